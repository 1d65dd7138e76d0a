"""Running the experiments both pipelines share: train and evaluate one fusion at one seed, a study
(every fusion at every seed of ``--seeds``, finished runs reused), the sweep over the training data
corruption (``--corruption-sweep``), and the body of both pipelines' ``main``.

Where each run goes: ``--out``, then ``corruption<X>/`` per fraction of a sweep, ``<fusion>/`` with
``--compare``, ``seed<k>/`` with more than one seed. A run of a study of several runs (more than one
seed, or a sweep) whose folder holds its results.json, written by a run of the same signature
(``options.run_signature``) evaluated at the same test levels, and its checkpoint is finished: it is
loaded, not trained again, so a killed study continues with its unfinished runs (``--resume``
continues the one that was killed from its checkpoint).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

import gpoe_fusion as gf

from . import distributed
from .checkpoint import load_checkpoint, write_json
from .cli import UsageError, exit_with
from .corruption import training_noise
from .credibility_eval import alpha_by_corruption, held_out_credibility
from .distributed import DistEnv
from .memory import pin_mmap_threshold
from .model import CrossModalVAE
from .options import run_signature
from .report import FUSION_LABELS
from .study import Study, SweepPoint
from .summary import describe_checkpoints
from .training import CHECKPOINT, ConfigMismatch, TrainConfig, fit

__all__ = ["finished_run", "run_directory", "run_experiment", "run_study", "run_sweep", "train_and_evaluate",
           "train_config"]

BuildModel = Callable[[argparse.Namespace, str], CrossModalVAE]
# evaluate(model, dataset, level, args, device) -> the metrics of one test-corruption level.
Evaluate = Callable[[CrossModalVAE, Dataset, float, argparse.Namespace, torch.device], dict]
# write_report(args, study, eval_set, seconds) -> the report's tables as markdown.
WriteReport = Callable[[argparse.Namespace, Study, Dataset, float], str]
# write_sweep_report(args, points, seconds) -> the sweep's table as markdown.
WriteSweepReport = Callable[[argparse.Namespace, list[SweepPoint], float], str]


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_epochs, seed=args.seed, amp=not args.no_amp,
                       num_workers=args.workers, progress=not args.no_progress, max_steps=args.max_steps,
                       signature=run_signature(args))


def _with(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    """A copy of ``args`` with ``changes``."""
    return argparse.Namespace(**{**vars(args), **changes})


def run_directory(args: argparse.Namespace, fusion: str, seed: int) -> Path:
    """Where the run of ``fusion`` at ``seed`` goes: --out, then <fusion>/ with --compare, then
    seed<k>/ with more than one seed."""
    out = Path(args.out)
    if args.compare:
        out = out / fusion
    return out / f"seed{seed}" if args.seeds > 1 else out


def train_and_evaluate(args: argparse.Namespace, build_model: BuildModel, evaluate: Evaluate, train_set: Dataset,
                       eval_set: Dataset, env: DistEnv, out_dir: Path) -> tuple[CrossModalVAE, dict | None]:
    """Train ``build_model(args, args.fusion)`` at ``args.seed`` on the noisy ``train_set``
    (checkpoints in ``out_dir``), then, on the main process, evaluate it at every
    ``args.test_corruption`` level and on the held-out credibility set, and write
    ``out_dir/results.json``. Returns the model and its result (None on the other ranks):
    ``{"fusion", "seed", "metrics": {str(level): evaluate(...)}, "alpha", "credibility",
    "train_seconds", "history", "dir", "signature", "credibility_samples"}``.
    """
    model = build_model(args, args.fusion)
    began = time.perf_counter()
    try:
        history = fit(model, training_noise(train_set, args), train_config(args), env, out_dir, resume=args.resume,
                      log=print if env.is_main else (lambda _: None))
    except ConfigMismatch as error:
        raise UsageError("--resume", f"{error}; resume with the options of that run, or choose another --out")
    except RuntimeError as error:  # load_checkpoint refuses a file that is no safe checkpoint
        if args.resume and str(error).startswith(f"checkpoint {out_dir / CHECKPOINT}"):
            raise UsageError("--resume", str(error))
        raise
    if not env.is_main:
        return model, None
    train_seconds = time.perf_counter() - began
    metrics = {str(level): evaluate(model, eval_set, level, args, env.device) for level in args.test_corruption}
    credibility, samples = held_out_credibility(model, eval_set, args, env.device)
    result = {"fusion": args.fusion, "seed": args.seed, "metrics": metrics,
              "alpha": alpha_by_corruption(model, eval_set, args, env.device), "credibility": credibility,
              "train_seconds": train_seconds, "history": history, "dir": str(out_dir),
              "signature": run_signature(args), "credibility_samples": samples}
    write_json(out_dir / "results.json", result)
    return model, result


def finished_run(out_dir: Path, args: argparse.Namespace) -> dict | None:
    """The result in ``out_dir/results.json`` if it is that of this very run (the same signature,
    evaluated at the same test levels) and its checkpoint is there too; else None."""
    path = out_dir / "results.json"
    if not path.is_file() or not (out_dir / CHECKPOINT).is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):  # half a file of an older version, or unreadable: train again
        return None
    if not isinstance(result, dict) or result.get("signature") != run_signature(args):
        return None
    return result if list(result.get("metrics", {})) == [str(level) for level in args.test_corruption] else None


def _load_trained(args: argparse.Namespace, build_model: BuildModel, out_dir: Path, env: DistEnv) -> CrossModalVAE:
    """The model of a finished run, from its checkpoint (for the figures)."""
    model = build_model(args, args.fusion)
    model.load_state_dict(load_checkpoint(out_dir / CHECKPOINT, map_location="cpu")["model"])
    return model.to(env.device).eval()


def run_study(args: argparse.Namespace, env: DistEnv, build_model: BuildModel, evaluate: Evaluate,
              train_set: Dataset, eval_set: Dataset, heading: str = "") -> Study:
    """``args.fusion``, or with --compare each of --fusions, trained and evaluated at each of the
    --seeds seeds args.seed, args.seed + 1, ..., each into its ``run_directory``; a seed's fusions
    one after the other, so that the paired comparisons of the first seeds come first. A study of
    several runs (more than one seed, or a point of a sweep) reuses its finished runs
    (``finished_run``). Only the first seed's models are kept, for the figures. Returns the study;
    its runs are filled on the main process only. heading: what the run headers begin with.
    """
    fusions = list(args.fusions) if args.compare else [args.fusion]
    seeds = list(range(args.seed, args.seed + args.seeds))
    reuse = len(seeds) > 1 or bool(args.corruption_sweep)
    log = print if env.is_main else (lambda _: None)
    study = Study(fusions, seeds, runs={f: {} for f in fusions})
    runs = list(itertools.product(seeds, fusions))
    for count, (seed, fusion) in enumerate(runs, start=1):
        run, out_dir = _with(args, fusion=fusion, seed=seed), run_directory(args, fusion, seed)
        name = heading + FUSION_LABELS[fusion] + (f", seed {seed}" if len(seeds) > 1 else "")
        name += f" (run {count} of {len(runs)})" if len(runs) > 1 else ""
        finished = finished_run(out_dir, run) if reuse else None
        if finished is not None:
            log(f"== {name}: finished in {out_dir}, its results loaded (not retrained)")
            study.runs[fusion][seed] = finished
            if seed == seeds[0] and env.is_main:
                study.models[fusion] = _load_trained(run, build_model, out_dir, env)
            continue
        steps = f", at most {args.max_steps} steps" if args.max_steps else ""
        log(f"== {name}: {len(train_set)} training samples, {args.epochs} epochs{steps}, on {env.device} "
            f"x{env.world_size} (kernels: {'on' if gf.extension_available() else 'off'}) -> {out_dir}")
        model, result = train_and_evaluate(run, build_model, evaluate, train_set, eval_set, env, out_dir)
        if env.is_main:
            study.runs[fusion][seed] = result
            if seed == seeds[0]:
                study.models[fusion] = model
        del model  # a later seed's model is done with once evaluated: only the first seed's are kept
    return study


def _sweep_directory(out: Path, fraction: float) -> Path:
    return Path(out) / f"corruption{fraction:g}"


def run_sweep(args: argparse.Namespace, env: DistEnv, build_model: BuildModel, evaluate: Evaluate,
              train_set: Dataset, eval_set: Dataset, write_report: WriteReport, began: float) -> list[SweepPoint]:
    """The study of each --corruption-sweep fraction (as --data-corruption) into --out/corruption<X>/,
    each with its own report there (written on the main process as soon as it is done; its models
    are released then). Returns the points, in the order given."""
    points = []
    for fraction in args.corruption_sweep:
        point = _with(args, data_corruption=fraction, out=_sweep_directory(args.out, fraction),
                      given=sorted({*args.given, "data_corruption"}))
        study = run_study(point, env, build_model, evaluate, train_set, eval_set,
                          heading=f"training corruption {fraction:.0%}: ")
        if env.is_main:
            write_report(point, study, eval_set, time.perf_counter() - began)
        study.models.clear()  # its figures are drawn: free the models before the next fraction trains
        points.append(SweepPoint(fraction, point.out, study))
    return points


def _setup(args: argparse.Namespace) -> DistEnv:
    try:
        return distributed.setup(args.device)
    except (ValueError, RuntimeError) as error:
        raise UsageError("--device", str(error).removeprefix("device: ")) from None


def _check_batch(args: argparse.Namespace, train_set: Dataset, env: DistEnv) -> None:
    per_rank = len(train_set) // env.world_size
    if per_rank < args.batch_size:
        raise UsageError("--batch-size", f"{args.batch_size} is more than the {per_rank} training samples of each of "
                                         f"the {env.world_size} process(es); lower it or raise --num-train")


def run_experiment(args: argparse.Namespace, load_data: Callable, build_model: BuildModel, evaluate: Evaluate,
                   write_report: WriteReport, write_sweep_report: WriteSweepReport) -> Study | list[SweepPoint] | None:
    """The body of both pipelines' ``main``: join the process group, load the data, run the study
    (or, with --corruption-sweep, the sweep), and on the main process write the report and print
    its tables.

    load_data(args, env) -> (train_set, eval_set). Returns the study (the sweep's points) on the
    main process, else None. A value found wrong on the way (UsageError) ends the program with one
    line and exit status 2.
    """
    if args.low_memory:
        pin_mmap_threshold()
    try:
        env = _setup(args)
        began = time.perf_counter()
        if env.is_main and args.rgb_weights is None:
            print("note: the RGB encoder (ResNet-18) starts from random weights; the paper starts from ImageNet "
                  "weights (give torchvision's resnet18 checkpoint file with --rgb-weights)")
        train_set, eval_set = load_data(args, env)
        _check_batch(args, train_set, env)
        # Loader workers are forked from this process and share its pages until they write to them;
        # the cyclic garbage collector writes to every object it visits, so without freezing them the
        # workers soon hold private copies of the interpreter's heap (at the full-size preset, two
        # workers added 240 MB to the process tree when they started; frozen, 50-100 MB).
        gc.collect()
        gc.freeze()
        try:
            if args.corruption_sweep:
                outcome = run_sweep(args, env, build_model, evaluate, train_set, eval_set, write_report, began)
            else:
                outcome = run_study(args, env, build_model, evaluate, train_set, eval_set)
        finally:
            gc.unfreeze()
    except UsageError as error:
        exit_with(str(error))
    if env.is_main:
        seconds = time.perf_counter() - began
        tables = (write_sweep_report(args, outcome, seconds) if args.corruption_sweep
                  else write_report(args, outcome, eval_set, seconds))
        print(f"\n{tables}\nresults and plots in {args.out} ({time.perf_counter() - began:.0f} s); "
              f"{describe_checkpoints(args.out)}")
    distributed.cleanup(env)
    return outcome if env.is_main else None
