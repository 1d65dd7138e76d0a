"""Both pipelines' command lines: every option has help text that shows its default, and every bad
invocation ends with one line on stderr that names the option, exit status 2 and no traceback."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import handpose_rhd
import surgical_seg

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"handpose_rhd.py": handpose_rhd, "surgical_seg.py": surgical_seg}
TINY = ["--epochs", "1", "--batch-size", "4", "--num-points", "32", "--latent-dim", "8", "--test-corruption", "0",
        "--no-progress"]
NO_CUDA = not torch.cuda.is_available()


def help_blocks(text: str) -> dict[str, str]:
    """Option string -> the rest of its entry in ``--help`` (metavar and help, joined on one line)."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--?[\w-]+)(?:,\s*--[\w-]+)?(.*)$", line)
        if match:
            current = match.group(1)
            blocks[current] = match.group(2).strip()
        elif current and line.startswith("      "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_that_shows_its_default(script, capsys):
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script].parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    options = set(re.findall(r"\[(--[\w-]+)", usage)) - {"--help"}
    blocks = help_blocks(text)
    assert options and options <= set(blocks), options - set(blocks)
    for option in options:
        entry = blocks[option]
        described = re.sub(r"^(\{[^}]*\}|[A-Z_]+(?: \[[A-Z_ .]+\])?(?: [A-Z]+)*)\s*", "", entry)
        assert "(default:" in entry, f"{option}: no default shown in {entry!r}"
        assert described and not described.startswith("(default:"), f"{option}: no help text in {entry!r}"
        assert "default: None" not in entry, f"{option}: shows a meaningless default in {entry!r}"


def one_line_error(capsys, call) -> str:
    """Run call(); it must exit with status 2 after printing exactly one line on stderr. Returns it."""
    with pytest.raises(SystemExit) as info:
        call()
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


