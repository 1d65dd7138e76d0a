"""Benchmark of the fused kernels against the pure-PyTorch path, eager and torch.compile'd.

For every configuration (device, dtype, M experts, batch B, D dimensions; logits [M, B, D], no
mask) it times three implementations of the gPoE fusion:

    kernel   gpoe_fusion.ops.fuse (the C++/CUDA extension)
    eager    gpoe_fusion._reference.fuse (pure PyTorch)
    compile  torch.compile(gpoe_fusion._reference.fuse)

over three passes: forward, forward+backward and backward (of a retained graph; all three
gradients). Timings are medians after warm-up; the implementations are measured in
alternating rounds, so load from other processes hits them alike.

The "mopoe" section times ``F.mopoe`` (every subset's product in one fused pass) against what other
libraries do, a Python loop of ``F.poe(backend="torch")`` over the 2^M - 1 subsets, against that
loop under ``torch.compile``, and against a loop of the fused ``F.poe``, at M = 2..6, B = 4096
(CPU) or 65536 (CUDA), D = 256, forward and forward+backward.

The "layer" section then times the path users call at M=4, B=16384 (CPU) or 65536 (CUDA),
D=256: ``F.gpoe`` with default value checks against ``validate=False``; the ``PoE`` and
``GPoE`` modules (global and joint credibility, with and without ``return_weights``) against
``backend="torch"``, its ``torch.compile``, and the bare op, in the same alternating rounds. Throughput is reported against
the minimum bytes a pass must move (each input read once, each output written once), and

    GPU: against the measured device-to-device copy bandwidth;
    CPU: against the larger of two floors measured in the same run: the exp floor (the time
         torch.exp needs for the pass's exp/log count) and the memory floor (the pass's minimum
         bytes at the measured copy bandwidth); the row says which one bounds it.

On the CPU every row is checked against the targets: the fused op >= 1.5x torch.compile and >= 2x
eager in each pass (CPU_TARGETS); the rows that miss them are listed after the table.

    python benchmarks/bench_fusion.py                    # full table, CPU and (if present) CUDA
    python benchmarks/bench_fusion.py --quick            # the target configurations only
    python benchmarks/bench_fusion.py --devices cuda --json runs/bench/gpu.json
    python benchmarks/bench_fusion.py --sections layer       # only the layer section
    python benchmarks/bench_fusion.py --malloc reuse         # glibc malloc that reuses large blocks
    python benchmarks/bench_fusion.py --only bfloat16:8:256,float32:13:64   # some rows (dtype:M:D)

CPU timings depend on the C allocator as much as on the kernels: glibc maps every allocation over
32 MiB afresh and unmaps it when freed, so each [M, B, D] output (64 MB at the target size) costs
one page fault per 4 KiB written, for every implementation alike. ``--malloc reuse`` re-runs the
benchmark with glibc tunables that serve every allocation from the reused heap (the effect
jemalloc or tcmalloc have), so both regimes can be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch._functorch.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpoe_fusion as gf  # noqa: E402
from gpoe_fusion import _reference, ops  # noqa: E402
from gpoe_fusion import functional as F  # noqa: E402

METHODS = ("kernel", "eager", "compile")
# Backward last: its retained graphs (the eager one holds ~9 [M, B, D] temporaries) then never
# coexist with another pass's allocations.
PASSES = ("forward", "forward+backward", "backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU targets of the fused op in every configuration and pass: its time at most the other's / x.
CPU_TARGETS = {"compile": 1.5, "eager": 2.0}
# glibc tunables under which malloc never maps a block of its own and never returns the heap's top,
# so freed outputs are reused by the next allocation of a similar size.
REUSE_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


@dataclass
class Config:
    device: str
    dtype: str
    m: int
    batch: int
    d: int


@dataclass
class Row:
    config: Config
    pass_name: str
    ms: dict[str, float]  # method -> median milliseconds
    min_bytes: int
    transcendentals: int  # exp + log evaluations the fused pass needs
    kernel_gbps: float = 0.0
    fraction_of_copy: float | None = None  # kernel GB/s / copy GB/s
    exp_floor_ms: float | None = None  # CPU: transcendentals / torch.exp rate
    memory_floor_ms: float | None = None  # min_bytes at the copy bandwidth
    bound: str | None = None  # CPU: the larger floor, "exp" or "memory"
    speedup: dict[str, float] = field(default_factory=dict)  # kernel vs eager / compile


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str, fn) -> float:
    """Seconds one call of fn takes (CUDA: between events on the current stream)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. "AMD EPYC" or "Intel(R) Xeon(R) ...": the kernel's prefetching
    differs by vendor (docs/kernels.md), so the rows of one machine say which it was."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown"


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy into a preallocated buffer (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    seconds = statistics.median(clock(device, lambda: dst.copy_(src)) for _ in range(10))
    return 2 * src.numel() * 4 / seconds / 1e9


def exp_rate(numel: int) -> float:
    """Elements per second of torch.exp on the CPU, into a preallocated output."""
    x = torch.rand(numel) * -10.0  # the arguments the fusion exponentiates are <= 0
    y = torch.empty_like(x)
    for _ in range(2):
        torch.exp(x, out=y)
    return numel / statistics.median(clock("cpu", lambda: torch.exp(x, out=y)) for _ in range(7))


def pass_cost(c: Config, element_bytes: int) -> dict[str, tuple[int, int]]:
    """(minimum bytes, exp + log count) per pass for logits [M, B, D], no mask, no prior.

    Forward: reads mu, logvar, logits, writes joint mu and logvar; M exps for the credibility
    softmax, M for the weights, one log. Backward: reads the three inputs and the two incoming
    gradients, writes three gradients; the same 2M exps, no log (docs/kernels.md)."""
    expert = c.m * c.batch * c.d  # elements of one [M, B, D] tensor
    joint = c.batch * c.d
    forward = ((3 * expert + 2 * joint) * element_bytes, joint * (2 * c.m + 1))
    backward = ((3 * expert + 2 * joint + 3 * expert) * element_bytes, joint * 2 * c.m)
    both = (forward[0] + backward[0], forward[1] + backward[1])
    return {"forward": forward, "backward": backward, "forward+backward": both}


def make_runners(c: Config, compiled_fuse):
    """Callables per (method, pass) on fresh inputs of configuration c."""
    g = torch.Generator(device=c.device).manual_seed(0)
    dtype = DTYPES[c.dtype]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=c.device) * scale).to(dtype)

    mu, logvar, logits = rand(c.m, c.batch, c.d), rand(c.m, c.batch, c.d, scale=2.0), rand(c.m, c.batch, c.d)
    grads = (rand(c.batch, c.d), rand(c.batch, c.d))
    leaves = [t.requires_grad_() for t in (mu, logvar, logits)]
    impls = {"kernel": ops.fuse, "eager": _reference.fuse, "compile": compiled_fuse}
    runners = {}
    for method, fuse in impls.items():
        def forward(fuse=fuse):
            with torch.no_grad():
                return fuse(*leaves, None, False)

        def both(fuse=fuse):
            out = fuse(*leaves, None, False)
            return torch.autograd.grad(out, leaves, grads)

        graph = {}

        def backward(fuse=fuse, graph=graph):
            if "out" not in graph:
                graph["out"] = fuse(*leaves, None, False)
            return torch.autograd.grad(graph["out"], leaves, grads, retain_graph=True)

        runners[method] = {"forward": forward, "backward": backward, "forward+backward": both}
    return runners


