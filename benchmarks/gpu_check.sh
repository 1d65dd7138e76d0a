#!/usr/bin/env bash
# Every CUDA check in one command, for a machine with an NVIDIA H100/H200, its own python3 with a
# CUDA build of torch, nvcc, and no network:
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# 1. preflight: the GPU, nvcc, torch, and the Python modules the tests and examples import;
# 2. builds the extension (pip install --no-build-isolation --no-deps -e ., offline) with the system
#    g++ (setup.py also checks that the toolchain links libstdc++ dynamically and switches to
#    /usr/bin/g++ when it does not: otherwise C++ errors in the ops would abort the process);
# 3. at the same time: the whole test suite with the CUDA tests and the extension required
#    (pytest -m "cuda or not slow"; tests/test_cuda_paths.py holds the CUDA-graph capture of the
#    layers and the C++ errors raised on CUDA tensors), and both example pipelines: the default
#    demo with --device cuda, shortened (1 epoch, fewer samples), and a 1-process torchrun of each;
# 4. the benchmark, alone on the GPU: the op section (targets first, later configurations dropped
#    past a time limit), then the layer and mopoe sections, merged into benchmarks/results/<gpu>_<date>.json
#    (a copy in OUT_DIR) and rendered by benchmarks/render_tables.py to OUT_DIR/tables.md, the
#    tables for docs/kernels.md;
# 5. prints a summary last (also OUT_DIR/summary.txt); exits 0 only if every step passed.
#
# Each step's time limit comes out of one budget, GPU_CHECK_SECONDS (default 465 s: with the
# results and summary the run stays under 8 minutes), and keeps a reserve for the steps after it;
# a step that finishes early leaves its time to the later ones. OUT_DIR receives gpu.txt,
# steps.txt (every step's exit status, seconds and limit), build.log, tests.log, tests.xml,
# pipelines/<run>.log with each run's results.json and results.md, bench_op.txt, bench_layer.txt, bench_mopoe.txt,
# the results JSON, tables.md and summary.txt. PYTHON selects the interpreter (default python3).
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out/pipelines"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
repo=$(pwd)
py=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-465}
export PYTHONUNBUFFERED=1
start=$(date +%s)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
: > "$out/steps.txt"

step() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
# limit CAP RESERVE: the seconds the next step may take: at most CAP, and RESERVE kept for the steps
# after it (never under 5).
limit() {
  local t=$(( $(left) - $2 ))
  (( t > $1 )) && t=$1
  (( t < 5 )) && t=5
  echo "$t"
}
# run_logged NAME LIMIT LOG COMMAND...: COMMAND under LIMIT seconds (then TERM, KILL 5 s later),
# output to LOG; records "NAME exit seconds limit" in steps.txt and returns the exit status
# (124 or 137: out of time).
run_logged() {
  local name=$1 seconds=$2 log=$3 began status
  shift 3
  began=$(date +%s)
  timeout -k 5 "$seconds" "$@" > "$log" 2>&1
  status=$?
  echo "$name $status $(( $(date +%s) - began )) $seconds" >> "$out/steps.txt"
  return $status
}

step "preflight (gpu.txt)"
{
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 10 nvcc --version | tail -2
  timeout 60 "$py" - <<'EOF'
import importlib.util
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.is_available() and torch.cuda.get_device_name())
needed = ["pytest", "hypothesis", "numpy", "setuptools", "wheel", "torchvision", "PIL", "tqdm", "matplotlib", "OpenEXR",
          "torchmetrics"]
print("missing python modules:", " ".join(m for m in needed if importlib.util.find_spec(m) is None) or "none")
EOF
} 2>&1 | tee "$out/gpu.txt"
missing=$(sed -n 's/^missing python modules: //p' "$out/gpu.txt")
pytest_extra=()
if [ -n "$missing" ] && [ "$missing" != none ]; then
  # Run what can run: test files whose imports fail are reported as collection errors (and the
  # property tests' settings in tests/conftest.py need hypothesis).
  pytest_extra+=(--continue-on-collection-errors)
  case " $missing " in *" hypothesis "*) pytest_extra+=(--noconftest) ;; esac
fi

step "build (build.log)"
# The system compiler: the GPU image's default g++ (/opt/gcc) links libstdc++ statically, and an
# extension with its own C++ runtime aborts the process on any C++ error raised in the ops.
if [ -x /usr/bin/g++ ] && [ -z "${CXX:-}" ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
build_start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} run_logged build "$(limit 260 245)" "$out/build.log" \
  "$py" -m pip install --no-build-isolation --no-deps --no-index -v -e .
build_status=$?
build_seconds=$(( $(date +%s) - build_start ))
grep -a "\[gpoe_fusion build\]" "$out/build.log"
if [ $build_status -ne 0 ]; then
  tail -40 "$out/build.log"
  echo "SUMMARY: build FAILED (exit $build_status) after ${build_seconds}s (see build.log)" | tee "$out/summary.txt"
  exit 1
