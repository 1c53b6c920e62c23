"""Random models and SAEs of a chosen shape, for the tests and the benchmarks."""
