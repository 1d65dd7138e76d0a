"""Loader for the Surgical Video-Sim2Real random views (Rivoir et al., ICCV 2021) on disk. The layout, and the choices
made where the dataset documents no geometry (z-depth, pinhole intrinsics, the centre crop, the point cloud's
normalisation): docs/surgical.md, "Getting the real dataset"."""

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import OpenEXR
import torch
from PIL import Image

from common.data import backproject, resample_points

# The classes (the position is the class id) and the RGB colour of each in the segmentation PNGs.
CLASS_NAMES: tuple[str, ...] = ("liver", "fat/stomach", "abdominal wall", "gallbladder", "ligament")
CLASS_COLORS: tuple[tuple[int, int, int], ...] = ((0, 0, 255), (255, 0, 0), (0, 255, 0), (0, 255, 255), (255, 0, 255))
NUM_CLASSES = len(CLASS_NAMES)
# The default split by scene: whole scenes, so no view of a test scene is seen in training.
SPLITS: dict[str, tuple[int, ...]] = {"train": (1, 2, 3, 4), "val": (5, 6), "test": (7,)}
IMAGE_WIDTH, IMAGE_HEIGHT = 512, 256
DEFAULT_HFOV_DEG = 90.0
POINT_SCALE = 100.0  # scene units: most depths are below 300, so the points' coordinates are of order 1

# The four modalities: (top folder, per-scene sub folder, file prefix, suffix); a sample needs all but the raw render.
_MODALITIES = {name: (f"{name}_random_views", name, name, ".exr" if name == "depth" else ".png")
               for name in ("translation", "input", "segmentation", "depth")}
_SAMPLE_MODALITIES = ("translation", "segmentation", "depth")


def default_intrinsics(width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT,
                       hfov_deg: float = DEFAULT_HFOV_DEG) -> np.ndarray:
    """Pinhole intrinsics [3, 3] (float64) for square pixels and a horizontal field of view: ``fx = fy = (width / 2) /
    tan(hfov / 2)``, principal point ``((width - 1) / 2, (height - 1) / 2)``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    if not 0.0 < hfov_deg < 180.0:
        raise ValueError(f"hfov_deg must be in (0, 180), got {hfov_deg}")
    f = (width / 2.0) / np.tan(np.radians(hfov_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def sample_paths(root: str | Path, scene: int, view: int | str) -> dict[str, Path]:
    """Paths of the four files of one view: keys ``translation``, ``input``, ``segmentation``, ``depth``. ``view``: the
    number N as an int (written with four digits, ``7 -> 0007``) or the file names' digits."""
    digits = f"{view:04d}" if isinstance(view, int) else view
    return {name: Path(root) / top / "random_views" / f"scene_{scene}" / sub / f"{prefix}{digits}{suffix}"
            for name, (top, sub, prefix, suffix) in _MODALITIES.items()}


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Sim2Real file missing: {path}")
    return path


def read_rgb(path: str | Path) -> np.ndarray:
    """An RGB image file as uint8 [H, W, 3] (alpha or palette images are converted to RGB)."""
    path = _require_file(Path(path))
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def colors_to_classes(rgb: np.ndarray, unknown_colors: str = "error", ignore_index: int = 255,
                      source: str = "segmentation") -> np.ndarray:
    """Class ids int64 [H, W] of colours uint8 [H, W, 3], exactly CLASS_COLORS; another colour is a ValueError naming
    ``source`` and the colours (``unknown_colors="error"``) or ``ignore_index`` ("ignore"), never a class."""
    if unknown_colors not in ("error", "ignore"):
        raise ValueError(f"unknown_colors must be 'error' or 'ignore', got {unknown_colors!r}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 [H, W, 3] colours, got {rgb.dtype} {list(rgb.shape)}")
    if 0 <= ignore_index < NUM_CLASSES:
        raise ValueError(f"ignore_index must not be a class id (0..{NUM_CLASSES - 1}), got {ignore_index}")
    codes = rgb.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)  # 0xRRGGBB per pixel
    classes = np.full(codes.shape, -1, dtype=np.int64)
    for class_id, (r, g, b) in enumerate(CLASS_COLORS):
        classes[codes == ((r << 16) | (g << 8) | b)] = class_id
    unknown = classes < 0
    if unknown_colors == "error" and unknown.any():
        found, counts = np.unique(codes[unknown], return_counts=True)
        listed = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x{n}" for c, n in zip(found[:5], counts[:5]))
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise ValueError(f"{source}: {int(unknown.sum())} pixels have colours that are not a Sim2Real class: "
                         f"{listed}{more}; known colours are {dict(zip(CLASS_NAMES, CLASS_COLORS))} "
                         "(pass unknown_colors='ignore' to map them to ignore_index)")
    classes[unknown] = ignore_index
    return classes


