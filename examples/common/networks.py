"""The paper's networks (Section 4.5) and the cross-modal VAE both pipelines train. Encoders return ``(mu, logvar,
features)``: the posterior [B, D] and the features [B, F] it came from, read by gPoE's credibility (Fig. 2)."""

import argparse
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

import gpoe_fusion as gf
from gpoe_fusion.likelihoods import chamfer_distance

FUSIONS = ("moe", "poe", "gpoe", "mopoe")  # the fusion layers compared, all around them alike (paper Section 5.3)


class GaussianHead(nn.Module):
    """features [B, F] -> (mu, logvar) [B, D]; logvar starts near 0 so early KLs are tame."""

    def __init__(self, in_dim: int, latent_dim: int):
        super().__init__()
        self.mu, self.logvar = nn.Linear(in_dim, latent_dim), nn.Linear(in_dim, latent_dim)
        nn.init.zeros_(self.logvar.bias)
        nn.init.normal_(self.logvar.weight, std=1e-3)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(features), self.logvar(features)


def load_resnet18_state(path: str | Path) -> dict[str, Tensor]:
    """A ResNet-18 state dict from a local file (e.g. torchvision's ImageNet ``resnet18-f37072fd.pth``), loaded
    ``weights_only`` (cannot run code). FileNotFoundError for a missing file, ValueError naming any other bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        torchvision.models.resnet18(weights=None).load_state_dict(state)  # every name and shape, or an error
    except Exception as error:  # a foreign or damaged file can fail in many ways; all mean "not the weights"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: not torchvision's ResNet-18 weights, loaded safely ({first})") from error
    return state


class ResNet18Encoder(nn.Module):
    """RGB encoder: a ResNet-18 trunk + Gaussian heads. rgb [B, 3, H, W] in [0, 1]. width: channels of the first stage
    (then 2, 4, 8 times it; 64 with ``stem_pool`` is torchvision's ResNet-18; compute falls with width squared);
    weights: a local ResNet-18 file (``load_resnet18_state``), width 64 with stem_pool only; nothing is downloaded."""

    def __init__(self, latent_dim: int, weights: str | Path | None = None, width: int = 64, stem_pool: bool = True):
        super().__init__()
        if width < 1:
            raise ValueError(f"width: expected a positive channel count, got {width}")
        if weights is not None and (width != 64 or not stem_pool):
            raise ValueError(f"weights: ResNet-18 weights fit width 64 with the stem's max-pool, not width {width}"
                             f"{'' if stem_pool else ' without it'}")
        trunk = torchvision.models.resnet18(weights=None)
        if weights is not None:
            trunk.load_state_dict(load_resnet18_state(weights))
        if width != 64:
            trunk.inplanes = width
            trunk.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            trunk.bn1 = nn.BatchNorm2d(width)
            for stage in range(4):
                setattr(trunk, f"layer{stage + 1}", trunk._make_layer(torchvision.models.resnet.BasicBlock,
                                                                      width << stage, 2, stride=1 if stage == 0 else 2))
            for module in trunk.modules():  # torchvision's initialisation of its ResNets
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if not stem_pool:
            trunk.maxpool = nn.Identity()
        trunk.fc = nn.Identity()
        self.trunk, self.feature_dim = trunk, 8 * width
        self.head = GaussianHead(self.feature_dim, latent_dim)
        # ImageNet's normalisation (torchvision's weights expect it); forward() makes it channels-last: 1 copy, not 2.
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.trunk(((rgb - self.mean) / self.std).contiguous(memory_format=torch.channels_last))
        return (*self.head(features), features)


class PermutationEquivariant(nn.Module):
    """DeepSets layer on points [B, P, C]: Gamma(x) - Lambda(max over points of x), per point."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.gamma, self.lam = nn.Linear(in_dim, out_dim), nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma(x) - self.lam(x.amax(dim=1, keepdim=True))


class ResPELBlock(nn.Module):
    """Residual block of two permutation-equivariant layers (Li & Lee, CVPR 2019)."""

    def __init__(self, width: int):
        super().__init__()
        self.pe1, self.pe2 = PermutationEquivariant(width, width), PermutationEquivariant(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pe1(torch.relu(self.norm1(x)))
        return x + self.pe2(torch.relu(self.norm2(h)))


class ResPELEncoder(nn.Module):
    """Point-cloud encoder: residual permutation-equivariant blocks, max-pooled to a global code, invariant to point
    order. points: [B, P, 3] -> (mu, logvar) [B, D], features [B, width]."""

    def __init__(self, latent_dim: int, width: int = 128, blocks: int = 2):
        super().__init__()
        self.lift = nn.Linear(3, width)
        self.blocks = nn.Sequential(*(ResPELBlock(width) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.feature_dim = width
        self.head = GaussianHead(width, latent_dim)

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = torch.relu(self.norm(self.blocks(self.lift(points)))).amax(dim=1)
        return (*self.head(features), features)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        # In place (a Linear's backward needs only its input): FoldingNet's activations, a step's largest, kept once.
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1]))


class FoldingNetDecoder(nn.Module):
    """FoldingNet (Yang et al., CVPR 2018): two folds of a fixed 2-D grid, conditioned on z. z: [B, D] -> points [B,
    grid_size**2, 3]. The paper's sizes are grid 32 (1024 points), hidden 512."""

    def __init__(self, latent_dim: int, grid_size: int = 32, hidden: int = 512):
        super().__init__()
        axis = torch.linspace(-1.0, 1.0, grid_size)
        self.register_buffer("grid", torch.cartesian_prod(axis, axis), persistent=False)  # [grid_size**2, 2]
        self.fold1 = _mlp([latent_dim + 2, hidden, hidden, 3])
        self.fold2 = _mlp([latent_dim + 3, hidden, hidden, 3])

    @staticmethod
    def _fold(mlp: nn.Sequential, z: Tensor, points: Tensor) -> Tensor:
        """mlp applied to [z, point] for every point: z [B, D], points [B or 1, P, k] -> [B, P, 3]. The first layer's
        product with z is computed once per sample, not per point: a third of a fold's work at the demo's sizes."""
        first, d = mlp[0], z.shape[1]
        hidden = (nn.functional.linear(z, first.weight[:, :d], first.bias).unsqueeze(1)
                  + nn.functional.linear(points, first.weight[:, d:]))
        # On rows [B * P, hidden]: a 3-D input's Linear returns a view, whose in-place ReLU costs 4 copies (CopySlices).
        return mlp[2:](mlp[1](hidden).flatten(0, 1)).view(*hidden.shape[:2], -1)

    def forward(self, z: Tensor) -> Tensor:
        folded = self._fold(self.fold1, z, self.grid.to(z.dtype).unsqueeze(0))
        return self._fold(self.fold2, z, folded)


class KeypointDecoder(nn.Module):
    """Linear layers from z [B, D] to normalised keypoints [B, K, 3]."""

    def __init__(self, latent_dim: int, hidden: int = 256, num_keypoints: int = 21):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.net = _mlp([latent_dim, hidden, hidden, num_keypoints * 3])

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], self.num_keypoints, 3)


