"""Loads the compiled ``gpoe_fusion._C`` ops and registers their fake and autograd kernels.

The extension defines (csrc/ops.cpp):

    gpoe_fusion::fuse_forward(mu, logvar, logits?, mask?, prior_expert, return_weights=False)
        -> (joint_mu, joint_logvar, weights)
    gpoe_fusion::fuse_backward(grad_joint_mu?, grad_joint_logvar?, grad_weights?, mu, logvar, logits?,
                               mask?, prior_expert, output_mask[3]) -> (grad_mu, grad_logvar, grad_logits)
    gpoe_fusion::mopoe_forward(mu, logvar, logits?, mask?, prior_expert) -> (joint_mu, joint_logvar)  [S, N, D]
    gpoe_fusion::mopoe_backward(grad_joint_mu?, grad_joint_logvar?, mu, logvar, logits?, mask?, prior_expert,
                                output_mask[3]) -> (grad_mu, grad_logvar, grad_logits)
    gpoe_fusion::compiled_with_cuda() -> bool
    gpoe_fusion::cpu_capability() -> str
    gpoe_fusion::cuda_architectures() -> str
    gpoe_fusion::interface_version() -> int

with CPU and (when built with CUDA) CUDA kernels. A CUDA device is served only if the build holds
machine code for its architecture or PTX it can compile (``cuda_device_problem``); otherwise the
``auto`` backend takes the pure-PyTorch path with one warning naming the rebuild. This module adds the fake kernels that let
``torch.compile`` trace them (checking shapes and dtypes as the real kernels do) and the autograd
formula of ``fuse_forward``, whose backward recomputes from the saved inputs (it saves no
[M, N, D] temporary). A backward that must itself be differentiable (``create_graph=True``) is
computed by the pure-PyTorch path instead, so higher-order gradients are exact.

With ``GPOE_FUSION_REQUIRE_EXTENSION=1`` in the environment a missing or unloadable extension
is an ImportError instead of a silent fallback to the pure-PyTorch path (CI sets it).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _reference

__all__ = [
    "KERNEL_DTYPES",
    "REQUIRE_ENV",
    "arch_serves",
    "available",
    "compiled_with_cuda",
    "cpu_capability",
    "cuda_architectures",
    "cuda_device_problem",
    "decompositions",
    "extension_info",
    "fuse",
    "load_error",
    "mopoe",
    "supports_device",
]

REQUIRE_ENV = "GPOE_FUSION_REQUIRE_EXTENSION"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The operator interface this Python code speaks (csrc/ops.cpp interface_version()).
_INTERFACE_VERSION = 4

_LOAD_ERROR: str | None = None


def _load() -> bool:
    global _LOAD_ERROR
    try:
        extension = importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError:
        _LOAD_ERROR = "gpoe_fusion._C was not built (pip install --no-build-isolation -e .)"
        return False
    except ImportError as exc:
        # dlopen failed, e.g. built against another torch.
        _LOAD_ERROR = f"importing gpoe_fusion._C failed: {exc}"
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.dirname(os.path.abspath(extension.__file__)) != here:
        # E.g. an editable install of another checkout serving this copy of the package.
        _LOAD_ERROR = f"gpoe_fusion._C was not built in {here} (found {extension.__file__})"
        return False
    version = int(torch.ops.gpoe_fusion.interface_version())
    if version != _INTERFACE_VERSION:
        _LOAD_ERROR = (f"{extension.__file__} is a stale build (operator interface {version}, this package needs "
                       f"{_INTERFACE_VERSION}); rebuild with pip install --no-build-isolation -e .")
        return False
    return True


_AVAILABLE = _load()

if not _AVAILABLE and os.environ.get(REQUIRE_ENV, "") == "1":
    raise ImportError(f"gpoe_fusion: {REQUIRE_ENV}=1 but the compiled extension is unavailable: {_LOAD_ERROR}")


def available() -> bool:
    """Whether the compiled kernels are loaded."""
    return _AVAILABLE


def load_error() -> str | None:
    """Why the kernels are not available (None when they are)."""
    return _LOAD_ERROR


def compiled_with_cuda() -> bool:
    """Whether the loaded extension was built with its CUDA kernels (False when not loaded)."""
    return _AVAILABLE and bool(torch.ops.gpoe_fusion.compiled_with_cuda())


def cpu_capability() -> str | None:
    """The instruction set of the CPU kernels in use ("AVX512", "AVX2", "DEFAULT"), or None."""
    return str(torch.ops.gpoe_fusion.cpu_capability()) if _AVAILABLE else None


# Device types with a registered kernel, looked up once: a plain dict, which torch.compile traces.
_DEVICE_KERNELS = {
    device_type: _AVAILABLE
    and torch._C._dispatch_has_kernel_for_dispatch_key("gpoe_fusion::fuse_forward", device_type.upper())
    for device_type in ("cpu", "cuda")
}


def cuda_architectures() -> tuple[str, ...]:
    """The CUDA architectures the kernels were built for: "sm_XY" (machine code) and "compute_XY"
    (PTX, compiled for newer GPUs when loaded); empty without CUDA kernels."""
    if not _AVAILABLE:
        return ()
    return tuple(arch for arch in str(torch.ops.gpoe_fusion.cuda_architectures()).split(",") if arch)


def _arch_number(arch: str) -> tuple[int, int, str]:
    """"sm_90a" -> (9, 0, "a"); "compute_120" -> (12, 0, "")."""
    digits = arch.partition("_")[2]
    suffix = digits.lstrip("0123456789")
    digits = digits[:len(digits) - len(suffix)]
    return int(digits[:-1]), int(digits[-1]), suffix


def arch_serves(capability: tuple[int, int], architectures: Sequence[str]) -> bool:
    """Whether kernels built for ``architectures`` run on a GPU of compute ``capability`` (major,
    minor): machine code sm_XY runs on X.Y' with Y' >= Y (sm_XYa only on X.Y itself), PTX
    compute_XY on every capability >= X.Y."""
    for arch in architectures:
        major, minor, suffix = _arch_number(arch)
        if arch.startswith("sm_"):
            if major == capability[0] and (minor == capability[1] if suffix == "a" else minor <= capability[1]):
                return True
        elif arch.startswith("compute_") and (major, minor) <= tuple(capability):
            return True
    return False


def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _cuda_device_problem(index: int) -> str:
    if not _DEVICE_KERNELS["cuda"]:
        return ""
    capability = tuple(_device_capability(index))
    built = cuda_architectures()
    if arch_serves(capability, built):
        return ""
    problem = (f"the CUDA kernels were built for {', '.join(built) or 'no architecture'}, which cannot run on "
               f"cuda:{index} (compute capability {capability[0]}.{capability[1]}); rebuild for it with "
               f"TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" pip install --no-build-isolation -e .")
    warnings.warn(f"gpoe_fusion: {problem}. backend='auto' uses the pure-PyTorch path on this device.",
                  RuntimeWarning, stacklevel=2)
    return problem


@torch.compiler.assume_constant_result
def cuda_device_problem(index: int) -> str:
    """Why the CUDA kernels cannot run on GPU ``index`` (its architecture was not built), or "" when
    they can. Found out once per device, with one RuntimeWarning; torch.compile takes the answer as
    a constant."""
    return _cuda_device_problem(index)


def supports_device(device: torch.device) -> bool:
    """Whether a kernel is registered for ``device``'s type and, on a GPU, built for its architecture."""
    if not _DEVICE_KERNELS.get(device.type, False):
        return False
    return device.type != "cuda" or not cuda_device_problem(device.index or 0)


