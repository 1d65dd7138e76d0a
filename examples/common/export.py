"""--export-onnx: a finished run in ONNX (dynamic batch), checked in ONNX Runtime: ``rgb_predictor.onnx`` (rgb ->
z_rgb's mean -> decoder), scored by ``evaluation.rgb_metrics`` against results.json, and ``fused_model.onnx`` (encoders,
fusion, decoder on the joint's mean); both compared with eager PyTorch on clean samples. See docs/deploy.md."""

import argparse
import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from .cli import UsageError, exit_with
from .data import eval_loader, materialize
from .evaluation import Score, rgb_metrics
from .networks import CrossModalVAE
from .report import Task, markdown_table
from .training import CHECKPOINT, DistEnv, load_checkpoint

RGB_PREDICTOR, FUSED_MODEL = "rgb_predictor.onnx", "fused_model.onnx"
DEPLOY_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the optional extra "deploy"
# How far from eager's an exported model's outputs may be, relative to the largest output (at least 1): not elementwise,
# as a logit near 0 is a sum of far larger terms and rounds like them (assert_close's rule fails 2 of the demo's 4.1 M).
EAGER_TOLERANCE = 1e-5


# What --export-onnx needs: the pipeline's task (metric compared), model, data (the training and test sets first),
# ``decoded``'s score and the tolerance.
Pipeline = NamedTuple("Pipeline", [("task", Task), ("build_model", Callable[[argparse.Namespace], CrossModalVAE]),
                                   ("load_data", Callable[[argparse.Namespace, DistEnv], Sequence[Dataset]]),
                                   ("score", Callable[[], Score]), ("decoded", str), ("tolerance", float)])


class RGBPredictor(nn.Module):
    """rgb [B, 3, S, S] -> what the evaluation scores (``CrossModalVAE.predict``: z_rgb's mean, decoded)."""

    def __init__(self, model: CrossModalVAE, decoded: str):
        super().__init__()
        self.model, self.decoded = model, decoded

    def forward(self, rgb: Tensor) -> Tensor:
        return self.model.predict(rgb, self.decoded)


class FusedModel(RGBPredictor):
    """rgb [B, 3, S, S], points [B, P, 3] -> the prediction from the joint's mean (``CrossModalVAE.predict_joint``)."""

    def forward(self, rgb: Tensor, points: Tensor) -> Tensor:
        return self.model.predict_joint({"rgb": rgb, "points": points}, self.decoded)


def export_onnx(module: nn.Module, inputs: tuple[Tensor, ...], input_names: list[str], output_name: str,
                path: Path) -> float:
    """``module`` (in eval mode) written to ``path`` as ONNX, every input's batch dynamic; returns the seconds taken."""
    began = time.perf_counter()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # Said of inputs sharing the one batch dimension, which the model names "batch" all the same.
        warnings.filterwarnings("ignore", "# The axis name: batch will not be used", UserWarning)
        program = torch.onnx.export(module.eval(), inputs, dynamic_shapes=tuple({0: batch} for _ in inputs),
                                    input_names=input_names, output_names=[output_name], dynamo=True, verbose=False)
    program.save(str(path))
    return time.perf_counter() - began


def session_predictor(session) -> Callable[..., Tensor]:
    """An ONNX Runtime session as a function of its inputs (tensors, in order) returning its output as a tensor."""
    names = [node.name for node in session.get_inputs()]

    def predict(*inputs: Tensor) -> Tensor:
        feeds = {name: np.ascontiguousarray(x.detach().cpu().numpy()) for name, x in zip(names, inputs)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return predict


def session_signature(session) -> str:
    """A session's inputs and outputs with their shapes, e.g. ``rgb [batch, 3, 64, 64] -> keypoints [batch, 21, 3]``."""
    return " -> ".join(", ".join(f"{node.name} [{', '.join(map(str, node.shape))}]" for node in nodes)
                       for nodes in (session.get_inputs(), session.get_outputs()))


def trained_run(args: argparse.Namespace) -> tuple[argparse.Namespace, dict, dict]:
    """The finished run in --out: its arguments (the checkpoint's signature; results.json's test levels, cache and
    evaluation batch; data streamed), checkpoint and result; UsageError (--out) unless both files are of one run."""
    out = Path(args.out)
    try:
        state = load_checkpoint(out / CHECKPOINT)
    except RuntimeError as error:
        raise UsageError("--out", str(error)) from None
    if state is None:
        raise UsageError("--out", f"no {CHECKPOINT} in {out}: train a run into it first (a --compare or --seeds "
                                  f"study keeps each run in a folder of its own)")
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError) as error:
        raise UsageError("--out", f"no results.json of a finished run in {out} ({error})") from None
    fusions = results.get("fusions", {})
    if len(fusions) > 1 or "seeds" in results or "sweep" in results:
        raise UsageError("--out", f"{out / 'results.json'} is a study's; export one of its runs, in its own folder")
    result = next(iter(fusions.values())) if fusions else results
    signature = state["signature"]
    if "metrics" not in result or result.get("fusion") != signature["fusion"] or (
            [h["steps"] for h in result.get("history", state["history"])] != [h["steps"] for h in state["history"]]):
        raise UsageError("--out", f"results.json in {out} is not that of its {CHECKPOINT} (another run's, or of a run "
                                  f"that did not finish)")
    run = argparse.Namespace(**{**vars(args), **signature})
    config = results.get("config", {})
    run.out, run.device, run.rgb_weights, run.in_memory = out, "cpu", None, False  # the checkpoint holds the weights
    run.data_root = None if signature["data_root"] == "built-in" else Path(signature["data_root"])
    run.cache_dir = Path(config.get("cache_dir", args.cache_dir))
    run.eval_batch_size = config.get("eval_batch_size", args.eval_batch_size)
    run.test_corruption = [float(level) for level in result["metrics"]]
    return run, state, result


