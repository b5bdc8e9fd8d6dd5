"""Downstream task kinds: one file per kind (classification, segmentation, retrieval), not per dataset.

``_head`` holds what the kinds that train a head share (classification and segmentation): the optimiser, the
fine-tune copy of the encoder, early stopping, checkpoint selection and the test with the best checkpoint.
"""
