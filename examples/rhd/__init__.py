"""The RHD side of the hand-pose pipeline: the restricted annotation reader (``annotations``), the loader (``dataset``),
the built-in data (``synthetic``) and the 3-D evaluation (``metrics``)."""
