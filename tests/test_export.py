"""Deployment: torch.onnx.export + ONNX Runtime, torch.export, AOTInductor and torch.jit.trace give
eager's results for every fusion layer with default arguments and for the functions, with a dynamic
batch (exported at one batch size, run at others)."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from fusion_models import LAYERS, features, make_model, randomised
from oracle import weighted_product
from torch import nn

import gpoe_fusion as gf
from gpoe_fusion import functional as F
from gpoe_fusion import ops

_MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
needs_deploy = pytest.mark.skipif(
    bool(_MISSING), reason=f"the deploy extra is not installed ({', '.join(_MISSING)} missing): "
                           "pip install 'gpoe_fusion[deploy]'")

BATCH = torch.export.Dim("batch", min=2)
# Both models' inputs have the batch first; the functions' experts [M, B, D] have it second.
FEATURE_BATCH = ({0: BATCH}, {0: BATCH})


def _gpoe_ops(graph: torch.fx.Graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if "gpoe_fusion" in str(node.target)}


def _assert_close(got, want) -> None:
    """ONNX Runtime / compiled outputs against eager, within float32 rounding (1e-5)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(torch.as_tensor(g), w.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"output {i}: {m}")


def _onnx_session(model: nn.Module | torch.export.ExportedProgram, args: tuple, dynamic_shapes, path):
    """``model`` (or an exported program, with no args) exported with ``torch.onnx.export(...,
    dynamo=True)`` (default opset), as an ONNX Runtime session; also returns the ONNX model."""
    import onnxruntime

    program = torch.onnx.export(model, args, dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
    program.save(str(path))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]), program.model_proto


def _run(session, args) -> list[np.ndarray]:
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})


@needs_deploy
@pytest.mark.parametrize("kind", LAYERS)
def test_onnx_runtime_matches_eager(kind, tmp_path):
    model = make_model(kind)
    session, proto = _onnx_session(model, features(4), FEATURE_BATCH, tmp_path / f"{kind}.onnx")
    # Standard ONNX operators only: no custom domain for the fusion.
    assert {node.domain for node in proto.graph.node} <= {""}, {node.domain for node in proto.graph.node}
    for batch in (2, 9):
        args = features(batch, seed=batch)
        _assert_close(_run(session, args), model(*args))


@pytest.mark.parametrize("kind", LAYERS)
def test_jit_trace_matches_eager(kind):
    model = make_model(kind)
    with warnings.catch_warnings():
        # torch.jit.trace is deprecated (and still used); the structural checks compare shapes, which
        # the tracer records as constants (and says so).
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, features(4))
    for batch in (2, 9):
        args = features(batch, seed=batch)
        _assert_close(traced(*args), model(*args))


class _Functions(nn.Module):
    """The functions with missing modalities and the prior expert: experts [M, B, D], logits
    [M, B, D], mask bool [M, B] -> the joints' and mixtures' tensors."""

    def forward(self, mu, logvar, logits, mask):
        poe = F.poe(mu, logvar, mask, prior_expert=True)
        gpoe = F.gpoe(mu, logvar, logits, mask)
        mopoe = F.mopoe(mu, logvar, mask, logits)
        moe = F.moe(mu, logvar, mask)
        return poe.mu, poe.logvar, gpoe.mu, gpoe.logvar, mopoe.mu, mopoe.logvar, mopoe.mask, moe.mean


