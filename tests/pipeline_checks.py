"""Checks both example pipelines share: an exact kill-and-resume, a two-process torchrun run, the
held-out credibility and the joint inference every fusion's results hold."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import training
from common.evaluation import PREDICTIONS
from common.training import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CREDIBILITY_KEYS = {"auroc", "auroc_alpha", "auroc_share", "weight_clean", "weight_corrupted", "alpha_clean",
                    "alpha_corrupted", "effective_experts", "samples"}


def check_credibility(result: dict, fusion: str, samples: int, kind: str = "pixels") -> None:
    """``result`` (a fusion's entry of results.json) holds the held-out credibility of both modalities:
    every measure, the corruption used (of --corruption-kind ``kind``), and for PoE and MoE a uniform
    alpha (AUROC 0.5)."""
    credibility = result["credibility"]
    assert set(credibility) == {"rgb", "points"}, fusion
    corruptions = ({"rgb": {"pixel_corruption": 0.9}, "points": {"point_noise": 1.0}} if kind == "pixels"
                   else {"rgb": {"desync": True}, "points": {"desync": True}})
    for modality, corruption in corruptions.items():
        assert set(credibility[modality]) == CREDIBILITY_KEYS | set(corruption)
        assert {k: credibility[modality][k] for k in corruption} == corruption
    for measures in credibility.values():
        assert measures["samples"] == samples
        for key in ("auroc", "auroc_alpha", "auroc_share", "weight_clean", "weight_corrupted"):
            assert 0 <= measures[key] <= 1, (fusion, key, measures[key])
        assert 1 <= measures["effective_experts"] <= 2
        if fusion != "gpoe":
            assert measures["auroc_alpha"] == 0.5 and measures["alpha_clean"] == measures["alpha_corrupted"] == 0.5
        if fusion == "gpoe":
            assert measures["auroc"] == measures["auroc_alpha"]
        if fusion == "poe":  # its own weight is the precision share
            assert measures["auroc"] == measures["auroc_share"]


def check_joint_inference(result: dict, metric: str, rgb_levels: list[str], noise_levels: list[str],
                          distinct: bool = True) -> None:
    """``result`` (a fusion's entry of results.json) holds every metric group at its test levels (the RGB's or the
    points'), ``metric`` finite in each. With every test sample corrupted (pixel corruption and point noise above level
    0; desync at level 1, the only level above 0 this accepts for it), the oracle (the joint with the corrupted
    modality masked) is the other modality alone at every level above 0, and with nothing masked the joint. distinct:
    the joint is neither modality alone and the points' noise changes the points alone (for a metric that a nearly
    untrained model's predictions do not leave unchanged)."""
    for group, (_, corrupted) in PREDICTIONS.items():
        assert list(result[group]) == (rgb_levels if corrupted == "rgb" else noise_levels), group
        assert all(math.isfinite(scores[metric]) for scores in result[group].values()), group
    assert rgb_levels[0] == noise_levels[0] == "0.0"
    rgb_alone, points_alone, joint = (result[g]["0.0"][metric] for g in ("metrics", "metrics_aux", "metrics_joint"))
    assert result["metrics_joint_aux_corrupted"]["0.0"][metric] == joint
    assert result["metrics_oracle"]["0.0"][metric] == pytest.approx(joint, rel=1e-5)
    for level in rgb_levels[1:]:
        assert result["metrics_oracle"][level][metric] == pytest.approx(points_alone, rel=1e-5), level
    for level in noise_levels[1:]:
        assert result["metrics_oracle_aux_corrupted"][level][metric] == pytest.approx(rgb_alone, rel=1e-5), level
    if distinct:
        assert joint != pytest.approx(points_alone, rel=1e-4) and joint != pytest.approx(rgb_alone, rel=1e-4)
        assert result["metrics_aux"][noise_levels[-1]][metric] != points_alone


def check_kill_and_resume(main, args_for, out: Path, monkeypatch, fusion: str = "gpoe") -> None:
    """A run killed in its second epoch and resumed ends exactly where an uninterrupted one does.

    main: the script's main(argv); args_for(out_dir, *extra) -> argv of a two-epoch tiny run.
    """
    main(args_for(out / "full", "--fusion", fusion))
    full = load_checkpoint(out / "full" / "checkpoint.pt")

    original = training.train_one_epoch

    def killed_in_second_epoch(*args, **kwargs):
        if args[4] == 1:  # the epoch argument
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(args_for(out / "killed", "--fusion", fusion))
    assert load_checkpoint(out / "killed" / "checkpoint.pt")["epoch"] == 0
    monkeypatch.setattr(training, "train_one_epoch", original)
    main(args_for(out / "killed", "--fusion", fusion, "--resume"))
    resumed = load_checkpoint(out / "killed" / "checkpoint.pt")
    assert resumed["epoch"] == full["epoch"] == 1
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    results = [json.loads((out / run / "results.json").read_text())["fusions"][fusion] for run in ("full", "killed")]
    assert [{group: r[group] for group in PREDICTIONS} for r in results] == [{group: results[0][group]
                                                                              for group in PREDICTIONS}] * 2


def free_port() -> int:
    """A TCP port no process on this machine listens on now (other test runs may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_torchrun(script: str, argv: list[str], out: Path) -> None:
    """Two CPU processes (gloo) train one epoch of PoE on streamed data (each rank's shard decoded by
    its loader worker) and write results.json."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "examples" / script)] + argv + ["--fusion", "poe", "--epochs", "1", "--device", "cpu",
                                                      "--no-in-memory", "--workers", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["fusions"]["poe"]["history"][0]["epoch"] == 1
