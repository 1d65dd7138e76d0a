"""Built-in synthetic Sim2Real data, written in exactly the on-disk format of the real dataset.

Each view (512 x 256) is a procedural laparoscopic scene: abdominal wall and fat/stomach regions split by
a smooth random level set, a large two-lobed liver in front of them, a small gallbladder at the liver's
lower rim, and a thin curved ligament band running from the liver towards the wall. Every pixel belongs to
one of the five classes, as in the real data (which has no background colour).

* depth: a smooth tilted wall surface; fat bulges out of it continuously, the liver is a dome clearly in
  front of the wall, the gallbladder in front of the liver, the ligament a thin sheet on top. Values are
  z-depth in scene units, about 75..305 (over 99.6 % of every view below 300).
* translation (the "realistic" image): per-class colours and textures (mottled liver, lobular fat,
  striated wall, veined gallbladder, fibrous ligament) that vary per scene and per view, lit by a light at
  the camera (Lambert shading from the depth normals, distance fall-off, vignetting, wet highlights).
* input (the raw render): flat simulator colours per class with Lambert shading only, in 51 shades per
  class (written as a palette PNG, which decodes to RGB like any other).

Scene k has its own tissue appearance (palette and texture maps); view N of scene k is drawn from
``np.random.default_rng([seed, k, N])``, so a view does not depend on how many views are generated, and
the same seed writes byte-identical files (with the same numpy, Pillow, zlib and OpenEXR versions).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sim2real.dataset import (
    CLASS_COLORS,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    NUM_CLASSES,
    default_intrinsics,
    sample_paths,
    write_depth_exr,
)

__all__ = ["GENERATOR_VERSION", "generate_sim2real", "ensure_builtin_sim2real"]

GENERATOR_VERSION = 1
"""Bumped whenever the generated images change, so cached data of an older generator is not reused."""

H, W = IMAGE_HEIGHT, IMAGE_WIDTH
_PAD = 64  # texture maps are this much larger than a view, so each view can show a shifted part of them
_FOCAL = float(default_intrinsics(W, H)[0, 0])

LIVER, FAT, WALL, GALLBLADDER, LIGAMENT = range(NUM_CLASSES)

# Mean tissue colours (RGB in [0, 1]) of the translated images, and the colour direction along
# which each class's texture varies. Chromaticity is the main cue, but lighting and per-view jitter make
# neighbouring classes (liver/wall, fat/ligament) overlap in brightness.
_BASE_COLORS = np.array(
    [
        [0.50, 0.16, 0.12],  # liver: dark red-brown
        [0.86, 0.68, 0.34],  # fat/stomach: yellow
        [0.80, 0.46, 0.44],  # abdominal wall: pink
        [0.42, 0.50, 0.26],  # gallbladder: olive green
        [0.88, 0.80, 0.72],  # ligament: off-white
    ],
    dtype=np.float32,
)
_TEXTURE_COLORS = np.array(
    [
        [0.16, 0.06, 0.05],
        [0.10, 0.12, 0.16],
        [0.16, 0.10, 0.10],
        [0.06, 0.10, 0.06],
        [0.08, 0.08, 0.09],
    ],
    dtype=np.float32,
)
_SPECULARITY = np.array([0.55, 0.25, 0.20, 0.80, 0.15], dtype=np.float32)
# The raw simulator render: flat colours per class under Lambert shading, quantised to _RENDER_SHADES
# levels per class so that the whole render fits one 256-colour palette.
_RENDER_COLORS = np.array(
    [[0.55, 0.20, 0.16], [0.90, 0.75, 0.40], [0.85, 0.55, 0.52], [0.45, 0.60, 0.30], [0.92, 0.88, 0.82]],
    dtype=np.float32,
)
_RENDER_SHADES = 51
_RENDER_PALETTE = (
    _RENDER_COLORS[:, None, :] * (np.arange(_RENDER_SHADES, dtype=np.float32) / (_RENDER_SHADES - 1))[:, None] * 255.0
    + 0.5
).astype(np.uint8).reshape(-1, 3)
_CLASS_PALETTE = np.array(CLASS_COLORS, dtype=np.uint8)


@lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X, Y, vignetting, each float32 [H, W]: pixel coordinates in units of the image height with the
    origin at the centre, and the endoscope light's radial fall-off ``1 - 0.35 r^2``."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float32)
    X = (u - np.float32((W - 1) / 2)) / np.float32(H)
    Y = (v - np.float32((H - 1) / 2)) / np.float32(H)
    return X, Y, 1.0 - 0.35 * (X * X + Y * Y)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # A Python float, so that arithmetic with float32 maps stays float32 (NumPy 2 promotion rules).
    return float(rng.uniform(low, high))


def _smooth_field(rng: np.random.Generator, cells: tuple[int, int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A smooth random field float32 [size]: Gaussian noise on a cells[0] x cells[1] grid, bicubically
    upsampled, so its features are about size / cells pixels across."""
    coarse = rng.standard_normal(cells, dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class _SceneStyle:
    """The tissue appearance shared by all views of one scene: palette and texture maps."""

    def __init__(self, rng: np.random.Generator) -> None:
        size = (H + _PAD, W + _PAD)
        jitter = 1.0 + 0.10 * rng.standard_normal((NUM_CLASSES, 3), dtype=np.float32)
        self.colors = np.clip(_BASE_COLORS * jitter, 0.0, 1.0)
        liver = 0.7 * _smooth_field(rng, (40, 72), size) + 0.3 * _smooth_field(rng, (80, 144), size)
        fat = 1.0 - 2.0 * np.abs(_smooth_field(rng, (30, 56), size))
        wall = 0.8 * _smooth_field(rng, (72, 8), size) + 0.3 * _smooth_field(rng, (16, 30), size)
        veins = np.exp(-((_smooth_field(rng, (8, 14), size) / 0.08) ** 2))
        gallbladder = 0.4 * _smooth_field(rng, (8, 14), size) - 1.2 * veins
        ligament = 0.9 * _smooth_field(rng, (6, 96), size)
        # Channel-last, so that picking each pixel's own class texture reads contiguous memory.
        self.textures = np.stack([liver, fat, wall, gallbladder, ligament], axis=-1).astype(np.float32)
        self.wetness = _smoothstep(2.0 * _smooth_field(rng, (40, 72), size) - 2.0)


def _ellipse_radius(X, Y, center, radii, angle):
    """Normalised elliptic radius float32 [H, W]: 0 at the centre, 1 on the ellipse."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    dx, dy = X - center[0], Y - center[1]
    a = (c * dx + s * dy) * (1.0 / radii[0])
    b = (c * dy - s * dx) * (1.0 / radii[1])
    return np.sqrt(a * a + b * b)


def _render_view(style: _SceneStyle, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One synthetic view: ``translation`` uint8 [H, W, 3]; ``input`` uint8 [H, W], indices into
    _RENDER_PALETTE; ``classes`` uint8 [H, W]; ``depth`` float32 [H, W] (z-depth, scene units)."""
    X, Y, vignetting = _grid()

    # Abdominal wall with fat/stomach regions: a smooth level set with a random dominant direction.
    direction = _uniform(rng, 0.0, 2.0 * np.pi)
    fat_field = _smooth_field(rng, (3, 6)) + (1.2 * float(np.cos(direction))) * X
    fat_field += (1.2 * float(np.sin(direction))) * Y - _uniform(rng, -0.5, 0.3)
    classes = np.where(fat_field > 0, np.uint8(FAT), np.uint8(WALL))
    wall_depth = 12.0 * _smooth_field(rng, (2, 4)) + _uniform(rng, -40, 40) * X + _uniform(rng, -40, 40) * Y
    wall_depth += _uniform(rng, 195.0, 235.0)
    depth = wall_depth - 25.0 * _smoothstep(fat_field)

    # The liver: the union of two overlapping ellipses (the lobes) with a wobbly rim.
    cx, cy = _uniform(rng, -0.25, 0.25), _uniform(rng, -0.30, 0.05)
    rx, ry, tilt = _uniform(rng, 0.38, 0.58), _uniform(rng, 0.24, 0.34), _uniform(rng, -0.5, 0.5)
    side = float(rng.choice([-1.0, 1.0]))
    lobes = np.minimum(
        _ellipse_radius(X, Y, (cx, cy), (rx, ry), tilt),
        _ellipse_radius(
            X,
            Y,
            (cx + side * rx * _uniform(rng, 0.5, 0.9), cy + _uniform(rng, -0.05, 0.1)),
            (0.7 * rx, 0.8 * ry),
            tilt - side * 0.4,
        ),
    )
    liver_radius = lobes + 0.12 * _smooth_field(rng, (3, 6))
    liver = liver_radius < 1.0
    dome = np.sqrt(np.clip(1.0 - liver_radius, 0.0, 1.0))
    np.copyto(depth, wall_depth - 40.0 - 50.0 * dome, where=liver)
    classes[liver] = LIVER

    # The ligament: a thin curved band from inside the liver's upper part out over its rim.
    phi = _uniform(rng, -0.75 * np.pi, -0.25 * np.pi) + tilt
    start_x, start_y = cx + 0.5 * rx * float(np.cos(phi)), cy + 0.5 * ry * float(np.sin(phi))
    heading = phi + _uniform(rng, -0.4, 0.4)
    dx, dy = float(np.cos(heading)), float(np.sin(heading))
    length = _uniform(rng, 0.45, 0.8)
    along = (X - start_x) * (dx / length) + (Y - start_y) * (dy / length)  # 0..1 over the band
    bend = _uniform(rng, -0.12, 0.12) * along * along + 0.02 * np.sin(_uniform(rng, 4.0, 8.0) * along)
    across = (Y - start_y) * dx - (X - start_x) * dy + bend
    half_width = _uniform(rng, 0.018, 0.03) * (1.2 - 0.5 * np.clip(along, 0.0, 1.0))
    ligament = (np.abs(across) < half_width) & (along > 0.0) & (along < 1.0)
    depth[ligament] -= 4.0
    classes[ligament] = LIGAMENT

    # The gallbladder: a blob hanging at the liver's lower rim, kept inside the centre crop.
    phi = _uniform(rng, 0.2 * np.pi, 0.8 * np.pi) + tilt
    gx = min(max(cx + 0.95 * rx * float(np.cos(phi)), -0.38), 0.38)
    gy = min(max(cy + 0.95 * ry * float(np.sin(phi)), -0.35), 0.38)
    blob_radius = _ellipse_radius(
        X, Y, (gx, gy), (_uniform(rng, 0.10, 0.15), _uniform(rng, 0.065, 0.10)), phi + _uniform(rng, -0.6, 0.6)
    )
    blob_radius += 0.08 * _smooth_field(rng, (3, 6))
    gallbladder = blob_radius < 1.0
    anchor_depth = float(depth[round(gy * H + (H - 1) / 2), round(gx * H + (W - 1) / 2)])
    blob_depth = (anchor_depth - 15.0) - 25.0 * np.sqrt(np.clip(1.0 - blob_radius, 0.0, 1.0))
    np.copyto(depth, np.minimum(blob_depth, depth - 3.0), where=gallbladder)
    classes[gallbladder] = GALLBLADDER

    # Light at the camera: Lambert term from the depth normals, distance fall-off, vignetting.
    dz_dv, dz_du = np.gradient(depth)
    scale = _FOCAL / depth
    slope_u = np.clip(dz_du * scale, -4.0, 4.0)
    slope_v = np.clip(dz_dv * scale, -4.0, 4.0)
    lambert = 1.0 / np.sqrt(1.0 + slope_u * slope_u + slope_v * slope_v)
    light = lambert * np.clip(scale * (150.0 / _FOCAL), 0.4, 1.6)
    light *= vignetting

    oy, ox = (int(o) for o in rng.integers(0, _PAD + 1, size=2))
    index = classes[..., None].astype(np.intp)
    texture = np.take_along_axis(style.textures[oy : oy + H, ox : ox + W], index, axis=2)
    colors = style.colors * (1.0 + 0.12 * rng.standard_normal((NUM_CLASSES, 3), dtype=np.float32))
    gain = _uniform(rng, 0.6, 1.2) * (1.0 + 0.10 * rng.standard_normal(3, dtype=np.float32))
    rgb = _TEXTURE_COLORS.take(classes, axis=0)
    rgb *= texture
    rgb += colors.take(classes, axis=0)
    rgb *= light[..., None]
    rgb *= gain
    shine = lambert * lambert
    shine *= shine
    shine *= shine
    shine *= style.wetness[oy : oy + H, ox : ox + W]
    shine *= _SPECULARITY.take(classes)
    rgb += shine[..., None]
    np.clip(rgb, 0.0, 1.0, out=rgb)
    rgb *= 255.0
    rgb += 0.5
    shade = (lambert * (_RENDER_SHADES - 1) + 0.5).astype(np.uint8)
    # Depth in steps of 1/16 scene unit (far below anything the point clouds resolve): exact in float32
    # and about six times smaller as a ZIP-compressed EXR than full-precision floats.
    depth = np.round(depth * 16.0) * (1.0 / 16.0)
    return {
        "translation": rgb.astype(np.uint8),
        "input": classes * np.uint8(_RENDER_SHADES) + shade,
        "classes": classes,
        "depth": depth,
    }


def _write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    # zlib level 1 with run-length matching: encoding costs about as much as rendering the view.
    Image.fromarray(rgb).save(path, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)


def _write_palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    """A palette PNG of indices uint8 [H, W] into palette uint8 [<= 256, 3]: it decodes to exactly
    those RGB colours, and Pillow writes it several times faster than an RGB PNG (no filter search)."""
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), np.ascontiguousarray(indices).tobytes())
    image.putpalette(palette.tobytes())
    image.save(path, format="PNG", compress_level=1)


