"""The fused C++/CUDA kernels against the pure-PyTorch reference (gpoe_fusion._reference).

Each case builds float64 inputs, rounds them to the dtype under test, and compares the kernel on
the rounded inputs with the reference evaluated in float64 on the same rounded values (so only
the kernel's own arithmetic is measured). Masked experts hold NaN everywhere, which must never
reach an output or a gradient.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gpoe_fusion import _backend, _reference, ops

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.load_error()}")

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Relative tolerance per dtype: float64/float32 a few units of the last place over the sums
# involved; 16-bit outputs are rounded to 8 (bfloat16) or 11 (float16) significant bits.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOGIT_SHAPES = {"none": None, "full": "MND", "rows": "M1D", "dims": "MN1", "all": "M11"}


@dataclass(frozen=True)
class Case:
    m: int
    n: int
    d: int
    logits: str = "full"  # a key of LOGIT_SHAPES
    masked: bool = True
    prior: bool = False
    layout: str = "contiguous"  # contiguous | transposed | expanded | strided
    logvar_range: float = 8.0

    def __str__(self) -> str:
        return (f"M{self.m}-N{self.n}-D{self.d}-{self.logits}-{'mask' if self.masked else 'nomask'}-"
                f"{'prior' if self.prior else 'noprior'}-{self.layout}")


CASES = [
    Case(1, 9, 16, "none", masked=False),
    Case(1, 9, 17, "full", prior=True),
    Case(2, 13, 16, "none"),
    Case(2, 13, 64, "full", prior=True),
    Case(2, 5, 1, "full"),
    Case(3, 11, 33, "rows", layout="transposed"),
    Case(3, 11, 33, "dims", prior=True),
    Case(4, 21, 37, "full", layout="transposed"),
    Case(4, 21, 37, "rows", prior=True, layout="expanded"),
    Case(4, 21, 40, "dims", layout="strided"),
    Case(4, 21, 5, "all", prior=True),
    Case(4, 17, 64, "none", masked=False, layout="expanded"),
    Case(5, 9, 23, "full", prior=True),
    Case(5, 9, 23, "all"),
    Case(8, 10, 29, "full", prior=True),
    Case(8, 10, 29, "rows"),
    Case(8, 10, 8, "dims", layout="transposed"),
    Case(9, 7, 19, "full", layout="strided"),
    Case(12, 7, 19, "dims", prior=True),
    Case(12, 7, 19, "all", masked=False),
]


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """(mu, logvar, logits, mask) on `device` in `dtype`, laid out as case.layout asks."""
    g = torch.Generator().manual_seed(seed)
    m, n, d = case.m, case.n, case.d
    mu = torch.randn(m, n, d, generator=g, dtype=torch.float64) * 2
    logvar = (torch.rand(m, n, d, generator=g, dtype=torch.float64) * 2 - 1) * case.logvar_range
    spec = LOGIT_SHAPES[case.logits]
    logits = None
    if spec is not None:
        shape = [{"M": m, "N": n, "D": d, "1": 1}[c] for c in spec]
        logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    mask = None
    if case.masked:
        mask = torch.rand(m, n, generator=g) > 0.35
        if case.prior:
            mask[:, 0] = False  # one row with every expert masked: the prior alone
        else:
            mask[0] = True  # every row keeps at least one expert
        mu = mu.masked_fill(~mask[..., None], float("nan"))
        logvar = logvar.masked_fill(~mask[..., None], float("nan"))
    if case.layout == "expanded":
        # mu and logvar shared by every row (stride 0 along N), except for the masked NaNs.
        mu = mu[:, :1].expand(m, n, d)
        logvar = logvar[:, :1].expand(m, n, d)
        if mask is not None:
            mask = mask[:, :1].expand(m, n)

    def place(t):
        if t is None:
            return None
        t = t.to(device=device, dtype=dtype)
        if case.layout == "transposed":  # storage [N, M, D] / [D, ..., M]: nothing unit-stride
            return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
        if case.layout == "strided":  # every other element along D
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype, device=device)
            wide[..., ::2] = t
            return wide[..., ::2]
        return t

    return place(mu), place(logvar), place(logits), None if mask is None else mask.to(device)


def run(fuse, mu, logvar, logits, mask, prior, grad_mu, grad_logvar, wanted=(True, True, True), grad_weights=None):
    """Outputs and the gradients of sum(grad_mu * joint_mu + grad_logvar * joint_logvar
    [+ grad_weights * weights]); with grad_weights the weights are an output too."""
    leaves = []
    inputs = []
    for t, want in zip((mu, logvar, logits), wanted):
        if t is not None and want:
            t = t.detach().requires_grad_()
            leaves.append(t)
        inputs.append(t)
    outputs = fuse(inputs[0], inputs[1], inputs[2], mask, prior, grad_weights is not None)
    if not leaves:
        return list(outputs)
    loss = (outputs[0] * grad_mu).sum() + (outputs[1] * grad_logvar).sum()
    if grad_weights is not None:
        loss = loss + (outputs[2] * grad_weights).sum()
    return [t.detach() for t in outputs] + list(torch.autograd.grad(loss, leaves))


def assert_matches(got, want, dtype, names):
    """Each output within TOLERANCE of the reference, relative to that output's largest value;
    grad_logits relative to grad_logvar's (the s-gradients): it is a difference of terms of that size
    (g_s_i - alpha_i sum_j g_s_j), which cancel exactly for one expert, and rounding leaves their ulps."""
    tol = TOLERANCE[dtype]
    scales = {}
    for name, w in zip(names, want):
        scales[name] = w.double().nan_to_num(0.0).abs().max().item() if w.numel() else 0.0
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        g = g.double().cpu()
        w = w.double().cpu()
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{name}: NaN pattern differs"
        g, w = g.nan_to_num(0.0), w.nan_to_num(0.0)
        scale = max(scales[name], scales.get("grad_logvar", 0.0) if name == "grad_logits" else 0.0)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda m: f"{name}: {m}")


def check_case(case: Case, dtype: torch.dtype, device: str, wanted=(True, True, True), weights: bool = False):
    """Kernel against the float64 reference; with ``weights`` the experts' weights are a third
    output, with an incoming gradient of their own."""
    mu, logvar, logits, mask = make_inputs(case, dtype, device)
    g = torch.Generator().manual_seed(1)
    grad_mu = torch.randn(case.n, case.d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    grad_logvar = torch.randn(case.n, case.d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    grad_weights = None
    if weights:
        grad_weights = torch.randn(case.m, case.n, case.d, generator=g, dtype=torch.float64).to(device=device,
                                                                                                 dtype=dtype)
    got = run(ops.fuse, mu, logvar, logits, mask, case.prior, grad_mu, grad_logvar, wanted, grad_weights)
    as64 = [None if t is None else t.double() for t in (mu, logvar, logits)]
    want = run(_reference.fuse, *as64, mask, case.prior, grad_mu.double(), grad_logvar.double(), wanted,
               None if grad_weights is None else grad_weights.double())
    names = ["joint_mu", "joint_logvar"] + (["weights"] if weights else []) + [
        name for name, t, w in zip(("grad_mu", "grad_logvar", "grad_logits"), (mu, logvar, logits), wanted)
        if t is not None and w
    ]
    assert_matches(got, want, dtype, names)
    for name, t in zip(names, got):
        assert t.dtype == dtype and t.device.type == device, f"{name}: {t.dtype} on {t.device}"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_matches_reference(case, dtype):
    check_case(case, dtype, "cpu")


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES[::2], ids=str)
def test_cpu_kernel_weights_match_reference(case, dtype):
    """The experts' weights from the fused pass (alpha, or PoE's precision shares) and their
    gradient, against the float64 reference."""
    check_case(case, dtype, "cpu", weights=True)


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["mu", "logvar", "logits"])
def test_only_requested_gradients(wanted):
    check_case(Case(4, 9, 21, "rows", prior=True), torch.float32, "cpu", wanted)


def test_gradient_of_one_output_only():
    mu, logvar, logits, mask = make_inputs(Case(3, 6, 10), torch.float64)
    for pick in (0, 1, 2):
        grads = []
        for fuse in (ops.fuse, _reference.fuse):
            leaves = [t.detach().requires_grad_() for t in (mu, logvar, logits)]
            out = fuse(*leaves, mask, False, True)[pick]
            grads.append(torch.autograd.grad(out.sum(), leaves, allow_unused=True, materialize_grads=True))
        for name, g, w in zip(("mu", "logvar", "logits"), *grads):
            torch.testing.assert_close(g, w, msg=lambda m: f"output {pick}, grad {name}: {m}")


@pytest.mark.parametrize("prior", [False, True])
def test_float32_exact_over_full_logvar_range(prior):
    """logvar anywhere in [-80, 80]: the float32 kernel is as exact as float32 arithmetic allows.

    Against float64, its largest and its mean error may not exceed those of the pure-PyTorch
    float32 path by more than half (both are dominated by the rounding of s = log alpha - logvar;
    an approximate exp or log would show up in the mean)."""
    case = Case(8, 256, 67, "full", prior=prior, logvar_range=80.0)
    mu, logvar, logits, mask = make_inputs(case, torch.float32)
    kernel = ops.fuse(mu, logvar, logits, mask, prior)
    torch_f32 = _reference.fuse(mu, logvar, logits, mask, prior)
    exact = _reference.fuse(mu.double(), logvar.double(), logits.double(), mask, prior)
    for name, k, t, e in zip(("joint_mu", "joint_logvar"), kernel, torch_f32, exact):
        kernel_err = (k.double() - e).abs()
        torch_err = (t.double() - e).abs()
        for stat in (torch.max, torch.mean):
            assert stat(kernel_err) <= 1.5 * stat(torch_err) + 1e-12, (
                f"{name}: kernel {stat.__name__} error {stat(kernel_err):.3g} vs float32 reference {stat(torch_err):.3g}")


def test_masked_nan_does_not_leak_and_empty_rows_give_prior():
    mu, logvar, logits, mask = make_inputs(Case(3, 5, 7, prior=True), torch.float32)
    mask[:, 1] = False
    leaves = [t.detach().requires_grad_() for t in (mu, logvar, logits)]
    joint_mu, joint_logvar = ops.fuse(*leaves, mask, True)
    assert torch.equal(joint_mu[[0, 1]], torch.zeros(2, 7)) and torch.equal(joint_logvar[[0, 1]], torch.zeros(2, 7))
    grads = torch.autograd.grad(joint_mu.sum() + joint_logvar.sum(), leaves)
    for name, grad in zip(("mu", "logvar", "logits"), grads):
        assert not grad.isnan().any(), f"grad {name} has NaN"
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), f"masked experts got a {name} gradient"


@pytest.mark.parametrize("weights", [False, True], ids=["joint", "weights"])
@pytest.mark.parametrize("logits", ["none", "full", "rows", "dims", "all"])
@pytest.mark.parametrize("m", [2, 5])
def test_gradcheck_float64(logits, m, weights):
    """First and second order (the double backward runs the differentiable pure-PyTorch path)."""
    mu, logvar, logit_values, mask = make_inputs(Case(m, 4, 6, logits, prior=True), torch.float64)
    mu, logvar = mu.nan_to_num(0.0), logvar.nan_to_num(0.0)
    leaves = [t.detach().requires_grad_() for t in (mu, logvar) + (() if logit_values is None else (logit_values,))]

    def fused(*args):
        return ops.fuse(args[0], args[1], args[2] if len(args) > 2 else None, mask, True, weights)

    assert torch.autograd.gradcheck(fused, leaves)
    assert torch.autograd.gradgradcheck(fused, leaves)


def test_opcheck():
    for case in (Case(3, 5, 7, "full", prior=True), Case(2, 4, 9, "rows"), Case(6, 3, 5, "dims"),
                 Case(4, 3, 5, "none", masked=False)):
        mu, logvar, logits, mask = make_inputs(case, torch.float64)
        mu, logvar = mu.nan_to_num(0.0).requires_grad_(), logvar.nan_to_num(0.0).requires_grad_()
        if logits is not None:
            logits.requires_grad_()
        for weights in (False, True):
            torch.library.opcheck(torch.ops.gpoe_fusion.fuse_forward, (mu, logvar, logits, mask, case.prior, weights))
        for grad_weights in (None, torch.randn(case.m, case.n, case.d, dtype=torch.float64)):
            grads = (torch.randn(case.n, case.d, dtype=torch.float64), None, grad_weights)
            torch.library.opcheck(torch.ops.gpoe_fusion.fuse_backward,
                                  (*grads, mu.detach(), logvar.detach(), None if logits is None else logits.detach(),
                                   mask, case.prior, [True, True, logits is not None]))


def _compile_and_compare(backend: str):
    torch._dynamo.reset()
    mu, logvar, logits, mask = make_inputs(Case(4, 6, 10, "full", prior=True), torch.float32)

    def step(mu, logvar, logits):
        joint_mu, joint_logvar, alpha = ops.fuse(mu * 1.5, logvar, logits, mask, True, True)
        return (joint_mu * joint_logvar.exp()).sum() + (alpha * alpha).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    outs = []
    for fn in (step, compiled):
        leaves = [t.detach().requires_grad_() for t in (mu, logvar, logits)]
        value = fn(*leaves)
        outs.append([value, *torch.autograd.grad(value, leaves)])
    for name, got, want in zip(("value", "grad_mu", "grad_logvar", "grad_logits"), outs[1], outs[0]):
        torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")


def test_torch_compile_fullgraph():
    """torch.compile traces through the ops (fake kernels, autograd) without a graph break."""
    _compile_and_compare("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    """The same through inductor, which generates C++ for the surrounding ops (slow to compile)."""
    _compile_and_compare("inductor")


def test_backend_reshapes_batch_axes():
    """_backend flattens [M, *batch, D] for the kernel, including partly broadcast logits."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 4, 5, 6, generator=g)
    logvar = torch.randn(3, 4, 5, 6, generator=g)
    mask = torch.rand(3, 4, 5, generator=g) > 0.3
    mask[0] = True
    for logits in (torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 1, 1, 6, generator=g),
                   torch.randn(3, 4, 5, 1, generator=g), torch.randn(3, 1, 5, 6, generator=g),
                   torch.randn(1, 4, 5, 6, generator=g).double()):
        got = _backend.fuse(mu, logvar, logits, mask, True, backend="kernel")
        want = _backend.fuse(mu, logvar, logits, mask, True, backend="torch")
        for a, b in zip(got, want):
            assert a.shape == b.shape == (4, 5, 6) and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
    mu = torch.randn(2, 3, 4)
    fwd = torch.ops.gpoe_fusion.fuse_forward
    with pytest.raises(ValueError, match="logvar: shape"):
        fwd(mu, torch.randn(2, 3, 5), None, None, False)
    with pytest.raises(TypeError, match="logits: dtype"):
        fwd(mu, mu, mu.double(), None, False)
    with pytest.raises(ValueError, match="logits: expected shape"):
        fwd(mu, mu, torch.randn(2, 2, 4), None, False)
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        fwd(mu, mu, None, torch.ones(2, 3), False)
    with pytest.raises(ValueError, match="mask: expected shape"):
        fwd(mu, mu, None, torch.ones(3, 2, dtype=torch.bool), False)
    with pytest.raises(TypeError, match="mu: expected float16"):
        fwd(mu.int(), mu.int(), None, None, False)
    bwd = torch.ops.gpoe_fusion.fuse_backward
    with pytest.raises(ValueError, match=r"grad_weights: expected shape \[M, N, D\]"):
        bwd(None, None, torch.randn(2, 3, 5), mu, mu, None, None, False, [True, True, False])


