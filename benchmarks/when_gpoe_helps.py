"""When does gPoE help? A controlled benchmark on synthetic sensors with a known latent, in minutes on a CPU.

Data. Each sample has a latent z ~ N(0, I_4) and M = 3 sensors; sensor m reads z through its own fixed random
MLP (4 -> 32 -> 16, tanh, drawn from the seed), standardised, plus Gaussian noise of std SENSOR_NOISE[m]: sensor 0
is the sharpest, sensor 2 the noisiest. The latent is known, so every model can be scored on it.

Faults, per sample and sensor (``gpoe_fusion.noise.CorruptedDataset``):

    noise    heavy Gaussian noise on the sensor's features (std NOISE_SIGMA, three times the signal's): visible
             in the input, so an encoder trained with it can answer it with a larger variance;
    desync   the sensor's reading replaced by the same sensor's reading of another sample (``Desynchronisation``):
             a real reading that looks clean, so the encoder stays confident and only the disagreement with the
             other sensors shows it.

Models. A multimodal VAE per fusion, trained with ``gf.CrossModalObjective``: one MLP encoder per sensor
(16 -> 32 features -> mu, logvar [8]) and an MLP decoder of the known latent from z (the cross-modal objective with
the latent as its target, as keypoints are the hand-pose pipeline's: the joint and every sensor's posterior decode
it, plus beta times each posterior's KL), for PoE, gPoE with credibility joint, independent, global and entropy,
MoE and MoPoE. For each seed, each fault and each training fraction (the share of the training samples whose sensor
m is corrupted, for every m independently), every fusion gets the same data, the same faults, the same initial
weights of the encoders and decoder, the same batches and the same number of steps; gPoE's alpha is learned
without the flags. beta, the learning rate and the budget (``Settings``) were chosen once on PoE's clean error
alone (beta = 1 collapsed every posterior to the prior, with a 4-dimensional target to pay for the KL).

Measures, on test samples of the same generator (half of them with one sensor corrupted by the training fault,
every other sensor clean, each sensor in turn):

    error    joint prediction: the latent decoded from the fused posterior's mean (a mixture's mean for MoE and
             MoPoE), mean squared error per latent dimension (1 = what predicting 0 scores), on the corrupted half;
    oracle   the same with the corrupted sensor masked out of the fusion from the flags (measurement only, never
             in training): what the fusion would score if it knew which sensor failed;
    auroc    of "the fusion's weight of the sensor (alpha, PoE's precision share, the mixture weights), averaged
             over the latent dimensions, is lower on corrupted samples" (``gpoe_fusion.diagnostics.auroc``);
    clean    the joint prediction error on a test set with no fault;
    single   the trivial baseline: the PoE model's best uncorrupted sensor alone (its unimodal posterior), the
             best chosen from the flags, as the oracle is.

Every measure is averaged over the three choices of the corrupted sensor, per run. Over the seeds: means with 95 %
Student-t intervals, and paired t intervals of each fusion's difference to PoE per seed (the seed fixes the data,
the faults and the initial weights, which cancel in the difference).

    python benchmarks/when_gpoe_helps.py --out runs/when_gpoe_helps     # 10 seeds: 350 models, 2 processes

It takes about 250 s of CPU time (user + sys) in two processes, so about half of that in wall time on two free
cores (docs/when-gpoe-helps.md); results.json (every run and the statistics), results.md (the tables) and
when_gpoe_helps.png go to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import gpoe_fusion as gf  # noqa: E402
from common.report import interval_cell, markdown_table  # noqa: E402
from common.study import paired_difference, t_interval  # noqa: E402
from gpoe_fusion.likelihoods import squared_error  # noqa: E402
from gpoe_fusion.noise import CorruptedDataset, Desynchronisation, GaussianPointNoise  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402  (common.report has chosen the headless backend)

FUSIONS = ("poe", "gpoe-joint", "gpoe-independent", "gpoe-global", "gpoe-entropy", "moe", "mopoe")
LABELS = {"poe": "PoE", "gpoe-joint": "gPoE joint", "gpoe-independent": "gPoE independent",
          "gpoe-global": "gPoE global", "gpoe-entropy": "gPoE entropy", "moe": "MoE", "mopoe": "MoPoE",
          "single": "best single sensor"}
FAULTS = ("noise", "desync")
# The std of each sensor's own noise, relative to its standardised signal.
SENSOR_NOISE = (0.25, 0.5, 1.0)
# The visible fault: Gaussian noise three times the signal's std.
NOISE_SIGMA = 3.0
# The share of the test samples with the sensor under test corrupted: two equal groups for the AUROC.
TEST_FRACTION = 0.5
# Seed streams, so that no two random choices of a run share one.
_DATA, _TRAIN_FAULTS, _TEST_FAULTS, _BATCHES = 1, 2, 3, 4


@dataclass(frozen=True)
class Settings:
    """Sizes and budget, the same for every fusion."""

    latent: int = 4  # the known latent's dimension
    features: int = 16  # each sensor's reading
    hidden: int = 32  # every MLP's width, the encoders' features the credibility networks read
    latent_dim: int = 8  # the VAE's latent
    train_samples: int = 4096
    test_samples: int = 1024
    steps: int = 200
    batch_size: int = 512
    lr: float = 1e-2
    beta: float = 0.1
    sensor_noise: tuple[float, ...] = SENSOR_NOISE

    @property
    def sensors(self) -> int:
        return len(self.sensor_noise)

    @property
    def names(self) -> list[str]:
        return [f"x{m}" for m in range(self.sensors)]


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (ReLU, not GELU: GELU's erf costs a quarter of a
    training step at these sizes on a CPU)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Sensors(Dataset):
    """Samples of a latent read by noisy sensors. Items: ``{"latent": [latent], "x0".."x{M-1}": [features]}``.

    The sensors' maps come from ``seed``; ``split`` ("train" or "test") draws that split's latents and noise from its
    own stream, so both splits share the sensors. Each sensor's features are standardised with statistics of a
    fixed reference draw, then get their own noise.
    """

    def __init__(self, settings: Settings, seed: int, split: str):
        size = {"train": settings.train_samples, "test": settings.test_samples}[split]
        maps = torch.Generator().manual_seed(seed * 1000 + _DATA)
        draws = torch.Generator().manual_seed(seed * 1000 + _DATA + (1 if split == "train" else 2) * 100)
        reference = torch.randn(4096, settings.latent, generator=maps)
        self.latent = torch.randn(size, settings.latent, generator=draws)
        self.readings = []
        for sigma in settings.sensor_noise:
            w1 = torch.randn(settings.latent, 32, generator=maps) / math.sqrt(settings.latent)
            w2 = torch.randn(32, settings.features, generator=maps) / math.sqrt(32)
            b1 = 0.5 * torch.randn(32, generator=maps)
            signal = torch.tanh(self.latent @ w1 + b1) @ w2
            ref = torch.tanh(reference @ w1 + b1) @ w2
            signal = (signal - ref.mean(0)) / ref.std(0)
            self.readings.append(signal + sigma * torch.randn(signal.shape, generator=draws))

    def __len__(self) -> int:
        return self.latent.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"latent": self.latent[index], **{f"x{m}": r[index] for m, r in enumerate(self.readings)}}


def fault(kind: str):
    """The corruption of ``CorruptedDataset`` for a fault kind."""
    if kind == "noise":
        return GaussianPointNoise(NOISE_SIGMA)
    if kind == "desync":
        return Desynchronisation()
    raise ValueError(f"kind: expected one of {FAULTS}, got {kind!r}")


def stacked(dataset: Dataset) -> dict[str, Tensor]:
    """Every item of ``dataset``, stacked per key: name -> [N, ...]."""
    items = [dataset[i] for i in range(len(dataset))]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def training_set(settings: Settings, seed: int, kind: str | None, fraction: float) -> dict[str, Tensor]:
    """The training samples, each sensor corrupted by ``kind`` in its own seeded ``fraction`` of them (the same samples
    for either kind), flags ``corrupted_x<m>`` included; kind None: clean (fraction 0)."""
    if (kind is None) != (fraction == 0):
        raise ValueError(f"kind: expected None exactly when fraction is 0, got {kind!r} at fraction {fraction}")
    dataset: Dataset = Sensors(settings, seed, "train")
    if kind is not None:
        for m, name in enumerate(settings.names):
            dataset = CorruptedDataset(dataset, name, fraction, fault(kind), seed=seed * 1000 + _TRAIN_FAULTS * 10 + m)
    return stacked(dataset)


def test_sets(settings: Settings, seed: int, kinds: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    """The clean test set (``"clean"``) and, per fault kind and sensor (``"<kind>/x<m>"``), the test set with that
    sensor corrupted in a seeded half of the samples (the same half for either kind), every other sensor clean."""
    clean = Sensors(settings, seed, "test")
    sets = {"clean": stacked(clean)}
    for kind in kinds:
        for m, name in enumerate(settings.names):
            sets[f"{kind}/{name}"] = stacked(CorruptedDataset(clean, name, TEST_FRACTION, fault(kind),
                                                              seed=seed * 1000 + _TEST_FAULTS * 10 + m))
    return sets


def make_fusion(name: str, settings: Settings) -> nn.Module:
    m, d, widths = settings.sensors, settings.latent_dim, [settings.hidden] * settings.sensors
    if name == "poe":
        return gf.PoE()
    if name == "moe":
        return gf.MoE()
    if name == "mopoe":
        return gf.MoPoE()
    if name.startswith("gpoe-"):
        return gf.GPoE(m, d, widths, credibility=name[len("gpoe-"):], hidden=(settings.hidden,))
    raise ValueError(f"fusion: expected one of {FUSIONS}, got {name!r}")


class SensorVAE(nn.Module):
    """One MLP encoder per sensor (x_m [B, F] -> features [B, H] -> mu, logvar [B, D]) and a ``CrossModalObjective``
    around ``fusion`` whose decoders read z [B, D] back into every sensor and into the latent."""

    def __init__(self, fusion: nn.Module, settings: Settings):
        super().__init__()
        self.settings = settings
        h, d = settings.hidden, settings.latent_dim
        self.trunks = nn.ModuleList(_mlp([settings.features, h]) for _ in settings.names)
        self.heads = nn.ModuleList(nn.Linear(h, 2 * d) for _ in settings.names)
        decoders = {"latent": _mlp([d, h, settings.latent])}
        self.objective = gf.CrossModalObjective(fusion, decoders, {k: squared_error for k in decoders},
                                                beta=settings.beta)

    def encode(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Each sensor's posterior (mu, logvar) [B, D] and features [B, H]."""
        posteriors, features = {}, {}
        for name, trunk, head in zip(self.settings.names, self.trunks, self.heads):
            features[name] = torch.relu(trunk(batch[name]))
            posteriors[name] = tuple(head(features[name]).chunk(2, dim=-1))
        return posteriors, features

    def forward(self, batch: Mapping[str, Tensor]) -> gf.ObjectiveOutput:
        posteriors, features = self.encode(batch)
        targets = {name: batch[name] for name in self.objective.decoders}
        return self.objective(posteriors, targets, features=features)


