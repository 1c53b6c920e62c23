"""Sparse autoencoders (SAELens objects): loading, the token corpus, TopK training, quality."""