def test_fake_kernels_check_shapes_and_dtypes():
    """Under torch.compile the fake kernels stand in for the real ones: they refuse what the
    kernels refuse, with the same message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        mu = torch.empty(2, 3, 4)
        fwd = torch.ops.gpoe_fusion.fuse_forward
        joint_mu, joint_logvar, weights = fwd(mu, mu, torch.empty(2, 1, 4), None, False, True)
        assert joint_mu.shape == joint_logvar.shape == (3, 4) and weights.shape == (2, 3, 4)
        for args, match in (((mu, torch.empty(2, 3, 5), None, None, False), "logvar: shape"),
                            ((mu, mu, torch.empty(2, 2, 4), None, False), "logits: expected shape"),
                            ((mu, mu, mu.double(), None, False), "logits: dtype"),
                            ((mu, mu, None, torch.empty(2, 3), False), "mask: expected dtype bool"),
                            ((mu, mu, None, torch.empty(3, 2, dtype=torch.bool), False), "mask: expected shape"),
                            ((mu.int(), mu.int(), None, None, False), "mu: expected float16")):
            with pytest.raises(RuntimeError, match=match):
                fwd(*args)
        with pytest.raises(RuntimeError, match="grad_weights: expected shape"):
            torch.ops.gpoe_fusion.fuse_backward(None, None, torch.empty(2, 3), mu, mu, None, None, False,
                                                [True, True, False])


def test_empty_batch():
    mu = torch.randn(3, 0, 4, requires_grad=True)
    logits = torch.randn(3, 1, 4, requires_grad=True)
    joint_mu, joint_logvar = ops.fuse(mu, mu, logits, None, False)
    assert joint_mu.shape == joint_logvar.shape == (0, 4)
    grads = torch.autograd.grad(joint_mu.sum() + joint_logvar.sum(), [mu, logits])
    assert grads[0].shape == (3, 0, 4) and torch.equal(grads[1], torch.zeros(3, 1, 4))


def test_outputs_are_ordinary_tensors():
    """Outputs come from PyTorch's allocator: resizable, usable as out=, freed like any tensor."""
    mu, logvar, logits, mask = make_inputs(Case(3, 2100, 128, "full"), torch.float32)
    joint_mu, joint_logvar, weights = ops.fuse(mu, logvar, logits, mask, False, True)
    joint_mu.resize_(0)
    torch.cat([joint_logvar, joint_logvar], out=joint_mu)
    assert joint_mu.shape == (4200, 128)
    weights.resize_(0)
    assert joint_logvar.untyped_storage().resizable()


