"""Every operand layout the Python layer hands the kernels, forward and backward, against the float64
pure-PyTorch path (itself checked against the numpy oracle, tests/oracle.py), on the CPU and, where
one exists, on a GPU.

The layer flattens the batch axes and passes logits as they broadcast: [M, B, D], [M, 1, D], [M, B, 1],
[M, 1, 1] for the fusion, and for MoPoE expanded to [M, B, D] (a stride-0 view on the broadcast
axes). Experts arrive contiguous, transposed (a [B, M, D] tensor's permutation), broadcast over
the batch (an expanded [M, 1, D]) or strided along D (copied first). Masked experts hold NaN, which
must reach no output and no gradient.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gpoe_fusion import functional as F
from gpoe_fusion import ops

from oracle import weighted_product

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.load_error()}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.supports_device(torch.device("cuda")) else [])
M, D = 3, 12
BATCH = (2, 5)  # two batch axes: the layer flattens them to N = 10 rows
LOGITS = {"none": None, "MBD": (M, *BATCH, D), "M1D": (M, 1, 1, D), "MB1": (M, *BATCH, 1), "M11": (M, 1, 1, 1),
          "M1bD": (M, 1, BATCH[1], D)}  # the last: broadcast over one of two batch axes (expanded by the layer)
EXPERTS = ["contiguous", "transposed", "batch-broadcast", "strided-d"]


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of t [M, *batch, D] in the memory layout ``kind`` (batch-broadcast: row 0 repeated)."""
    if kind == "transposed":
        return t.movedim(0, -2).contiguous().movedim(-2, 0)
    if kind == "batch-broadcast":
        return t[:, :1, :1].expand(t.shape)
    if kind == "strided-d":
        wide = torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)
        return wide[..., ::2]
    return t


def make_case(logits: str, experts: str, masked: bool, device: str, seed: int):
    """float32 experts and logits in the layout asked for, on ``device``; mask bool [M, *batch] or None
    (every row keeps an expert), masked experts NaN."""
    g = torch.Generator().manual_seed(seed)
    mu = layout(torch.randn(M, *BATCH, D, generator=g) * 2, experts)
    logvar = layout((torch.rand(M, *BATCH, D, generator=g) * 2 - 1) * 6, experts)
    mask = None
    if masked:
        mask = torch.rand(M, *BATCH, generator=g) > 0.4
        mask[:, 1, 2] = False
        mask[2, 1, 2] = True  # a row with one expert
        mask[0] |= ~mask.any(0)  # every row keeps an expert
        if experts == "batch-broadcast":
            mask = mask[:, :1, :1].expand(M, *BATCH)
        nan = ~mask[..., None]
        mu, logvar = mu.masked_fill(nan, float("nan")), logvar.masked_fill(nan, float("nan"))
    shape = LOGITS[logits]
    logit_values = None if shape is None else torch.randn(*shape, generator=g) * 1.5
    move = lambda t: None if t is None else t.to(device)  # noqa: E731 (.to keeps the layout's strides)
    return move(mu), move(logvar), move(logit_values), move(mask)


def leaves(*tensors):
    """float64 leaf copies (the reference's inputs) and float32 leaf views of the same values."""
    exact = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    fused = [None if t is None else t.detach().requires_grad_() for t in tensors]
    return exact, fused


def grads_of(outputs, inputs, upstream):
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outputs, present, upstream, allow_unused=True)
    return [g if g is None else g.double() for g in got]


def assert_close(got, want, what):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=3e-5, atol=3e-5, msg=lambda m: f"{what}: {m}")


def check_gradients(got_outputs, want_outputs, fused, exact, seed):
    """Gradients of both paths' outputs under the same random upstream gradients, compared."""
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in want_outputs]
    want_grads = grads_of(want_outputs, exact, upstream)
    got_grads = grads_of(got_outputs, fused, [u.float() for u in upstream])
    for name, g, w in zip(("mu", "logvar", "logits"), got_grads, want_grads):
        assert g.shape == w.shape, name
        assert_close(g, w, f"grad {name}")


