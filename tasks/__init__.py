"""Downstream task kinds: one file per kind (classification, segmentation, retrieval), not per dataset."""
