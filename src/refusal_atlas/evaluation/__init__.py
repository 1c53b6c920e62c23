"""Judging and measuring a model: the substring and HarmBench judges, cross-entropy, capability
benchmarks.
"""
