"""benchmarks/render_tables.py turns a benchmark file into the markdown tables of docs/kernels.md,
for files with a layer section and for older ones without."""

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H200 = ROOT / "benchmarks" / "results" / "h200_2026-11-27.json"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def render():
    return load("render_tables")


@pytest.fixture(scope="module")
def bench():
    return load("bench_fusion")


def bench_file(bench) -> dict:
    """A file as bench_fusion.py --json writes it (its own records), CPU and CUDA, both sections."""
    def record(row):
        return {**asdict(row.config), **{k: v for k, v in asdict(row).items() if k != "config"}}

    rows = []
    for device, dtype, m, batch, d in (("cpu", "float32", 4, 16384, 256), ("cuda", "bfloat16", 4, 65536, 1024)):
        for i, pass_name in enumerate(bench.PASSES):
            row = bench.Row(bench.Config(device, dtype, m, batch, d), pass_name,
                            {"kernel": 1.2341 + i, "eager": 6.5432 + i, "compile": 3.25 + i}, 1 << 30, 1 << 20,
                            kernel_gbps=870.06 - i, speedup={"eager": 5.3, "compile": 2.6339 - i})
            if device == "cuda":
                row.fraction_of_copy = 0.8551 - 0.1 * i
            else:
                row.exp_floor_ms, row.bound = 2.0, "exp"
                if pass_name == "backward":  # a row bound by memory
                    row.memory_floor_ms, row.bound = 4.0, "memory"
            rows.append(record(row))
    layer_rows = [bench.LayerRow(path, pass_name, ms) for path, pass_name, ms in (
        ("F.gpoe", "forward", 9.61), ("F.gpoe validate=False", "forward", 9.0), ("PoE", "forward+backward", 10.0),
        ("PoE torch", "forward+backward", 40.04))]
    layers = {"rows": [asdict(r) for r in layer_rows], "targets": bench.layer_ratios(layer_rows)}
    environment = {"torch": "2.14.1", "cpu_threads": 16, "cpu_model": "AMD EPYC", "gpu": "NVIDIA H200",
                   "started": "2026-12-02 10:00:00",
                   "seconds": 41.6, "malloc": "default", "copy_gbps": {"cuda": 4212.6, "cpu": 38.85},
                   "exp_per_s": 2.99e9, "truncated": True}
    return {"environment": environment, "rows": rows, "layers": {"cpu": layers, "cuda": layers}}


def test_older_file_without_layers_gives_the_documented_gpu_tables(render):
    text = render.render(json.loads(H200.read_text()), H200.name)
    lines = text.splitlines()
    assert "Run 2026-11-27 11:47:06 (62 s): NVIDIA H200, torch 2.11.0+cu130, 16 CPU threads; cuda copy 4213 GB/s." \
        in lines
    header = ("| dtype | M | B | D | pass | kernel ms | eager ms | compile ms | x eager | x compile | kernel GB/s "
              "| % of copy |")
    assert lines[lines.index(header) + 1] == "| --- | ---: | ---: | ---: | --- | " + "---: | " * 6 + "---: |"
    assert lines[lines.index(header) + 2] == \
        "| float32 | 4 | 65536 | 1024 | forward | 1.072 | 6.432 | 3.588 | 6.00 | 3.35 | 3505.7 | 83% |"
    assert "| bfloat16 | 8 | 65536 | 1024 | backward | 3.158 | 13.925 | 2.946 | 4.41 | 0.93 | 2125.1 | 50% |" in lines
    assert sum(line.startswith(("| float32 |", "| bfloat16 |")) for line in lines) == 54
    start = lines.index("| | float32 | bfloat16 | target |")
    assert lines[start + 1:start + 6] == [
        "| --- | --- | --- | --- |",
        "| forward, % of copy bandwidth | 83% (1.07 ms) | 47% (0.96 ms) | >= 85% |",
        "| backward, % of copy bandwidth | 79% (2.11 ms) | 50% (1.66 ms) | >= 85% |",
        "| forward+backward vs torch.compile | 3.33x | 3.25x | >= 1.3x |",
        "| forward+backward vs eager | 4.23x | 6.80x | - |",
    ]
    assert "layer path" not in text


