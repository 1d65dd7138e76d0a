"""3-D hand pose from RGB with a cross-modal VAE and MoE / PoE / gPoE fusion (paper Sections 4-5).

RGB (ResNet-18) and the hand's depth point cloud (ResPEL) are encoded to Gaussian posteriors and fused; the joint and
each unimodal latent decode the 21 keypoints and the point cloud (FoldingNet), paper Eq. 12-15 (Eq. 16 for MoE), on
partly corrupted training samples; at test time the pose comes from RGB alone at several corruption levels, and from
joint inference. The script reads top to bottom: options, data, model, evaluation, report, ``main``.

    python examples/handpose_rhd.py                       # demo: built-in data, gPoE, about 2 min on 2 CPU cores
    python examples/handpose_rhd.py --compare             # MoE vs PoE vs gPoE (paper Table 3, Figs. 4-5)
    python examples/handpose_rhd.py --preset study        # the comparison over 6 seeds: means, CIs, paired differences
    python examples/handpose_rhd.py --preset full --data-root /data/RHD_published_v2 --rgb-weights resnet18-f37072fd.pth
    torchrun --nproc_per_node 2 examples/handpose_rhd.py  # data-parallel, gloo on CPU, nccl on GPU (docs/handpose.md)
"""

import argparse
import functools
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset

from common import evaluation, export, report, study, training
from common.cli import Parser, UsageError, positive_int
from common.data import load_splits, test_corruption
from common.networks import CrossModalVAE, KeypointDecoder, cross_modal_vae
from common.report import FUSION_LABELS
from gpoe_fusion.likelihoods import squared_error
from rhd.dataset import RHDDataset, make_sample
from rhd.metrics import KeypointEvaluator
from rhd.synthetic import ensure_builtin_rhd

PRESETS = {
    # Built-in data at small sizes, in memory: about 2 min on a 2-core CPU (docs/handpose.md: how the demo learns).
    "demo": dict(num_train=8000, num_eval=300, crop_size=64, num_points=128, latent_dim=32, rgb_width=16,
                 rgb_stem_pool=True, pel_width=48, grid_size=8, fold_hidden=64, keypoint_hidden=256, epochs=10,
                 batch_size=64, eval_batch_size=150, lr=3e-3, weight_decay=1e-4, warmup_epochs=0.5, beta=1e-3,
                 points_weight=1.0, data_corruption=0.3, train_pixel_corruption=0.9, point_noise=1.0, in_memory=True,
                 workers=0, low_memory=False, seeds=1, training_noise="fixed"),
    # The real RHD at the crop size of Yang et al.'s preprocessing (which the paper follows), streamed from disk.
    "full": dict(num_train=41258, num_eval=2728, crop_size=256, num_points=1024, latent_dim=64, rgb_width=64,
                 rgb_stem_pool=True, pel_width=256, grid_size=32, fold_hidden=512, keypoint_hidden=512, epochs=60,
                 batch_size=64, eval_batch_size=None, lr=3e-4, weight_decay=1e-4, warmup_epochs=1.0, beta=1e-3,
                 points_weight=1.0, data_corruption=0.5, train_pixel_corruption=0.9, point_noise=1.0, in_memory=False,
                 workers=4, low_memory=True, seeds=1, training_noise="fresh"),
}
# The demo's settings, MoE, PoE and gPoE at several seeds: intervals and paired differences (docs/handpose.md).
PRESETS["study"] = dict(PRESETS["demo"], compare=True, seeds=6)
# The settings of each preset that the paper publishes, and where; the others are our choices (results.json).
FROM_PAPER = {"demo": {}, "study": {}, "full": {"num_train": "Section 4.1: RHD's 41258 training samples",
                                                "num_eval": "Section 4.1: RHD's 2728 evaluation samples"}}
TASK = report.Task("handpose_rhd", "Hand pose on RHD", "RHD", PRESETS, FROM_PAPER, ("mean_epe_mm", "mean EPE (mm)"),
                   ".3f")