fi

# ---- 3. tests and pipelines, side by side --------------------------------------------------------
window=$(limit 220 135)
step "tests (tests.log) and pipelines (pipelines/*.log), ${window}s"
GPOE_FUSION_REQUIRE_EXTENSION=1 run_logged tests "$window" "$out/tests.log" \
  "$py" -m pytest -q -m "cuda or not slow" -rfEs --junitxml="$out/tests.xml" "${pytest_extra[@]}" &
tests_pid=$!

# pipeline NAME SCRIPT ARGS...: one run (its own time limit within the window), its results kept.
pipeline() {
  local name=$1 script=$2 remaining
  shift 2
  remaining=$(( window_end - $(date +%s) ))
  (( remaining < 5 )) && return 1  # not run: the summary says so
  # Few CPU threads: the test suite runs beside them.
  OMP_NUM_THREADS=4 GPOE_FUSION_REQUIRE_EXTENSION=1 run_logged "$name" "$remaining" "$out/pipelines/$name.log" \
    "$@" "examples/$script" --device cuda --epochs 1 --no-progress --out "$scratch/$name" \
    --cache-dir "$scratch/data" "${sizes[@]}"
  local status=$?
  mkdir -p "$out/pipelines/$name"
  cp "$scratch/$name"/results.json "$scratch/$name"/results.md "$out/pipelines/$name/" 2>/dev/null
  rm -rf "${scratch:?}/$name"  # the checkpoints (hundreds of MB) stay behind
  return $status
}
window_end=$(( $(date +%s) + window ))
# The demo preset with one epoch and fewer samples: generating and decoding the demo's full
# built-in data (1500 frames, 560 views) alone would take most of the window.
(
  sizes=(--num-train 256 --num-eval 64)
  pipeline handpose_demo handpose_rhd.py "$py"
  pipeline handpose_torchrun handpose_rhd.py "$py" -m torch.distributed.run --standalone --nproc_per_node 1
  sizes=(--num-train 64 --num-eval 16)
  pipeline surgical_demo surgical_seg.py "$py"
  pipeline surgical_torchrun surgical_seg.py "$py" -m torch.distributed.run --standalone --nproc_per_node 1
) &
pipelines_pid=$!
wait $tests_pid
test_status=$?
wait $pipelines_pid
tail -15 "$out/tests.log"
for log in "$out"/pipelines/*.log; do echo "== $(basename "$log")"; tail -3 "$log"; done

# ---- 4. the benchmark ------------------------------------------------------------------------------
# The op section first (its first rows are the targets), keeping at least 60 s for the layer
# section; bench_fusion's --time-limit only stops new configurations, so it is 35 s shorter.
op_seconds=$(limit 90 90)
step "benchmark: op section (bench_op.txt), ${op_seconds}s"
run_logged bench_op "$op_seconds" "$out/bench_op.txt" "$py" benchmarks/bench_fusion.py --devices cuda --sections op \
  --time-limit $(( op_seconds > 45 ? op_seconds - 35 : 10 )) --json "$out/bench_op.json"
tail -12 "$out/bench_op.txt"
layer_seconds=$(limit 150 30)
step "benchmark: layer section (bench_layer.txt), ${layer_seconds}s"
run_logged bench_layer "$layer_seconds" "$out/bench_layer.txt" "$py" benchmarks/bench_fusion.py --devices cuda \
  --sections layer --json "$out/bench_layer.json"
tail -25 "$out/bench_layer.txt"
mopoe_seconds=$(limit 90 25)
step "benchmark: mopoe section, M = 2..4 (bench_mopoe.txt), ${mopoe_seconds}s"
run_logged bench_mopoe "$mopoe_seconds" "$out/bench_mopoe.txt" "$py" benchmarks/bench_fusion.py --devices cuda \
  --sections mopoe --quick --json "$out/bench_mopoe.json"
tail -10 "$out/bench_mopoe.txt"

step "results and tables"
# One results file: the op section's environment and rows, the layer and mopoe sections' tables.
results=$(timeout 10 "$py" - "$out" <<'EOF'
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
parts = {name: json.loads((out / f"bench_{name}.json").read_text())
         for name in ("op", "layer", "mopoe") if (out / f"bench_{name}.json").exists()}
if not parts:
    sys.exit(1)
first = parts.get("op") or parts.get("layer") or parts["mopoe"]
data = {"environment": first["environment"], "rows": parts.get("op", {}).get("rows", []),
        "layers": parts.get("layer", {}).get("layers", {}), "mopoe": parts.get("mopoe", {}).get("mopoe", {})}
gpu = re.sub(r"[^a-z0-9]+", "-", first["environment"].get("gpu", "gpu").lower().removeprefix("nvidia ")).strip("-")
name = f"{gpu}_{first['environment']['started'][:10]}.json"
text = json.dumps(data, indent=2)
(Path("benchmarks/results") / name).write_text(text)
(out / name).write_text(text)
print(name)
EOF
)
if [ -n "$results" ]; then
  timeout 10 "$py" benchmarks/render_tables.py "$out/$results" -o "$out/tables.md"
  echo "benchmarks/results/$results written; tables for docs/kernels.md in $out/tables.md"
fi

step "summary"
timeout 10 "$py" - "$out" "$build_seconds" "$test_status" "${results:-}" "$(( $(date +%s) - start ))" "$budget" \
  "$repo" <<'EOF' | tee "$out/summary.txt"
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, build_seconds, test_status, results, elapsed, budget, repo = sys.argv[1:]
out, test_status = Path(out), int(test_status)
ok = True


def tail(path: Path, default: str) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else default


steps = {}
for line in (out / "steps.txt").read_text().splitlines():
    name, status, seconds, limit = line.split()
    steps[name] = (int(status), int(seconds), int(limit))


def outcome(name: str) -> str:
    status, seconds, limit = steps[name]
    if status == 0:
        return f"ok in {seconds}s"
    what = "OUT OF TIME" if status in (124, 137) else f"FAILED (exit {status})"
    return f"{what} after {seconds}s of {limit}s"


gpu = (out / "gpu.txt").read_text().splitlines()[0]
print(f"SUMMARY on {gpu}, {elapsed}s of the {budget}s budget")
print(f"  build: ok in {build_seconds}s")
for line in (out / "build.log").read_text(errors="replace").splitlines():
    if "[gpoe_fusion build]" in line and "libstdc++" in line:
        print(f"    {line.strip()}")
missing = [l for l in (out / "gpu.txt").read_text().splitlines() if l.startswith("missing python modules:")]
if missing and missing[0] != "missing python modules: none":
    print(f"  {missing[0]}")
ok &= test_status == 0
print(f"  tests: {outcome('tests')}: {tail(out / 'tests.log', 'no test output')}")
if test_status in (134, -6):
    print("    the test process aborted: a C++ exception that could not reach Python? (docs/kernels.md)")
xml = out / "tests.xml"
if xml.exists():
    counts = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        module, name = case.get("classname", ""), case.get("name", "")
        if "cuda" not in f"{module}.{name}".lower():
            continue
        group = ("other CUDA" if not module.endswith("test_cuda_paths") else
                 "CUDA graphs" if "graph" in name else "C++ errors on CUDA")
        result = ("failed" if case.find("failure") is not None or case.find("error") is not None
                  else "skipped" if case.find("skipped") is not None else "passed")
        counts.setdefault(group, {}).setdefault(result, 0)
        counts[group][result] += 1
    for group, by_result in counts.items():
        print(f"    {group}: " + ", ".join(f"{n} {r}" for r, n in sorted(by_result.items())))
        ok &= set(by_result) == {"passed"}
for name in ("handpose_demo", "handpose_torchrun", "surgical_demo", "surgical_torchrun"):
    if name not in steps:
        print(f"  {name}: not run (no time left)")
        ok = False
        continue
    ok &= steps[name][0] == 0
    result = out / "pipelines" / name / "results.json"
    note = ""
    if result.exists():
        data = json.loads(result.read_text())
        note = f"; kernels {'on' if data.get('kernel_extension') else 'OFF'}, {data.get('seconds', 0):.0f}s in the script"
        ok &= bool(data.get("kernel_extension"))
    print(f"  {name}: {outcome(name)}{note}")
for name in ("bench_op", "bench_layer"):
    ok &= name in steps and steps[name][0] == 0
    print(f"  {name}: {outcome(name) if name in steps else 'not run'}")
if not results:
    print("  benchmark: no results (see bench_op.txt, bench_layer.txt)")
    sys.exit(1)
data = json.loads((out / results).read_text())
env = data["environment"]
print(f"  results: benchmarks/results/{results} (copy in OUT_DIR), tables: OUT_DIR/tables.md")
if "cuda" in env.get("copy_gbps", {}):
    print(f"  copy bandwidth {env['copy_gbps']['cuda']:.0f} GB/s; {len(data['rows'])} op rows"
          + (" (time limit reached)" if env.get("truncated") else ""))
for row in data["rows"]:
    if (row["m"], row["batch"], row["d"]) != (4, 65536, 1024):
        continue
    ms = row["ms"]
    print(f"  {row['dtype']:8} {row['pass_name']:16} kernel {ms['kernel']:7.3f} ms  "
          f"{100 * row['fraction_of_copy']:4.0f}% of copy  x{row['speedup']['eager']:.2f} eager  "
          f"x{row['speedup']['compile']:.2f} compile")
print("  targets: forward and backward >= 85% of copy; forward+backward >= 1.3x compile")
for target in data.get("layers", {}).get("cuda", {}).get("targets", []):
    print(f"  layer: {target['target']}: {target['ratio']:.2f} ({target['bound']}, {'met' if target['met'] else 'not met'})")
sys.exit(0 if ok else 1)
EOF
summary_status=$?
step "done"
exit $summary_status