def test_file_with_layers_and_both_devices(render, bench):
    lines = render.render(bench_file(bench), "bench.json").splitlines()
    assert lines[0] == "<!-- rendered by benchmarks/render_tables.py from bench.json -->"
    assert lines[2] == ("Run 2026-12-02 10:00:00 (42 s): NVIDIA H200, torch 2.14.1, 16 CPU threads (AMD EPYC), malloc: "
                        "default; cuda copy 4213 GB/s, cpu copy 38.9 GB/s, CPU torch.exp 2.99 G elements/s. The time "
                        "limit was reached: later configurations were not measured.")
    # CPU rows: milliseconds to 0.1, kernel time over the larger floor and which; CUDA rows: to the microsecond,
    # % of copy.
    assert "| float32 | 4 | 16384 | 256 | forward | 1.2 | 6.5 | 3.2 | 5.3 | 2.6 | 870.1 | 0.62 (exp) |" in lines
    assert "| float32 | 4 | 16384 | 256 | backward | 3.2 | 8.5 | 5.2 | 5.3 | 0.6 | 868.1 | 0.81 (memory) |" in lines
    assert "| bfloat16 | 4 | 65536 | 1024 | forward+backward | 2.234 | 7.543 | 4.250 | 5.30 | 1.63 | 869.1 | 76% |" \
        in lines
    # The targets table has a column for each dtype measured at the target configuration only.
    start = lines.index("| | bfloat16 | target |")
    assert lines[start + 2:start + 6] == [
        "| forward, % of copy bandwidth | 86% (1.23 ms) | >= 85% |",
        "| backward, % of copy bandwidth | 66% (3.23 ms) | >= 85% |",
        "| forward+backward vs torch.compile | 1.63x | >= 1.3x |",
        "| forward+backward vs eager | 5.30x | - |",
    ]
    for device, forward in (("cpu", "9.6"), ("cuda", "9.610")):
        start = lines.index(f"The layer path on {device} (M=4, D=256, float32; median ms):")
        table = lines[start + 2:start + 8]
        assert table[0] == "| path | forward ms | fwd+bwd ms |" and table[1] == "| --- | ---: | ---: |"
        assert table[2] == f"| `F.gpoe` | {forward} | - |"
        assert table[5].startswith("| `PoE torch` | - | 40.0")
    assert "| default checks, F.gpoe forward (<= 1.1) | 1.07 (met) |" in lines
    assert "| PoE layer: backend=torch over kernel, fwd+bwd (>= 5.0) | 4.00 (not met) |" in lines


def test_command_line_writes_the_file(render, tmp_path, capsys):
    out = tmp_path / "tables.md"
    assert render.main([str(H200), "-o", str(out)]) == 0
    assert out.read_text() == render.render(json.loads(H200.read_text()), H200.name)
    assert render.main([str(H200)]) == 0
    assert capsys.readouterr().out == out.read_text()


def test_mopoe_section_is_rendered_from_the_committed_cpu_run(render):
    path = ROOT / "benchmarks" / "results" / "cpu-2core_2026-12-01_mopoe_malloc-reuse.json"
    data = json.loads(path.read_text())
    text = render.render(data, path.name)
    row = next(r for r in data["mopoe"]["cpu"] if r["m"] == 4 and r["pass_name"] == "forward+backward")
    line = next(line for line in text.splitlines() if line.startswith("| 4 | 15 | forward+backward |"))
    assert f"| {row['ms']['mopoe']:.2f} |" in line and f"| {row['speedup']['loop torch']:.2f} |" in line
    assert "MoPoE on cpu against loops over the subsets" in text
