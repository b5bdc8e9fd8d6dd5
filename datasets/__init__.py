"""Datasets: the embedded phantoms and exact-format adapters for real datasets (one file each)."""
