"""Reading RHD (Rendered Hand Pose Dataset, Zimmermann & Brox 2017) from its on-disk ``RHD_published_v2`` folder
(its layout: docs/handpose.md, "Getting RHD and pointing at it"): ``read_frame`` decodes one raw frame, ``make_sample``
makes the network's inputs and targets of one, ``RHDDataset`` of a split's frames."""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data import backproject, resample_points
from rhd.annotations import load_annotations

SPLITS = ("training", "evaluation")
ROOT_KEYPOINT = 12  # middle-finger MCP (Yang et al. lineage)
SCALE_KEYPOINTS = (12, 11)  # scale = ||kp12 - kp11||, the middle finger's proximal bone
CROP_PAD_VALUE = 127
CROP_MARGIN = 1.3
MIN_CROP_HALF_SIZE = 8.0  # pixels; keeps the crop finite when the visible keypoints all sit on the root
POINT_RADIUS_M = 0.2
DEPTH_RANGE_M = 5.0
LEFT_IDS, RIGHT_IDS = (2, 17), (18, 33)  # inclusive mask-id ranges of each hand
# One raw RHD frame: color uint8 [H, W, 3]; depth float32 [H, W] metres; mask uint8 [H, W] ids; xyz [42, 3] metres,
# camera frame; uv_vis [42, 3]; K [3, 3] (keypoints 0..20 left hand, 21..41 right hand).
Frame = NamedTuple("Frame", [(field, np.ndarray) for field in ("color", "depth", "mask", "xyz", "uv_vis", "K")])


