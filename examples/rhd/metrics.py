"""The standard 3-D hand-pose evaluation on RHD (Zimmermann & Brox 2017 and the work that follows it; docs/handpose.md).
Keypoint k's error is ``||pred_k - gt_k|| * scale`` in mm, both normalised root-relative (``(xyz - root) / scale``) and
de-normalised with the ground-truth scale. As the common evaluation code (``EvalUtil``), every statistic is computed
per keypoint over the samples where it counts, then averaged over keypoints; the AUC over 20-50 mm takes the curve on
``linspace(0, 50, 20)`` from 21.05 to 50 mm (the last 12 points), trapezoids, divided by that span."""

import numpy as np
import torch

PCK_THRESHOLDS_MM = np.linspace(0.0, 50.0, 20)
AUC_RANGE_MM = (20.0, 50.0)
Array = np.ndarray | torch.Tensor


def _as_numpy(value: Array) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        dtype = torch.float64 if value.is_floating_point() else value.dtype  # numpy has no bfloat16
        value = value.detach().to(device="cpu", dtype=dtype).numpy()
    return np.asarray(value)


def keypoint_errors_mm(pred: Array, gt: Array, scale: Array) -> np.ndarray:
    """Per-keypoint Euclidean errors in mm. pred, gt: [N, K, 3] normalised root-relative keypoints; scale: [N]
    ground-truth scales in metres. Returns float64 [N, K]."""
    pred, gt = _as_numpy(pred).astype(np.float64), _as_numpy(gt).astype(np.float64)
    scale = _as_numpy(scale).astype(np.float64).reshape(-1)
    if pred.ndim != 3 or pred.shape[-1] != 3 or pred.shape != gt.shape:
        raise ValueError(f"pred and gt must both be [N, K, 3], got pred {pred.shape} and gt {gt.shape}")
    if scale.shape != (pred.shape[0],):
        raise ValueError(f"scale must be [N] with N = {pred.shape[0]}, got {scale.shape}")
    return np.linalg.norm(pred - gt, axis=-1) * scale[:, None] * 1000.0


def trapezoid_auc(curve: np.ndarray, thresholds: np.ndarray) -> float:
    """Area under ``curve`` over ``thresholds`` (trapezoids) divided by their span: [0, 1] for a PCK curve."""
    curve, thresholds = np.asarray(curve, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)
    area = np.sum(0.5 * (curve[1:] + curve[:-1]) * np.diff(thresholds))
    return float(area / (thresholds[-1] - thresholds[0]))


class KeypointEvaluator:
    """Accumulates keypoint errors over batches and computes the standard RHD scores. thresholds_mm: the PCK thresholds;
    visible_only: count only keypoints whose ``visible`` flag is set (default: all count)."""

    def __init__(self, thresholds_mm: np.ndarray = PCK_THRESHOLDS_MM, visible_only: bool = False):
        self.thresholds_mm = np.asarray(thresholds_mm, dtype=np.float64)
        if self.thresholds_mm.ndim != 1 or len(self.thresholds_mm) < 2 or np.any(np.diff(self.thresholds_mm) <= 0):
            raise ValueError(f"thresholds_mm must be an increasing 1-D array of >= 2 values, got {thresholds_mm!r}")
        self.visible_only = visible_only
        self.reset()

    def reset(self) -> None:
        self._errors: list[np.ndarray] = []
        self._counted: list[np.ndarray] = []

    def update(self, pred: Array, gt: Array, scale: Array, visible: Array | None = None) -> None:
        """Add a batch: pred, gt, scale as in keypoint_errors_mm; visible: bool [N, K], required if ``visible_only``."""
        errors = keypoint_errors_mm(pred, gt, scale)
        if self._errors and errors.shape[1] != self._errors[0].shape[1]:
            raise ValueError(f"every batch must have the same number of keypoints: got {errors.shape[1]}, "
                             f"earlier {self._errors[0].shape[1]}")
        if self.visible_only and visible is None:
            raise ValueError("visible is required when visible_only=True")
        counted = _as_numpy(visible).astype(bool) if self.visible_only else np.ones(errors.shape, dtype=bool)
        if counted.shape != errors.shape:
            raise ValueError(f"visible must be [N, K] = {errors.shape}, got {counted.shape}")
        self._errors.append(errors)
        self._counted.append(counted)

    @property
    def errors_mm(self) -> np.ndarray:
        """All errors fed so far, float64 [N, K] (e.g. to gather across processes)."""
        return np.concatenate(self._errors) if self._errors else np.zeros((0, 0))

    @property
    def counted(self) -> np.ndarray:
        """Which entries of :attr:`errors_mm` count, bool [N, K]."""
        return np.concatenate(self._counted) if self._counted else np.zeros((0, 0), dtype=bool)

    def compute(self) -> dict:
        """Scores over everything fed so far: mean_epe_mm, median_epe_mm, per_keypoint_mean_epe_mm (K floats, NaN
        where none counts), pck_thresholds_mm, pck_curve (in [0, 1]), auc_20_50, num_samples, num_keypoints_counted."""
        errors, counted = self.errors_mm, self.counted
        if errors.size == 0 or not counted.any():
            raise ValueError("no keypoint errors to evaluate: call update() with at least one counted keypoint")
        per_keypoint = [errors[counted[:, k], k] for k in range(errors.shape[1])]  # each keypoint's counted errors
        per_keypoint_mean = [float(values.mean()) if len(values) else float("nan") for values in per_keypoint]
        scored = [values for values in per_keypoint if len(values)]  # the statistics below skip uncounted keypoints
        medians = [np.median(values) for values in scored]
        curve = np.mean([(values[:, None] <= self.thresholds_mm[None, :]).mean(axis=0) for values in scored], axis=0)
        in_range = (self.thresholds_mm >= AUC_RANGE_MM[0]) & (self.thresholds_mm <= AUC_RANGE_MM[1])
        if in_range.sum() < 2:
            raise ValueError(f"fewer than 2 thresholds lie within {AUC_RANGE_MM} mm, so auc_20_50 is undefined")
        return {"mean_epe_mm": float(np.nanmean(per_keypoint_mean)), "median_epe_mm": float(np.mean(medians)),
                "per_keypoint_mean_epe_mm": per_keypoint_mean, "pck_thresholds_mm": self.thresholds_mm.tolist(),
                "pck_curve": curve.tolist(), "auc_20_50": trapezoid_auc(curve[in_range], self.thresholds_mm[in_range]),
                "num_samples": int(errors.shape[0]), "num_keypoints_counted": int(counted.sum())}
