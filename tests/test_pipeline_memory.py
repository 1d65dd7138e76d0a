"""Memory at full size: a full-preset run over 4000 built-in training frames at 256x256, streamed
by two loader workers, stays under 2 GiB for the whole process tree.

Slow (it generates 4032 built-in frames once, into the default cache folder, and trains two steps
of the full-size model on the CPU): ``pytest -m slow tests/test_pipeline_memory.py -s``.

The tree's memory is the sum of the proportional set sizes (PSS, /proc/<pid>/smaps_rollup) of the
script and its worker processes, sampled every 20 ms: workers are forked from the script and share
most of its pages, which a sum of resident set sizes would count once per process.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import default_cache_dir
from rhd.synthetic import ensure_builtin_rhd

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 2 * 1024**3


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes of ``pid`` and all its descendants."""
    children, todo, pss, rss = _children(), [pid], 0, 0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Pss:", "Rss:")):
                        kib = int(line.split()[1]) * 1024
                        pss, rss = (pss + kib, rss) if line.startswith("Pss:") else (pss, rss + kib)
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return pss, rss


def run_and_sample(cmd: list[str], env: dict,
                   interval: float = 0.02) -> tuple[subprocess.CompletedProcess, int, int, float]:
    """Run ``cmd``; returns (the finished process, peak tree PSS, peak tree RSS sum, wall seconds)."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = tree_memory(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(interval)
    out = proc.stdout.read()
    return subprocess.CompletedProcess(cmd, proc.returncode, out), peak_pss, peak_rss, time.perf_counter() - began


@pytest.mark.slow
def test_a_full_size_run_over_4000_frames_stays_under_2_gib(tmp_path):
    began = time.perf_counter()
    ensure_builtin_rhd(default_cache_dir(), 4000, 32, progress=False)
    print(f"built-in data ready in {time.perf_counter() - began:.0f} s")
    cmd = [sys.executable, str(ROOT / "examples" / "handpose_rhd.py"), "--preset", "full", "--num-train", "4000",
           "--num-eval", "32", "--batch-size", "8", "--epochs", "1", "--max-steps", "2", "--workers", "2",
           "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]))
    proc, pss, rss, seconds = run_and_sample(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    print(f"peak memory of the process tree: {pss / 2**20:.0f} MiB PSS ({rss / 2**20:.0f} MiB as a sum of RSS), "
          f"{seconds:.0f} s")
    assert pss < LIMIT
