"""Pre-training methods: one file per method, selected by ``configs/method/<name>.yaml``."""
