"""The command line both pipelines share: the options, the presets that fill them, their checks, where
each value of a run comes from (the paper, the command line, or our choice), and a run's signature.

A bad invocation ends with exit status 2 and one line on stderr, e.g.
``handpose_rhd.py: error: argument --epochs: expected a positive integer, got -1``, with no traceback:
argparse's own errors and :class:`UsageError`, raised when a value turns out wrong only once it is used
(a data folder of the wrong layout, a checkpoint of another run). Options a preset sets default to None;
:func:`apply_preset` fills them, so a value on the command line always wins (``args.given`` lists them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

import torch

import gpoe_fusion as gf

from .networks import FUSIONS, load_resnet18_state

COMPARED = ("moe", "poe", "gpoe")  # what --compare trains unless --fusions says otherwise: the paper's comparison
# The paper's test pixel-corruption levels: Table 3 (0, 25, 50 percent), Table 1 and Fig. 4 (0, 50, 70 percent).
TEST_CORRUPTION = (0.0, 0.25, 0.5, 0.7)
TEST_CORRUPTION_SOURCE = "paper: Table 3 (0, 25, 50 percent), Table 1 and Fig. 4 (0, 50, 70 percent)"
# Options that change how a run executes or what it reports, or which runs a study makes (each run's own
# seed, fusion and data corruption are in its signature), not the model it trains: a run resumed or
# reused with other values of these is the same run.
NOT_IN_SIGNATURE = {"out", "resume", "compare", "fusions", "seeds", "corruption_sweep", "no_progress", "low_memory",
                    "device", "cache_dir", "workers", "in_memory", "eval_batch_size", "test_corruption", "given",
                    "rgb_weights"}


class UsageError(Exception):
    """A command-line value found wrong at run time. str(): ``"<option>: <message>"``."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")


def exit_with(message: str, prog: str | None = None) -> NoReturn:
    """Print ``<prog>: error: <message>`` as one line on stderr and exit with status 2 (argparse's)."""
    prog = prog or os.path.basename(sys.argv[0]) or "python"
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``--help`` shows the usage) and the module docstring kept as written."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        exit_with(f"{message} (see --help)", self.prog)


def _value(kind: type, accepts: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` if ``accepts`` it, else an error saying ``expected <what>``."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = _value(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _value(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _value(float, lambda v: 0 < v < float("inf"), "a positive finite number")
non_negative_float = _value(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
fraction = _value(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")


def default_cache_dir() -> Path:
    """Where built-in data is generated: ``$XDG_CACHE_HOME/gpoe_fusion``, else ``~/.cache/gpoe_fusion``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpoe_fusion"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both pipelines take; those a preset sets default to None."""
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=("demo", "full", "study"), default="demo",
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
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available, else CPU")
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


def _shown(value: object) -> str:
    if value is None:
        return "none"
    return " ".join(map(_shown, value)) if isinstance(value, (list, tuple)) else str(value)


def finish_help(parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, object]], **notes: str) -> None:
    """End every option's help with its default: each preset's value, the fixed one, or ``notes[dest]``
    where words say it better (e.g. ``out``)."""
    notes = {"test_corruption": f"{_shown(TEST_CORRUPTION)}, the paper's levels",
             "compare": ", ".join(f"{name} {'on' if p.get('compare') else 'off'}" for name, p in presets.items()),
             "eval_batch_size": ", ".join(f"{name} {p['eval_batch_size'] or 'the training batch size'}"
                                          for name, p in presets.items()), **notes}
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or "default:" in action.help or action.default == argparse.SUPPRESS:
            continue
        if action.dest in notes:
            default = notes[action.dest]
        elif action.default is None and any(action.dest in p for p in presets.values()):
            default = ", ".join(f"{name} {_shown(p[action.dest])}" for name, p in presets.items())
        else:
            default = "off" if isinstance(action, argparse._StoreTrueAction) else _shown(action.default)
        action.help = f"{action.help} (default: {default})".replace("%", "%%")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 presets: Mapping[str, Mapping[str, object]]) -> argparse.Namespace:
    """Fill every option left unset from the chosen preset, then check the values together (a bad one
    ends the program through ``parser.error``). Records ``args.given``, the preset's settings (and
    ``test_corruption``) set on the command line, and ``args.rgb_weights_sha256``, what the RGB
    encoder starts from (None: random weights)."""
    preset = presets[args.preset]
    args.given = sorted(key for key in [*preset, "test_corruption"] if getattr(args, key, None) is not None)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.compare = bool(args.compare)
    args.test_corruption = args.test_corruption or list(TEST_CORRUPTION)
    args.eval_batch_size = args.eval_batch_size or args.batch_size
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
    args.rgb_weights_sha256 = None
    if args.rgb_weights is not None:
        if args.rgb_width != 64 or not args.rgb_stem_pool:
            parser.error(f"argument --rgb-weights: ResNet-18 weights need --rgb-width 64 and --rgb-stem-pool "
                         f"(this run has --rgb-width {args.rgb_width}{'' if args.rgb_stem_pool else ' and --no-rgb-stem-pool'})")
        try:
            load_resnet18_state(args.rgb_weights)
        except (OSError, ValueError) as error:
            parser.error(f"argument --rgb-weights: {error}")
        args.rgb_weights_sha256 = file_sha256(args.rgb_weights)
    return args


def provenance(args: argparse.Namespace, presets: Mapping[str, Mapping[str, object]],
               from_paper: Mapping[str, str]) -> dict:
    """Where each setting comes from, for results.json: ``{"paper": {setting: where}, "command_line":
    [...], "project_choice": [...], "rgb_init": ...}``, every preset setting (and the test levels) in
    exactly one of the three lists. from_paper: setting -> where the paper gives it, for this preset."""
    keys, given = [*presets[args.preset], "test_corruption"], set(args.given)
    paper = {"test_corruption": TEST_CORRUPTION_SOURCE, **from_paper}
    return {"paper": {k: paper[k] for k in keys if k in paper and k not in given},
            "command_line": [k for k in keys if k in given],
            "project_choice": [k for k in keys if k not in paper and k not in given],
            "rgb_init": (f"weights from --rgb-weights {args.rgb_weights} (sha256 {args.rgb_weights_sha256})"
                         if args.rgb_weights is not None else
                         "random (the paper starts from ImageNet weights, Section 4.5)")}


def run_signature(args: argparse.Namespace) -> dict:
    """Every setting that defines the trained model, as plain values (checkpoints hold no others): a
    checkpoint is resumed, and a finished run reused, only by a run of the same signature. The start
    weights of the RGB encoder count by their file's hash (``rgb_weights_sha256``), not its path."""
    signature = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                 for k, v in sorted(vars(args).items()) if k not in NOT_IN_SIGNATURE}
    if "data_root" in signature:
        signature["data_root"] = str(Path(args.data_root).resolve()) if args.data_root is not None else "built-in"
    return signature