def test_extension_is_this_packages_module():
    """The ops come from the package's own ``_C`` module, found by Python's import rules; a build
    whose operator interface differs from the package's is refused as stale."""
    from gpoe_fusion import _C

    assert Path(_C.__file__).resolve().parent == (ROOT / "gpoe_fusion").resolve()
    version = torch.ops.gpoe_fusion.interface_version()
    assert version == ops._INTERFACE_VERSION
    saved = ops._LOAD_ERROR
    try:
        ops._INTERFACE_VERSION = version + 1
        assert not ops._load() and "stale build" in ops.load_error()
    finally:
        ops._INTERFACE_VERSION, ops._LOAD_ERROR = version, saved


# ---- Build and registration checks --------------------------------------------------------------

def _cuda_toolkit_found() -> bool:
    """The rule setup.py uses: CUDA_HOME, else /usr/local/cuda with bin/nvcc."""
    return bool(os.environ.get("CUDA_HOME")) or os.path.exists("/usr/local/cuda/bin/nvcc")


def test_cuda_kernels_registered_when_built_with_cuda():
    for op in ("gpoe_fusion::fuse_forward", "gpoe_fusion::fuse_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op}: no CPU kernel"
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        assert has_cuda == ops.compiled_with_cuda(), f"{op}: CUDA kernel registered={has_cuda}, built with CUDA=" \
                                                     f"{ops.compiled_with_cuda()}"
    if torch.version.cuda is not None and _cuda_toolkit_found() and os.environ.get("GPOE_FUSION_NO_CUDA") != "1":
        assert ops.compiled_with_cuda(), (
            "torch has CUDA and a CUDA toolkit is present, but the extension was built without its CUDA kernels; "
            "rebuild with `pip install --no-build-isolation -e .` (or set GPOE_FUSION_NO_CUDA=1 to build CPU only)")


_ISA_SCRIPT = """
import torch
from gpoe_fusion import ops, _reference
print(ops.cpu_capability())
g = torch.Generator().manual_seed(0)
for m in (2, 4, 8, 5):
    mu, logvar, logits = (torch.randn(m, 7, 37, generator=g) * 3 for _ in range(3))
    mask = torch.rand(m, 7, generator=g) > 0.3
    mask[0] = True
    for got, want in zip(ops.fuse(mu, logvar, logits, mask, True),
                         _reference.fuse(mu.double(), logvar.double(), logits.double(), mask, True)):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
"""


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2"])
def test_narrower_instruction_sets(isa):
    """The copies of the CPU kernel for narrower instruction sets (chosen with ATen's switch)."""
    if ops.cpu_capability() == "DEFAULT" and isa != "DEFAULT":
        pytest.skip(f"this machine or build has no {isa} kernels")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower())
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa


