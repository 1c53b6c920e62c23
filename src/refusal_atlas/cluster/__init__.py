"""What a cluster job needs: the LA-IG memory model and GPUs per rule."""
