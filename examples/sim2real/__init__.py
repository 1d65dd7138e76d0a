"""Surgical Video-Sim2Real: the on-disk loader, the built-in synthetic data generator, IoU/F1 metrics."""