EXPORT_TOLERANCE = 0.01  # how far --export-onnx's mean EPE (mm) in ONNX Runtime may be from results.json's
COLUMNS = [("mean EPE (mm)", "mean_epe_mm"), ("AUC", "auc_20_50")]
# Skeleton of one RHD hand: the wrist to each finger's MCP, then MCP -> PIP -> DIP -> tip.
BONES = [(0, 4), (4, 3), (3, 2), (2, 1), (0, 8), (8, 7), (7, 6), (6, 5), (0, 12), (12, 11), (11, 10), (10, 9),
         (0, 16), (16, 15), (15, 14), (14, 13), (0, 20), (20, 19), (19, 18), (18, 17)]
COLOURS = {"moe": (40, 160, 40), "poe": (220, 40, 40), "gpoe": (40, 80, 230), "mopoe": (200, 120, 20)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(__doc__, "docs/handpose.md")
    add = parser.add_argument_group("hand pose").add_argument
    add("--crop-size", type=positive_int, metavar="N", help="side of the square RGB crop of the hand")
    add("--keypoint-hidden", type=positive_int, metavar="N", help="width of the keypoint decoder's hidden layers")
    return parser.parse(argv, PRESETS, "handpose")


def load_data(args: argparse.Namespace, env) -> tuple[Dataset, Dataset]:
    """The first --num-train training and --num-eval evaluation samples of --data-root or of the built-in data, streamed
    or (--in-memory) decoded once into memory. A folder that is no RHD raises UsageError naming --data-root."""
    # Built-in frames rendered by this run become samples as they are drawn, instead of being decoded again.
    sample = functools.partial(make_sample, crop_size=args.crop_size, num_points=args.num_points, seed=args.seed)
    rendered: dict[str, dict[int, dict]] = {}
    root = args.data_root or training.builtin_root(
        lambda progress: ensure_builtin_rhd(args.cache_dir, args.num_train, args.num_eval, progress=progress,
                                            sample=sample if args.in_memory else None, samples=rendered),
        not args.no_progress, env)

    def split_of(split: str, count: int, option: str) -> Dataset:
        full = RHDDataset(root, split, crop_size=args.crop_size, num_points=args.num_points, seed=args.seed,
                          samples=rendered.get(split))
        if count > len(full):
            raise UsageError(option, f"{count} samples requested, but {root / split} has {len(full)}")
        return Subset(full, range(count))

    splits = [("training", args.num_train, "--num-train"), ("evaluation", args.num_eval, "--num-eval")]
    return load_splits(split_of, splits, args.in_memory, progress=not args.no_progress and env.is_main,
                       errors=(OSError, ValueError, KeyError, pickle.UnpicklingError))


def build_model(args: argparse.Namespace) -> CrossModalVAE:
    """``networks.cross_modal_vae`` with the keypoint decoder (squared error) besides the point-cloud one."""
    return cross_modal_vae(args, lambda: {"keypoints": KeypointDecoder(args.latent_dim, hidden=args.keypoint_hidden)},
                           {"keypoints": squared_error})


class PoseScore:
    """``KeypointEvaluator``'s EPE, PCK and AUC (mm) of normalised keypoint predictions [B, 21, 3] against a batch."""

    def __init__(self):
        self.evaluator = KeypointEvaluator()

    def update(self, keypoints: torch.Tensor, batch: dict) -> None:
        self.evaluator.update(keypoints.float().cpu(), batch["keypoints"], batch["scale"])

    def compute(self) -> dict:
        return self.evaluator.compute()


def evaluate(model: CrossModalVAE, eval_set: Dataset, args: argparse.Namespace, device: torch.device) -> dict:
    """The run's metric groups (``evaluation.evaluate``), the pose's ``PoseScore`` per test level."""
    return evaluation.evaluate(model, eval_set, args, device, "keypoints", PoseScore)


def qualitative_figure(models: dict[str, CrossModalVAE], eval_set: Dataset, args: argparse.Namespace, path: Path,
                       samples: int = 3, zoom: int = 3) -> None:
    """Like paper Fig. 5: per sample, the corrupted input with the ground truth (black), then each fusion's prediction
    from RGB alone, corruption growing from left to right."""
    def drawn(base: Image.Image, item: dict, poses: list[tuple[torch.Tensor, tuple[int, int, int]]]) -> np.ndarray:
        """``base`` with each of ``poses`` (normalised keypoints [21, 3], colour) drawn through the crop's K."""
        image = base.copy()
        for keypoints, colour in poses:
            uvw = (keypoints.double() * item["scale"].double() + item["root"].double()) @ item["K"].double().T
            uv = (uvw[:, :2] / uvw[:, 2:3]).numpy()
            for a, b in BONES:
                ImageDraw.Draw(image).line([tuple(uv[a] * zoom), tuple(uv[b] * zoom)], fill=colour, width=2)
        return np.asarray(image)

    rows, labels = [], []
    for i in range(min(samples, len(eval_set))):
        per_model: dict[str, list] = {name: [] for name in ["input", *models]}
        for level in args.test_corruption:
            item = test_corruption(eval_set, level, args.seed, kind=args.corruption_kind)[i]
            base = Image.fromarray((item["rgb"].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
            base = base.resize((base.width * zoom, base.height * zoom), Image.NEAREST)
            truth = (item["keypoints"], (0, 0, 0))
            per_model["input"].append(drawn(base, item, [truth]))
            for name, model in models.items():
                pred = model.predict(item["rgb"][None], "keypoints")[0].float()
                per_model[name].append(drawn(base, item, [truth, (pred, COLOURS[name])]))
        rows += per_model.values()
        labels += [f"#{i} " + ("input + GT" if name == "input" else FUSION_LABELS[name]) for name in per_model]
    key = {"ground truth": (0, 0, 0), **{FUSION_LABELS[name]: COLOURS[name] for name in models}}
    report.image_grid(rows, path, row_labels=labels, col_labels=report.level_labels(args), legend=key)


def write_report(args: argparse.Namespace, runs: study.Study, eval_set: Dataset) -> str:
    """results.json, results.md (the paper's Table 3 layout and the common tables), the plots and the qualitative
    figure (first seed) in --out; returns the tables."""
    out, results, statistics, kind = Path(args.out), runs.results, runs.statistics, args.corruption_kind
    summary = study.write_summary(args, TASK, runs)
    tables = ("Pose from RGB alone; mean EPE in mm (lower is better), AUC of PCK over 20-50 mm (higher is better)"
              f"{report.spread(runs.seeds)}.\n\n{report.fusion_table(results, COLUMNS, '.3f', statistics, kind=kind)}\n"
              f"{report.differences_markdown(statistics, COLUMNS, '.3f', kind=kind)}\n"
              f"{report.joint_markdown(results, statistics, COLUMNS, '.3f', kind)}\n"
              f"{report.credibility_markdown(results, statistics)}")
    (out / "results.md").write_text(f"# {TASK.title} ({summary['data']}, preset {args.preset}, "
                                    f"{report.seeds_phrase(runs.seeds)})\n\n{tables}")
    report.corruption_plot(results, "mean_epe_mm", out / "epe_vs_corruption.png", "mean EPE (mm)", "Pose from RGB",
                           statistics, kind=kind)
    report.joint_plots(results, "mean_epe_mm", out, "mean EPE (mm)", statistics, kind)
    for f, r in results.items():
        report.line_plot(next(iter(r["metrics"].values()))["pck_thresholds_mm"],
                         {f"{float(lv):.0%}": m["pck_curve"] for lv, m in r["metrics"].items()}, out / f"pck_{f}.png",
                         "error threshold (mm)", "3D PCK", markers=False,
                         title=f"{FUSION_LABELS[f]}: PCK under pixel corruption{report.first_seed(runs.seeds)}")
    qualitative_figure(runs.models(build_model), eval_set, args, out / "qualitative.png")
    return tables


def main(argv: list[str] | None = None) -> study.Study | list[study.Study] | dict | None:
    args = parse_args(argv)
    if args.export_onnx:
        return export.export_run(args, export.Pipeline(TASK, build_model, load_data, PoseScore, "keypoints",
                                                       EXPORT_TOLERANCE))
    with training.session(args) as env:
        train_set, eval_set = load_data(args, env)
        return study.run(args, env, TASK, training.runner(build_model, evaluate, train_set, eval_set, env),
                         functools.partial(write_report, eval_set=eval_set))


if __name__ == "__main__":
    main()