# Every (logits layout, experts layout, masked, prior).
CASES = list(itertools.product(LOGITS, EXPERTS, [False, True], [False, True]))
every_layout = pytest.mark.parametrize(
    "logits, experts, masked, prior", CASES,
    ids=[f"{lg}-{ex}-{'mask' if mk else 'nomask'}-{'prior' if pr else 'noprior'}" for lg, ex, mk, pr in CASES])


@pytest.mark.parametrize("device", DEVICES)
@every_layout
def test_fuse_in_every_layout_matches_the_float64_reference(device, logits, experts, masked, prior):
    mu, logvar, logit_values, mask = make_case(logits, experts, masked, device, seed=1)
    exact, fused = leaves(mu, logvar, logit_values)

    def run(inputs, backend):
        m, lv, lg = inputs
        if lg is None:
            return F.poe(m, lv, mask, prior, backend=backend, return_weights=True)
        return F.gpoe(m, lv, lg, mask, prior, backend=backend, return_weights=True)

    want, want_weights = run(exact, "torch")
    got, got_weights = run(fused, "kernel")
    oracle_mu, oracle_logvar = weighted_product(mu.double().cpu().numpy(), logvar.double().cpu().numpy(),
                                                None if logit_values is None else logit_values.double().cpu().numpy(),
                                                None if mask is None else mask.cpu().numpy(), prior)
    assert_close(want.mu.detach(), torch.from_numpy(oracle_mu), "reference joint mu vs oracle")
    assert_close(want.logvar.detach(), torch.from_numpy(oracle_logvar), "reference joint logvar vs oracle")
    for name, g, w in (("joint mu", got.mu, want.mu), ("joint logvar", got.logvar, want.logvar),
                       ("weights", got_weights, want_weights)):
        assert g.shape == w.shape and g.device.type == device
        assert_close(g.detach(), w.detach(), name)
    check_gradients([got.mu, got.logvar, got_weights], [want.mu, want.logvar, want_weights], fused, exact, seed=2)


@pytest.mark.parametrize("device", DEVICES)
@every_layout
def test_mopoe_in_every_layout_matches_the_float64_reference(device, logits, experts, masked, prior):
    mu, logvar, logit_values, mask = make_case(logits, experts, masked, device, seed=3)
    exact, fused = leaves(mu, logvar, logit_values)
    want = F.mopoe(exact[0], exact[1], mask, exact[2], prior, backend="torch")
    got = F.mopoe(fused[0], fused[1], mask, fused[2], prior, backend="kernel")
    assert torch.equal(got.mask.cpu(), want.mask.cpu()) if want.mask is not None else got.mask is None
    for name, g, w in (("components' mu", got.mu, want.mu), ("components' logvar", got.logvar, want.logvar)):
        assert g.shape == w.shape and g.device.type == device
        assert_close(g.detach(), w.detach(), name)
    # Each present component is the product of its members: the oracle, member by member.
    for c, members in enumerate(got.subsets.cpu()):
        idx = members.nonzero().flatten()
        sub_logits = None if logit_values is None else logit_values.expand(mu.shape)[idx].double().cpu().numpy()
        sub_mask = None if mask is None else mask[idx].cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):  # rows where the component is absent
            oracle_mu, _ = weighted_product(mu[idx].double().cpu().numpy(), logvar[idx].double().cpu().numpy(),
                                            sub_logits, sub_mask, prior)
        present = torch.ones(BATCH, dtype=torch.bool) if got.mask is None else got.mask[c].cpu()
        assert_close(got.mu[c].detach().cpu()[present], torch.from_numpy(oracle_mu)[present], f"component {c}")
    check_gradients([got.mu, got.logvar], [want.mu, want.logvar], fused, exact, seed=4)