def build(fusion: str, settings: Settings, seed: int) -> SensorVAE:
    """The VAE of ``fusion``; the encoders and decoders start from the same weights for every fusion of a seed."""
    torch.manual_seed(seed + 1)
    layer = make_fusion(fusion, settings)
    torch.manual_seed(seed)  # drawn after the fusion's own weights: the same for every fusion
    return SensorVAE(layer, settings)


def train(model: SensorVAE, data: Mapping[str, Tensor], settings: Settings, seed: int) -> None:
    """``settings.steps`` Adam steps over shuffled batches, the batches and reparameterisation noise fixed by ``seed``."""
    order = torch.Generator().manual_seed(seed * 1000 + _BATCHES)
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=True)
    n = len(data["latent"])
    batches: list[Tensor] = []
    model.train()
    for _ in range(settings.steps):
        if not batches:
            batches = list(torch.randperm(n, generator=order).split(settings.batch_size))
            if len(batches) > 1 and len(batches[-1]) < settings.batch_size:
                batches.pop()
        rows = batches.pop(0)
        loss = model({k: v[rows] for k, v in data.items()}).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def _prediction_error(model: SensorVAE, joint, latent: Tensor) -> Tensor:
    """Per-sample mean squared error [B] of the latent decoded from the fused posterior's mean."""
    return (model.objective.decoders["latent"](joint.mean) - latent).square().mean(-1)