def extension_info() -> dict:
    """What the compiled extension offers on this machine: whether it loaded (and why not), the CPU
    kernels' instruction set, whether it has CUDA kernels and for which architectures, and each visible
    GPU with whether the kernels serve it."""
    gpus = []
    if _DEVICE_KERNELS["cuda"] and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            capability = tuple(_device_capability(index))
            gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                         "capability": f"{capability[0]}.{capability[1]}",
                         "served": arch_serves(capability, cuda_architectures())})
    return {"available": _AVAILABLE, "load_error": _LOAD_ERROR, "torch": torch.__version__,
            "cpu_capability": cpu_capability(), "cuda": compiled_with_cuda(),
            "cuda_architectures": list(cuda_architectures()), "cuda_devices": gpus}


def fuse(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool,
         return_weights: bool = False) -> tuple[Tensor, ...]:
    """Fused joint ``(mu, logvar)`` [N, D] of mu, logvar [M, N, D]; logits [M, N|1, D|1]; mask bool [M, N].

    With ``return_weights`` also every expert's weight [M, N, D] (alpha with logits, the share of
    the joint precision without; 0 when masked) as a third, differentiable output.
    """
    joint_mu, joint_logvar, weights = torch.ops.gpoe_fusion.fuse_forward(mu, logvar, logits, mask, prior_expert,
                                                                          return_weights)
    return (joint_mu, joint_logvar, weights) if return_weights else (joint_mu, joint_logvar)