def classes_to_colors(classes: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """The colours uint8 [H, W, 3] of class ids [H, W]; ``ignore_index`` becomes black, other ids a ValueError."""
    classes = np.asarray(classes)
    valid = (classes >= 0) & (classes < NUM_CLASSES)
    if (bad := ~valid & (classes != ignore_index)).any():
        raise ValueError(f"class ids must be in 0..{NUM_CLASSES - 1} or {ignore_index}, found "
                         f"{np.unique(classes[bad])}")
    return np.array(CLASS_COLORS + ((0, 0, 0),), dtype=np.uint8)[np.where(valid, classes, NUM_CLASSES)]


def read_segmentation(path: str | Path, unknown_colors: str = "error", ignore_index: int = 255) -> np.ndarray:
    """Class ids int64 [H, W] of a colour-coded segmentation PNG (see :func:`colors_to_classes`)."""
    return colors_to_classes(read_rgb(path), unknown_colors, ignore_index, source=str(path))


def read_depth_exr(path: str | Path) -> np.ndarray:
    """Depth float32 [H, W] from the single channel ``'Y'`` of an EXR file (half or float pixels)."""
    path = _require_file(Path(path))
    try:
        with OpenEXR.File(str(path), separate_channels=True) as exr:
            channels = exr.channels()
            depth = np.asarray(channels["Y"].pixels) if "Y" in channels else None
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read depth EXR {path}: {error}") from error
    if depth is None:
        raise ValueError(f"{path}: no depth channel 'Y' (channels: {sorted(channels)})")
    if depth.ndim != 2 or depth.dtype.kind != "f":
        raise ValueError(f"{path}: channel 'Y' must be 2-D float, got {depth.dtype} {list(depth.shape)}")
    return depth.astype(np.float32, copy=False)


def write_depth_exr(path: str | Path, depth: np.ndarray) -> None:
    """Write depth [H, W] as a float32 scanline EXR with one channel ``'Y'`` (lossless ZIP)."""
    depth = np.ascontiguousarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got shape {list(depth.shape)}")
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}, {"Y": depth}) as exr:
        exr.write(str(path))


