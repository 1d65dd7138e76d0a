"""The exact pure-PyTorch fusion math: the ``"torch"`` backend and the kernels' oracle.

Everything here works on already validated, stacked tensors:

    mu, logvar: [M, *batch, D]   one Gaussian expert per row of the leading axis
    logits:     broadcastable to [M, *batch, D], or None (plain PoE)
    mask:       bool [M, *batch], True = expert present, or None (all present)

With ``l_i = log alpha_i`` (PoE: ``l_i = 0``) and ``s_i = l_i - logvar_i`` over the present
experts, the weighted product of Gaussians is Gaussian with

    joint_logvar = -logsumexp_i(s_i)
    joint_mu     = sum_i softmax_i(s) * mu_i

which never forms a precision ``exp(-logvar)`` and so is exact wherever ``logvar`` is finite
(see docs/math.md). float16/bfloat16 inputs are computed in float32 and returned in their dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["component_mask", "compute_dtype", "credibility", "fuse", "mopoe", "subset_masks", "subset_members"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fusion is computed in: float32 for 16-bit floats, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _expand_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    return None if mask is None else mask.unsqueeze(-1).expand_as(like)


def credibility(logits: Tensor, mask: Tensor | None, shape: torch.Size) -> Tensor:
    """alpha = softmax of ``logits`` over the expert axis, masked experts excluded.

    logits: broadcastable to ``shape`` = [M, *batch, D]; mask: bool [M, *batch] or None.
    Returns log(alpha): [M, *batch, D] in the logits' dtype; masked experts get -inf.
    A row with every expert masked gets -inf everywhere (its gradient is zero, not NaN).
    """
    logits = logits.expand(shape)
    present = _expand_mask(mask, logits)
    if present is None:
        return torch.log_softmax(logits, dim=0)
    masked = logits.masked_fill(~present, float("-inf"))
    norm = torch.logsumexp(masked, dim=0, keepdim=True)
    # Rows with no expert present would give -inf - -inf = NaN; zero the normaliser there so
    # the row stays -inf and contributes nothing (and its gradient is exactly zero).
    norm = torch.where(torch.isinf(norm), torch.zeros_like(norm), norm)
    return masked - norm


def fuse(
    mu: Tensor,
    logvar: Tensor,
    logits: Tensor | None = None,
    mask: Tensor | None = None,
    prior_expert: bool = False,
    return_weights: bool = False,
) -> tuple[Tensor, ...]:
    """Exact weighted product of diagonal Gaussian experts.

    mu, logvar: [M, *batch, D]; logits: broadcastable to [M, *batch, D] or None;
    mask: bool [M, *batch] or None; prior_expert: add N(0, I) as an expert with alpha = 1.
    Returns ``(joint_mu, joint_logvar)``, each [*batch, D] in the dtype of ``mu``, computed in
    float32 or float64 (whichever the inputs need; float64 if any of them is float64).
    With ``return_weights`` also every expert's weight [M, *batch, D] in mu's dtype, 0 when
    masked: alpha with logits, else the expert's share of the joint precision.
    """
    out_dtype = mu.dtype
    dtype = compute_dtype(out_dtype if logits is None else torch.promote_types(out_dtype, logits.dtype))
    mu = mu.to(dtype)
    s = -logvar.to(dtype)
    log_alpha = None
    if logits is not None:
        log_alpha = credibility(logits.to(dtype), mask, s.shape)
        s = s + log_alpha
    present = _expand_mask(mask, s)
    if present is not None:
        s = s.masked_fill(~present, float("-inf"))
        # A masked expert's mu may be anything (even NaN); keep it out of the weighted sum.
        mu = mu.masked_fill(~present, 0.0)
    if prior_expert:
        # N(0, I) enters outside the softmax: l = 0, logvar = 0, so s = 0 and mu = 0.
        s = torch.cat([s, s.new_zeros((1,) + s.shape[1:])])
        mu = torch.cat([mu, mu.new_zeros((1,) + mu.shape[1:])])
    # Shift by the largest s (the result does not depend on the shift, so it carries no
    # gradient): every exp is then <= 1, and mu = sum(e * mu) / sum(e) divides two sums formed
    # from the same rounded e, which is more accurate than forming softmax(s) through logsumexp.
    shift = s.amax(dim=0).detach()
    shift = shift.masked_fill(torch.isinf(shift), 0.0)
    e = torch.exp(s - shift)
    total = e.sum(dim=0)
    joint_mu = (e * mu).sum(dim=0) / total
    joint_logvar = -(shift + torch.log(total))
    if not return_weights:
        return joint_mu.to(out_dtype), joint_logvar.to(out_dtype)
    if log_alpha is not None:
        weights = log_alpha.exp()
    else:
        weights = e[: logvar.shape[0]] / total
        if present is not None:
            # A row with no expert and no prior has total 0: its (masked) weights are 0, not 0 / 0.
            weights = weights.masked_fill(~present, 0.0)
    return joint_mu.to(out_dtype), joint_logvar.to(out_dtype), weights.to(out_dtype)


def subset_members(m: int) -> list[list[int]]:
    """MoPoE's components, the non-empty subsets of M experts: component c holds the experts whose
    bit is set in c + 1: [0], [1], [0, 1], [2], [0, 2], ... (plain lists: reading them costs no
    device synchronisation)."""
    return [[i for i in range(m) if code >> i & 1] for code in range(1, 2**m)]


def subset_masks(m: int, device: torch.device | str | None = None) -> Tensor:
    """``subset_members`` as bool [S = 2^M - 1, M]."""
    codes = torch.arange(1, 2**m, device=device).unsqueeze(1)
    # Expert i's bit 2^i, tested with a bitwise and rather than a shift (ONNX shifts only unsigned
    # integers), formed in floating point (exact) as AOTInductor miscompiles integer powers.
    bits = (2.0 ** torch.arange(m, device=device)).long()
    return codes & bits != 0


def mopoe(
    mu: Tensor,
    logvar: Tensor,
    logits: Tensor | None = None,
    mask: Tensor | None = None,
    prior_expert: bool = False,
) -> tuple[Tensor, Tensor]:
    """Every subset's product (MoPoE's components): ``fuse`` of each subset's experts, with alpha
    renormalised over the subset's members. mu, logvar: [M, *batch, D]; logits broadcastable to
    them or None; mask bool [M, *batch] or None. Returns joint mu, logvar [S, *batch, D] (order of
    ``subset_masks``); a subset with a masked member is not a component of that row and gets 0, 0.
    """
    m = mu.shape[0]
    if logits is not None:
        logits = logits.expand(mu.shape)
    if mask is not None:
        # Masked experts may hold anything: give them finite stand-ins, whose subsets are dropped below.
        present = mask.unsqueeze(-1)
        mu = torch.where(present, mu, 0.0)
        logvar = torch.where(present, logvar, 0.0)
        logits = None if logits is None else torch.where(present, logits, 0.0)
    outputs = [fuse(mu[idx], logvar[idx], None if logits is None else logits[idx], None, prior_expert)
               for idx in subset_members(m)]
    joint_mu = torch.stack([o[0] for o in outputs])
    joint_logvar = torch.stack([o[1] for o in outputs])
    if mask is not None:
        complete = component_mask(mask, subset_masks(m, mu.device)).unsqueeze(-1)
        joint_mu = torch.where(complete, joint_mu, 0.0)
        joint_logvar = torch.where(complete, joint_logvar, 0.0)
    return joint_mu, joint_logvar


def component_mask(mask: Tensor, members: Tensor) -> Tensor:
    """bool [S, *batch]: subset s is a component of a row when all its members are present there.
    mask: bool [M, *batch]; members: bool [S, M]."""
    absent = (~mask).flatten(1).to(torch.float32)  # [M, prod(batch)]
    missing = members.to(torch.float32) @ absent  # [S, prod(batch)]: members missing in each row
    return (missing == 0).reshape((members.shape[0],) + tuple(mask.shape[1:]))
