"""Depth maps to point clouds: back-projection through pinhole intrinsics and fixed-size resampling."""

from __future__ import annotations

import numpy as np

__all__ = ["backproject", "resample_points"]


def backproject(depth: np.ndarray, K: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Camera-frame 3-D points of the (masked) pixels of a z-depth map.

    depth: [H, W] z-depth (metres or scene units); K: [3, 3] pinhole intrinsics;
    mask: bool [H, W] or None (all pixels with depth > 0). Returns [P, 3] float32 points
    ``z * K^-1 [u, v, 1]``: pixel (u, v) sits at integer coordinates, the convention of the RHD
    annotations (``uv = (xyz @ K.T)[:, :2] / z``), so projecting a point back gives its pixel.
    """
    keep = depth > 0
    if mask is not None:
        keep &= mask
    v, u = np.nonzero(keep)
    z = depth[v, u].astype(np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x = (u - cx) * z / fx
    y = (v - cy) * z / fy
    return np.stack([x, y, z], axis=1).astype(np.float32)


def resample_points(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` points: a random subset when there are more, all of them plus random
    repeats when there are fewer. An empty cloud becomes ``count`` points at the origin.

    points: [P, 3]. Returns [count, 3] in the dtype of ``points``.
    """
    n = len(points)
    if n == 0:
        return np.zeros((count, 3), dtype=points.dtype)
    if n >= count:
        idx = rng.choice(n, size=count, replace=False)
    else:
        idx = np.concatenate([np.arange(n), rng.choice(n, size=count - n, replace=True)])
    return points[idx]