def mopoe(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None,
          prior_expert: bool) -> tuple[Tensor, Tensor]:
    """Every subset's product ``(joint_mu, joint_logvar)`` [S = 2^M - 1, N, D] of mu, logvar [M, N, D]
    (M <= 8); logits [M, N, D] or None; mask bool [M, N]. Component c holds the experts whose bit
    is set in c + 1; a subset with a masked member gives zeros."""
    return torch.ops.gpoe_fusion.mopoe_forward(mu, logvar, logits, mask, prior_expert)


def _check_inputs(op: str, mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None) -> None:
    """The structural checks of csrc/fusion_host.cpp, for tracing (the real kernels repeat them)."""
    torch._check(mu.dim() == 3, lambda: f"{op}: mu: expected shape [M, N, D], got {tuple(mu.shape)}")
    torch._check(mu.dtype in KERNEL_DTYPES, lambda: f"{op}: mu: expected float16, bfloat16, float32 or float64, "
                                                    f"got {mu.dtype}")
    torch._check(logvar.shape == mu.shape, lambda: f"{op}: logvar: shape {tuple(logvar.shape)} differs from mu's "
                                                    f"shape {tuple(mu.shape)}")
    torch._check(logvar.dtype == mu.dtype, lambda: f"{op}: logvar: dtype {logvar.dtype} differs from mu's dtype "
                                                    f"{mu.dtype}")
    torch._check(mu.shape[0] >= 1, lambda: f"{op}: mu: expected at least one expert (M >= 1)")
    m, n, d = mu.shape
    if logits is not None:
        torch._check(
            logits.dim() == 3 and logits.shape[0] == m and (logits.shape[1] == n or logits.shape[1] == 1)
            and (logits.shape[2] == d or logits.shape[2] == 1),
            lambda: f"{op}: logits: expected shape [M, N or 1, D or 1] with [M, N, D] = {tuple(mu.shape)}, "
                    f"got {tuple(logits.shape)}")
        torch._check(logits.dtype == mu.dtype, lambda: f"{op}: logits: dtype {logits.dtype} differs from mu's "
                                                        f"dtype {mu.dtype}")
    if mask is not None:
        torch._check(mask.dtype == torch.bool, lambda: f"{op}: mask: expected dtype bool (true = present), got "
                                                        f"{mask.dtype}")
        torch._check(mask.dim() == 2 and mask.shape[0] == m and mask.shape[1] == n,
                     lambda: f"{op}: mask: expected shape [M, N] = [{m}, {n}], got {tuple(mask.shape)}")


def _fuse_forward_fake(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool,
                       return_weights: bool = False):
    _check_inputs("fuse_forward", mu, logvar, logits, mask)
    m, n, d = mu.shape
    weights = mu.new_empty((m, n, d)) if return_weights else mu.new_empty((0,))
    return mu.new_empty((n, d)), mu.new_empty((n, d)), weights