BAD_OPTIONS = [
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "four"], "--batch-size"),
    (["--max-steps", "0"], "--max-steps"),
    (["--lr", "-1e-3"], "--lr"),
    (["--workers", "-2"], "--workers"),
    (["--test-corruption", "0", "1.5"], "--test-corruption"),
    (["--data-corruption", "2"], "--data-corruption"),
    (["--preset", "paper"], "--preset"),
    (["--data-root", "{tmp}/no_such_folder"], "--data-root"),
    (["--rgb-weights", "{tmp}/no_such_file.pth"], "--rgb-weights"),
    (["--rgb-weights", "{tmp}/garbage.pth"], "--rgb-weights"),
    (["--rgb-weights", "{tmp}/other_net.pth"], "--rgb-weights"),
    (["--out", "{tmp}/garbage.pth"], "--out"),
    (["--seeds", "0"], "--seeds"),
    (["--corruption-sweep", "1.5"], "--corruption-sweep"),
    (["--corruption-sweep", "0.5", "0", "0.5"], "--corruption-sweep"),
    (["--corruption-sweep", "0", "0.5", "--data-corruption", "0.25"], "--corruption-sweep"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("argv, option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_naming_it(script, argv, option, tmp_path, capsys):
    (tmp_path / "garbage.pth").write_bytes(b"not weights\n" * 10)
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "other_net.pth")
    argv = [a.format(tmp=tmp_path) for a in argv]
    line = one_line_error(capsys, lambda: SCRIPTS[script].main(argv))
    assert f"error: argument {option}:" in line


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is present")
@pytest.mark.parametrize("script", SCRIPTS)
def test_cuda_without_a_device_is_one_line(script, capsys):
    line = one_line_error(capsys, lambda: SCRIPTS[script].main(["--device", "cuda"]))
    assert "argument --device: cuda was asked for" in line


def test_the_segmentation_options_are_checked(capsys):
    assert "argument --image-size: expected a power of two" in one_line_error(
        capsys, lambda: surgical_seg.main(["--image-size", "48"]))
    assert "argument --intrinsics: expected a positive" in one_line_error(
        capsys, lambda: surgical_seg.main(["--intrinsics", "0", "256", "255.5", "127.5"]))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_folder_that_is_not_the_dataset_is_one_line(script, tmp_path, capsys):
    (tmp_path / "training").mkdir()  # something, but not the dataset's layout
    line = one_line_error(capsys, lambda: SCRIPTS[script].main(["--data-root", str(tmp_path), "--out",
                                                                 str(tmp_path / "out")] + TINY))
    assert "error: --data-root:" in line and str(tmp_path) in line


def test_a_damaged_dataset_is_one_line(rhd_root, tmp_path, capsys):
    damaged = tmp_path / "RHD_published_v2"
    for split in ("training", "evaluation"):
        (damaged / split).mkdir(parents=True)
        (damaged / split / f"anno_{split}.pickle").write_bytes((rhd_root / split / f"anno_{split}.pickle").read_bytes())
    argv = ["--data-root", str(damaged), "--out", str(tmp_path / "out"), "--num-train", "8", "--num-eval", "4"]
    line = one_line_error(capsys, lambda: handpose_rhd.main(argv + TINY))
    assert "error: --data-root: RHD image not found:" in line


def test_more_samples_or_a_larger_batch_than_the_data_has(rhd_root, sim2real_root, tmp_path, capsys):
    line = one_line_error(capsys, lambda: handpose_rhd.main(["--data-root", str(rhd_root), "--out", str(tmp_path),
                                                             "--num-train", "9", "--num-eval", "4"] + TINY))
    assert "error: --num-train: 9 samples requested, but" in line and "has 8" in line
    line = one_line_error(capsys, lambda: surgical_seg.main(["--data-root", str(sim2real_root), "--out", str(tmp_path),
                                                             "--num-train", "8", "--num-eval", "9", "--split", "scene"]
                                                            + TINY))
    assert "error: --num-eval: 9 views requested" in line
    line = one_line_error(capsys, lambda: surgical_seg.main(["--data-root", str(sim2real_root), "--out", str(tmp_path),
                                                             "--num-train", "8", "--num-eval", "9"] + TINY))
    assert "error: --num-train: 8 views requested, but the 7 scenes have 5 besides the 9 test views" in line
    line = one_line_error(capsys, lambda: handpose_rhd.main(["--data-root", str(rhd_root), "--out", str(tmp_path),
                                                             "--num-train", "8", "--num-eval", "4"] + TINY
                                                            + ["--batch-size", "16"]))
    assert "error: --batch-size: 16 is more than the 8 training samples" in line


def test_resuming_a_checkpoint_of_another_configuration(rhd_root, tmp_path, capsys):
    argv = ["--data-root", str(rhd_root), "--out", str(tmp_path), "--num-train", "8", "--num-eval", "4",
            "--crop-size", "32", "--max-steps", "1"] + TINY
    handpose_rhd.main(argv)
    capsys.readouterr()
    line = one_line_error(capsys, lambda: handpose_rhd.main(argv + ["--latent-dim", "16", "--resume"]))
    assert "error: --resume: the checkpoint" in line and "latent_dim: 8 there, 16 here" in line
    # How the run executes may change: other workers, no progress bars, another evaluation batch.
    handpose_rhd.main(argv + ["--resume", "--workers", "1", "--eval-batch-size", "2"])
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    line = one_line_error(capsys, lambda: handpose_rhd.main(argv + ["--resume"]))
    assert "error: --resume: checkpoint" in line and "not a gpoe_fusion checkpoint" in line


def run_script(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]))
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *argv], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script, argv, expected", [
    ("handpose_rhd.py", ["--epochs", "-1"],
     "handpose_rhd.py: error: argument --epochs: expected a positive integer, got -1"),
    ("surgical_seg.py", ["--data-root", "{tmp}"], "surgical_seg.py: error: --data-root: Sim2Real folder missing:"),
])
def test_the_scripts_themselves_end_bad_invocations_in_one_line(script, argv, expected, tmp_path):
    proc = run_script(script, *[a.format(tmp=tmp_path) for a in argv], "--no-progress", "--out", str(tmp_path / "o"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), proc.stderr
