"""Pinned, checksummed datasets and the prompt sets built from them, with their selectors."""