def measure(c: Config, warmup: int, reps: int, copy_gbps: float | None, exps_per_s: float | None) -> list[Row]:
    torch._dynamo.reset()  # every configuration compiles afresh (no recompile limit, no stale graphs)
    # The backward pass is timed on a retained graph, which compiled graphs with donated buffers
    # (torch >= 2.11) refuse; donation only saves memory, not time.
    torch._functorch.config.donated_buffer = False
    runners = make_runners(c, torch.compile(_reference.fuse))
    element_bytes = torch.empty((), dtype=DTYPES[c.dtype]).element_size()
    costs = pass_cost(c, element_bytes)
    rows = []
    for pass_name in PASSES:
        for method in METHODS:  # warm-up (and compilation)
            for _ in range(warmup):
                runners[method][pass_name]()
        synchronize(c.device)
        times = {method: [] for method in METHODS}
        for _ in range(reps):
            for method in METHODS:
                times[method].append(clock(c.device, runners[method][pass_name]))
        ms = {method: statistics.median(t) * 1e3 for method, t in times.items()}
        min_bytes, transcendentals = costs[pass_name]
        row = Row(c, pass_name, ms, min_bytes, transcendentals)
        row.kernel_gbps = min_bytes / (ms["kernel"] / 1e3) / 1e9
        row.speedup = {m: ms[m] / ms["kernel"] for m in ("eager", "compile")}
        if copy_gbps:
            row.fraction_of_copy = row.kernel_gbps / copy_gbps
            row.memory_floor_ms = min_bytes / (copy_gbps * 1e9) * 1e3
        if exps_per_s:
            row.exp_floor_ms = transcendentals / exps_per_s * 1e3
            row.bound = "memory" if (row.memory_floor_ms or 0.0) > row.exp_floor_ms else "exp"
        rows.append(row)
    del runners
    if c.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def configs(device: str, quick: bool, only: list[tuple[str, int, int]] | None = None) -> list[Config]:
    """The target configurations first (the documented performance targets), then the rest: M in
    {2, 4, 5, 8, 13} (5 and 13 outside the specialised expert counts), D in {64, 256, 1024}, every
    dtype; ``only``: just the (dtype, M, D) given."""
    targets = ([Config("cuda", dt, 4, 65536, 1024) for dt in DTYPES] if device == "cuda"
               else [Config("cpu", "float32", 4, 16384, 256)])
    if quick and not only:
        return targets
    out = [] if only else list(targets)
    for dtype in DTYPES:
        for m in (2, 4, 5, 8, 13):
            for d in (64, 256, 1024):
                if only and (dtype, m, d) not in only:
                    continue
                # CPU: 16384 rows, fewer for D = 1024 to keep one pass near the D = 256 cost.
                batch = 65536 if device == "cuda" else (16384 if d <= 256 else 4096)
                config = Config(device, dtype, m, batch, d)
                if config not in out:
                    out.append(config)
    return out


