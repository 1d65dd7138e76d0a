"""An independent float64 oracle for the weighted product of Gaussians, in numpy.

It uses the textbook precision form (paper Eq. 8-9), which is exact in float64 for |logvar| <= 80
(precisions stay within 1e-35..1e35), and shares no code with the package.
"""

from __future__ import annotations

import numpy as np


def weighted_product(mu, logvar, logits=None, mask=None, prior_expert=False):
    """mu, logvar: [M, *batch, D]; logits broadcastable or None (moderate values: |logits| < 300);
    mask bool [M, *batch] or None. Returns joint mu, joint logvar [*batch, D] as float64 arrays."""
    mu = np.asarray(mu, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    present = np.ones(mu.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    present = np.broadcast_to(present[..., None], mu.shape)
    if logits is None:
        alpha = np.ones_like(mu)
    else:
        e = np.where(present, np.exp(np.broadcast_to(np.asarray(logits, dtype=np.float64), mu.shape)), 0.0)
        total = e.sum(axis=0, keepdims=True)
        alpha = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    precision = np.where(present, alpha * np.exp(-logvar), 0.0)
    total_precision = precision.sum(axis=0) + (1.0 if prior_expert else 0.0)
    total_weighted = (precision * np.where(present, mu, 0.0)).sum(axis=0)
    return total_weighted / total_precision, -np.log(total_precision)
