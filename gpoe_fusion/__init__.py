"""gpoe_fusion: exact Product-, Generalized Product-, Mixture- and Mixture-of-Products-of-Experts
fusion of Gaussian latents.

    import gpoe_fusion as gf
    joint = gf.functional.gpoe(mu, logvar, logits, mask)      # mu, logvar: [M, B, D]
    mu_j, logvar_j = joint                                    # unpacks as the usual pair
    fusion = gf.GPoE(num_experts=2, latent_dim=64, feature_dims=[512, 256])

See README.md and docs/api.md.
"""

from . import credibility, diagnostics, distributed, functional, likelihoods, noise, objectives, ops
from ._validation import set_validation, validation_enabled
from .credibility import EntropyCredibility, GlobalCredibility, IndependentCredibility, JointCredibility
from .distributions import Gaussian, GaussianMixture
from .modules import GPoE, MoE, MoPoE, PoE
from .objectives import CrossModalObjective, ObjectiveOutput

__version__ = "0.1.0"

__all__ = [
    "CrossModalObjective",
    "EntropyCredibility",
    "GPoE",
    "Gaussian",
    "GaussianMixture",
    "GlobalCredibility",
    "IndependentCredibility",
    "JointCredibility",
    "MoE",
    "MoPoE",
    "ObjectiveOutput",
    "PoE",
    "credibility",
    "diagnostics",
    "distributed",
    "extension_available",
    "extension_info",
    "functional",
    "likelihoods",
    "noise",
    "objectives",
    "ops",
    "set_validation",
    "validation_enabled",
]


extension_info = ops.extension_info


def extension_available() -> bool:
    """Whether the fused C++/CUDA kernels are built and loaded (else the pure-PyTorch path runs)."""
    return ops.available()