def _fuse_backward_fake(grad_joint_mu, grad_joint_logvar, grad_weights, mu, logvar, logits, mask, prior_expert,
                        output_mask):
    _check_inputs("fuse_backward", mu, logvar, logits, mask)
    m, n, d = mu.shape
    for name, grad, shape in (("grad_joint_mu", grad_joint_mu, (n, d)), ("grad_joint_logvar", grad_joint_logvar, (n, d)),
                              ("grad_weights", grad_weights, (m, n, d))):
        if grad is not None:
            torch._check(tuple(grad.shape) == shape,
                         lambda name=name, grad=grad, shape=shape: f"fuse_backward: {name}: expected shape "
                                                                   f"{list(shape)}, got {tuple(grad.shape)}")
            torch._check(grad.dtype == mu.dtype, lambda name=name, grad=grad: f"fuse_backward: {name}: dtype "
                                                                              f"{grad.dtype} differs from mu's dtype")

    def like(t: Tensor | None, wanted: bool) -> Tensor:
        return t.new_empty(t.shape) if wanted and t is not None else mu.new_empty((0,))

    return like(mu, output_mask[0]), like(mu, output_mask[1]), like(logits, output_mask[2])


def _mopoe_forward_fake(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool):
    _check_inputs("mopoe_forward", mu, logvar, logits, mask)
    m, n, d = mu.shape
    torch._check(m <= 8, lambda: f"mopoe_forward: mu: at most 8 experts (255 subsets), got M = {m}")
    if logits is not None:
        torch._check(tuple(logits.shape) == (m, n, d),
                     lambda: f"mopoe_forward: logits: expected shape [M, N, D] (expand broadcast logits first), "
                             f"got {tuple(logits.shape)}")
    s = 2**m - 1
    return mu.new_empty((s, n, d)), mu.new_empty((s, n, d))


def _mopoe_backward_fake(grad_joint_mu, grad_joint_logvar, mu, logvar, logits, mask, prior_expert, output_mask):
    _check_inputs("mopoe_backward", mu, logvar, logits, mask)
    m, n, d = mu.shape
    for name, grad in (("grad_joint_mu", grad_joint_mu), ("grad_joint_logvar", grad_joint_logvar)):
        if grad is not None:
            torch._check(tuple(grad.shape) == (2**m - 1, n, d),
                         lambda name=name, grad=grad: f"mopoe_backward: {name}: expected shape [S, N, D] = "
                                                      f"{[2**m - 1, n, d]}, got {tuple(grad.shape)}")

    def like(t: Tensor | None, wanted: bool) -> Tensor:
        return t.new_empty(t.shape) if wanted and t is not None else mu.new_empty((0,))

    return like(mu, output_mask[0]), like(mu, output_mask[1]), like(logits, output_mask[2])


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, logits, mask, prior_expert, *rest = inputs
    ctx.save_for_backward(mu, logvar, logits, mask)
    ctx.prior_expert = prior_expert
    ctx.return_weights = bool(rest and rest[0])
    # An output that gets no gradient is passed to the kernel as None and never read.
    ctx.set_materialize_grads(False)


def _differentiable_grads(outputs, grads, leaves, wanted) -> list[Tensor | None]:
    """The first-order gradients as a differentiable function of the inputs and of ``grads``:
    ``outputs`` (the pure-PyTorch forward of ``leaves``) differentiated with ``create_graph=True``.
    Only the ``wanted`` leaves get a gradient."""
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None]
    inputs = [t for t, want in zip(leaves, wanted) if want]
    result = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], create_graph=True,
                                      allow_unused=True, materialize_grads=True))
    return [next(result) if want else None for want in wanted]