def depth_to_points(depth: np.ndarray, K: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Point cloud float32 [num_points, 3] of z-depth [H, W]: the pixels of finite depth > 0 back-projected through
    ``K`` [3, 3], centred on their centroid, over POINT_SCALE, resampled with ``rng`` (ValueError if none)."""
    points = backproject(depth, K, mask=np.isfinite(depth))
    if len(points) == 0:
        raise ValueError("depth map has no finite depth > 0")
    points = (points - points.mean(axis=0, dtype=np.float64)) / POINT_SCALE
    return resample_points(points.astype(np.float32), num_points, rng)


class Sim2RealDataset(torch.utils.data.Dataset):
    """Sim2Real views as RGB, mask and point cloud. root: the folder of ``*_random_views/``; split: a key of SPLITS,
    unless ``scenes`` names the scenes; image_size: S; num_points: P; intrinsics: [3, 3] of the full image (None:
    ``default_intrinsics``); unknown_colors, ignore_index: as ``colors_to_classes``; seed: view (scene, N) resamples its
    points with ``np.random.default_rng([seed, scene, N])``. ``views``: (scene, digits of N) in dataset order. A sample:
    "rgb" float32 [3, S, S] in [0, 1], the centred square crop resized bilinearly; "mask" int64 [S, S], the crop resized
    nearest; "points" float32 [P, 3], ``depth_to_points`` of the crop's depth and intrinsics; "scene", "index" (N):
    ints. Missing files (all checked here): FileNotFoundError, unreadable ones ValueError, naming the file."""

    def __init__(self, root: str | Path, split: str | None = "train", scenes: Sequence[int] | None = None,
                 image_size: int = 256, num_points: int = 1024, intrinsics: np.ndarray | None = None,
                 unknown_colors: str = "error", ignore_index: int = 255, seed: int = 0) -> None:
        if scenes is None and split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)} (or pass scenes=...), got {split!r}")
        self.root, self.split = Path(root), split if scenes is None else None
        self.scenes = tuple(int(s) for s in (SPLITS[split] if scenes is None else scenes))
        if not self.scenes:
            raise ValueError("scenes must name at least one scene")
        for name, value in (("image_size", image_size), ("num_points", num_points)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if unknown_colors not in ("error", "ignore"):
            raise ValueError(f"unknown_colors must be 'error' or 'ignore', got {unknown_colors!r}")
        if 0 <= ignore_index < NUM_CLASSES:
            raise ValueError(f"ignore_index must not be a class id (0..{NUM_CLASSES - 1}), got {ignore_index}")
        if intrinsics is not None:
            intrinsics = np.asarray(intrinsics, dtype=np.float64)
            if intrinsics.shape != (3, 3):
                raise ValueError(f"intrinsics must be [3, 3], got shape {list(intrinsics.shape)}")
        self.image_size, self.num_points, self.intrinsics, self.seed = image_size, num_points, intrinsics, seed
        self.unknown_colors, self.ignore_index = unknown_colors, ignore_index
        self.views = [(scene, digits) for scene in self.scenes for digits in self._scene_views(scene)]

    def _scene_views(self, scene: int) -> list[str]:
        """The view digits of one scene, ordered by N; every sample modality must have every view."""
        first_paths, found = sample_paths(self.root, scene, 0), {}
        for name in _SAMPLE_MODALITIES:
            directory = first_paths[name].parent
            if not directory.is_dir():
                raise FileNotFoundError(f"Sim2Real folder missing: {directory}")
            _, _, prefix, suffix = _MODALITIES[name]
            pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
            found[name] = {m.group(1) for m in map(pattern.fullmatch, (p.name for p in directory.iterdir())) if m}
        if not (views := found["translation"]):
            raise FileNotFoundError(f"no translation*.png views in {first_paths['translation'].parent}")
        for name in _SAMPLE_MODALITIES[1:]:
            if missing := sorted(views - found[name], key=int):
                raise FileNotFoundError(f"Sim2Real file missing: {sample_paths(self.root, scene, missing[0])[name]} "
                                        f"({len(missing)} {name} files of scene {scene} missing)")
        return sorted(views, key=int)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict:
        scene, digits = self.views[i]
        paths = sample_paths(self.root, scene, digits)
        rgb = read_rgb(paths["translation"])
        classes = read_segmentation(paths["segmentation"], self.unknown_colors, self.ignore_index)
        depth = read_depth_exr(paths["depth"])
        height, width = rgb.shape[:2]
        for name, shape in (("segmentation", classes.shape), ("depth", depth.shape)):
            if shape != (height, width):
                raise ValueError(f"{paths[name]}: size {shape[1]} x {shape[0]} differs from its RGB image "
                                 f"{paths['translation']} ({width} x {height})")
        side = min(width, height)  # the largest centred square: for 512 x 256, columns 128..383
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        size = (self.image_size, self.image_size)
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, box=box))
        # Class ids resized as an int32 image: Pillow's nearest sampling on the RGB's pixel grid, for any ignore_index.
        mask = np.asarray(Image.fromarray(classes.astype(np.int32)).resize(size, Image.Resampling.NEAREST, box=box))
        K = np.array(self.intrinsics if self.intrinsics is not None else default_intrinsics(width, height))
        K[:2, 2] -= (left, top)  # the crop's intrinsics: the principal point moves
        rng = np.random.default_rng([self.seed, scene, int(digits)])
        try:
            points = depth_to_points(depth[top:top + side, left:left + side], K, self.num_points, rng)
        except ValueError as error:
            raise ValueError(f"{paths['depth']}: {error}") from error
        return {"rgb": torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0),
                "mask": torch.from_numpy(mask.astype(np.int64)), "points": torch.from_numpy(points), "scene": scene,
                "index": int(digits)}
