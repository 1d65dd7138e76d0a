"""Surgical scene segmentation from RGB with a cross-modal VAE and MoE / PoE / gPoE fusion (paper Tables 1, 4).

RGB (ResNet-18) and the view's depth point cloud (ResPEL) are encoded and fused; each latent decodes the five-class
mask (DCGAN-style, cross-entropy) and the point cloud (FoldingNet), paper Eq. 12-15, on partly corrupted training
views; at test time the mask from RGB alone and from joint inference is scored by IoU and F1.

    python examples/surgical_seg.py                       # demo: built-in data, gPoE, under 3 min on 2 CPU cores
    python examples/surgical_seg.py --compare             # MoE vs PoE vs gPoE (paper Tables 1 and 4, Fig. 6)
    python examples/surgical_seg.py --preset study        # the comparison over 6 seeds: means, CIs, paired differences
    python examples/surgical_seg.py --preset full --data-root /data/sim2real --rgb-weights resnet18-f37072fd.pth
    torchrun --nproc_per_node 2 examples/surgical_seg.py  # data-parallel, gloo on CPU, nccl on GPU (docs/surgical.md)
"""

import argparse
import functools
import itertools
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common import evaluation, export, report, study, training
from common.cli import Parser, UsageError, positive_float, positive_int
from common.data import Fields, load_splits, test_corruption
from common.networks import CrossModalVAE, DCGANDecoder, cross_modal_vae
from gpoe_fusion.likelihoods import cross_entropy
from sim2real.dataset import (CLASS_COLORS, CLASS_NAMES, DEFAULT_HFOV_DEG, IMAGE_HEIGHT, IMAGE_WIDTH, NUM_CLASSES,
                              SPLITS, Sim2RealDataset, classes_to_colors, default_intrinsics)
from sim2real.metrics import SegmentationEvaluator
from sim2real.synthetic import ensure_builtin_sim2real

PRESETS = {
    # Built-in data at small sizes, in memory: minutes on a 2-core CPU; networks and noise as the hand-pose demo's.
    "demo": dict(num_train=1200, num_eval=200, image_size=64, num_points=128, latent_dim=32, rgb_width=16,
                 rgb_stem_pool=True, pel_width=48, grid_size=8, fold_hidden=64, seg_base=128, seg_min_channels=16,
                 epochs=48, batch_size=32, eval_batch_size=100, lr=2e-3, weight_decay=1e-4, warmup_epochs=0.5,
                 beta=1e-3, points_weight=1.0, data_corruption=0.3, train_pixel_corruption=0.9, point_noise=1.0,
                 in_memory=True, workers=0, low_memory=False, seeds=1, split="random", training_noise="fresh"),
    # The real random views at the paper's image size, streamed; num_train / num_eval None: every view of the split.
    "full": dict(num_train=None, num_eval=None, image_size=256, num_points=1024, latent_dim=64, rgb_width=64,
                 rgb_stem_pool=True, pel_width=256, grid_size=32, fold_hidden=512, seg_base=256, seg_min_channels=32,
                 epochs=60, batch_size=64, eval_batch_size=None, lr=3e-4, weight_decay=1e-4, warmup_epochs=1.0,
                 beta=1e-3, points_weight=1.0, data_corruption=0.5, train_pixel_corruption=0.9, point_noise=1.0,
                 in_memory=False, workers=4, low_memory=True, seeds=1, split="scene", training_noise="fresh"),
}
# The demo's settings, MoE, PoE and gPoE at several seeds: intervals and paired differences (docs/surgical.md).
PRESETS["study"] = dict(PRESETS["demo"], compare=True, seeds=6)
# The settings of each preset that the paper publishes, and where; the others are our choices (results.json).
_PAPER_VIEWS = "Section 4.1: the 21000 random views of 7 scenes (the split by scene is our choice)"
FROM_PAPER = {"demo": {}, "study": {}, "full": {"image_size": "Section 4.2: RGB centre-cropped and resized to 256x256",
                                                "num_train": _PAPER_VIEWS, "num_eval": _PAPER_VIEWS}}
IGNORE_INDEX = 255
TRAIN_SPLIT, EVAL_SPLIT, UNSEEN_SPLIT = "train", "test", "unseen"
RANDOM_SPLIT_SEED = 0  # --split random's permutation, whatever --seed is: every seed of a study tests the same views
ALL_SCENES = tuple(range(1, 8))
FIELDS = ("rgb", "mask", "points")  # what training and evaluation read of a view
VIEWS_PER_SCENE = 3000  # the real dataset's: the built-in data's size when a whole split is asked for
TABLE1_LEVELS = (0.0, 0.5, 0.7)  # the test pixel-corruption levels at which paper Table 1 compares PoE and gPoE
TASK = report.Task("surgical_seg", "Surgical segmentation on Sim2Real", "Sim2Real", PRESETS, FROM_PAPER,
                   ("iou", "IoU (macro)"), ".4f")
