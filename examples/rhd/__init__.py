"""The RHD side of the hand-pose pipeline: annotation reader, loader, built-in data and 3-D evaluation."""
