"""CUDA paths beyond the kernels' numerics (tests/test_kernels.py): C++ errors raised inside the ops
on CUDA tensors reach Python, and the layers' forward and backward can be captured in a CUDA graph
(their default path never synchronises with the host) and replayed on new inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gpoe_fusion as gf
from gpoe_fusion import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.load_error()}"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def cuda_kernels():
    assert ops.supports_device(CUDA), "the extension has no CUDA kernels"


# ---- C++ errors on CUDA tensors --------------------------------------------------------------------
# These run in the pytest process on purpose: an extension that carries its own static copy of the
# C++ runtime cannot hand its exceptions to torch, and the process aborts instead of raising.

# name -> (the arguments after mu, the exception, what its message says); built on the device when run.
FORWARD_ERRORS = {
    "logvar-shape": (lambda mu: (torch.randn(2, 3, 5, device=CUDA), None, None, False), ValueError, "logvar: shape"),
    "mask-dtype": (lambda mu: (mu, None, torch.ones(2, 3, device=CUDA), False), TypeError,
                   "mask: expected dtype bool"),
    "mask-shape": (lambda mu: (mu, None, torch.ones(3, 2, dtype=torch.bool, device=CUDA), False), ValueError,
                   "mask: expected shape"),
    "logits-dtype": (lambda mu: (mu, mu.double(), None, False), TypeError, "logits: dtype"),
    # A CPU mask with CUDA experts dispatches to the CUDA kernel, whose device check refuses it.
    "mask-device": (lambda mu: (mu, None, torch.ones(2, 3, dtype=torch.bool), False), ValueError,
                    r"mask: .*(?i:cuda)"),
}


@pytest.mark.parametrize("case", list(FORWARD_ERRORS))
def test_cpp_errors_in_the_cuda_forward_reach_python(case):
    rest, error, match = FORWARD_ERRORS[case]
    mu = torch.randn(2, 3, 4, device=CUDA)
    with pytest.raises(error, match=match) as raised:
        torch.ops.gpoe_fusion.fuse_forward(mu, *rest(mu))
    assert "fuse_forward" in str(raised.value)
    # The failed call left the device usable: with equal variances the joint mean is the experts' mean.
    joint_mu, _, _ = torch.ops.gpoe_fusion.fuse_forward(mu, torch.zeros_like(mu), None, None, False)
    torch.cuda.synchronize()
    torch.testing.assert_close(joint_mu, mu.mean(0))


def test_cpp_error_in_the_cuda_backward_reaches_python():
    mu = torch.randn(2, 3, 4, device=CUDA)
    with pytest.raises(ValueError, match=r"grad_weights: expected shape \[M, N, D\]"):
        torch.ops.gpoe_fusion.fuse_backward(None, None, torch.randn(2, 3, 5, device=CUDA), mu, mu, None, None, False,
                                            [True, True, False])
    torch.cuda.synchronize()


# ---- CUDA graphs ---------------------------------------------------------------------------------

M, B, D = 3, 64, 32
FEATURE_DIMS = [8, 6, 5]


def inputs(seed: int) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(M, B, generator=g) > 0.3
    mask[0] = True  # every sample keeps an expert
    return {
        "mu": torch.randn(M, B, D, generator=g).to(CUDA),
        "logvar": (2 * torch.randn(M, B, D, generator=g)).to(CUDA),
        "mask": mask.to(CUDA),
        "features": [torch.randn(B, f, generator=g).to(CUDA) for f in FEATURE_DIMS],
        # Weights of the loss terms, so every output gets a different incoming gradient.
        "weights": [torch.randn(B, D, generator=g).to(CUDA), torch.randn(B, D, generator=g).to(CUDA),
                    torch.randn(M, B, D, generator=g).to(CUDA)],
    }


def training_step(fusion: torch.nn.Module, x: dict):
    """Forward with alpha, a loss on the joint and alpha, and the gradients of the inputs and
    parameters: what a training step asks of a fusion layer."""
    params = list(fusion.parameters())

    def step():
        joint, alpha = fusion(x["mu"], x["logvar"], x["mask"], x["features"], return_weights=True)
        w_mu, w_logvar, w_alpha = x["weights"]
        loss = (joint.mu * w_mu).sum() + (joint.logvar * w_logvar).sum() + (alpha * w_alpha).sum()
        grads = torch.autograd.grad(loss, [x["mu"], x["logvar"], *params])
        return (joint.mu, joint.logvar, alpha, *grads)

    return step


def leaves(x: dict) -> dict:
    """Copies of ``x`` with the experts as leaves that want gradients."""
    out = {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in x.items()}
    out["mu"].requires_grad_()
    out["logvar"].requires_grad_()
    return out


def copy_into(static: dict, new: dict) -> None:
    """New values into the tensors the graph reads."""
    with torch.no_grad():
        for key in ("mu", "logvar", "mask"):
            static[key].copy_(new[key])
        for key in ("features", "weights"):
            for target, source in zip(static[key], new[key], strict=True):
                target.copy_(source)


def capture(step):
    """``step`` captured in a CUDA graph after a warm-up on a side stream (the recipe of the CUDA
    graphs documentation); returns the graph and its static outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


LAYERS = {
    "gpoe-global": lambda: gf.GPoE(M, D, credibility="global"),
    "gpoe-joint": lambda: gf.GPoE(M, D, FEATURE_DIMS, credibility="joint", hidden=(16,)),
    "poe": lambda: gf.PoE(),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_and_backward_replay_in_a_cuda_graph(name):
    torch.manual_seed(0)
    fusion = LAYERS[name]().to(CUDA).train()
    with torch.no_grad():  # away from the zero-initialised last layers, so alpha depends on the input
        for p in fusion.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    gf.set_validation(None)  # the default: value checks only on the CPU, so nothing waits for the device
    assert not gf.validation_enabled(None, CUDA)

    static = leaves(inputs(0))
    # Capturing fails on any host synchronisation (reading a value, a data-dependent shape).
    graph, outputs = capture(training_step(fusion, static))
    for seed in (1, 2):
        new = inputs(seed)
        copy_into(static, new)
        # What one eager step does from the state the replay starts from (running statistics included).
        eager_fusion = copy.deepcopy(fusion)
        graph.replay()
        expected = training_step(eager_fusion, leaves(new))()
        torch.cuda.synchronize()
        names = ["joint mu", "joint logvar", "alpha", "grad mu", "grad logvar"] + \
            [f"grad {n}" for n, _ in fusion.named_parameters()]
        assert len(outputs) == len(expected) == len(names)
        for label, got, want in zip(names, outputs, expected, strict=True):
            torch.testing.assert_close(got, want, msg=lambda m, at=f"{name}, inputs {seed}, {label}": f"{at}: {m}")
        for (label, got), want in zip(fusion.named_buffers(), eager_fusion.buffers(), strict=True):
            torch.testing.assert_close(got, want, msg=lambda m, at=f"{name}, inputs {seed}, {label}": f"{at}: {m}")
