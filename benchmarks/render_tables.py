"""Markdown tables of a benchmark file written by ``benchmarks/bench_fusion.py --json``, in the
layout docs/kernels.md uses, ready to paste there:

    python benchmarks/render_tables.py benchmarks/results/h200_2026-12-01.json > tables.md

Per device, the fused op against eager and torch.compile (GPU: kernel bandwidth as a share of the
device-to-device copy bandwidth measured in the same run; CPU: kernel time over the exp floor);
on the GPU, the targets at M=4, B=65536, D=1024; and, in files that have a ``layers`` or ``mopoe``
section (older files do not), the layer path and its targets, and MoPoE against loops over subsets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The configuration of the GPU performance targets, and the targets (docs/kernels.md).
GPU_TARGET = (4, 65536, 1024)
GPU_TARGETS = [
    ("forward, % of copy bandwidth", "forward", "copy", ">= 85%"),
    ("backward, % of copy bandwidth", "backward", "copy", ">= 85%"),
    ("forward+backward vs torch.compile", "forward+backward", "compile", ">= 1.3x"),
    ("forward+backward vs eager", "forward+backward", "eager", "-"),
]


def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; ``align`` has one letter per column: l(eft) or r(ight)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|" for cells in [header, rule, *rows]]


def cpu_floor(r: dict) -> str:
    """Kernel time over the row's larger floor and which one it is; files before the memory floor
    was measured have the exp floor only."""
    memory = r.get("memory_floor_ms") or 0.0
    bound = r.get("bound") or "exp"
    return f"{r['ms']['kernel'] / max(r['exp_floor_ms'], memory):.2f} ({bound})"


def op_table(rows: list[dict], device: str) -> list[str]:
    """The fused op's rows of one device, as in docs/kernels.md (GPU timings in us resolution)."""
    gpu = device == "cuda"
    ms, times = (".3f", ".2f") if gpu else (".1f", ".1f")
    last = "% of copy" if gpu else "kernel / floor (bound)"
    header = ["dtype", "M", "B", "D", "pass", "kernel ms", "eager ms", "compile ms", "x eager", "x compile",
              "kernel GB/s", last]
    body = []
    for r in rows:
        if gpu:
            share = "-" if r.get("fraction_of_copy") is None else f"{100 * r['fraction_of_copy']:.0f}%"
        else:
            share = "-" if not r.get("exp_floor_ms") else cpu_floor(r)
        body.append([r["dtype"], str(r["m"]), str(r["batch"]), str(r["d"]), r["pass_name"],
                     *(format(r["ms"][method], ms) for method in ("kernel", "eager", "compile")),
                     *(format(r["speedup"][method], times) for method in ("eager", "compile")),
                     f"{r['kernel_gbps']:.1f}", share])
    return table(header, body, align="lrrrlrrrrrrr")


def gpu_targets_table(rows: list[dict]) -> list[str]:
    """The GPU targets at GPU_TARGET, one column per dtype measured there; empty if none was."""
    at = {(r["dtype"], r["pass_name"]): r for r in rows if (r["m"], r["batch"], r["d"]) == GPU_TARGET}
    dtypes = list(dict.fromkeys(dtype for dtype, _ in at))
    if not dtypes:
        return []
    body = []
    for label, pass_name, measure, target in GPU_TARGETS:
        cells = []
        for dtype in dtypes:
            r = at.get((dtype, pass_name))
            if r is None:
                cells.append("-")
            elif measure == "copy":
                share = r.get("fraction_of_copy")
                cells.append("-" if share is None else f"{100 * share:.0f}% ({r['ms']['kernel']:.2f} ms)")
            else:
                cells.append(f"{r['speedup'][measure]:.2f}x")
        body.append([label, *cells, target])
    return table(["", *dtypes, "target"], body, align="l" * (len(dtypes) + 2))