def _experts(batch: int, seed: int, spread: float = 3.0):
    """mu, logvar (uniform in [-spread, spread]), logits [3, batch, 4]; a mask with rows missing
    one or two modalities (never all three)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(3, batch, 4, generator=g)
    logvar = (torch.rand(3, batch, 4, generator=g) * 2 - 1) * spread
    logits = torch.randn(3, batch, 4, generator=g)
    mask = torch.rand(3, batch, generator=g) > 0.4
    mask[torch.arange(batch) % 3, torch.arange(batch)] = True
    return mu, logvar, logits, mask


@needs_deploy
def test_onnx_functions_with_masks_compute_the_exact_form(tmp_path):
    """The exported graph computes the log-space form: at log-variances in [-80, 80], where
    1 / (exp(logvar) + eps) is far off, ONNX Runtime still agrees with eager and the float64 oracle."""
    model = _Functions().eval()
    dims = ({1: BATCH}, {1: BATCH}, {1: BATCH}, {1: BATCH})
    session, _ = _onnx_session(model, _experts(4, seed=0), dims, tmp_path / "functions.onnx")
    for batch, spread in ((7, 3.0), (16, 80.0)):
        args = _experts(batch, seed=batch, spread=spread)
        got = _run(session, args)
        _assert_close(got, model(*args))
        mu, logvar, logits, mask = (a.numpy() for a in args)
        for (joint_mu, joint_logvar), oracle in (
                (got[0:2], weighted_product(mu, logvar, None, mask, prior_expert=True)),
                (got[2:4], weighted_product(mu, logvar, logits, mask))):
            np.testing.assert_allclose(joint_mu, oracle[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(joint_logvar, oracle[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", LAYERS)
def test_torch_export_holds_aten_ops_only(kind):
    """torch.export traces the exact pure-PyTorch math (no extension needed to run the program), so
    run_decompositions() lowers it to core ATen; both match eager at other batch sizes."""
    model = make_model(kind)
    program = torch.export.export(model, features(4), dynamic_shapes=FEATURE_BATCH)
    decomposed = program.run_decompositions()
    assert not _gpoe_ops(program.graph) and not _gpoe_ops(decomposed.graph)
    for batch in (2, 9):
        args = features(batch, seed=batch)
        _assert_close(program.module()(*args), model(*args))
        _assert_close(decomposed.module()(*args), model(*args))


class _KernelLayers(nn.Module):
    """GPoE (global credibility) and MoPoE forced onto the fused kernel: experts [M, B, D], mask [M, B]."""

    def __init__(self):
        super().__init__()
        self.gpoe = randomised(gf.GPoE(3, 4, credibility="global", backend="kernel"))
        self.mopoe = gf.MoPoE(backend="kernel")

    def forward(self, mu, logvar, mask):
        joint, mixture = self.gpoe(mu, logvar, mask), self.mopoe(mu, logvar, mask)
        return joint.mu, joint.logvar, mixture.mu, mixture.logvar


def test_kernel_backend_exports_the_ops_and_their_decompositions_lower_them():
    """With backend="kernel" the exported program calls the fused ops (AOTInductor then runs the
    kernels); gpoe_fusion.ops.decompositions() turns them into the same ATen math."""
    model = _KernelLayers()
    mu, logvar, _, mask = _experts(4, seed=0)
    program = torch.export.export(model, (mu, logvar, mask), dynamic_shapes=({1: BATCH},) * 3)
    assert _gpoe_ops(program.graph) == {"gpoe_fusion.fuse_forward.default", "gpoe_fusion.mopoe_forward.default"}
    decomposed = program.run_decompositions(ops.decompositions())
    assert not _gpoe_ops(decomposed.graph)
    mu, logvar, _, mask = _experts(9, seed=1)
    _assert_close(decomposed.module()(mu, logvar, mask), model(mu, logvar, mask))


@needs_deploy
def test_onnx_of_a_kernel_backend_program_after_its_decompositions(tmp_path):
    model = _KernelLayers()
    mu, logvar, _, mask = _experts(4, seed=0)
    program = torch.export.export(model, (mu, logvar, mask), dynamic_shapes=({1: BATCH},) * 3)
    session, _ = _onnx_session(program.run_decompositions(ops.decompositions()), (), None, tmp_path / "kernel.onnx")
    args = _experts(9, seed=1)
    args = (args[0], args[1], args[3])
    _assert_close(_run(session, args), model(*args))


@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_decompositions_equal_the_kernels(prior, dtype):
    g = torch.Generator().manual_seed(0)
    m, n, d = 3, 6, 5
    mu, logvar = (torch.randn(m, n, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(m, n, generator=g) > 0.3
    mask[0] = True
    table = ops.decompositions()
    fuse, mopoe = torch.ops.gpoe_fusion.fuse_forward.default, torch.ops.gpoe_fusion.mopoe_forward.default
    tolerance = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else {}
    for logits in (None, torch.randn(m, n, d, generator=g), torch.randn(m, 1, d, generator=g),
                   torch.randn(m, n, 1, generator=g)):
        logits = None if logits is None else logits.to(dtype)
        for masked in (None, mask):
            for weights in (False, True):
                args = (mu, logvar, logits, masked, prior, weights)
                for got, want in zip(table[fuse](*args), fuse(*args)):
                    assert got.shape == want.shape and got.dtype == want.dtype
                    torch.testing.assert_close(got, want, **tolerance)
            if logits is None or logits.shape == mu.shape:
                for got, want in zip(table[mopoe](*args[:5]), mopoe(*args[:5])):
                    torch.testing.assert_close(got, want, **tolerance)


class _AllLayers(nn.Module):
    """Every layer kind on the same experts, with missing modalities: features x1 [B, 5], x2 [B, 7],
    mask bool [2, B] -> their results (Gaussians and mixtures, returned as pytrees)."""

    def __init__(self):
        super().__init__()
        self.encoders = make_model("poe").encoders
        self.layers = nn.ModuleList(make_model(kind).fusion for kind in LAYERS)

    def forward(self, x1, x2, mask):
        halves = [encoder(x).chunk(2, dim=-1) for encoder, x in zip(self.encoders, (x1, x2))]
        mu, logvar = torch.stack([h[0] for h in halves]), torch.stack([h[1] for h in halves])
        return [layer(mu, logvar, mask, features=[x1, x2]) for layer in self.layers]


def _with_mask(batch: int, seed: int):
    """features(batch) and a mask bool [2, batch] with either modality missing in some rows."""
    mask = torch.ones(2, batch, dtype=torch.bool)
    mask[0, ::3] = False
    mask[1, 1::3] = False
    return (*features(batch, seed), mask)


def test_aoti_package_matches_eager(tmp_path):
    """One AOTInductor package holding every layer kind (one compile: tens of seconds on 2 cores):
    exported with a dynamic batch, compiled, loaded and run at other batch sizes."""
    model = _AllLayers().eval()
    program = torch.export.export(model, _with_mask(4, seed=0), dynamic_shapes=(*FEATURE_BATCH, {1: BATCH}))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "fusion.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for batch in (3, 9):
        args = _with_mask(batch, seed=batch)
        got, want = compiled(*args), model(*args)
        assert [type(r) for r in got] == [type(r) for r in want]
        leaves = [torch.utils._pytree.tree_leaves(r) for r in (got, want)]
        assert [t is None for t in leaves[0]] == [t is None for t in leaves[1]]
        _assert_close(*[[t.double() for t in ts if t is not None] for ts in leaves])
