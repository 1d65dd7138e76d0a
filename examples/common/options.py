"""The options both pipelines take, the presets that fill them, the checks on their values, and
where each value of a run comes from (the paper, the command line, or our choice).

Options a preset sets default to None here; :func:`apply_preset` fills them from the chosen preset,
so a value given on the command line always wins and ``args.given`` records which were given.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

import gpoe_fusion as gf

from .cli import (default_cache_dir, fraction, non_negative_float, non_negative_int, positive_float,
                  positive_int, show_defaults)
from .networks import load_resnet18_state

__all__ = ["COMPARED", "FUSIONS", "PRESET_NAMES", "TEST_CORRUPTION", "add_common_arguments", "apply_preset",
           "finish_help", "provenance", "run_signature"]

FUSIONS = ("moe", "poe", "gpoe", "mopoe")
# What --compare trains unless --fusions says otherwise: the paper's comparison.
COMPARED = ("moe", "poe", "gpoe")
# Each pipeline's presets: demo, full, and study (the demo's settings, --compare over several seeds).
PRESET_NAMES = ("demo", "full", "study")
# The paper's test pixel-corruption levels: Table 3 (0, 25, 50 percent), Table 1 and Fig. 4 (0, 50, 70 percent).
TEST_CORRUPTION = (0.0, 0.25, 0.5, 0.7)
TEST_CORRUPTION_SOURCE = "paper: Table 3 (0, 25, 50 percent), Table 1 and Fig. 4 (0, 50, 70 percent)"
# Options that change how a run executes or what it reports, not the model it trains: a run resumed
# with other values of these continues exactly. So are those that say which runs a study makes
# (--seeds, --corruption-sweep, --compare, --fusions): each run's own seed, fusion and data corruption
# are in its signature.
_RUN_ONLY = {"out", "resume", "compare", "fusions", "no_progress", "low_memory", "device", "cache_dir", "workers",
             "in_memory", "eval_batch_size", "test_corruption", "rgb_weights", "given", "seeds", "corruption_sweep"}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options both pipelines take. Those a preset sets default to None (filled by apply_preset)."""
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=PRESET_NAMES, default="demo",
                     help="sizes and schedule: demo (minutes on a CPU), full (the whole real dataset, 256x256 "
                          "images, streamed from disk) or study (the demo's settings, --compare at several "
                          "--seeds: means with confidence intervals); each value it sets has its own option, "
                          "which overrides it")
    run.add_argument("--fusion", choices=FUSIONS, default="gpoe",
                     help="the fusion layer (mopoe: the mixture of every subset's product, Sutter et al. 2021)")
    run.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                     help="train the --fusions alike (each into --out/<fusion>) and compare them")
    run.add_argument("--fusions", nargs="+", choices=FUSIONS, default=list(COMPARED), metavar="FUSION",
                     help=f"what --compare trains, from {', '.join(FUSIONS)}")
    run.add_argument("--out", type=Path, metavar="DIR", default=None,
                     help="output folder: results.json, results.md, plots, checkpoint.pt")
    run.add_argument("--resume", action="store_true",
                     help="continue a killed run from the checkpoint in --out (it must be of the same configuration)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="auto: CUDA when available, else CPU")
    run.add_argument("--seed", type=non_negative_int, metavar="N", default=0,
                     help="initial weights, batch order, training noise and test corruption")
    run.add_argument("--seeds", type=positive_int, metavar="N", default=None,
                     help="train each fusion at the seeds --seed, --seed + 1, ..., --seed + N - 1 (each into "
                          "seed<k>/ of its folder; a finished seed is loaded, not retrained) and report the mean, "
                          "95 % confidence intervals and the paired differences between the fusions")
    run.add_argument("--no-amp", action="store_true", help="train in float32 on GPU instead of bf16 autocast")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                     help="return freed tensor memory to the system at once (glibc's malloc with a fixed mmap "
                          "threshold): a lower peak on the CPU at full size, about a quarter slower steps")

    data = parser.add_argument_group("data")
    data.add_argument("--data-root", type=Path, metavar="DIR", default=None,
                      help="the real dataset's folder (default: none, built-in data in the real format, "
                           "generated once under --cache-dir)")
    data.add_argument("--cache-dir", type=Path, metavar="DIR", default=default_cache_dir(),
                      help="where built-in data is generated and kept ($XDG_CACHE_HOME/gpoe_fusion)")
    data.add_argument("--num-train", type=positive_int, metavar="N", default=None, help="training samples used")
    data.add_argument("--num-eval", type=positive_int, metavar="N", default=None, help="evaluation samples used")
    data.add_argument("--num-points", type=positive_int, metavar="N", default=None, help="points per point cloud")
    data.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=None,
                      help="decode every sample once and keep it in memory (fast for small sets), or read "
                           "each from disk when it is used, in the loader's worker processes")
    data.add_argument("--workers", type=non_negative_int, metavar="N", default=None,
                      help="data-loader worker processes per rank (0: load in the main process)")

    model = parser.add_argument_group("model")
    model.add_argument("--rgb-weights", type=Path, metavar="FILE", default=None,
                       help="torchvision's ResNet-18 checkpoint file (e.g. resnet18-f37072fd.pth, ImageNet "
                            "weights as in the paper); nothing is downloaded (default: none, random init)")
    model.add_argument("--rgb-width", type=positive_int, metavar="N", default=None,
                       help="channels of the RGB ResNet-18's first stage (64: ResNet-18 itself; narrower: the same "
                            "blocks and strides with fewer channels)")
    model.add_argument("--rgb-stem-pool", action=argparse.BooleanOptionalAction, default=None,
                       help="the max-pool after the RGB ResNet's stem (without it small crops keep more resolution)")
    model.add_argument("--credibility", choices=gf.credibility.CREDIBILITIES, default="joint",
                       help="gPoE's credibility: joint (paper Fig. 2), independent or global networks, entropy (the "
                            "entropy each expert removes from the prior, no network) or entropy+joint")
    model.add_argument("--latent-dim", type=positive_int, metavar="N", default=None, help="latent dimensions")
    model.add_argument("--pel-width", type=positive_int, metavar="N", default=None, help="ResPEL point encoder width")
    model.add_argument("--grid-size", type=positive_int, metavar="N", default=None,
                       help="FoldingNet grid side (grid-size squared points decoded)")
    model.add_argument("--fold-hidden", type=positive_int, metavar="N", default=None, help="FoldingNet hidden width")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, metavar="N", default=None, help="training epochs")
    train.add_argument("--max-steps", type=positive_int, metavar="N", default=None,
                       help="stop after this many optimizer steps, then evaluate and report as usual (the "
                            "schedule stays that of --epochs: the steps are the first ones of the full run) "
                            "(default: none, all epochs)")
    train.add_argument("--batch-size", type=positive_int, metavar="N", default=None, help="training batch per rank")
    train.add_argument("--eval-batch-size", type=positive_int, metavar="N", default=None, help="evaluation batch")
    train.add_argument("--lr", type=positive_float, metavar="X", default=None, help="AdamW peak learning rate")
    train.add_argument("--weight-decay", type=non_negative_float, metavar="X", default=None, help="AdamW weight decay")
    train.add_argument("--warmup-epochs", type=non_negative_float, metavar="X", default=None,
                       help="linear learning-rate warm-up, then cosine decay")
    train.add_argument("--beta", type=non_negative_float, metavar="X", default=None, help="KL weight (paper Eq. 15)")
    train.add_argument("--points-weight", type=non_negative_float, metavar="X", default=None,
                       help="weight of the point-cloud reconstruction terms")

    noise = parser.add_argument_group("noise (paper Section 4.3)")
    noise.add_argument("--data-corruption", type=fraction, metavar="X", default=None,
                       help="fraction of training samples whose RGB is pixel-corrupted (and, independently, "
                            "whose point cloud gets Gaussian noise)")
    noise.add_argument("--train-pixel-corruption", type=fraction, metavar="X", default=None,
                       help="share of pixels replaced in a corrupted training image")
    noise.add_argument("--point-noise", type=non_negative_float, metavar="X", default=None,
                       help="std of the Gaussian noise on a corrupted training point cloud (normalised units)")
    noise.add_argument("--training-noise", choices=("fixed", "fresh"), default=None,
                       help="fixed: a corrupted training sample has the same noise in every epoch (a dataset "
                            "recorded once); fresh: the same samples are corrupted, with noise drawn anew every "
                            "epoch (a sensor's noise at every capture), so that a model cannot learn a sample's "
                            "noise pattern by heart")
    noise.add_argument("--test-corruption", type=fraction, nargs="+", metavar="P", default=None,
                       help="test-time pixel-corruption levels")
    noise.add_argument("--corruption-sweep", type=fraction, nargs="+", metavar="X", default=None,
                       help="train at each of these --data-corruption fractions (each into --out/corruption<X>/, "
                            "with its own report) and plot the metric at 0 and 50 %% test corruption against "
                            "them (paper Fig. 4, first panel) (default: none, no sweep)")