def layer_tables(layer: dict, device: str) -> list[str]:
    """The layer path's median ms per path and pass, then its targets."""
    ms = ".3f" if device == "cuda" else ".1f"
    passes: dict[str, dict[str, float]] = {}
    for r in layer["rows"]:
        passes.setdefault(r["path"], {})[r["pass_name"]] = r["ms"]
    body = [[f"`{path}`", *(format(p[name], ms) if name in p else "-" for name in ("forward", "forward+backward"))]
            for path, p in passes.items()]
    lines = table(["path", "forward ms", "fwd+bwd ms"], body, align="lrr")
    if layer.get("targets"):
        targets = [[f"{t['target']} ({t['bound']})", f"{t['ratio']:.2f} ({'met' if t['met'] else 'not met'})"]
                   for t in layer["targets"]]
        lines += [""] + table(["target", "ratio"], targets, align="lr")
    return lines


def describe(env: dict) -> str:
    """One line on the run: when, where, and the reference rates measured in it."""
    parts = [f"torch {env['torch']}"]
    if env.get("gpu"):
        parts.insert(0, env["gpu"])
    parts.append(f"{env['cpu_threads']} CPU threads" + (f" ({env['cpu_model']})" if env.get("cpu_model") else ""))
    if env.get("malloc"):
        parts.append(f"malloc: {env['malloc']}")
    rates = [f"{device} copy {gbps:.0f} GB/s" if device == "cuda" else f"{device} copy {gbps:.1f} GB/s"
             for device, gbps in env.get("copy_gbps", {}).items()]
    if env.get("exp_per_s"):
        rates.append(f"CPU torch.exp {env['exp_per_s'] / 1e9:.2f} G elements/s")
    line = f"Run {env.get('started', '?')}"
    if env.get("seconds") is not None:
        line += f" ({env['seconds']:.0f} s)"
    line += ": " + ", ".join(parts) + (f"; {', '.join(rates)}" if rates else "") + "."
    if env.get("truncated"):
        line += " The time limit was reached: later configurations were not measured."
    return line


def render(data: dict, source: str) -> str:
    """All tables of one benchmark file as markdown."""
    lines = [f"<!-- rendered by benchmarks/render_tables.py from {source} -->", "", describe(data["environment"])]
    rows = data.get("rows", [])
    devices = list(dict.fromkeys(r["device"] for r in rows))
    for device in devices:
        rows_here = [r for r in rows if r["device"] == device]  # in the order measured: targets first
        lines += ["", f"The fused op on {device}, logits [M, B, D], no mask (median ms):", ""]
        lines += op_table(rows_here, device)
        if device == "cuda":
            targets = gpu_targets_table(rows_here)
            if targets:
                m, b, d = GPU_TARGET
                lines += ["", f"Against the targets (M={m}, B={b}, D={d}):", ""] + targets
    for device, layer in data.get("layers", {}).items():
        lines += ["", f"The layer path on {device} (M=4, D=256, float32; median ms):", ""]
        lines += layer_tables(layer, device)
    for device, mopoe in data.get("mopoe", {}).items():
        lines += ["", f"MoPoE on {device} against loops over the subsets (B={mopoe[0]['batch']}, D=256, float32; "
                      "median ms; x: the loop's time over mopoe's):", ""]
        lines += mopoe_table(mopoe)
    return "\n".join(lines) + "\n"


def mopoe_table(rows: list[dict]) -> list[str]:
    """bench_fusion.py's mopoe rows: F.mopoe against loops of F.poe over the subsets."""
    loops = ("loop torch", "loop compile", "loop kernel")
    header = ["M", "subsets", "pass", "mopoe ms"] + [f"{name} ms" for name in loops] + [f"x {name[5:]}" for name in loops]
    body = [[str(r["m"]), str(2 ** r["m"] - 1), r["pass_name"], f"{r['ms']['mopoe']:.2f}"]
            + [f"{r['ms'][name]:.2f}" for name in loops] + [f"{r['speedup'][name]:.2f}" for name in loops]
            for r in rows]
    return table(header, body, "rrl" + "r" * (len(header) - 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_json", type=Path, help="a file written by bench_fusion.py --json")
    parser.add_argument("-o", "--output", type=Path, help="write the markdown here (default: standard output)")
    args = parser.parse_args(argv)
    text = render(json.loads(args.bench_json.read_text()), args.bench_json.name)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
