"""The RHD (Rendered Hand Pose Dataset) side of the hand-pose pipeline.

- ``rhd.annotations``: the restricted reader (and the writer) of ``anno_<split>.pickle``.
- ``rhd.dataset``: ``read_frame`` for one raw frame, ``RHDDataset`` for the cropped, normalised samples.
- ``rhd.synthetic``: the built-in data, written in exactly the RHD on-disk format.
- ``rhd.metrics``: the standard 3-D evaluation (EPE in mm, PCK curve, AUC over 20-50 mm).
"""