@torch.no_grad()
def largest_differences(modules: Mapping[str, tuple[nn.Module, list[str]]],
                        exported: Mapping[str, Callable[..., Tensor]], eval_set: Dataset,
                        args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per exported model (file -> its eager module and input names), on the clean evaluation samples: the largest
    absolute difference from eager's output, ``max_abs_difference``, and the largest eager output, ``max_abs``."""
    found = {name: {"max_abs_difference": 0.0, "max_abs": 0.0} for name in exported}
    for batch in eval_loader(eval_set, args):
        for name, predict in exported.items():
            module, names = modules[name]
            inputs = tuple(batch[n] for n in names)
            eager = module(*inputs)
            for key, value in (("max_abs_difference", predict(*inputs) - eager), ("max_abs", eager)):
                found[name][key] = max(found[name][key], value.abs().max().item())
    return found


def export_run(args: argparse.Namespace, pipeline: Pipeline) -> dict:
    """Exports --out's run: ``{"models": {file: {"bytes", "export_seconds", "max_abs_difference", "max_abs"}}, "metric",
    "levels": {level: {"results_json", "onnx_runtime"}}, "tolerance"}``; exits 1 out of tolerance, 2 on a bad --out."""
    try:
        missing = [name for name in DEPLOY_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError("--export-onnx", f"needs the deploy extra ({', '.join(missing)} missing): pip install "
                                              f"'gpoe_fusion[deploy]'")
        run, state, result = trained_run(args)
        streamed = pipeline.load_data(run, DistEnv(0, 1, torch.device("cpu")))[1]
    except UsageError as error:
        exit_with(str(error))
    eval_set = materialize(streamed, desc="decoding the evaluation split", progress=not run.no_progress)
    model = pipeline.build_model(run)
    model.load_state_dict(state["model"])
    model.eval()
    example = default_collate([eval_set[i % len(eval_set)] for i in range(2)])  # a batch of 2: a dynamic size
    print(f"exporting {run.out} ({run.fusion}, {len(state['history'])} epochs) to ONNX")
    models, modules = {}, {RGB_PREDICTOR: (RGBPredictor(model, pipeline.decoded), ["rgb"]),
                           FUSED_MODEL: (FusedModel(model, pipeline.decoded), ["rgb", "points"])}
    for file, (module, names) in modules.items():
        seconds = export_onnx(module, tuple(example[name] for name in names), names, pipeline.decoded, run.out / file)
        models[file] = {"bytes": (run.out / file).stat().st_size, "export_seconds": seconds}
    import onnxruntime
    sessions = {file: onnxruntime.InferenceSession(str(run.out / file), providers=["CPUExecutionProvider"])
                for file in models}
    exported = {file: session_predictor(session) for file, session in sessions.items()}
    for file, found in largest_differences(modules, exported, eval_set, run).items():
        models[file].update(found)
    measured = rgb_metrics(exported[RGB_PREDICTOR], eval_set, run, pipeline.score)
    (key, label), tolerance = pipeline.task.metric, pipeline.tolerance
    levels = {level: {"results_json": result["metrics"][level][key], "onnx_runtime": measured[level][key]}
              for level in result["metrics"]}
    rows = [[file, session_signature(sessions[file]), m["bytes"] / 1e6, m["export_seconds"],
             f"{m['max_abs_difference']:.2e}", f"{m['max_abs']:.3g}"] for file, m in models.items()]
    print(markdown_table(["File", "Inputs -> output", "Size (MB)", "Export (s)", "Largest difference from eager",
                          "Largest eager output (absolute)"], rows, ".2f"))
    print(markdown_table(["Test corruption", f"{label}, results.json", f"{label}, ONNX Runtime", "Difference"],
                         [[f"{float(level):.0%}", v["results_json"], v["onnx_runtime"],
                           f"{v['onnx_runtime'] - v['results_json']:.2e}"] for level, v in levels.items()], ".6f"))
    failed = [f"{label} at {float(level):.0%} test corruption: {v['onnx_runtime']:.6f} in ONNX Runtime, "
              f"{v['results_json']:.6f} in results.json" for level, v in levels.items()
              if not abs(v["onnx_runtime"] - v["results_json"]) <= tolerance]
    failed += [f"{file}: {m['max_abs_difference']:.2e} from eager, its largest output {m['max_abs']:.3g}"
               for file, m in models.items() if not m["max_abs_difference"] <= EAGER_TOLERANCE * max(1, m["max_abs"])]
    if failed:
        print(f"error: the exported models disagree with the run (tolerance {tolerance:g} on the metric, "
              f"{EAGER_TOLERANCE:g} of the largest output from eager): " + "; ".join(failed), file=sys.stderr)
        raise SystemExit(1)
    print(f"ONNX Runtime gives back results.json's {label} within {tolerance:g} at every test level; the models are "
          f"in {run.out}")
    return {"models": models, "metric": key, "levels": levels, "tolerance": tolerance}
