"""The command line both pipelines share: the options, the presets that fill them (``args.given``: those given on the
command line, which win), their checks, where each value comes from, and a run's signature. A bad invocation ends with
one line on stderr and exit status 2 (argparse's errors, and UsageError for a value found wrong once it is used)."""

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
TEST_CORRUPTION = (0.0, 0.25, 0.5, 0.7)  # the paper's test pixel-corruption levels
TEST_CORRUPTION_SOURCE = "paper: Table 3 (0, 25, 50 percent), Table 1 and Fig. 4 (0, 50, 70 percent)"
TEST_POINT_NOISE = (0.0, 0.25, 0.5, 1.0)  # std, normalised units: up to the presets' training --point-noise, 1
TEST_LEVELS = ("test_corruption", "test_point_noise")  # options not in a preset, but in results.json's provenance
Presets = Mapping[str, Mapping[str, object]]  # preset name -> option -> value
# Options of how a run executes or reports or which runs a study makes, not of its model: other values, the same run.
NOT_IN_SIGNATURE = {"out", "resume", "compare", "fusions", "seeds", "corruption_sweep", "no_progress", "low_memory",
                    "device", "cache_dir", "workers", "in_memory", "eval_batch_size", "test_corruption", "given",
                    "rgb_weights", "export_onnx", "test_point_noise"}