def missed_targets(rows: list[Row]) -> list[str]:
    """The CPU rows below CPU_TARGETS, one line each."""
    missed = []
    for r in rows:
        if r.config.device != "cpu":
            continue
        short = [f"{r.speedup[m]:.2f}x {m} (target {x}x)" for m, x in CPU_TARGETS.items() if r.speedup[m] < x]
        if short:
            c = r.config
            missed.append(f"{c.dtype} M={c.m} B={c.batch} D={c.d} {r.pass_name}: " + ", ".join(short))
    return missed


def print_table(rows: list[Row], env: dict) -> None:
    print(f"\ngpoe_fusion benchmark: torch {env['torch']}, {env['cpu_threads']} CPU threads"
          + (f", {env['gpu']}" if env.get("gpu") else "") + f", malloc: {env['malloc']}")
    if env.get("copy_gbps"):
        for device, gbps in env["copy_gbps"].items():
            print(f"  {device} copy bandwidth: {gbps:.1f} GB/s")
    if env.get("exp_per_s"):
        print(f"  CPU torch.exp: {env['exp_per_s'] / 1e9:.2f} G elements/s")
    header = (f"{'dev':4} {'dtype':8} {'M':>2} {'B':>6} {'D':>5} {'pass':16} {'kernel ms':>10} {'eager ms':>10} "
              f"{'compile ms':>10} {'x eager':>8} {'x compile':>9} {'GB/s':>7} {'copy%':>6} {'floor':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        c = r.config
        copy = f"{100 * r.fraction_of_copy:5.0f}%" if r.fraction_of_copy is not None else "     -"
        floor = (f"{r.ms['kernel'] / max(r.exp_floor_ms, r.memory_floor_ms or 0.0):5.2f}x {r.bound[:3]}"
                 if r.exp_floor_ms else "        -")
        print(f"{c.device:4} {c.dtype:8} {c.m:>2} {c.batch:>6} {c.d:>5} {r.pass_name:16} {r.ms['kernel']:10.3f} "
              f"{r.ms['eager']:10.3f} {r.ms['compile']:10.3f} {r.speedup['eager']:8.2f} {r.speedup['compile']:9.2f} "
              f"{r.kernel_gbps:7.1f} {copy} {floor}")
    print("x eager / x compile: their time over the kernel's. floor (CPU): kernel time over the larger of the exp "
          "floor (torch.exp on the pass's exp+log count) and the memory floor (minimum bytes at the copy bandwidth), "
          "and which one it is.")
    missed = missed_targets(rows)
    if any(r.config.device == "cpu" for r in rows):
        targets = ", ".join(f">= {x}x {m}" for m, x in CPU_TARGETS.items())
        print(f"CPU targets ({targets} in every row): " + ("all met" if not missed else f"{len(missed)} rows miss them:"))
        for line in missed:
            print(f"  {line}")


# ---- The layer section: the path users call ---------------------------------------------------

# Targets of the layer path (CPU, M=4, B=16384, D=256 float32): (name, numerator and denominator
# as (path, pass), comparison, bound).
LAYER_TARGETS = [
    ("default checks, F.gpoe forward", ("F.gpoe", "forward"), ("F.gpoe validate=False", "forward"), "<=", 1.10),
    ("GPoE(global) layer vs F.gpoe(validate=False), fwd+bwd", ("GPoE global", "forward+backward"),
     ("F.gpoe global validate=False", "forward+backward"), "<=", 1.15),
    ("return_weights=True, GPoE(global) fwd+bwd", ("GPoE global +alpha", "forward+backward"),
     ("GPoE global", "forward+backward"), "<=", 1.15),
    ("PoE layer: backend=torch over kernel, fwd+bwd", ("PoE torch", "forward+backward"),
     ("PoE", "forward+backward"), ">=", 5.0),
]


@dataclass
class LayerRow:
    path: str
    pass_name: str
    ms: float


def median_ms(device: str, runners: dict[str, callable], warmup: int, reps: int) -> dict[str, float]:
    """Median milliseconds of each runner, measured in alternating rounds after warm-up."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            times[name].append(clock(device, fn))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def layer_paths(device: str, batch: int, m: int = 4, d: int = 256, feature_dim: int = 128):
    """name -> (forward callable returning the tensors to differentiate, leaves) for every path."""
    g = torch.Generator(device=device).manual_seed(0)
    mu = torch.randn(m, batch, d, generator=g, device=device).requires_grad_()
    logvar = (2 * torch.randn(m, batch, d, generator=g, device=device)).requires_grad_()
    logits = torch.randn(m, batch, d, generator=g, device=device)
    features = [torch.randn(batch, feature_dim, generator=g, device=device) for _ in range(m)]
    poe = {b: gf.PoE(backend=b) for b in ("auto", "torch")}
    gpoe_global = {b: gf.GPoE(m, d, credibility="global", backend=b).to(device) for b in ("auto", "torch")}
    gpoe_joint = {b: gf.GPoE(m, d, [feature_dim] * m, backend=b).to(device) for b in ("auto", "torch")}
    for module in (gpoe_global["torch"], gpoe_joint["torch"]):  # same weights for both backends
        module.load_state_dict((gpoe_global if module is gpoe_global["torch"] else gpoe_joint)["auto"].state_dict())
    global_logits = gpoe_global["auto"].credibility.logits
    compiled_poe = torch.compile(poe["torch"])
    compiled_global = torch.compile(gpoe_global["torch"])
    compiled_joint = torch.compile(gpoe_joint["torch"])
    base = [mu, logvar]

    def joint(out):
        return (out.mu, out.logvar)

    def with_alpha(out):
        # alpha is returned, as a training loop that logs it asks for it; the loss uses the joint only.
        return (out[0].mu, out[0].logvar)

    flat_global = lambda: global_logits.unsqueeze(1)  # noqa: E731  [M, 1, D] for the bare op
    return {
        "op gpoe": (lambda: ops.fuse(mu, logvar, logits, None, False), base),
        "F.gpoe": (lambda: joint(F.gpoe(mu, logvar, logits)), base),
        "F.gpoe validate=False": (lambda: joint(F.gpoe(mu, logvar, logits, validate=False)), base),
        "op gpoe global": (lambda: ops.fuse(mu, logvar, flat_global(), None, False), base + [global_logits]),
        "F.gpoe global validate=False": (lambda: joint(F.gpoe(mu, logvar, flat_global(), validate=False)),
                                         base + [global_logits]),
        "GPoE global": (lambda: joint(gpoe_global["auto"](mu, logvar)), base + [global_logits]),
        "GPoE global +alpha": (lambda: with_alpha(gpoe_global["auto"](mu, logvar, return_weights=True)),
                               base + [global_logits]),
        "GPoE global torch": (lambda: joint(gpoe_global["torch"](mu, logvar)), base),
        "GPoE global compile": (lambda: joint(compiled_global(mu, logvar)), base),
        "GPoE joint +alpha": (lambda: with_alpha(gpoe_joint["auto"](mu, logvar, features=features, return_weights=True)),
                              base),
        "GPoE joint +alpha torch": (lambda: with_alpha(gpoe_joint["torch"](mu, logvar, features=features,
                                                                           return_weights=True)), base),
        "GPoE joint +alpha compile": (lambda: with_alpha(compiled_joint(mu, logvar, features=features,
                                                                        return_weights=True)), base),
        "op poe": (lambda: ops.fuse(mu, logvar, None, None, False), base),
        "PoE": (lambda: joint(poe["auto"](mu, logvar)), base),
        "PoE torch": (lambda: joint(poe["torch"](mu, logvar)), base),
        "PoE compile": (lambda: joint(compiled_poe(mu, logvar)), base),
    }


def measure_layers(device: str, warmup: int, reps: int) -> list[LayerRow]:
    torch._dynamo.reset()
    batch = 16384 if device == "cpu" else 65536
    paths = layer_paths(device, batch)
    g = torch.Generator(device=device).manual_seed(1)
    grads = [torch.randn(batch, 256, generator=g, device=device) for _ in range(2)]
    forward_paths = ("op gpoe", "F.gpoe", "F.gpoe validate=False")
    rows = []
    for pass_name in ("forward", "forward+backward"):
        runners = {}
        for name, (fn, leaves) in paths.items():
            if pass_name == "forward":
                if name not in forward_paths:
                    continue
                runners[name] = lambda fn=fn: fn()
            else:
                runners[name] = lambda fn=fn, leaves=leaves: torch.autograd.grad(fn(), leaves, grads)
        for name, ms in median_ms(device, runners, warmup, reps).items():
            rows.append(LayerRow(name, pass_name, ms))
    return rows


def layer_ratios(rows: list[LayerRow]) -> list[dict]:
    """The targets of LAYER_TARGETS evaluated on ``rows``."""
    ms = {(r.path, r.pass_name): r.ms for r in rows}
    out = []
    for name, num, den, op, bound in LAYER_TARGETS:
        if num not in ms or den not in ms:
            continue
        ratio = ms[num] / ms[den]
        met = ratio <= bound if op == "<=" else ratio >= bound
        out.append({"target": name, "ratio": ratio, "bound": f"{op} {bound}", "met": met})
    return out


def print_layers(rows: list[LayerRow], ratios: list[dict], device: str, malloc: str) -> None:
    print(f"\nlayer path ({device}, M=4, B={16384 if device == 'cpu' else 65536}, D=256, float32; median ms; "
          f"malloc: {malloc})")
    width = max(len(r.path) for r in rows)
    header = f"{'path':{width}} {'forward':>10} {'fwd+bwd':>10}"
    print(header)
    print("-" * len(header))
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        table.setdefault(r.path, {})[r.pass_name] = r.ms
    for path, passes in table.items():
        cells = [f"{passes[p]:10.2f}" if p in passes else f"{'-':>10}" for p in ("forward", "forward+backward")]
        print(f"{path:{width}} {' '.join(cells)}")
    for r in ratios:
        print(f"  {r['target']}: {r['ratio']:.2f} (target {r['bound']}: {'met' if r['met'] else 'NOT met'})")


# ---- The mopoe section: every subset's product against a loop over the subsets -----------------

MOPOE_TARGET = ("mopoe vs loop of F.poe(backend='torch'), fwd+bwd, M=4", 4.0)


def poe_loop(backend: str):
    """What other libraries do: one PoE per subset, stacked. Returns fn(mu, logvar) -> [S, B, D] x 2."""
    def loop(mu, logvar):
        outputs = [F.poe(mu[idx], logvar[idx], backend=backend, validate=False)
                   for idx in _reference.subset_members(mu.shape[0])]
        return torch.stack([o.mu for o in outputs]), torch.stack([o.logvar for o in outputs])
    return loop


def mopoe_components(mixture) -> tuple[torch.Tensor, torch.Tensor]:
    return mixture.mu, mixture.logvar


def measure_mopoe(device: str, warmup: int, reps: int, ms_range=range(2, 7)) -> list[dict]:
    batch = 4096 if device == "cpu" else 65536
    rows = []
    for m in ms_range:
        torch._dynamo.reset()
        g = torch.Generator(device=device).manual_seed(m)
        mu = torch.randn(m, batch, 256, generator=g, device=device).requires_grad_()
        logvar = (2 * torch.randn(m, batch, 256, generator=g, device=device)).requires_grad_()
        grads = [torch.randn(2 ** m - 1, batch, 256, generator=g, device=device) for _ in range(2)]
        impls = {
            "mopoe": lambda a, b: mopoe_components(F.mopoe(a, b, validate=False)),
            "loop torch": poe_loop("torch"),
            "loop compile": torch.compile(poe_loop("torch")),
            "loop kernel": poe_loop("auto"),
        }
        for pass_name in ("forward", "forward+backward"):
            runners = {}
            for name, fn in impls.items():
                if pass_name == "forward":
                    runners[name] = lambda fn=fn: fn(mu.detach(), logvar.detach())
                else:
                    runners[name] = lambda fn=fn: torch.autograd.grad(fn(mu, logvar), [mu, logvar], grads)
            ms = median_ms(device, runners, warmup, reps)
            rows.append({"m": m, "batch": batch, "d": 256, "pass_name": pass_name, "ms": ms,
                         "speedup": {k: v / ms["mopoe"] for k, v in ms.items() if k != "mopoe"}})
        print(f"  measured mopoe M={m} on {device}", file=sys.stderr, flush=True)
    return rows


def print_mopoe(rows: list[dict], device: str) -> None:
    print(f"\nmopoe ({device}, B={rows[0]['batch']}, D=256, float32; median ms; x: loop time over mopoe's)")
    header = f"{'M':>2} {'pass':16} {'mopoe':>9} {'loop torch':>11} {'loop compile':>13} {'loop kernel':>12} " \
             f"{'x torch':>8} {'x compile':>9} {'x kernel':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ms, x = r["ms"], r["speedup"]
        print(f"{r['m']:>2} {r['pass_name']:16} {ms['mopoe']:9.2f} {ms['loop torch']:11.2f} {ms['loop compile']:13.2f} "
              f"{ms['loop kernel']:12.2f} {x['loop torch']:8.2f} {x['loop compile']:9.2f} {x['loop kernel']:9.2f}")
    for r in rows:
        if r["m"] == 4 and r["pass_name"] == "forward+backward":
            ratio, bound = r["speedup"]["loop torch"], MOPOE_TARGET[1]
            print(f"  {MOPOE_TARGET[0]}: {ratio:.2f} (target >= {bound}: {'met' if ratio >= bound else 'NOT met'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the target configurations (under a minute on CPU)")
    parser.add_argument("--only", default=None, metavar="DTYPE:M:D,...",
                        help="only these configurations of the op section, e.g. float32:8:256,bfloat16:13:64")
    parser.add_argument("--devices", default="auto", help="comma-separated cpu,cuda (default: cpu and, if present, cuda)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per pass (default 5 CPU / 20 CUDA)")
    parser.add_argument("--sections", default="op,layer,mopoe",
                        help="comma-separated: op (the fused op against eager and compile), layer (the layer path), "
                             "mopoe (every subset's product against a loop over the subsets)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="start no new configuration after this many seconds (the targets come first)")
    parser.add_argument("--malloc", choices=("default", "reuse"), default="default",
                        help="the C allocator's regime on the CPU: as configured, or glibc tunables that reuse freed "
                             "blocks (the benchmark re-runs itself with GLIBC_TUNABLES set)")
    args = parser.parse_args(argv)
    if args.malloc == "reuse" and os.environ.get("GLIBC_TUNABLES") != REUSE_TUNABLES:
        # Tunables are read when the process starts: run again with them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": REUSE_TUNABLES})

    if not ops.available():
        print(f"the extension is not available: {ops.load_error()}", file=sys.stderr)
        return 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else [d.strip() for d in args.devices.split(",")]
    if "cuda" in devices and not torch.cuda.is_available():
        print("--devices cuda: no CUDA device", file=sys.stderr)
        return 1

    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "cpu_capability": ops.cpu_capability(), "machine": platform.machine(), "cpu_model": cpu_model(),
           "quick": args.quick,
           "copy_gbps": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "malloc": os.environ.get("GLIBC_TUNABLES") or "default"}
    if "cuda" in devices:
        env["gpu"] = torch.cuda.get_device_name()
        env["copy_gbps"]["cuda"] = copy_bandwidth("cuda", 1 << 30)
    if "cpu" in devices:
        env["copy_gbps"]["cpu"] = copy_bandwidth("cpu", 1 << 28)
        env["exp_per_s"] = exp_rate(1 << 24)

    sections = {s.strip() for s in args.sections.split(",")}
    only = None
    if args.only:
        only = [(dtype, int(m), int(d)) for dtype, m, d in (spec.split(":") for spec in args.only.split(","))]
    rows: list[Row] = []
    start = time.perf_counter()
    for device in devices if "op" in sections else []:
        warmup = 2 if device == "cpu" else 3
        reps = args.reps or (5 if device == "cpu" else 20)
        for c in configs(device, args.quick, only):
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                print(f"  --time-limit reached: skipping {c} and later configurations", file=sys.stderr)
                env["truncated"] = True
                break
            rows += measure(c, warmup, reps, env["copy_gbps"].get(device), env.get("exp_per_s") if device == "cpu" else None)
            print(f"  measured {c} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    layers: dict[str, dict] = {}
    for device in devices if "layer" in sections else []:
        layer_rows = measure_layers(device, warmup=2 if device == "cpu" else 3, reps=args.reps or (7 if device == "cpu"
                                                                                                    else 20))
        layers[device] = {"rows": [asdict(r) for r in layer_rows], "targets": layer_ratios(layer_rows)}
        print(f"  measured the layer path on {device} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
              flush=True)
    mopoe: dict[str, list[dict]] = {}
    for device in devices if "mopoe" in sections else []:
        mopoe[device] = measure_mopoe(device, warmup=2 if device == "cpu" else 3,
                                      reps=args.reps or (5 if device == "cpu" else 20),
                                      ms_range=range(2, 5) if args.quick else range(2, 7))
    env["seconds"] = time.perf_counter() - start
    if rows:
        print_table(rows, env)
    for device, layer in layers.items():
        print_layers([LayerRow(**r) for r in layer["rows"]], layer["targets"], device, env["malloc"])
    for device, mopoe_rows in mopoe.items():
        print_mopoe(mopoe_rows, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = [{**asdict(r.config), **{k: v for k, v in asdict(r).items() if k != "config"}} for r in rows]
        args.json.write_text(json.dumps({"environment": env, "rows": records, "layers": layers, "mopoe": mopoe},
                                        indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