EXPORT_TOLERANCE = 0.001  # how far --export-onnx's IoU in ONNX Runtime may be from results.json's
COLUMNS = [("IoU", "iou"), ("F1", "f1")]
AVERAGING = ("IoU and F1 per class from one confusion matrix accumulated over every evaluated pixel of the test set; "
             "the single IoU and F1 are macro averages, the unweighted mean over the classes present in the "
             "ground truth or the prediction (torchmetrics' average='macro'); pixels labelled ignore_index "
             f"{IGNORE_INDEX} are left out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(__doc__, "docs/surgical.md")
    add = parser.add_argument_group("segmentation").add_argument
    add("--image-size", type=positive_int, metavar="N",
        help="side of the square RGB and mask, a power of two >= 8 (the paper's: 256)")
    add("--seg-base", type=positive_int, metavar="N", help="channels of the segmentation decoder's 4x4 map")
    add("--seg-min-channels", type=positive_int, metavar="N", help="fewest channels of the decoder's layers")
    add("--intrinsics", type=positive_float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
        help="pinhole intrinsics of the full 512x256 views in pixels: the random views store none (default: "
             "assumed, a 90 degree horizontal field of view: 256 256 255.5 127.5)")
    add("--split", choices=("scene", "random"), help="scene: train on scenes 1-4, test on scene 7, an anatomy never "
        "seen in training; random: a seeded random split of the views of all 7 scenes, test views from the anatomies "
        "seen in training (--num-eval of them, default a tenth)")
    add("--unseen-scenes", type=int, nargs="+", choices=ALL_SCENES, default=[], metavar="K",
        help="with --split random: scenes left out of its views and tested on as well (--num-eval views, evenly "
             "spaced), anatomies never seen in training (metric groups <group>_unseen) (default: none)")
    add("--unknown-colors", choices=("error", "ignore"), default="error", help="a segmentation colour that is no "
        f"class: an error, or ignored (label {IGNORE_INDEX}, left out of loss and metrics)")
    args = parser.parse(argv, PRESETS, "surgical", num_train="demo 1200, full every view of scenes 1-4 (with --split "
                        "random: of the views that do not test)",
                        num_eval="demo 200, full every view of scene 7 (with --split random: a tenth of the views)")
    if args.unseen_scenes and (args.split != "random" or len(set(args.unseen_scenes)) == len(ALL_SCENES)):
        parser.error("argument --unseen-scenes: expected some of the 7 scenes with --split random (--split scene tests "
                     f"on an unseen scene already), got {args.unseen_scenes} with --split {args.split}")
    if args.image_size < 8 or args.image_size & (args.image_size - 1):
        parser.error(f"argument --image-size: expected a power of two >= 8 (the segmentation decoder doubles a 4x4 "
                     f"map up to it), got {args.image_size}")
    return args


def intrinsics_matrix(args: argparse.Namespace) -> np.ndarray | None:
    """--intrinsics as a [3, 3] matrix, or None for the loader's documented default."""
    fx, fy, cx, cy = args.intrinsics or (None,) * 4
    return None if args.intrinsics is None else np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def intrinsics_record(args: argparse.Namespace) -> dict:
    """The intrinsics the point clouds were made with and where they come from, for results.json."""
    K = intrinsics_matrix(args) if args.intrinsics else default_intrinsics(IMAGE_WIDTH, IMAGE_HEIGHT)
    source = "--intrinsics" if args.intrinsics else (
        f"assumed: a pinhole with a {DEFAULT_HFOV_DEG:.0f} degree horizontal field of view (the random views store "
        f"no intrinsics; the paper uses the provided ones, Section 4.2)")
    return {"fx": float(K[0, 0]), "fy": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]),
            "image": f"{IMAGE_WIDTH}x{IMAGE_HEIGHT} (before the centre crop)", "source": source}


def seen_scenes(args: argparse.Namespace) -> tuple[int, ...]:
    """The scenes of --split random's views: all but --unseen-scenes."""
    return tuple(k for k in ALL_SCENES if k not in args.unseen_scenes)