class UsageError(Exception):
    """A command-line value found wrong at run time. str(): ``"<option>: <message>"``."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")


def exit_with(message: str, prog: str | None = None) -> NoReturn:
    """Print ``<prog>: error: <message>`` as one line on stderr and exit with status 2 (argparse's)."""
    prog = prog or os.path.basename(sys.argv[0]) or "python"
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


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
    count, natural, number, share = ({"type": positive_int, "metavar": "N"}, {"type": non_negative_int, "metavar": "N"},
                                     {"type": non_negative_float, "metavar": "X"}, {"type": fraction, "metavar": "X"})
    switch = {"action": argparse.BooleanOptionalAction}
    add = parser.add_argument_group("run").add_argument
    add("--preset", choices=("demo", "full", "study"), default="demo",
        help="demo (minutes on a CPU), full (the real dataset at 256x256, streamed) or study (the demo, --compare "
             "over --seeds); each value it sets has its own option, which overrides it")
    add("--fusion", choices=FUSIONS, default="gpoe",
        help="the fusion layer (mopoe: the mixture of every subset's product, Sutter et al. 2021)")
    add("--compare", **switch, help="train the --fusions alike (each into --out/<fusion>) and compare them")
    add("--fusions", nargs="+", choices=FUSIONS, default=list(COMPARED), metavar="FUSION",
        help=f"what --compare trains, from {', '.join(FUSIONS)}")
    add("--out", type=Path, metavar="DIR", help="output folder: results.json, results.md, plots, checkpoint.pt")
    add("--resume", action="store_true",
        help="continue a killed run from the checkpoint in --out (it must be of the same configuration)")
    add("--export-onnx", action="store_true", help="train nothing: export the finished run in --out (its checkpoint "
        "and results.json) to ONNX, the RGB-only predictor and the fused model, next to its checkpoint, and check that "
        "ONNX Runtime gives back its results.json metric (docs/deploy.md)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available, else CPU")
    add("--seed", **natural, default=0, help="initial weights, batch order, training noise and test corruption")
    add("--seeds", **count, help="train each fusion at the seeds --seed ... --seed + N - 1 (into seed<k>/; a finished "
                                 "one is loaded) and report means, 95 % intervals and paired differences")
    add("--no-amp", action="store_true", help="train in float32 on GPU instead of bf16 autocast")
    add("--no-progress", action="store_true", help="no progress bars")
    add("--low-memory", **switch, help="return freed memory to the system at once (glibc's mmap threshold fixed) "
        "instead of keeping it for reuse: a lower peak on the CPU at full size, steps a quarter slower")

    add = parser.add_argument_group("data").add_argument
    add("--data-root", type=Path, metavar="DIR",
        help="the real dataset's folder (default: none, built-in data generated once under --cache-dir)")
    add("--cache-dir", type=Path, metavar="DIR", default=default_cache_dir(),
        help="where built-in data is generated and kept ($XDG_CACHE_HOME/gpoe_fusion)")
    add("--num-train", **count, help="training samples used")
    add("--num-eval", **count, help="evaluation samples used")
    add("--num-points", **count, help="points per point cloud")
    add("--in-memory", **switch, help="decode every sample once into memory, or each from disk when used (in the "
                                      "loader's workers)")
    add("--workers", **natural, help="data-loader worker processes per rank (0: load in the main process)")

    add = parser.add_argument_group("model").add_argument
    add("--rgb-weights", type=Path, metavar="FILE", help="torchvision's ResNet-18 checkpoint file (e.g. "
        "resnet18-f37072fd.pth, ImageNet weights as in the paper) (default: none, random init)")
    add("--rgb-width", **count, help="channels of the RGB ResNet-18's first stage (64: ResNet-18 itself)")
    add("--rgb-stem-pool", **switch, help="the max-pool after the RGB ResNet's stem")
    add("--credibility", choices=gf.credibility.CREDIBILITIES, default="joint", help="gPoE's credibility: joint "
        "(paper Fig. 2), independent or global networks, entropy (no network) or entropy+joint")
    add("--latent-dim", **count, help="latent dimensions")
    add("--pel-width", **count, help="ResPEL point encoder width")
    add("--grid-size", **count, help="FoldingNet grid side (grid-size squared points decoded)")
    add("--fold-hidden", **count, help="FoldingNet hidden width")

    add = parser.add_argument_group("training").add_argument
    add("--epochs", **count, help="training epochs")
    add("--max-steps", **count, help="stop after this many optimizer steps (the first ones of --epochs' schedule), "
                                     "then evaluate and report (default: none, all epochs)")
    add("--batch-size", **count, help="training batch per rank")
    add("--eval-batch-size", **count, help="evaluation batch")
    add("--lr", type=positive_float, metavar="X", help="AdamW peak learning rate")
    add("--weight-decay", **number, help="AdamW weight decay")
    add("--warmup-epochs", **number, help="linear learning-rate warm-up, then cosine decay")
    add("--beta", **number, help="KL weight (paper Eq. 15)")
    add("--points-weight", **number, help="weight of the point-cloud reconstruction terms")

    add = parser.add_argument_group("noise (paper Section 4.3)").add_argument
    add("--data-corruption", **share, help="fraction of training samples whose RGB (and, independently, whose points) "
                                           "is corrupted")
    add("--train-pixel-corruption", **share, help="share of pixels replaced in a corrupted training image")
    add("--point-noise", **number, help="std of the noise on a corrupted training point cloud (normalised units)")
    add("--training-noise", choices=("fixed", "fresh"), help="fixed: a corrupted sample's noise is the same every "
        "epoch; fresh: drawn anew every epoch, so that a model cannot learn it by heart")
    add("--corruption-kind", choices=("pixels", "desync"), default="pixels",
        help="the corruption of training, test and held-out samples: pixels, noise the encoder can see (the RGB's "
             "pixels replaced, Gaussian noise on the points); desync, a modality replaced by the same modality of "
             "another sample, as a sensor out of step delivers it, which looks clean to the encoder (a test level is "
             "then the fraction of the samples desynchronised, for the RGB and the points alike)")
    add("--test-corruption", type=fraction, metavar="P", nargs="+", help="test-time pixel-corruption levels")
    add("--test-point-noise", type=non_negative_float, metavar="SIGMA", nargs="+",
        help="test-time noise levels of the point cloud (std, as --point-noise), scored with the RGB clean")
    add("--corruption-sweep", **share, nargs="+", help="train at each --data-corruption X (into corruption<X>/) and "
        "plot the metric against them (paper Fig. 4, first panel) (default: none)")


class Parser(argparse.ArgumentParser):
    """A pipeline's command line: the options both take (``add_common_arguments``), one-line errors, and ``doc`` (the
    script's docstring; its first paragraph describes it) and ``page`` (its documentation) in the help."""

    def __init__(self, doc: str, page: str):
        super().__init__(description=doc.split("\n\n")[0], epilog=f"See {page}.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(self)

    def error(self, message: str) -> NoReturn:
        exit_with(f"{message} (see --help)", self.prog)

    def parse(self, argv: list[str] | None, presets: Presets, runs: str, **notes: str) -> argparse.Namespace:
        """The options of ``argv`` (``finish_help``, ``apply_preset``); --out defaults to
        ``runs/<runs>_<preset>_<fusion>`` (``_compare`` with --compare)."""
        finish_help(self, presets, out=f"runs/{runs}_<preset>_<fusion>, or runs/{runs}_<preset>_compare", **notes)
        args = apply_preset(self, self.parse_args(argv), presets)
        args.out = args.out or Path(f"runs/{runs}_{args.preset}" + ("_compare" if args.compare else f"_{args.fusion}"))
        return args


def _shown(value: object) -> str:
    return "none" if value is None else " ".join(map(_shown, value)) if isinstance(value, (list, tuple)) else str(value)


def finish_help(parser: argparse.ArgumentParser, presets: Presets, **notes: str) -> None:
    """End every option's help with its default: each preset's value, the fixed one, or words (``notes[dest]``)."""
    notes = {"test_corruption": f"{_shown(TEST_CORRUPTION)}, the paper's levels",
             "test_point_noise": f"{_shown(TEST_POINT_NOISE)}, up to the presets' training noise",
             "compare": ", ".join(f"{name} {'on' if p.get('compare') else 'off'}" for name, p in presets.items()),
             "eval_batch_size": ", ".join(f"{name} {p['eval_batch_size'] or 'the training batch size'}"
                                          for name, p in presets.items()), **notes}
    for action in parser._actions:
        if action.default == argparse.SUPPRESS or "default:" in action.help:  # --help, or said already
            continue
        if action.dest in notes:
            default = notes[action.dest]
        elif action.default is None and any(action.dest in p for p in presets.values()):
            default = ", ".join(f"{name} {_shown(p[action.dest])}" for name, p in presets.items())
        else:
            default = "off" if isinstance(action, argparse._StoreTrueAction) else _shown(action.default)
        action.help = f"{action.help} (default: {default})".replace("%", "%%")


def apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace, presets: Presets) -> argparse.Namespace:
    """Fill every option left unset from the chosen preset, then check the values together (``parser.error``). Records
    ``args.given`` and ``args.rgb_weights_sha256`` (None: random weights)."""
    preset = presets[args.preset]
    args.given = sorted(key for key in [*preset, *TEST_LEVELS] if getattr(args, key, None) is not None)
    vars(args).update({key: value for key, value in preset.items() if getattr(args, key, None) is None})
    args.compare = bool(args.compare)
    args.test_corruption = args.test_corruption or list(TEST_CORRUPTION)
    args.test_point_noise = args.test_point_noise or list(TEST_POINT_NOISE)
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
            parser.error(f"argument --rgb-weights: ResNet-18 weights need --rgb-width 64 and --rgb-stem-pool (this run "
                         f"has --rgb-width {args.rgb_width}{'' if args.rgb_stem_pool else ' and --no-rgb-stem-pool'})")
        try:
            load_resnet18_state(args.rgb_weights)
        except (OSError, ValueError) as error:
            parser.error(f"argument --rgb-weights: {error}")
        args.rgb_weights_sha256 = hashlib.sha256(args.rgb_weights.read_bytes()).hexdigest()
    return args


def provenance(args: argparse.Namespace, presets: Presets, from_paper: Mapping[str, str]) -> dict:
    """Where each setting comes from: ``{"paper": {setting: where}, "command_line": [...], "project_choice": [...],
    "rgb_init": ...}``, every preset setting and test level in exactly one of the three."""
    keys, given = [*presets[args.preset], *TEST_LEVELS], set(args.given)
    paper = {"test_corruption": TEST_CORRUPTION_SOURCE, **from_paper}
    return {"paper": {k: paper[k] for k in keys if k in paper and k not in given},
            "command_line": [k for k in keys if k in given],
            "project_choice": [k for k in keys if k not in paper and k not in given],
            "rgb_init": (f"weights from --rgb-weights {args.rgb_weights} (sha256 {args.rgb_weights_sha256})"
                         if args.rgb_weights is not None else
                         "random (the paper starts from ImageNet weights, Section 4.5)")}


def run_signature(args: argparse.Namespace) -> dict:
    """Every setting that defines the trained model, as plain values: a checkpoint is resumed, a finished run reused,
    only by a run of the same signature (the RGB start weights count by their hash, not their path)."""
    signature = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                 for k, v in sorted(vars(args).items()) if k not in NOT_IN_SIGNATURE}
    if "data_root" in signature:
        signature["data_root"] = str(Path(args.data_root).resolve()) if args.data_root is not None else "built-in"
    return signature