def _read_png(path: Path, modes: tuple[str, ...], what: str) -> np.ndarray:
    """The pixels uint8 of the PNG ``path``, which must be of one of ``modes`` (``what`` in the error); RGBA as RGB.
    Palette images keep their indices (converting them to "L" would map label ids to grey levels)."""
    if not path.is_file():
        raise FileNotFoundError(f"RHD image not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's ways of saying "not a readable PNG"
        raise ValueError(f"{path}: cannot decode image ({error})") from error
    if image.mode not in modes:
        raise ValueError(f"{path}: expected {what}, got mode {image.mode}")
    return np.asarray(image.convert("RGB") if image.mode == "RGBA" else image, dtype=np.uint8)


def decode_depth(encoded: np.ndarray) -> np.ndarray:
    """RHD depth PNG pixels uint8 [H, W, >=2] -> metres float32 [H, W]: ``(R * 256 + G) / 65535 * 5``."""
    code = encoded[..., 0].astype(np.float64) * 256.0 + encoded[..., 1].astype(np.float64)
    return (code / 65535.0 * DEPTH_RANGE_M).astype(np.float32)


def _split_dir(root: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(root) / split
    if not folder.is_dir():
        nested = Path(root) / "RHD_published_v2"
        hint = f" (did you mean root={nested}?)" if (nested / split).is_dir() else ""
        raise FileNotFoundError(f"RHD split folder not found: {folder}; root must be the RHD_published_v2 folder{hint}")
    return folder


def read_frame(root: str | os.PathLike, split: str, index: int,
               annotations: dict[int, dict[str, np.ndarray]] | None = None) -> Frame:
    """Decode frame ``index`` of ``split`` at full resolution; ``annotations`` (``load_annotations``) saves re-reading
    the pickle. Missing or undecodable files raise errors naming the file."""
    folder = _split_dir(root, split)
    if annotations is None:
        annotations = load_annotations(folder / f"anno_{split}.pickle")
    if index not in annotations:
        raise KeyError(f"sample {index} is not in the annotations of {folder}")
    name = f"{index:05d}.png"
    color = _read_png(folder / "color" / name, ("RGB", "RGBA"), "an RGB colour image")
    depth = decode_depth(_read_png(folder / "depth" / name, ("RGB", "RGBA"),
                                   "an RGB depth image (top byte in R, bottom byte in G)"))
    mask = _read_png(folder / "mask" / name, ("L", "P"), "an 8-bit label image (mode L or P)")
    if not (color.shape[:2] == depth.shape == mask.shape):
        raise ValueError(f"{folder}/*/{name}: colour {color.shape[:2]}, depth {depth.shape} "
                         f"and mask {mask.shape} sizes differ")
    return Frame(color, depth, mask, **annotations[index])


def _hand_pixels(mask: np.ndarray, hand: int) -> np.ndarray:
    low, high = RIGHT_IDS if hand == 1 else LEFT_IDS
    return (mask >= low) & (mask <= high)


def choose_hand(mask: np.ndarray) -> int:
    """The hand with more mask pixels: 0 left (ids 2..17), 1 right (ids 18..33), also on a tie (as RHD's code does)."""
    return 0 if _hand_pixels(mask, 0).sum() > _hand_pixels(mask, 1).sum() else 1


def crop_box(uv: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, float]:
    """Square crop centred on keypoint 12 (the root), half-size = 1.3 x its largest distance to a visible keypoint (to
    any when none is), >= ``MIN_CROP_HALF_SIZE`` pixels. uv: [21, 2]; visible: bool [21] -> (centre [2], half_size)."""
    centre = uv[ROOT_KEYPOINT].astype(np.float64)
    counted = uv[visible] if visible.any() else uv
    reach = np.linalg.norm(counted - centre, axis=1).max()
    return centre, max(CROP_MARGIN * float(reach), MIN_CROP_HALF_SIZE)


def crop_intrinsics(K: np.ndarray, centre: np.ndarray, half_size: float, crop_size: int) -> np.ndarray:
    """The crop's intrinsics ``A @ K``, float64 [3, 3] (K: [3, 3]): A maps the box [centre - h, centre + h] (the outer
    pixels' edges) to [-0.5, S - 0.5] (pixel centres at integers): ``u' = s (u - c_u + h) - 0.5``, ``s = S / 2h``."""
    s = crop_size / (2.0 * half_size)
    affine = np.array([[s, 0.0, s * (half_size - centre[0]) - 0.5],
                       [0.0, s, s * (half_size - centre[1]) - 0.5],
                       [0.0, 0.0, 1.0]])
    return affine @ np.asarray(K, dtype=np.float64)


def _crop_image(color: np.ndarray, centre: np.ndarray, half_size: float, crop_size: int) -> np.ndarray:
    """Resample the square box of :func:`crop_intrinsics` to [S, S, 3] with Pillow's bilinear filter (which widens its
    support when shrinking, i.e. antialiases); outside the image is CROP_PAD_VALUE."""
    height, width = color.shape[:2]
    # Pillow's coordinates put pixel centres at +0.5; pad by whole pixels so the box lies inside the image.
    left, top = centre[0] - half_size + 0.5, centre[1] - half_size + 0.5
    right, bottom = centre[0] + half_size + 0.5, centre[1] + half_size + 0.5
    pad = int(np.ceil(max(0.0, -left, -top, right - width, bottom - height))) + 1
    padded = np.pad(color, ((pad, pad), (pad, pad), (0, 0)), constant_values=CROP_PAD_VALUE)
    box = (left + pad, top + pad, right + pad, bottom + pad)
    return np.asarray(Image.fromarray(padded).resize((crop_size, crop_size), Image.BILINEAR, box=box), dtype=np.uint8)


def make_sample(frame: Frame, index: int, crop_size: int, num_points: int, seed: int,
                where: str = "") -> dict[str, torch.Tensor]:
    """``RHDDataset``'s item of sample ``index`` from its decoded ``frame``; ``where`` prefixes a zero scale's error."""
    hand = choose_hand(frame.mask)
    own = slice(21 * hand, 21 * hand + 21)
    keypoints, uv, visible = frame.xyz[own], frame.uv_vis[own, :2], frame.uv_vis[own, 2] == 1
    root = keypoints[ROOT_KEYPOINT]
    scale = float(np.linalg.norm(keypoints[SCALE_KEYPOINTS[0]] - keypoints[SCALE_KEYPOINTS[1]]))
    if not scale > 0:
        raise ValueError(f"{where}sample {index}: keypoints 12 and 11 coincide: the scale is 0")

    centre, half_size = crop_box(uv, visible)
    crop = _crop_image(frame.color, centre, half_size, crop_size)
    crop_K = crop_intrinsics(frame.K, centre, half_size, crop_size)
    crop_uv = (uv - centre + half_size) * (crop_size / (2.0 * half_size)) - 0.5

    points = backproject(frame.depth, frame.K, _hand_pixels(frame.mask, hand)).astype(np.float64)
    points = points[np.linalg.norm(points - root, axis=1) < POINT_RADIUS_M]
    points = resample_points((points - root) / scale, num_points, np.random.default_rng([seed, index]))

    floats = {"points": points, "keypoints": (keypoints - root) / scale, "root": root, "uv": crop_uv, "K": crop_K}
    return {"rgb": torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32) / 255.0),
            **{k: torch.from_numpy(v.astype(np.float32)) for k, v in floats.items()},
            "scale": torch.tensor(scale, dtype=torch.float32), "visible": torch.from_numpy(visible),
            "hand": torch.tensor(hand, dtype=torch.int64), "index": torch.tensor(index, dtype=torch.int64)}