_BFLOAT16_SCRIPT = """
import sys
import torch
from gpoe_fusion import ops
g = torch.Generator().manual_seed(0)
results = []
for m, d in ((2, 64), (4, 37), (5, 64), (8, 256), (13, 48)):
    inputs = [(torch.randn(m, 9, d, generator=g) * 3).bfloat16().requires_grad_() for _ in range(3)]
    mask = torch.rand(m, 9, generator=g) > 0.3
    mask[0] = True
    outputs = ops.fuse(*inputs, mask, True)
    sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outputs).backward()
    results += [o.detach() for o in outputs] + [t.grad for t in inputs]
torch.save(results, sys.argv[1])
"""


def test_bfloat16_conversion_paths_agree(tmp_path):
    """bfloat16 outputs rounded by AVX512-BF16's one instruction (where the CPU has it) and by ATen's conversion
    (GPOE_FUSION_NO_AVX512_BF16 set) are the same bits: both round to nearest even, and nothing here is subnormal."""
    if ops.cpu_capability() != "AVX512":
        pytest.skip("the AVX512 kernels are not in use here")
    runs = []
    for extra in ({}, {"GPOE_FUSION_NO_AVX512_BF16": "1"}):
        env = {k: v for k, v in os.environ.items() if k != "GPOE_FUSION_NO_AVX512_BF16"} | extra
        path = tmp_path / f"run{len(runs)}.pt"
        result = subprocess.run([sys.executable, "-c", _BFLOAT16_SCRIPT, str(path)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(torch.load(path))
    assert len(runs[0]) == len(runs[1]) == 5 * 5  # per case: the joint mean and log-variance, three gradients
    for i, (one, other) in enumerate(zip(*runs)):
        assert one.dtype == torch.bfloat16 and torch.equal(one, other), f"tensor {i}"


def test_require_extension_env_makes_missing_extension_an_error(tmp_path):
    """GPOE_FUSION_REQUIRE_EXTENSION=1: importing a package without the built kernels fails."""
    shutil.copytree(ROOT / "gpoe_fusion", tmp_path / "gpoe_fusion",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    command = [sys.executable, "-c", "import gpoe_fusion"]
    for value, fails in (("1", True), ("0", False)):
        env = dict(os.environ, PYTHONPATH=str(tmp_path), **{ops.REQUIRE_ENV: value})
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (result.returncode != 0) == fails, result.stderr[-2000:]
        if fails:
            assert ops.REQUIRE_ENV in result.stderr and "not built" in result.stderr, result.stderr[-2000:]


# ---- CUDA ------------------------------------------------------------------------------------------

CUDA_CASES = [
    Case(2, 300, 64, "full", prior=True),
    Case(3, 129, 33, "rows"),
    Case(4, 257, 37, "full", layout="transposed"),
    Case(4, 100, 1024, "rows", prior=True),
    Case(4, 100, 260, "dims", prior=True),
    Case(4, 64, 70, "all", layout="strided"),
    Case(4, 64, 128, "none", masked=False, layout="expanded"),
    Case(8, 77, 96, "full", prior=True),
    Case(8, 77, 96, "dims"),
    Case(1, 50, 20, "full"),
    Case(6, 50, 45, "full", prior=True),
    Case(6, 50, 45, "rows"),
    Case(11, 40, 30, "dims", prior=True),
    Case(11, 40, 30, "all", prior=True),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_kernel_matches_reference(case, dtype):
    assert ops.supports_device(torch.device("cuda")), "the extension has no CUDA kernels"
    check_case(case, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_kernel_weights_match_reference(case, dtype):
    check_case(case, dtype, "cuda", weights=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_kernel_large():
    case = Case(4, 4096, 256, "full", prior=True, logvar_range=80.0)
    for dtype in (torch.float32, torch.bfloat16):
        cpu = make_inputs(case, dtype, "cpu")
        gpu = make_inputs(case, dtype, "cuda")
        for got, want in zip(ops.fuse(*gpu, True), ops.fuse(*cpu, True)):
            assert_matches([got], [want], dtype, ["joint"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_torch_compile_fullgraph():
    torch._dynamo.reset()
    mu, logvar, logits, mask = make_inputs(Case(4, 64, 96, "full", prior=True), torch.float32, "cuda")
    compiled = torch.compile(lambda a, b, c: ops.fuse(a, b, c, mask, True), fullgraph=True)
    for got, want in zip(compiled(mu, logvar, logits), ops.fuse(mu, logvar, logits, mask, True)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_outputs_larger_than_the_caches_equal_those_written_in_place(dtype):
    """Calls whose outputs exceed 32 MiB stream them out through a tile buffer (non-temporal stores,
    csrc/cpu/capability/fusion_kernel.cpp); the same rows in calls small enough to be written in place
    give the same bits. Sizes: the forward's weights and the backward's gradients each over 32 MiB;
    D no multiple of the vector width (16 float32, 8 float64 lanes on AVX512), so tiles end in a
    partial vector and rows start off the cache-line grid."""
    g = torch.Generator().manual_seed(0)
    m, n, d = {torch.float32: (3, 16384, 200), torch.bfloat16: (3, 16384, 392), torch.float64: (3, 8192, 196)}[dtype]
    assert m * n * d * dtype.itemsize > 32 << 20
    mu, logvar, logits = (torch.randn(m, n, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    mask = torch.rand(m, n, generator=g) > 0.2
    mask[0] = True
    grads = [torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    big = torch.ops.gpoe_fusion.fuse_forward(mu, logvar, logits, mask, True, True)
    big_grads = torch.ops.gpoe_fusion.fuse_backward(*grads, None, mu, logvar, logits, mask, True, [True, True, True])
    step = 256  # rows per small call: well under the streaming size
    for first in range(0, n, step):
        rows = slice(first, first + step)
        small = torch.ops.gpoe_fusion.fuse_forward(mu[:, rows], logvar[:, rows], logits[:, rows], mask[:, rows], True,
                                                   True)
        small_grads = torch.ops.gpoe_fusion.fuse_backward(grads[0][rows], grads[1][rows], None, mu[:, rows],
                                                          logvar[:, rows], logits[:, rows], mask[:, rows], True,
                                                          [True, True, True])
        for got, want in zip(big[:2], small[:2]):
            assert torch.equal(got[rows], want)
        assert torch.equal(big[2][:, rows], small[2])
        for got, want in zip(big_grads, small_grads):
            assert torch.equal(got[:, rows], want)


def test_mopoe_outputs_larger_than_the_caches_equal_those_written_in_place():
    g = torch.Generator().manual_seed(1)
    m, n, d = 4, 2048, 150  # 15 components: 2 x 15 x 2048 x 150 x 4 bytes = 37 MB of outputs
    mu, logvar, logits = (torch.randn(m, n, d, generator=g) for _ in range(3))
    grads = [torch.randn(2**m - 1, n, d, generator=g) for _ in range(2)]
    big = torch.ops.gpoe_fusion.mopoe_forward(mu, logvar, logits, None, False)
    big_grads = torch.ops.gpoe_fusion.mopoe_backward(*grads, mu, logvar, logits, None, False, [True, True, True])
    rows = slice(1000, 1100)
    small = torch.ops.gpoe_fusion.mopoe_forward(mu[:, rows], logvar[:, rows], logits[:, rows], None, False)
    small_grads = torch.ops.gpoe_fusion.mopoe_backward(grads[0][:, rows], grads[1][:, rows], mu[:, rows],
                                                       logvar[:, rows], logits[:, rows], None, False,
                                                       [True, True, True])
    for got, want in zip(big, small):
        assert torch.equal(got[:, rows], want)
    for got, want in zip(big_grads, small_grads):
        assert torch.equal(got[:, rows], want)