class DCGANDecoder(nn.Module):
    """DCGAN-style generator (Radford et al.): z [B, D] -> per-class logits [B, C, S, S]: a 4x4 map, then stride-2
    transposed convolutions up to out_size (a power of two >= 8), channels halving from ``base`` to ``min_channels``, BN
    + ReLU after all but the last (more layers at full resolution cost the demo half its time for no IoU)."""

    def __init__(self, latent_dim: int, num_classes: int, out_size: int = 256, base: int = 256, min_channels: int = 32):
        super().__init__()
        ups = int(math.log2(out_size)) - 2
        if 2 ** (ups + 2) != out_size or ups < 1:
            raise ValueError(f"out_size: expected a power of two >= 8, got {out_size}")
        if min_channels < 1:
            raise ValueError(f"min_channels: expected a positive count, got {min_channels}")
        self.base = base
        self.project = nn.Sequential(nn.Linear(latent_dim, base * 16), nn.ReLU())
        channels = [base, *(max(min_channels, base // 2**i) for i in range(1, ups))]
        layers: list[nn.Module] = []
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(channels[-1], num_classes, 4, stride=2, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.project(z).view(z.shape[0], self.base, 4, 4))


class CrossModalVAE(nn.Module):
    """encoders: modality -> module giving (mu, logvar, features), the first the input used alone at test time;
    objective: the library's CrossModalObjective, whose decoders name the decoded ones. Batches: name -> tensor."""

    def __init__(self, encoders: Mapping[str, nn.Module], objective: gf.CrossModalObjective):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.objective, self.modalities = objective, list(encoders)
        # oneDNN's and cuDNN's preferred layout: a demo training step on 2 CPU cores takes 109 ms instead of 157.
        self.to(memory_format=torch.channels_last)

    def encode(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Each encoded modality's posterior (mu, logvar) [B, D] and features [B, F]."""
        outputs = {name: encoder(batch[name]) for name, encoder in self.encoders.items()}
        return {n: (mu, logvar) for n, (mu, logvar, _) in outputs.items()}, {n: o[2] for n, o in outputs.items()}

    def forward(self, batch: Mapping[str, Tensor], return_weights: bool = False) -> gf.ObjectiveOutput:
        """The training loss of a batch; with ``return_weights`` also each modality's weight [M, B, D]."""
        posteriors, features = self.encode(batch)
        targets = {name: batch[name] for name in self.objective.decoders}
        return self.objective(posteriors, targets, features=features, return_weights=return_weights)

    @torch.no_grad()
    def predict(self, inputs: Tensor, decoded: str) -> Tensor:
        """Unimodal inference (paper Section 5): z = the input modality's posterior mean, decoded."""
        mu, _, _ = self.encoders[self.modalities[0]](inputs)
        return self.objective.decoders[decoded](mu)

    @torch.no_grad()
    def predict_joint(self, inputs: Mapping[str, Tensor], decoded: str) -> Tensor:
        """Multimodal inference: z = the mean of the fusion of every encoded modality's posterior (a product's mean, or
        a mixture's for MoE and MoPoE), decoded. inputs: modality name -> [B, ...]."""
        posteriors, features = self.encode(inputs)
        mu, logvar = (torch.stack([posteriors[name][part] for name in self.modalities]) for part in (0, 1))
        joint = self.objective.fusion(mu, logvar, features=[features[name] for name in self.modalities])
        return self.objective.decoders[decoded](joint.mean)


def cross_modal_vae(args: argparse.Namespace, task_decoders: Callable[[], Mapping[str, nn.Module]],
                    likelihoods: Mapping[str, Callable[[Tensor, Tensor], Tensor]]) -> CrossModalVAE:
    """The paper's model: ResNet-18 (RGB) and ResPEL (points) encoders, --fusion, the objective over ``task_decoders()``
    (``likelihoods``) and a FoldingNet; all but the fusion built first from --seed (so every fusion starts alike)."""
    torch.manual_seed(args.seed)
    rgb = ResNet18Encoder(args.latent_dim, weights=args.rgb_weights, width=args.rgb_width, stem_pool=args.rgb_stem_pool)
    points = ResPELEncoder(args.latent_dim, width=args.pel_width)
    decoders = {**task_decoders(),
                "points": FoldingNetDecoder(args.latent_dim, grid_size=args.grid_size, hidden=args.fold_hidden)}
    dims = [rgb.feature_dim, points.feature_dim]
    layer = {"moe": gf.MoE, "poe": gf.PoE, "mopoe": gf.MoPoE, "gpoe": lambda: gf.GPoE(
        2, args.latent_dim, dims, credibility=args.credibility, hidden=(128,))}[args.fusion]()  # FUSIONS
    objective = gf.CrossModalObjective(layer, decoders, {**likelihoods, "points": chamfer_distance}, beta=args.beta,
                                       weights={"points": args.points_weight})
    return CrossModalVAE({"rgb": rgb, "points": points}, objective)