def generate_sim2real(
    root: str | Path, scenes: int = 7, views_per_scene: int = 100, seed: int = 0, progress: bool = True
) -> Path:
    """Write ``scenes`` x ``views_per_scene`` synthetic views under ``root`` in the Sim2Real layout
    (scenes ``1..scenes``, views ``0000..``; existing files of the same names are overwritten).

    Returns ``root`` as a Path. Same arguments give byte-identical files.
    """
    if not (isinstance(scenes, int) and scenes > 0):
        raise ValueError(f"scenes must be a positive int, got {scenes!r}")
    if not (isinstance(views_per_scene, int) and 0 < views_per_scene <= 10000):
        raise ValueError(f"views_per_scene must be an int in 1..10000, got {views_per_scene!r}")
    root = Path(root)
    bar = tqdm(total=scenes * views_per_scene, desc="generating Sim2Real views", unit="view", disable=not progress)
    with bar:
        for scene in range(1, scenes + 1):
            for path in sample_paths(root, scene, 0).values():
                path.parent.mkdir(parents=True, exist_ok=True)
            style = _SceneStyle(np.random.default_rng([seed, scene]))
            for view in range(views_per_scene):
                sample = _render_view(style, np.random.default_rng([seed, scene, view]))
                paths = sample_paths(root, scene, view)
                _write_rgb_png(paths["translation"], sample["translation"])
                _write_palette_png(paths["input"], sample["input"], _RENDER_PALETTE)
                _write_palette_png(paths["segmentation"], sample["classes"], _CLASS_PALETTE)
                write_depth_exr(paths["depth"], sample["depth"])
                bar.update()
    return root


def ensure_builtin_sim2real(cache_dir: str | Path, views_per_scene: int, seed: int = 0, progress: bool = True) -> Path:
    """The root of the built-in dataset (7 scenes x ``views_per_scene``), generated on first use.

    Each (generator version, size, seed) has its own folder under ``cache_dir``, e.g.
    ``sim2real_builtin_v1_7x100_seed0``; a different size or seed therefore generates anew, and an existing
    folder is reused. Generation happens in a temporary folder that is renamed into place only when
    complete, so an interrupted run leaves no half-written dataset; concurrent callers may both generate,
    and the first rename wins.
    """
    scenes = 7
    cache_dir = Path(cache_dir)
    final = cache_dir / f"sim2real_builtin_v{GENERATOR_VERSION}_{scenes}x{views_per_scene}_seed{seed}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        generate_sim2real(staging, scenes, views_per_scene, seed, progress)
        manifest = {
            "generator_version": GENERATOR_VERSION,
            "scenes": scenes,
            "views_per_scene": views_per_scene,
            "seed": seed,
            "width": W,
            "height": H,
        }
        (staging / "builtin_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final