@torch.no_grad()
def evaluate(model: SensorVAE, sets: Mapping[str, Mapping[str, Tensor]], kinds: Sequence[str],
             single: bool) -> dict[str, float]:
    """``clean``, ``clean_weights`` (each sensor's mean weight on the clean test set, a list of M) and, per kind,
    ``<kind>/error``, ``<kind>/oracle``, ``<kind>/auroc`` (and ``<kind>/single`` with ``single``), each averaged over
    the corrupted sensor."""
    model.eval()
    names = model.settings.names
    fusion = model.objective.fusion

    def fused(batch, mask=None):
        posteriors, features = model.encode(batch)
        mu = torch.stack([posteriors[n][0] for n in names])
        logvar = torch.stack([posteriors[n][1] for n in names])
        joint = fusion(mu, logvar, mask, [features[n] for n in names])
        weights = model.objective.fusion_weights(posteriors, mask, features)
        return posteriors, joint, weights

    clean = sets["clean"]
    _, joint, weights = fused(clean)
    out = {"clean": float(_prediction_error(model, joint, clean["latent"]).mean()),
           "clean_weights": weights.double().mean((1, 2)).tolist()}
    for kind in kinds:
        per_sensor: dict[str, list[float]] = {"error": [], "oracle": [], "auroc": [], "single": []}
        for m, name in enumerate(names):
            batch = sets[f"{kind}/{name}"]
            flags = batch[f"corrupted_{name}"]
            posteriors, joint, weights = fused(batch)
            per_sensor["error"].append(float(_prediction_error(model, joint, batch["latent"])[flags].mean()))
            per_sensor["auroc"].append(gf.diagnostics.auroc(-weights[m].mean(-1), flags))
            mask = torch.ones(len(names), len(flags), dtype=torch.bool)
            mask[m] = ~flags
            oracle = fused(batch, mask)[1]
            per_sensor["oracle"].append(float(_prediction_error(model, oracle, batch["latent"])[flags].mean()))
            if single:
                decode = model.objective.decoders["latent"]
                alone = [float((decode(posteriors[other][0][flags]) - batch["latent"][flags]).square().mean())
                         for other in names if other != name]
                per_sensor["single"].append(min(alone))
        for measure, values in per_sensor.items():
            if values:
                out[f"{kind}/{measure}"] = sum(values) / len(values)
    return out