def finish_help(parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, object]],
                **notes: str) -> None:
    """Every option's help ends with its default: a preset's value per preset, or the fixed one.
    notes: option dest -> the default in words, where no value says it (e.g. ``out``)."""
    notes = {"test_corruption": " ".join(map(str, TEST_CORRUPTION)) + ", the paper's levels",
             "compare": ", ".join(f"{name} {'on' if p.get('compare') else 'off'}" for name, p in presets.items()),
             **notes}
    if any(p.get("eval_batch_size") is None for p in presets.values()):
        notes["eval_batch_size"] = ", ".join(f"{name} {p['eval_batch_size'] or 'the training batch size'}"
                                             for name, p in presets.items())
    show_defaults(parser, presets, notes)


def apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 presets: Mapping[str, Mapping[str, object]]) -> argparse.Namespace:
    """Fill every option left unset from the chosen preset, then check the values together.

    Records ``args.given``: the preset's keys (and ``test_corruption``) set on the command line.
    A bad value ends the program through ``parser.error`` (one line, exit status 2).
    """
    preset = presets[args.preset]
    args.given = sorted(key for key in [*preset, "test_corruption"] if getattr(args, key, None) is not None)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.compare is None:  # a preset that does not compare leaves it out
        args.compare = False
    if args.test_corruption is None:
        args.test_corruption = list(TEST_CORRUPTION)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.corruption_sweep is not None:
        if len(set(args.corruption_sweep)) < len(args.corruption_sweep):
            parser.error(f"argument --corruption-sweep: a fraction appears twice in {args.corruption_sweep}")
        if "data_corruption" in args.given:
            parser.error("argument --corruption-sweep: not allowed with --data-corruption (the sweep sets it)")
    if args.data_root is not None and not args.data_root.is_dir():
        parser.error(f"argument --data-root: no such folder: {args.data_root}")
    for name in ("out", "cache_dir"):
        path = getattr(args, name)
        if path is not None and path.exists() and not path.is_dir():
            parser.error(f"argument --{name.replace('_', '-')}: {path} exists and is not a folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        built = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        parser.error(f"argument --device: cuda was asked for, but {built}; use --device cpu (or auto)")
    if args.rgb_weights is not None:
        if args.rgb_width != 64 or not args.rgb_stem_pool:
            parser.error(f"argument --rgb-weights: ResNet-18 weights need --rgb-width 64 and --rgb-stem-pool "
                         f"(this run has --rgb-width {args.rgb_width}"
                         f"{'' if args.rgb_stem_pool else ' and --no-rgb-stem-pool'})")
        try:
            load_resnet18_state(args.rgb_weights)
        except (OSError, ValueError) as error:
            parser.error(f"argument --rgb-weights: {error}")
    return args


def provenance(args: argparse.Namespace, presets: Mapping[str, Mapping[str, object]],
               from_paper: Mapping[str, str]) -> dict:
    """Where each setting of the run comes from, for results.json.

    from_paper: setting -> where the paper gives it, for the chosen preset. Returns
    ``{"paper": {setting: where}, "command_line": [settings], "project_choice": [settings],
    "rgb_init": ...}``: every preset setting (and the test levels) in exactly one of the three.
    """
    keys = [*presets[args.preset], "test_corruption"]
    given = set(args.given)
    paper = dict(from_paper)
    if "test_corruption" not in paper:
        paper["test_corruption"] = TEST_CORRUPTION_SOURCE
    return {
        "paper": {k: paper[k] for k in keys if k in paper and k not in given},
        "command_line": [k for k in keys if k in given],
        "project_choice": [k for k in keys if k not in paper and k not in given],
        "rgb_init": (f"weights from --rgb-weights {args.rgb_weights}" if args.rgb_weights is not None else
                     "random (the paper starts from ImageNet weights, Section 4.5)"),
    }


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def run_signature(args: argparse.Namespace) -> dict:
    """The settings that define the trained model (not how the run executes): a checkpoint may be
    resumed only by a run with the same signature. Plain values, as checkpoints require."""
    signature = {k: _plain(v) for k, v in sorted(vars(args).items()) if k not in _RUN_ONLY}
    signature["data_root"] = str(Path(args.data_root).resolve()) if args.data_root is not None else "built-in"
    return signature
