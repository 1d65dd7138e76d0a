"""A trained run of either pipeline exports to ONNX (``--export-onnx``): the RGB-only predictor, in ONNX Runtime on the
built-in evaluation samples, gives back the run's results.json metric at every test level; the fused model equals
eager; an export that does not reproduce the run's results.json fails the command."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_export import needs_deploy
from test_handpose_pipeline import SMALL
from test_handpose_pipeline import tiny_args as handpose_args
from test_surgical_pipeline import tiny_args as surgical_args

import handpose_rhd
import surgical_seg
from common import export
from common.training import load_checkpoint

# Per pipeline: its script, the fusion of its tiny run (a product and a mixture), results.json's metric, the tolerance.
PIPELINES = {"handpose": (handpose_rhd, "gpoe", "mean_epe_mm", 0.01), "surgical": (surgical_seg, "mopoe", "iou", 0.001)}


@pytest.fixture(scope="module")
def exported(rhd_root, sim2real_root, tmp_path_factory):
    """``exported(pipeline) -> (folder, argv, record)``: a finished tiny run of the pipeline (one epoch, narrow
    networks) made with ``argv`` into ``folder``, then ``--export-onnx``'s ``record`` of it; each made when first
    asked for."""
    made = {}

    def of(pipeline: str) -> tuple[Path, list[str], dict]:
        if pipeline not in made:
            script, fusion, _, _ = PIPELINES[pipeline]
            out = tmp_path_factory.mktemp(pipeline)
            if pipeline == "handpose":
                argv = handpose_args(rhd_root, out, "--epochs", "1", "--fusion", fusion, *SMALL)
            else:
                argv = surgical_args(sim2real_root, out, "--epochs", "1", "--fusion", fusion, "--rgb-width", "8",
                                     "--pel-width", "16", "--grid-size", "4", "--fold-hidden", "16", "--seg-base", "32")
            script.main(argv)
            made[pipeline] = (out, argv, script.main(["--out", str(out), "--export-onnx", "--no-progress"]))
        return made[pipeline]

    return of


@needs_deploy
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_exported_predictor_gives_back_the_metric_and_the_fused_model_equals_eager(pipeline, exported):
    import onnx
    import onnxruntime

    script, fusion, key, tolerance = PIPELINES[pipeline]
    run, argv, record = exported(pipeline)
    metrics = json.loads((run / "results.json").read_text())["fusions"][fusion]["metrics"]
    assert list(record["levels"]) == list(metrics) == ["0.0", "0.5"]
    for level, measured in record["levels"].items():
        assert measured["results_json"] == metrics[level][key]
        assert abs(measured["onnx_runtime"] - metrics[level][key]) <= tolerance, (level, measured)
    for file, model in record["models"].items():
        assert model["max_abs_difference"] <= 1e-5, (file, model)
        assert (run / file).stat().st_size == model["bytes"] > 0
        assert {node.domain for node in onnx.load(str(run / file)).graph.node} <= {""}  # standard operators only

    # The fused model once more, at a batch size it was neither exported nor evaluated at, against eager of the
    # checkpoint loaded into a model built here from the run's own options.
    model = script.build_model(script.parse_args(argv))
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    model.eval()
    session = onnxruntime.InferenceSession(str(run / "fused_model.onnx"), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == model.modalities == ["rgb", "points"]
    g = torch.Generator().manual_seed(0)
    inputs = {node.name: torch.rand(5, *node.shape[1:], generator=g) for node in session.get_inputs()}
    (got,) = session.run(None, {name: x.numpy() for name, x in inputs.items()})
    decoded = session.get_outputs()[0].name
    torch.testing.assert_close(torch.from_numpy(got), model.predict_joint(inputs, decoded), rtol=1e-5, atol=1e-5)


@needs_deploy
def test_an_export_that_misses_the_results_metric_fails_the_command(exported, tmp_path, capsys, monkeypatch):
    run = shutil.copytree(exported("handpose")[0], tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results["fusions"]["gpoe"]["metrics"]["0.5"]["mean_epe_mm"] += 0.02  # as if the run had measured another EPE
    (run / "results.json").write_text(json.dumps(results))
    # The copy holds the models exported from this very checkpoint: only the check runs again.
    monkeypatch.setattr(export, "export_onnx", lambda module, inputs, names, output, path: 0.0)
    with pytest.raises(SystemExit) as exit_info:
        handpose_rhd.main(["--out", str(run), "--export-onnx", "--no-progress"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.split("error: ")[1]
    assert error.startswith("the exported models disagree") and "at 50% test corruption" in error
    assert "at 0% test corruption" not in error and ".onnx" not in error


@needs_deploy
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_folder_without_a_finished_run_is_a_usage_error(pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PIPELINES[pipeline][0].main(["--out", str(tmp_path), "--export-onnx"])
    assert exit_info.value.code == 2
    assert f"error: --out: no checkpoint.pt in {tmp_path}" in capsys.readouterr().err
