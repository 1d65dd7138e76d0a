"""The RHD evaluation protocol against hand-computed cases."""

import numpy as np
import pytest
import torch

from rhd.metrics import PCK_THRESHOLDS_MM, KeypointEvaluator, keypoint_errors_mm, trapezoid_auc


def offsets(errors_mm: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pred/gt [N, K, 3] (normalised) whose de-normalised errors are ``errors_mm`` [N, K], alternating the
    offset direction between x and a (3, 4, 0)/5 diagonal so that no single axis carries it."""
    n, k = errors_mm.shape
    gt = np.random.default_rng(0).normal(size=(n, k, 3))
    direction = np.where((np.arange(k) % 2 == 0)[:, None], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0])
    pred = gt + direction[None] * (errors_mm / 1000.0 / scale[:, None])[..., None]
    return pred, gt


def test_errors_use_the_ground_truth_scale_in_mm():
    gt = np.zeros((2, 21, 3))
    pred = gt.copy()
    pred[0, 4] = [0.3, 0.4, 0.0]  # 0.5 normalised units
    pred[1, 0] = [0.0, 0.0, -2.0]
    errors = keypoint_errors_mm(pred, gt, np.array([0.02, 0.01]))
    expected = np.zeros((2, 21))
    expected[0, 4] = 10.0  # 0.5 * 0.02 m
    expected[1, 0] = 20.0  # 2 * 0.01 m
    np.testing.assert_allclose(errors, expected, atol=1e-12)


def test_two_error_levels_by_hand():
    # Sample 0: every keypoint 10 mm off, sample 1: 30 mm off.
    errors = np.array([[10.0] * 21, [30.0] * 21])
    scale = np.array([0.02, 0.04])
    evaluator = KeypointEvaluator()
    evaluator.update(*offsets(errors, scale), scale)
    result = evaluator.compute()
    assert result["mean_epe_mm"] == pytest.approx(20.0)
    assert result["median_epe_mm"] == pytest.approx(20.0)
    thresholds = np.arange(20) * 50.0 / 19.0
    np.testing.assert_allclose(result["pck_thresholds_mm"], thresholds)
    # 10 mm passes from threshold 4 (10.53 mm) on; 30 mm from threshold 12 (31.58 mm) on.
    np.testing.assert_allclose(result["pck_curve"], [0.0] * 4 + [0.5] * 8 + [1.0] * 8)
    # AUC 20-50 uses thresholds 8..19 (21.05..50 mm), spacing d = 50/19: values 0.5 at 8..11, 1 at 12..19.
    # Trapezoid area = d * (0.5/2 + 0.5 * 3 + 1 * 7 + 1/2) = 9.25 d over a span of 11 d.
    assert result["auc_20_50"] == pytest.approx(9.25 / 11.0)
    assert result["num_samples"] == 2 and result["num_keypoints_counted"] == 42
    np.testing.assert_allclose(result["per_keypoint_mean_epe_mm"], [20.0] * 21)


def test_median_is_the_mean_of_per_keypoint_medians():
    # Keypoint 0 errors [0, 0, 30] (median 0), keypoint 1 [30, 30, 30] (median 30): the mean of medians is 15,
    # while the pooled median of all six would be 30.
    errors = np.array([[0.0, 30.0], [0.0, 30.0], [30.0, 30.0]])
    scale = np.full(3, 0.05)
    evaluator = KeypointEvaluator()
    evaluator.update(*offsets(errors, scale), scale)
    result = evaluator.compute()
    assert result["median_epe_mm"] == pytest.approx(15.0)
    assert result["mean_epe_mm"] == pytest.approx((10.0 + 30.0) / 2)


def test_visible_only_averages_per_keypoint():
    # Keypoint 0 counts in both samples (10, 30 mm), keypoint 1 only in sample 0 (10 mm), keypoint 2 never.
    errors = np.array([[10.0, 10.0, 99.0], [30.0, 77.0, 99.0]])
    visible = np.array([[True, True, False], [True, False, False]])
    scale = np.array([0.03, 0.03])
    pred, gt = offsets(errors, scale)
    result_visible = KeypointEvaluator(visible_only=True)
    result_visible.update(pred, gt, scale, visible)
    result = result_visible.compute()
    assert result["mean_epe_mm"] == pytest.approx((20.0 + 10.0) / 2)  # pooled would be 50/3
    assert result["median_epe_mm"] == pytest.approx((20.0 + 10.0) / 2)
    assert result["num_keypoints_counted"] == 3
    assert np.isnan(result["per_keypoint_mean_epe_mm"][2])
    # PCK at 10.53 mm: keypoint 0 passes in 1 of 2 samples, keypoint 1 in 1 of 1 -> (0.5 + 1) / 2.
    assert result["pck_curve"][4] == pytest.approx(0.75)

    everything = KeypointEvaluator()
    everything.update(pred, gt, scale, visible)
    assert everything.compute()["mean_epe_mm"] == pytest.approx(errors.mean())


def test_perfect_prediction():
    gt = np.random.default_rng(1).normal(size=(4, 21, 3))
    evaluator = KeypointEvaluator()
    evaluator.update(gt, gt, np.full(4, 0.04))
    result = evaluator.compute()
    assert result["mean_epe_mm"] == 0.0 and result["median_epe_mm"] == 0.0
    assert result["pck_curve"] == [1.0] * 20  # error 0 <= threshold 0
    assert result["auc_20_50"] == pytest.approx(1.0)


def test_batches_accumulate_and_accept_tensors():
    rng = np.random.default_rng(2)
    errors = rng.uniform(0.0, 60.0, size=(10, 21))
    scale = rng.uniform(0.03, 0.05, size=10)
    pred, gt = offsets(errors, scale)
    whole = KeypointEvaluator()
    whole.update(pred, gt, scale)
    batched = KeypointEvaluator()
    for chunk in (slice(0, 3), slice(3, 10)):
        batched.update(torch.from_numpy(pred[chunk]), torch.from_numpy(gt[chunk]), torch.from_numpy(scale[chunk]))
    batched_result, whole_result = batched.compute(), whole.compute()
    assert batched_result.keys() == whole_result.keys()
    for key in whole_result:
        np.testing.assert_allclose(batched_result[key], whole_result[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(batched.errors_mm, errors, atol=1e-9)
    assert whole.compute()["mean_epe_mm"] == pytest.approx(errors.mean())
    # Pooled PCK equals the mean of per-keypoint PCKs when every keypoint counts in every sample.
    np.testing.assert_allclose(whole.compute()["pck_curve"],
                               (errors[..., None] <= PCK_THRESHOLDS_MM).mean(axis=(0, 1)))
    bf16 = KeypointEvaluator()
    bf16.update(torch.zeros(2, 21, 3, dtype=torch.bfloat16), torch.zeros(2, 21, 3), torch.full((2,), 0.04))
    assert bf16.compute()["mean_epe_mm"] == 0.0
    batched.reset()
    with pytest.raises(ValueError, match="no keypoint errors"):
        batched.compute()


def test_trapezoid_auc_by_hand():
    assert trapezoid_auc([0.0, 1.0], [0.0, 2.0]) == pytest.approx(0.5)
    assert trapezoid_auc([0.2, 0.4, 1.0], [20.0, 30.0, 50.0]) == pytest.approx((0.3 * 10 + 0.7 * 20) / 30)


def test_bad_input_is_reported():
    evaluator = KeypointEvaluator(visible_only=True)
    with pytest.raises(ValueError, match="visible is required"):
        evaluator.update(np.zeros((2, 21, 3)), np.zeros((2, 21, 3)), np.ones(2))
    with pytest.raises(ValueError, match=r"pred and gt must both be \[N, K, 3\]"):
        keypoint_errors_mm(np.zeros((2, 21, 3)), np.zeros((2, 20, 3)), np.ones(2))
    with pytest.raises(ValueError, match=r"scale must be \[N\]"):
        keypoint_errors_mm(np.zeros((2, 21, 3)), np.zeros((2, 21, 3)), np.ones(3))
    with pytest.raises(ValueError, match="thresholds_mm"):
        KeypointEvaluator(thresholds_mm=[10.0, 5.0])