@dataclass(frozen=True)
class Task:
    """One training condition: every fusion of ``fusions`` trained on the same data, with the fault ``kind`` in
    ``fraction`` of each sensor's samples (None and 0: clean training)."""

    seed: int
    kind: str | None
    fraction: float
    fusions: tuple[str, ...]
    settings: Settings = field(default_factory=Settings)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The faults tested: the training fault, or every fault after clean training (one model serves both)."""
        return FAULTS if self.kind is None else (self.kind,)


def run_task(task: Task) -> dict:
    """Trains and evaluates every fusion of ``task``. Returns the task's fields and ``metrics``: fusion -> measures."""
    torch.set_num_threads(1)
    data = training_set(task.settings, task.seed, task.kind, task.fraction)
    sets = test_sets(task.settings, task.seed, task.kinds)
    metrics = {}
    for fusion in task.fusions:
        model = build(fusion, task.settings, task.seed)
        train(model, data, task.settings, task.seed)
        metrics[fusion] = evaluate(model, sets, task.kinds, single=fusion == "poe")
    return {"seed": task.seed, "kind": task.kind, "fraction": task.fraction, "metrics": metrics}


def tasks(seeds: Sequence[int], fractions: Sequence[float], fusions: Sequence[str], settings: Settings) -> list[Task]:
    """Every (seed, fault, fraction); clean training (fraction 0) once per seed, tested with every fault."""
    out = []
    for seed in seeds:
        for fraction in fractions:
            for kind in ((None,) if fraction == 0 else FAULTS):
                out.append(Task(seed, kind, fraction, tuple(fusions), settings))
    return out


