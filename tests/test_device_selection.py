"""Which GPUs the CUDA kernels serve, and what the backends do on one they do not: ``auto`` takes the
pure-PyTorch path with one warning naming the device, its architecture and the rebuild command;
``kernel`` raises that message. The GPU is simulated (its compute capability and the built
architectures are patched), so this runs without one.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gpoe_fusion as gf
from gpoe_fusion import _backend, ops

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.load_error()}")


@pytest.mark.parametrize("capability, architectures, served", [
    ((9, 0), ["sm_90"], True),
    ((8, 0), ["sm_90"], False),             # A100 with a Hopper-only build: "no kernel image"
    ((8, 9), ["sm_80"], True),              # machine code runs on later minors of its major
    ((8, 6), ["sm_89"], False),
    ((10, 0), ["sm_90"], False),            # ... but never on another major
    ((10, 0), ["sm_90", "compute_90"], True),  # PTX compiles for any later architecture
    ((12, 0), ["sm_75", "compute_90"], True),
    ((7, 5), ["compute_80"], False),        # PTX never runs on an earlier one
    ((9, 0), ["sm_90a"], True),             # arch-specific code runs on its own architecture only
    ((9, 1), ["sm_90a"], False),
    ((12, 0), ["sm_120", "compute_120"], True),
    ((9, 0), [], False),
])
def test_which_architectures_serve_a_device(capability, architectures, served):
    assert ops.arch_serves(capability, architectures) is served


@pytest.fixture
def simulated_gpu(monkeypatch):
    """A CUDA build for sm_90 (+PTX) and GPU 0 of the compute capability the test sets."""
    capability = {"value": (9, 0)}
    monkeypatch.setitem(ops._DEVICE_KERNELS, "cuda", True)
    monkeypatch.setattr(ops, "cuda_architectures", lambda: ("sm_90", "compute_90"))
    monkeypatch.setattr(ops, "_device_capability", lambda index: capability["value"])
    ops._cuda_device_problem.cache_clear()
    yield capability
    ops._cuda_device_problem.cache_clear()


def test_auto_falls_back_on_an_unbuilt_architecture_with_one_warning(simulated_gpu):
    simulated_gpu["value"] = (8, 0)
    device = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning) as caught:
        assert not _backend.use_kernel(device, torch.float32, "auto")
        assert not _backend.use_kernel(device, torch.bfloat16, "auto")
        assert not ops.supports_device(device)
    assert len(caught) == 1, "one warning per device, not one per call"
    message = str(caught[0].message)
    assert "cuda:0 (compute capability 8.0)" in message and "sm_90, compute_90" in message
    assert 'TORCH_CUDA_ARCH_LIST="8.0" pip install --no-build-isolation -e .' in message
    assert "backend='auto' uses the pure-PyTorch path" in message


def test_kernel_backend_raises_the_reason_on_an_unbuilt_architecture(simulated_gpu):
    simulated_gpu["value"] = (7, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"backend='kernel' was requested but the CUDA kernels were built for "
                                               r"sm_90, compute_90, which cannot run on cuda:0 \(compute capability "
                                               r"7.5\); rebuild for it with TORCH_CUDA_ARCH_LIST=\"7.5\""):
            _backend.use_kernel(torch.device("cuda", 0), torch.float32, "kernel")


@pytest.mark.parametrize("capability", [(9, 0), (10, 0), (12, 0)])
def test_a_served_architecture_takes_the_kernel_without_a_warning(simulated_gpu, capability):
    simulated_gpu["value"] = capability
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_kernel(torch.device("cuda", 0), torch.float32, "auto")
        assert _backend.use_kernel(torch.device("cuda", 0), torch.float32, "kernel")
    assert not _backend.use_kernel(torch.device("cuda", 0), torch.float32, "torch")


def test_extension_info_reports_the_build():
    info = gf.extension_info()
    assert info["available"] and info["load_error"] is None
    assert info["cpu_capability"] in ("AVX512", "AVX2", "DEFAULT")
    assert info["cuda"] == ops.compiled_with_cuda()
    assert all(arch.startswith(("sm_", "compute_")) for arch in info["cuda_architectures"])
    assert bool(info["cuda_architectures"]) == info["cuda"]
    assert len(info["cuda_devices"]) == (torch.cuda.device_count() if info["cuda"] else 0)
