"""Hydra config groups, shipped inside the package as ``medvlp_bench.configs``."""