def run(seeds: Sequence[int], fractions: Sequence[float], fusions: Sequence[str], settings: Settings,
        workers: int = 1, progress: bool = True) -> list[dict]:
    """Every task's result, in the order of ``tasks``; ``workers`` processes train in parallel."""
    todo = tasks(seeds, fractions, fusions, settings)
    bar = tqdm(total=len(todo), desc="conditions", unit="condition", disable=not progress)
    results: list[dict] = []
    if workers <= 1:
        for task in todo:
            results.append(run_task(task))
            bar.update()
    else:
        # fork: the workers inherit the imported modules; one thread each, as small networks run best.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for result in pool.imap_unordered(run_task, todo):
                results.append(result)
                bar.update()
    bar.close()
    index = {(t.seed, t.kind, t.fraction): i for i, t in enumerate(todo)}
    return sorted(results, key=lambda r: index[(r["seed"], r["kind"], r["fraction"])])


def conditions(fractions: Sequence[float]) -> list[tuple[str, float]]:
    """The (tested fault, training fraction) cells of the report: clean training is reported under both faults."""
    return [(kind, fraction) for kind in FAULTS for fraction in fractions]


def statistics(results: Sequence[dict], seeds: Sequence[int], fractions: Sequence[float],
               fusions: Sequence[str]) -> dict:
    """Per ``"<fault>@<fraction>"``: each fusion's measures over the seeds (``t_interval``; ``clean_weights``: one per
    sensor), the single sensor's, and each fusion's paired difference to PoE of ``error`` and ``clean``
    (``paired_difference``)."""
    def run_of(kind: str, fraction: float, seed: int) -> dict:
        trained = None if fraction == 0 else kind
        return next(r for r in results if (r["seed"], r["kind"], r["fraction"]) == (seed, trained, fraction))

    out = {}
    for kind, fraction in conditions(fractions):
        runs = [run_of(kind, fraction, seed)["metrics"] for seed in seeds]

        def series(fusion: str, measure: str) -> list:
            key = measure if measure.startswith("clean") else f"{kind}/{measure}"
            return [r[fusion][key] for r in runs]

        cell: dict = {"fusions": {}, "single": t_interval(series("poe", "single"))}
        for fusion in fusions:
            cell["fusions"][fusion] = {m: t_interval(series(fusion, m)) for m in ("error", "oracle", "auroc", "clean")}
            cell["fusions"][fusion]["clean_weights"] = [t_interval(w) for w in zip(*series(fusion, "clean_weights"))]
            if fusion != "poe":
                cell["fusions"][fusion]["error_minus_poe"] = paired_difference(series(fusion, "error"),
                                                                               series("poe", "error"))
                cell["fusions"][fusion]["clean_minus_poe"] = paired_difference(series(fusion, "clean"),
                                                                               series("poe", "clean"))
        out[f"{kind}@{fraction:g}"] = cell
    return out


def markdown(stats: Mapping, fractions: Sequence[float], fusions: Sequence[str], seeds: Sequence[int]) -> str:
    """One table per fault: rows grouped by training fraction, cells mean ± 95 % half-width (differences:
    mean [95 % interval])."""
    lines = []
    for kind in FAULTS:
        rows = []
        for fraction in fractions:
            cell = stats[f"{kind}@{fraction:g}"]
            for fusion in fusions:
                s = cell["fusions"][fusion]
                diff = "" if fusion == "poe" else interval_cell(s["error_minus_poe"], ".3f", brackets=True)
                rows.append([f"{fraction:g}", LABELS[fusion], interval_cell(s["error"], ".3f"), diff,
                             interval_cell(s["oracle"], ".3f"), interval_cell(s["auroc"], ".2f"),
                             interval_cell(s["clean"], ".3f")])
            rows.append([f"{fraction:g}", LABELS["single"], interval_cell(cell["single"], ".3f"), "", "", "", ""])
        lines.append(f"Fault: {kind}. Columns: training fraction (share of training samples with each sensor "
                     f"corrupted), fusion, joint error with one sensor corrupted, its paired difference to PoE "
                     f"(< 0: better than PoE), the oracle bound, the AUROC of the corrupted sensor's weight, the "
                     f"joint error on clean data. Mean ± 95 % t half-width over {len(seeds)} seeds.\n")
        lines.append(markdown_table(["train fraction", "fusion", "error", "error − PoE", "oracle", "AUROC", "clean"],
                                    rows))
    return "\n".join(lines)