class RHDDataset(Dataset):
    """RHD samples as network inputs and targets. root: the ``RHD_published_v2`` folder; split: "training" or
    "evaluation"; crop_size: S, the side of the RGB crop; num_points: P; indices: the sample ids to use (default: every
    id of the split's pickle, ascending); seed: with the sample id, fixes the point-cloud resampling, so an item is the
    same whenever it is read; samples: items already made (``make_sample``) by sample id, returned instead of decoding
    their frames again. Which hand, the normalisation, the crop and the points: docs/handpose.md, "Getting RHD and
    pointing at it" (a hand without points gives P copies of the origin). An item (tensors):

    - "rgb": float32 [3, S, S] in [0, 1], the crop; "points": float32 [P, 3], the hand's point cloud, normalised;
    - "keypoints": float32 [21, 3], the hand's 3-D keypoints, normalised (RHD order; keypoint 12 at the origin);
      "scale": float32 [] metres; "root": float32 [3] metres, camera frame;
    - "uv": float32 [21, 2], keypoints in crop pixels (integer = pixel centre); "visible": bool [21] (uv_vis == 1);
      "K": float32 [3, 3], the crop's intrinsics: K @ (keypoints * scale + root) projects onto "uv";
    - "hand": int64 [], 0 left, 1 right; "index": int64 [], the sample id."""

    def __init__(self, root: str | os.PathLike, split: str = "training", crop_size: int = 256, num_points: int = 1024,
                 indices: list[int] | np.ndarray | None = None, seed: int = 0,
                 samples: Mapping[int, dict[str, torch.Tensor]] | None = None):
        for name, value, low in (("crop_size", crop_size, 1), ("num_points", num_points, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.root, self.split, self.seed = Path(root), split, int(seed)
        self.crop_size, self.num_points, self.samples = int(crop_size), int(num_points), samples or {}
        path = _split_dir(root, split) / f"anno_{split}.pickle"
        annotations = load_annotations(path)
        self.indices = list(annotations) if indices is None else [int(i) for i in indices]
        if missing := [i for i in self.indices if i not in annotations]:
            raise ValueError(f"indices not in {path}: {missing[:10]}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
        # One array per field, row i for self.indices[i]: a dict of 41258 small arrays is 110 MB of Python objects
        # that every forked DataLoader worker slowly copies (reference counting writes to them); arrays stay shared.
        self._fields = {name: np.stack([annotations[i][name] for i in self.indices]) if self.indices else
                        np.zeros((0, *shape)) for name, shape in (("xyz", (42, 3)), ("uv_vis", (42, 3)), ("K", (3, 3)))}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = self.indices[item]
        if index in self.samples:
            return self.samples[index]
        frame = read_frame(self.root, self.split, index, {index: {name: f[item] for name, f in self._fields.items()}})
        return make_sample(frame, index, self.crop_size, self.num_points, self.seed, f"{self.root / self.split}: ")