def builtin_views_per_scene(args: argparse.Namespace) -> int:
    """Views per scene of built-in data large enough for --num-train and --num-eval: with --split scene, spread over
    scenes 1-4 and scene 7; with --split random, both together over its scenes, and --num-eval over --unseen-scenes."""
    if args.num_train is None or args.num_eval is None:
        return VIEWS_PER_SCENE
    if args.split == "random":
        unseen = math.ceil(args.num_eval / len(args.unseen_scenes)) if args.unseen_scenes else 0
        return max(math.ceil((args.num_train + args.num_eval) / len(seen_scenes(args))), unseen)
    return max(math.ceil(args.num_train / len(SPLITS[TRAIN_SPLIT])), math.ceil(args.num_eval / len(SPLITS[EVAL_SPLIT])))


def split_indices(size: int, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """--split random: the sorted positions of the test and training views among ``size`` views of its scenes: in a
    permutation from RANDOM_SPLIT_SEED, the first --num-eval (default a tenth), then --num-train (default the rest)."""
    order = np.random.default_rng(RANDOM_SPLIT_SEED).permutation(size)
    num_eval = size // 10 if args.num_eval is None else args.num_eval
    scenes = f"the {len(seen_scenes(args))} scenes"
    if num_eval > size:
        raise UsageError("--num-eval", f"{num_eval} views requested, but {scenes} have {size}")
    rest = size - num_eval
    num_train = rest if args.num_train is None else args.num_train
    if num_train > rest:
        raise UsageError("--num-train", f"{num_train} views requested, but {scenes} have {rest} besides the "
                                        f"{num_eval} test views")
    return {EVAL_SPLIT: np.sort(order[:num_eval]), TRAIN_SPLIT: np.sort(order[num_eval:num_eval + num_train])}


def load_data(args: argparse.Namespace, env) -> list[Dataset]:
    """The training and test views (--split) of --data-root or the built-in data: scenes 1-4 and 7 (a smaller count
    takes views evenly spaced), or a seeded random split of all scenes but --unseen-scenes, then the test views of
    --unseen-scenes; streamed or (--in-memory) decoded once. No Sim2Real folder: UsageError naming --data-root."""
    root = args.data_root or training.builtin_root(
        lambda progress: ensure_builtin_sim2real(args.cache_dir, builtin_views_per_scene(args), progress=progress),
        not args.no_progress, env)
    views_of = functools.partial(Sim2RealDataset, root, image_size=args.image_size, num_points=args.num_points,
                                 intrinsics=intrinsics_matrix(args), unknown_colors=args.unknown_colors,
                                 ignore_index=IGNORE_INDEX, seed=args.seed)

    def split_of(split: str, count: int | None, option: str) -> Dataset:
        if args.split == "random" and split != UNSEEN_SPLIT:
            every = views_of(scenes=seen_scenes(args))
            return Fields(every, split_indices(len(every), args)[split].tolist(), FIELDS)
        full = views_of(scenes=args.unseen_scenes if split == UNSEEN_SPLIT else SPLITS[split])
        count = len(full) if count is None else count
        if count > len(full):
            raise UsageError(option, f"{count} views requested, but the {split} split (scenes "
                                     f"{', '.join(map(str, full.scenes))}) of {root} has {len(full)}")
        return Fields(full, np.linspace(0, len(full) - 1, count).round().astype(int).tolist(), FIELDS)

    splits = [(TRAIN_SPLIT, args.num_train, "--num-train"), (EVAL_SPLIT, args.num_eval, "--num-eval")]
    splits += [(UNSEEN_SPLIT, args.num_eval, "--num-eval")] if args.unseen_scenes else []
    return load_splits(split_of, splits, args.in_memory, progress=not args.no_progress and env.is_main)


def splits_record(args: argparse.Namespace) -> dict:
    """Which views train and which test, for results.json."""
    if args.split == "random":
        return {"kind": "random", "scenes": list(seen_scenes(args)), "seed": RANDOM_SPLIT_SEED,
                "how": "a permutation of the views of these scenes from seed; its first num_eval views test, "
                       "the next num_train train", "unseen": sorted(args.unseen_scenes)}
    return {"kind": "scene", "train": list(SPLITS[TRAIN_SPLIT]), "eval": list(SPLITS[EVAL_SPLIT])}


def build_model(args: argparse.Namespace) -> CrossModalVAE:
    """``networks.cross_modal_vae`` with the segmentation decoder (per-pixel cross-entropy, ignore index 255)."""
    return cross_modal_vae(args, lambda: {"mask": DCGANDecoder(args.latent_dim, NUM_CLASSES, out_size=args.image_size,
                                                               base=args.seg_base, min_channels=args.seg_min_channels)},
                           {"mask": functools.partial(cross_entropy, ignore_index=IGNORE_INDEX)})


class MaskScore:
    """``SegmentationEvaluator``'s scores of logits [B, C, S, S] against a batch's masks (``iou``, ``f1`` macro,
    ``pixel_accuracy``, per class (None: absent from both), ``support``, ``pixels``) and ``num_samples``."""

    def __init__(self):
        self.evaluator, self.samples = SegmentationEvaluator(NUM_CLASSES, ignore_index=IGNORE_INDEX), 0

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        self.evaluator.update(logits.float(), batch["mask"].to(logits.device))
        self.samples += len(logits)

    def compute(self) -> dict:
        scores = self.evaluator.compute()
        for key in ("iou_per_class", "f1_per_class"):
            scores[key] = [None if math.isnan(v) else v for v in scores[key]]
        return {**scores, "num_samples": self.samples}


def evaluate(model: CrossModalVAE, eval_set: Dataset, args: argparse.Namespace, device: torch.device,
             unseen: Dataset | None = None) -> dict:
    """The run's metric groups (``evaluation.evaluate``, also of the ``unseen`` scenes' views), ``MaskScore``'s."""
    return evaluation.evaluate(model, eval_set, args, device, "mask", MaskScore, unseen)


def table_rows(runs: study.Study, fusions: list[str], levels: list[str]) -> list[dict]:
    """A row per level and fusion: its IoU and F1, over seeds their means and 95 % intervals."""
    rows = []
    for lv, f in itertools.product(levels, fusions):
        row = {"corruption": float(lv), "fusion": f}
        for _, key in COLUMNS:
            summary = report.metric_summary(runs.results, runs.statistics, f, lv, key)
            row[key] = summary["mean"]
            if runs.statistics is not None:
                row.update({f"{key}_ci95": summary["ci95"], "seeds": summary["n"]})
        rows.append(row)
    return rows


def per_class_table(results: dict) -> str:
    """IoU / F1 of every class, per fusion and corruption level."""
    def pair(iou: float | None, f1: float | None) -> str:
        return "n/a" if iou is None else f"{iou:.3f} / {f1:.3f}"

    rows = [[report.FUSION_LABELS[f], f"{float(lv):.0%}"] + list(map(pair, m["iou_per_class"], m["f1_per_class"]))
            for f, r in results.items() for lv, m in r["metrics"].items()]
    return report.markdown_table(["Fusion", "Corruption"] + [f"{name} IoU / F1" for name in CLASS_NAMES], rows)


@torch.no_grad()
def qualitative_figure(models: dict[str, CrossModalVAE], eval_set: Dataset, args: argparse.Namespace, path: Path,
                       samples: int = 2) -> None:
    """Like paper Fig. 6: per sample, the input, the ground truth, then each fusion's mask from RGB alone; the test
    pixel corruption grows from left to right."""
    rows, labels = [], []
    for i in range(min(samples, len(eval_set))):
        inputs = torch.stack([test_corruption(eval_set, level, args.seed, kind=args.corruption_kind)[i]["rgb"]
                              for level in args.test_corruption])
        rows += [[(x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in inputs],
                 [classes_to_colors(eval_set[i]["mask"].numpy(), IGNORE_INDEX)] * len(inputs),
                 *([classes_to_colors(p) for p in m.predict(inputs, "mask").argmax(1).numpy()]
                   for m in models.values())]
        labels += [f"#{i} input", f"#{i} ground truth"] + [f"#{i} {report.FUSION_LABELS[name]}" for name in models]
    key = dict(zip(CLASS_NAMES, CLASS_COLORS))
    if args.unknown_colors == "ignore":
        key["not a class (ignored)"] = (0, 0, 0)
    report.image_grid(rows, path, row_labels=labels, col_labels=report.level_labels(args), legend=key)


def unseen_markdown(args: argparse.Namespace, runs: study.Study, out: Path) -> str:
    """The IoU and F1 on the --unseen-scenes' views from RGB alone, the joint and the oracle (RGB corrupted, the points
    clean) with the paired differences, and ``iou_unseen_vs_corruption.png``."""
    results, statistics, kind = runs.results, runs.statistics, args.corruption_kind
    groups = {f"{group}{evaluation.UNSEEN}": label for group, label in
              (("metrics", "RGB alone"), ("metrics_joint", "joint"), ("metrics_oracle", "oracle"))}
    scenes = ", ".join(map(str, sorted(args.unseen_scenes)))
    text = (f"\nScenes never seen in training (scene {scenes}, {args.num_eval} views; RGB corrupted, the points clean)"
            f"{report.spread(runs.seeds)}.\n\n{report.fusion_table(results, COLUMNS, '.4f', statistics, groups, kind)}"
            "\n")
    for group, label in list(groups.items())[:2]:
        text += report.differences_markdown(statistics, COLUMNS, ".4f", group, f" on the unseen scenes, {label}", kind)
    report.corruption_plot(results, "iou", out / "iou_unseen_vs_corruption.png", "IoU (macro)",
                           f"Segmentation of unseen scene {scenes}", statistics, dict(list(groups.items())[:2]), kind)
    return text


def write_report(args: argparse.Namespace, runs: study.Study, eval_set: Dataset) -> str:
    """results.json, results.md, the paper's Table 4 and Table 1 layouts (markdown and JSON), the common tables, the
    plots and the qualitative figure (first seed) in --out; returns the tables."""
    out, results, statistics, kind = Path(args.out), runs.results, runs.statistics, args.corruption_kind
    summary = study.write_summary(args, TASK, runs, classes=list(CLASS_NAMES), averaging=AVERAGING,
                                  intrinsics=intrinsics_record(args), splits=splits_record(args))
    levels = report.corruption_levels(results)
    table4 = report.fusion_table(results, COLUMNS, ".4f", statistics, kind=kind)
    training.write_json(out / "table4.json", {"layout": "paper Table 4", "averaging": AVERAGING,
                                              "rows": table_rows(runs, runs.fusions, levels)})
    (out / "table4.md").write_text(table4)
    tables = f"Paper Table 4 layout: IoU and F1 (macro) from RGB alone{report.spread(runs.seeds)}.\n\n{table4}"
    table1_levels = [lv for lv in levels if float(lv) in TABLE1_LEVELS]
    if {"poe", "gpoe"} <= set(runs.fusions) and kind == "pixels":  # paper Table 1: PoE and gPoE at its levels
        table1 = report.markdown_table(["Pixel corruption", "Method", "IoU", "F1"], [
            [f"{float(lv):.0%}" if i == 0 else "", report.FUSION_LABELS[f]]
            + [report.metric_cell(results, statistics, f, lv, key, ".4f") for _, key in COLUMNS]
            for lv in table1_levels for i, f in enumerate(("poe", "gpoe"))])
        training.write_json(out / "table1.json", {"layout": "paper Table 1", "averaging": AVERAGING,
                                                  "rows": table_rows(runs, ["poe", "gpoe"], table1_levels)})
        (out / "table1.md").write_text(table1)
        tables += f"\nPaper Table 1 layout: PoE vs gPoE.\n\n{table1}"
    tables += (f"\n{report.differences_markdown(statistics, COLUMNS, '.4f', kind=kind)}\n"
               f"{report.joint_markdown(results, statistics, COLUMNS, '.4f', kind)}\n"
               f"{report.credibility_markdown(results, statistics)}")
    if args.unseen_scenes:
        tables += unseen_markdown(args, runs, out)
    (out / "results.md").write_text(
        f"# {TASK.title} ({summary['data']}, preset {args.preset}, {report.seeds_phrase(runs.seeds)})\n\nMasks from "
        f"RGB alone (z_rgb -> segmentation decoder) unless said otherwise, {len(eval_set)} test views. "
        f"{AVERAGING}.\n\n{tables}\nPer class{report.first_seed(runs.seeds)}, IoU / F1:\n\n{per_class_table(results)}")
    for key, label in (("iou", "IoU (macro)"), ("f1", "F1 (macro)")):
        report.corruption_plot(results, key, out / f"{key}_vs_corruption.png", label, "Segmentation from RGB",
                               statistics, kind=kind)
    report.joint_plots(results, "iou", out, "IoU (macro)", statistics, kind)
    qualitative_figure(runs.models(build_model), eval_set, args, out / "qualitative.png")
    return tables


def main(argv: list[str] | None = None) -> study.Study | list[study.Study] | dict | None:
    args = parse_args(argv)
    if args.export_onnx:
        return export.export_run(args, export.Pipeline(TASK, build_model, load_data, MaskScore, "mask",
                                                       EXPORT_TOLERANCE))
    with training.session(args) as env:
        if env.is_main:
            record = intrinsics_record(args)
            print(f"intrinsics: fx {record['fx']:g}, fy {record['fy']:g}, cx {record['cx']:g}, cy {record['cy']:g} "
                  f"({record['source'].split(' (')[0]})")
        train_set, eval_set, *unseen = load_data(args, env)
        run_one = training.runner(build_model, functools.partial(evaluate, unseen=next(iter(unseen), None)), train_set,
                                  eval_set, env)
        return study.run(args, env, TASK, run_one, functools.partial(write_report, eval_set=eval_set))


if __name__ == "__main__":
    main()