def plot(stats: Mapping, fractions: Sequence[float], fusions: Sequence[str], path: Path, seeds: int) -> None:
    """Per fault (columns): joint error with one sensor corrupted (the best single sensor dashed, PoE's oracle
    dotted), the paired difference to PoE, and the AUROC, each over the training fraction, with 95 % intervals."""
    fig, axes = plt.subplots(3, len(FAULTS), figsize=(11, 10), dpi=110, sharex=True)
    x = list(fractions)
    for col, kind in enumerate(FAULTS):
        cells = [stats[f"{kind}@{f:g}"] for f in fractions]
        for k, fusion in enumerate(fusions):
            shift = (k - (len(fusions) - 1) / 2) * 0.006  # side by side, so the error bars can be read
            xs = [f + shift for f in x]
            style = dict(marker="o", markersize=3, capsize=2, label=LABELS[fusion], color=f"C{k}")
            for row, measure in ((0, "error"), (2, "auroc")):
                ys = [c["fusions"][fusion][measure] for c in cells]
                axes[row, col].errorbar(xs, [s["mean"] for s in ys], yerr=[s["half_width"] or 0 for s in ys], **style)
            if fusion != "poe":
                ds = [c["fusions"][fusion]["error_minus_poe"] for c in cells]
                axes[1, col].errorbar(xs, [d["mean"] for d in ds], yerr=[d["half_width"] or 0 for d in ds], **style)
        single = [c["single"]["mean"] for c in cells]
        oracle = [c["fusions"]["poe"]["oracle"]["mean"] for c in cells]
        axes[0, col].plot(x, single, "k--", label=LABELS["single"])
        axes[0, col].plot(x, oracle, "k:", label="PoE oracle")
        axes[1, col].axhline(0.0, color="k", linewidth=0.8)
        axes[2, col].axhline(0.5, color="k", linewidth=0.8, linestyle=":")
        axes[0, col].set_yscale("log")  # clean training under noise is an order of magnitude off the rest
        axes[0, col].set_title(f"fault: {kind}", fontsize=10)
        axes[0, col].set_ylabel("joint error, one sensor corrupted")
        axes[1, col].set_ylabel("error − PoE (paired)")
        axes[2, col].set_ylabel("AUROC of the corrupted sensor's weight")
        axes[2, col].set_xlabel("training fraction corrupted (per sensor)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"When gPoE helps: synthetic sensors, mean and 95 % interval over {seeds} seeds", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/when_gpoe_helps"), help="folder of the results")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (at least 2 for intervals)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.2, 0.4],
                        help="training fractions of corrupted samples per sensor (0 first)")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="training steps of every model")
    parser.add_argument("--workers", type=int, default=2, help="processes training in parallel")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds: expected at least 2 for intervals, got {args.seeds}")
    if any(not 0.0 <= f < 1.0 for f in args.fractions):
        parser.error(f"--fractions: expected fractions in [0, 1), got {args.fractions}")
    if args.steps < 1:
        parser.error(f"--steps: expected >= 1, got {args.steps}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    settings = Settings(steps=args.steps)
    seeds = list(range(args.seeds))
    fractions = sorted(set(args.fractions))
    results = run(seeds, fractions, FUSIONS, settings, workers=args.workers)
    stats = statistics(results, seeds, fractions, FUSIONS)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"settings": asdict(settings), "noise_sigma": NOISE_SIGMA, "seeds": seeds, "fractions": fractions,
              "fusions": list(FUSIONS), "seconds": seconds, "interval": "95 % Student-t over seeds; differences paired by seed",
              "statistics": stats, "runs": results}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    table = markdown(stats, fractions, FUSIONS, seeds)
    (args.out / "results.md").write_text(table)
    plot(stats, fractions, FUSIONS, args.out / "when_gpoe_helps.png", len(seeds))
    print(table)
    print(f"{len(results)} conditions, {len(results) * len(FUSIONS)} models in {seconds:.0f} s; {args.out}")
    return record


if __name__ == "__main__":
    main()