def _input_grads(ctx, grads, reference, fused) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of mu, logvar, logits (None where autograd does not want one) for the incoming
    ``grads`` (None: that output gets no gradient). ``fused(mu, logvar, logits, mask, wanted)`` is
    the backward op; ``reference(mu, logvar, logits, mask)`` the pure-PyTorch forward, differentiated
    instead when the gradients must be differentiable themselves (create_graph=True), which the
    fused backward op is not."""
    mu, logvar, logits, mask = ctx.saved_tensors
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], logits is not None and ctx.needs_input_grad[2]]
    if not any(wanted) or all(g is None for g in grads):
        return None, None, None
    if torch.is_grad_enabled():
        got = _differentiable_grads(reference(mu, logvar, logits, mask), grads, (mu, logvar, logits), wanted)
    else:
        got = fused(mu, logvar, logits, mask, wanted)
    return tuple(g if want else None for g, want in zip(got, wanted))


def _fuse_backward(ctx, grad_joint_mu: Tensor | None, grad_joint_logvar: Tensor | None, grad_weights: Tensor | None):
    if not ctx.return_weights:
        grad_weights = None  # the empty placeholder output (tracing may hand it a gradient)
    grads = _input_grads(
        ctx, (grad_joint_mu, grad_joint_logvar, grad_weights),
        lambda mu, logvar, logits, mask: _reference.fuse(mu, logvar, logits, mask, ctx.prior_expert,
                                                         return_weights=grad_weights is not None),
        lambda mu, logvar, logits, mask, wanted: torch.ops.gpoe_fusion.fuse_backward(
            grad_joint_mu, grad_joint_logvar, grad_weights, mu, logvar, logits, mask, ctx.prior_expert, wanted))
    return (*grads, None, None, None)


def _mopoe_backward(ctx, grad_joint_mu: Tensor | None, grad_joint_logvar: Tensor | None):
    grads = _input_grads(
        ctx, (grad_joint_mu, grad_joint_logvar),
        lambda mu, logvar, logits, mask: _reference.mopoe(mu, logvar, logits, mask, ctx.prior_expert),
        lambda mu, logvar, logits, mask, wanted: torch.ops.gpoe_fusion.mopoe_backward(
            grad_joint_mu, grad_joint_logvar, mu, logvar, logits, mask, ctx.prior_expert, wanted))
    return (*grads, None, None)


if _AVAILABLE:
    torch.library.register_fake("gpoe_fusion::mopoe_forward")(_mopoe_forward_fake)
    torch.library.register_fake("gpoe_fusion::mopoe_backward")(_mopoe_backward_fake)
    torch.library.register_autograd("gpoe_fusion::mopoe_forward", _mopoe_backward, setup_context=_setup_context)
    torch.library.register_fake("gpoe_fusion::fuse_forward")(_fuse_forward_fake)
    torch.library.register_fake("gpoe_fusion::fuse_backward")(_fuse_backward_fake)
    torch.library.register_autograd("gpoe_fusion::fuse_forward", _fuse_backward, setup_context=_setup_context)


# ---- Decompositions into ATen ops, for exported programs that hold the ops -----------------------

def _fuse_forward_decomposition(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None,
                                prior_expert: bool, return_weights: bool = False):
    """``fuse_forward`` as ATen ops (``_reference.fuse``): joint mu, logvar [N, D] and the weights
    [M, N, D] (an empty [0] without ``return_weights``, as the kernel returns)."""
    outputs = _reference.fuse(mu, logvar, logits, mask, prior_expert, return_weights)
    weights = outputs[2] if return_weights else mu.new_empty((0,))
    return outputs[0], outputs[1], weights


def _mopoe_forward_decomposition(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None,
                                 prior_expert: bool):
    """``mopoe_forward`` as ATen ops (``_reference.mopoe``): every subset's product [S, N, D]."""
    return _reference.mopoe(mu, logvar, logits, mask, prior_expert)


def decompositions() -> dict:
    """The forward ops as the exact pure-PyTorch (ATen) math, a decomposition table for
    ``ExportedProgram.run_decompositions``: ``ep.run_decompositions(gpoe_fusion.ops.decompositions())``
    turns a program that holds the fused ops (exported with ``backend="kernel"``, or calling
    ``torch.ops.gpoe_fusion`` directly) into one of ATen ops only, which ``torch.onnx.export`` and other
    ATen consumers take. The default ``backend="auto"`` needs none of this: under ``torch.export`` the
    layers and functions trace the same math directly. Empty when the extension is not loaded."""
    if not _AVAILABLE:
        return {}
    return {torch.ops.gpoe_fusion.fuse_forward.default: _fuse_forward_decomposition,
            torch.ops.gpoe_fusion.mopoe_forward.default: _mopoe_forward_decomposition}
