"""Built-in synthetic Sim2Real data, written in exactly the on-disk format of the real dataset (docs/surgical.md).

As in the real dataset, scene k is one fixed anatomy (here procedural: wall and fat regions, a two-lobed liver, a
gallbladder, a ligament band, the five classes) and each 512 x 256 view a random pan, distance and roll. A view's depth
is z-depth in scene units (about 75..290); its translation (the "realistic" image) has per-class textures fixed to the
tissue, lit from the camera; its input (the raw render) flat class colours with Lambert shading, 51 shades each (a
palette PNG). Scene k is drawn from ``np.random.default_rng([seed, k])``, view N from ``[seed, k, N]``: a view does not
depend on how many are generated; a seed writes byte-identical files (same numpy, Pillow, zlib, OpenEXR)."""

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.data import build_once, ordered_map, write_png
from sim2real.dataset import (CLASS_COLORS, IMAGE_HEIGHT, IMAGE_WIDTH, NUM_CLASSES, default_intrinsics, sample_paths,
                              write_depth_exr)

GENERATOR_VERSION = 3  # bumped whenever the generated images change, so cached data of an older one is not reused
H, W = IMAGE_HEIGHT, IMAGE_WIDTH
_FOCAL = float(default_intrinsics(W, H)[0, 0])
# Pixel coordinates in units of the image height, origin at the centre: x float64 [W], y float64 [H]; the endoscope
# light's radial fall-off ``1 - 0.35 r^2``, float32 [H, W].
_PIXEL_X = (np.arange(W) - (W - 1) / 2) / H
_PIXEL_Y = (np.arange(H) - (H - 1) / 2) / H
_VIGNETTING = (1.0 - 0.35 * (_PIXEL_X[None, :] ** 2 + _PIXEL_Y[:, None] ** 2)).astype(np.float32)
LIVER, FAT, WALL, GALLBLADDER, LIGAMENT = range(NUM_CLASSES)
# Camera poses, in world units of the image height at the reference distance (f = H): a distance from _DISTANCE (to the
# wall's mean plane) scales the image by _REFERENCE_DISTANCE / distance; a roll of up to _ROLL; an aim in a random
# direction at an exponential elliptical radius, semi-axes _PAN at its mean (mostly on the liver, now and then off it).
_REFERENCE_DISTANCE = 215.0
_DISTANCE = (190.0, 235.0)
_ROLL = np.pi / 6
_PAN = (0.32, 0.24)
# The texture maps: one tile of _TILE (rows, columns) pixels (one per view pixel at the reference distance) repeated
# over the world; a view covers at most 624 x 520 of it, so none shows a texture twice.
_TILE = (560, 640)
# Mean tissue colours (RGB in [0, 1]) and the colour direction of each class's texture; lighting and per-view jitter
# make neighbouring classes (liver/wall, fat/ligament) overlap in brightness.
_BASE_COLORS = np.array([[0.50, 0.16, 0.12], [0.86, 0.68, 0.34], [0.80, 0.46, 0.44], [0.42, 0.50, 0.26],
                         [0.88, 0.80, 0.72]], dtype=np.float32)
_TEXTURE_COLORS = np.array([[0.16, 0.06, 0.05], [0.10, 0.12, 0.16], [0.16, 0.10, 0.10], [0.06, 0.10, 0.06],
                            [0.08, 0.08, 0.09]], dtype=np.float32)
_SPECULARITY = np.array([0.55, 0.25, 0.20, 0.80, 0.15], dtype=np.float32)
# The raw render's colours, quantised to _RENDER_SHADES levels per class: the whole render fits one 256-colour palette.
_RENDER_COLORS = np.array([[0.55, 0.20, 0.16], [0.90, 0.75, 0.40], [0.85, 0.55, 0.52], [0.45, 0.60, 0.30],
                           [0.92, 0.88, 0.82]], dtype=np.float32)
_RENDER_SHADES = 51
_SHADES = np.arange(_RENDER_SHADES, dtype=np.float32) / (_RENDER_SHADES - 1)
_RENDER_PALETTE = (_RENDER_COLORS[:, None, :] * _SHADES[:, None] * 255.0 + 0.5).astype(np.uint8).reshape(-1, 3)
_CLASS_PALETTE = np.array(CLASS_COLORS, dtype=np.uint8)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # A Python float, so that arithmetic with float32 maps stays float32 (NumPy 2 promotion rules).
    return float(rng.uniform(low, high))


def _smooth_field(rng: np.random.Generator, cell: tuple[int, int], out: np.ndarray) -> None:
    """Fills ``out`` float32 [_TILE[0] + 1, _TILE[1] + 1] with a random field of period _TILE (last row and column
    repeat the first): Gaussian noise on a periodic grid of ``cell`` (rows, columns) pixels, upsampled bicubically."""
    cells = (_TILE[0] // cell[0], _TILE[1] // cell[1])
    # Wrapped by 2 cells (bicubic interpolation's reach), so that the upsampled tile wraps around as well.
    coarse = Image.fromarray(np.pad(rng.standard_normal(cells, dtype=np.float32), 2, mode="wrap"))
    box = (2, 2, 2 + cells[1], 2 + cells[0])
    out[:-1, :-1] = np.asarray(coarse.resize((_TILE[1], _TILE[0]), Image.Resampling.BICUBIC, box=box))
    out[-1, :-1] = out[0, :-1]
    out[:, -1] = out[:, 0]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class _SceneStyle:
    """One scene's tissue appearance: ``colors``, and ``textures`` float32 [NUM_CLASSES + 1, _TILE[0] + 1,
    _TILE[1] + 1], each class's texture, then the surface's wetness (where highlights appear), fixed to the world: tile
    pixel (row, column) shows world points ``((column + i _TILE[1]) / H, (row + j _TILE[0]) / H)``, i, j integers."""

    def __init__(self, rng: np.random.Generator) -> None:
        jitter = 1.0 + 0.10 * rng.standard_normal((NUM_CLASSES, 3), dtype=np.float32)
        self.colors = np.clip(_BASE_COLORS * jitter, 0.0, 1.0)
        # A plane per map: a view samples one per pixel, far fewer cache lines than channel-last maps.
        self.textures = np.empty((NUM_CLASSES + 1, _TILE[0] + 1, _TILE[1] + 1), dtype=np.float32)
        liver, fat, wall, gallbladder, ligament, wetness = self.textures
        detail = np.empty_like(liver)
        _smooth_field(rng, (8, 8), liver)
        _smooth_field(rng, (4, 4), detail)
        liver[:] = 0.7 * liver + 0.3 * detail
        _smooth_field(rng, (10, 10), fat)
        fat[:] = -2.0 * np.abs(fat) + 1.0
        _smooth_field(rng, (5, 80), wall)
        _smooth_field(rng, (20, 20), detail)
        wall[:] = 0.8 * wall + 0.3 * detail
        _smooth_field(rng, (40, 40), detail)
        veins = np.exp(-np.square(detail * (1.0 / 0.08)))
        _smooth_field(rng, (40, 40), gallbladder)
        gallbladder[:] = 0.4 * gallbladder - 1.2 * veins
        _smooth_field(rng, (56, 5), ligament)
        ligament *= 0.9
        _smooth_field(rng, (8, 8), wetness)
        wetness[:] = _smoothstep(2.0 * wetness - 2.0)


class _CameraPose:
    """A view's camera: aimed at world point ``target``, ``distance`` scene units from the wall's mean plane, rolled by
    ``roll`` radians. View point (X, Y) (as _PIXEL_X, _PIXEL_Y) shows the world point ``target + matrix (X, Y)``,
    ``matrix = R(roll) / zoom`` with ``zoom = _REFERENCE_DISTANCE / distance``."""

    def __init__(self, target: tuple[float, float], roll: float, distance: float) -> None:
        self.target, self.distance = target, distance
        zoom = _REFERENCE_DISTANCE / distance
        c, s = float(np.cos(roll)) / zoom, float(np.sin(roll)) / zoom
        self.matrix = ((c, -s), (s, c))

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "_CameraPose":
        """A random pose (the distributions are described at _PAN, _ROLL and _DISTANCE)."""
        radius, angle = float(rng.exponential()), _uniform(rng, 0.0, 2.0 * np.pi)
        target = (_PAN[0] * radius * float(np.cos(angle)), _PAN[1] * radius * float(np.sin(angle)))
        return cls(target, _uniform(rng, -_ROLL, _ROLL), _uniform(rng, *_DISTANCE))

    def affine(self, wx, wy, w0):
        """Coefficients (of X, of Y, constant) of world-affine ``wx x + wy y + w0`` in view coordinates; elementwise."""
        (m00, m01), (m10, m11) = self.matrix
        return wx * m00 + wy * m10, wx * m01 + wy * m11, wx * self.target[0] + wy * self.target[1] + w0

    def plane(self, wx: float, wy: float, w0: float) -> np.ndarray:
        """``wx x + wy y + w0`` float32 [H, W] at every pixel's world point (x, y)."""
        alpha, beta, gamma = self.affine(wx, wy, w0)
        return (alpha * _PIXEL_X).astype(np.float32)[None, :] + (beta * _PIXEL_Y + gamma).astype(np.float32)[:, None]

    def ellipse_radius(self, center: tuple[float, float], radii: tuple[float, float], angle: float) -> np.ndarray:
        """Normalised elliptic radius float32 [H, W] of every pixel's world point: 0 at the centre, 1 on the ellipse
        (semi-axes ``radii``, the first rotated by ``angle`` from the world x axis)."""
        c, s = float(np.cos(angle)), float(np.sin(angle))
        a = self.plane(c / radii[0], s / radii[0], -(c * center[0] + s * center[1]) / radii[0])
        b = self.plane(-s / radii[1], c / radii[1], (s * center[0] - c * center[1]) / radii[1])
        return np.sqrt(a * a + b * b)


class _WaveField:
    """A smooth random field ``sum_k amplitude * cos(k_k . p + phase_k)`` of ``waves`` waves, Gaussian wave vectors
    (std ``wavenumber`` per axis) and uniform phases: stationary, isotropic, of standard deviation ``std``."""

    def __init__(self, rng: np.random.Generator, wavenumber: float, std: float, waves: int) -> None:
        self.waves = wavenumber * rng.standard_normal((waves, 2))
        self.phases = rng.uniform(0.0, 2.0 * np.pi, waves)
        self.amplitude = std * np.sqrt(2.0 / waves)

    def at(self, x: float, y: float) -> float:
        return self.amplitude * float(np.cos(self.waves[:, 0] * x + self.waves[:, 1] * y + self.phases).sum())

    def render(self, pose: _CameraPose) -> np.ndarray:
        """The field float32 [H, W] at every pixel's world point of the view ``pose``."""
        # The phase is affine in (X, Y): a small matrix product, by einsum (a threaded BLAS's sums vary with threads).
        alpha, beta, gamma = pose.affine(self.waves[:, 0], self.waves[:, 1], self.phases)  # each [waves]
        # The phases (tens of radians) in float64, their cosines in float32: ten times faster, errors near 1e-5.
        across = (alpha[:, None] * _PIXEL_X + gamma[:, None]).astype(np.float32)  # [waves, W]
        down = (_PIXEL_Y[:, None] * beta).astype(np.float32)  # [H, waves]
        # cos(across + down) = cos(across) cos(down) - sin(across) sin(down)
        rows = np.concatenate([np.cos(down), -np.sin(down)], axis=1)  # [H, 2 waves]
        columns = np.concatenate([np.cos(across), np.sin(across)]) * np.float32(self.amplitude)  # [2 waves, W]
        return np.einsum("hk,kw->hw", rows, columns)


class _SceneAnatomy:
    """One scene's fixed 3-D anatomy in world coordinates (units of the image height at the reference distance, origin
    at the scene centre): smooth fields, world-affine functions (wx, wy, w0) and ellipses (centre, semi-axes, angle).
    Its depths (``wall_slope``, ``wall_bumps``, ``gallbladder_anchor``) are relative: a view adds the camera's."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.fat_level = _WaveField(rng, wavenumber=4.2, std=0.87, waves=10)  # its level set parts fat from wall
        self.wall_bumps = _WaveField(rng, wavenumber=2.5, std=10.4, waves=6)  # in scene units
        self.liver_wobble = _WaveField(rng, wavenumber=4.2, std=0.104, waves=6)  # of the liver's rim
        # Abdominal wall with fat/stomach regions: the level set tilted by a ramp in a random direction.
        direction = _uniform(rng, 0.0, 2.0 * np.pi)
        self.fat_ramp = (1.2 * float(np.cos(direction)), 1.2 * float(np.sin(direction)), -_uniform(rng, -0.5, 0.3))
        # The wall's slope: uniform in a disc of radius 40, so that a zoomed-out view's far side stays below depth 300.
        slope, direction = 40.0 * float(np.sqrt(rng.uniform())), _uniform(rng, 0.0, 2.0 * np.pi)
        self.wall_slope = (slope * float(np.cos(direction)), slope * float(np.sin(direction)))
        # The liver: the union of two overlapping ellipses (the lobes) with a wobbly rim.
        cx, cy = _uniform(rng, -0.25, 0.25), _uniform(rng, -0.30, 0.05)
        rx, ry, tilt = _uniform(rng, 0.38, 0.58), _uniform(rng, 0.24, 0.34), _uniform(rng, -0.5, 0.5)
        side = float(rng.choice([-1.0, 1.0]))
        second = (cx + side * rx * _uniform(rng, 0.5, 0.9), cy + _uniform(rng, -0.05, 0.1))
        self.lobes = (((cx, cy), (rx, ry), tilt), (second, (0.7 * rx, 0.8 * ry), tilt - side * 0.4))
        # The ligament: a thin curved band from inside the liver's upper part out over its rim.
        phi = _uniform(rng, -0.75 * np.pi, -0.25 * np.pi) + tilt
        self.ligament_start = (cx + 0.5 * rx * float(np.cos(phi)), cy + 0.5 * ry * float(np.sin(phi)))
        heading = phi + _uniform(rng, -0.4, 0.4)
        self.ligament_heading = (float(np.cos(heading)), float(np.sin(heading)))
        self.ligament_length = _uniform(rng, 0.45, 0.8)
        self.ligament_bend = (_uniform(rng, -0.12, 0.12), _uniform(rng, 4.0, 8.0))
        # Its half-width: 18-31 pixels wide at the reference distance, 5-8 in the demo's 64 x 64 crops.
        self.ligament_width = _uniform(rng, 0.036, 0.06)
        # The gallbladder: a blob hanging at the liver's lower rim, near the scene centre.
        phi = _uniform(rng, 0.2 * np.pi, 0.8 * np.pi) + tilt
        gx = min(max(cx + 0.95 * rx * float(np.cos(phi)), -0.38), 0.38)
        gy = min(max(cy + 0.95 * ry * float(np.sin(phi)), -0.35), 0.38)
        radii = (_uniform(rng, 0.10, 0.15), _uniform(rng, 0.065, 0.10))
        self.gallbladder = ((gx, gy), radii, phi + _uniform(rng, -0.6, 0.6))
        # The wobble of its rim: a smooth field's value and slope (the blob is far smaller than the field's features).
        value = 0.07 * rng.standard_normal()
        slope_x, slope_y = (0.3 * rng.standard_normal(2)).tolist()
        self.gallbladder_wobble = (slope_x, slope_y, value - slope_x * gx - slope_y * gy)
        # It lies on the liver, in front of its surface at its centre (at the rim's depth off the liver).
        lobes = min(_ellipse_radius_at(gx, gy, *lobe) for lobe in self.lobes) + self.liver_wobble.at(gx, gy)
        wall = self.wall_slope[0] * gx + self.wall_slope[1] * gy + self.wall_bumps.at(gx, gy)
        self.gallbladder_anchor = float(wall - 40.0 - 50.0 * np.sqrt(max(1.0 - lobes, 0.0)))


def _ellipse_radius_at(x: float, y: float, center, radii, angle) -> float:
    """:meth:`_CameraPose.ellipse_radius` at the single world point (x, y)."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    dx, dy = x - center[0], y - center[1]
    return float(np.hypot((c * dx + s * dy) / radii[0], (c * dy - s * dx) / radii[1]))


def _tile_position(pose: _CameraPose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each pixel's world point lies on the texture tile: the flat index (row * (_TILE[1] + 1) + column) of the
    tile pixel at or above-left of it, intp [H, W], and the fractions to the next column and row, float32 [H, W]."""
    across, down = pose.plane(float(H), 0.0, 0.0), pose.plane(0.0, float(H), 0.0)
    column, row = np.floor(across), np.floor(down)
    across -= column
    down -= row
    # Wrapped into the tile; whole numbers below 2^24 and a correctly rounded division keep it exact.
    column -= _TILE[1] * np.floor(column / _TILE[1])
    row -= _TILE[0] * np.floor(row / _TILE[0])
    return (row * (_TILE[1] + 1) + column).astype(np.intp), across, down


def _render_view(style: _SceneStyle, anatomy: _SceneAnatomy, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One view from a camera pose drawn from ``rng`` (then its colours): ``translation`` uint8 [H, W, 3], ``input``
    uint8 [H, W] (indices into _RENDER_PALETTE), ``classes`` uint8 [H, W], ``depth`` float32 [H, W] (z-depth)."""
    pose = _CameraPose.draw(rng)
    # Abdominal wall with fat/stomach regions; the camera distance is that of the wall plane on the axis.
    fat_field = anatomy.fat_level.render(pose) + pose.plane(*anatomy.fat_ramp)
    classes = np.where(fat_field > 0, np.uint8(FAT), np.uint8(WALL))
    slope_x, slope_y = anatomy.wall_slope
    offset = pose.distance - slope_x * pose.target[0] - slope_y * pose.target[1]
    wall_depth = anatomy.wall_bumps.render(pose) + pose.plane(slope_x, slope_y, offset)
    depth = wall_depth - 25.0 * _smoothstep(fat_field)
    # The liver: a dome clearly in front of the wall.
    liver_radius = np.minimum(pose.ellipse_radius(*anatomy.lobes[0]), pose.ellipse_radius(*anatomy.lobes[1]))
    liver_radius += anatomy.liver_wobble.render(pose)
    liver = liver_radius < 1.0
    np.copyto(depth, wall_depth - 40.0 - 50.0 * np.sqrt(np.clip(1.0 - liver_radius, 0.0, 1.0)), where=liver)
    classes[liver] = LIVER
    # The ligament: a thin sheet on top; ``along`` runs 0..1 over the band, ``across`` across it.
    (start_x, start_y), (dx, dy) = anatomy.ligament_start, anatomy.ligament_heading
    length, (curvature, frequency) = anatomy.ligament_length, anatomy.ligament_bend
    along = pose.plane(dx / length, dy / length, -(start_x * dx + start_y * dy) / length)
    across = pose.plane(-dy, dx, start_x * dy - start_y * dx)
    across += curvature * along * along + 0.02 * np.sin(frequency * along)
    half_width = anatomy.ligament_width * (1.2 - 0.5 * np.clip(along, 0.0, 1.0))
    ligament = (np.abs(across) < half_width) & (along > 0.0) & (along < 1.0)
    depth[ligament] -= 4.0
    classes[ligament] = LIGAMENT
    # The gallbladder, in front of the liver.
    blob_radius = pose.ellipse_radius(*anatomy.gallbladder) + pose.plane(*anatomy.gallbladder_wobble)
    gallbladder = blob_radius < 1.0
    blob_depth = (anatomy.gallbladder_anchor + offset - 15.0) - 25.0 * np.sqrt(np.clip(1.0 - blob_radius, 0.0, 1.0))
    np.copyto(depth, np.minimum(blob_depth, depth - 3.0), where=gallbladder)
    classes[gallbladder] = GALLBLADDER
    # Light at the camera: Lambert term from the depth normals, distance fall-off, vignetting.
    dz_dv, dz_du = np.gradient(depth)
    scale = _FOCAL / depth
    slope_u, slope_v = np.clip(dz_du * scale, -4.0, 4.0), np.clip(dz_dv * scale, -4.0, 4.0)
    lambert = 1.0 / np.sqrt(1.0 + slope_u * slope_u + slope_v * slope_v)
    light = lambert * np.clip(scale * (150.0 / _FOCAL), 0.4, 1.6) * _VIGNETTING
    # The pixel's class texture and wetness where its world point lies on the tile; the wetness only shapes the
    # highlights, so its tile pixel (no interpolation) does, at a fifth of the cost of bilinear sampling.
    index, across, down = _tile_position(pose)
    maps, plane = style.textures.reshape(-1), (_TILE[0] + 1) * (_TILE[1] + 1)
    wetness = maps[NUM_CLASSES * plane :].take(index)
    class_index = classes.astype(np.intp)  # converted once for the lookups below
    index += class_index * plane
    # The texture sampled bilinearly: the four neighbours as the same index into shifted views, no index arithmetic.
    texture = maps.take(index)
    texture += across * (maps[1:].take(index) - texture)
    bottom = maps[_TILE[1] + 1 :].take(index)
    bottom += across * (maps[_TILE[1] + 2 :].take(index) - bottom)
    texture += down * (bottom - texture)
    colors = style.colors * (1.0 + 0.12 * rng.standard_normal((NUM_CLASSES, 3), dtype=np.float32))
    gain = _uniform(rng, 0.6, 1.2) * (1.0 + 0.10 * rng.standard_normal(3, dtype=np.float32))
    shine = np.square(np.square(lambert * lambert)) * wetness * _SPECULARITY.take(class_index)  # lambert^8
    # rgb = (texture colour * texture + colour) * light * gain + shine, per class, in 0..255 (+ 0.5: the conversion
    # rounds); one channel at a time: contiguous [H, W] maps combine several times faster than [H, W, 3] ones.
    shine *= 255.0
    shine += 0.5
    light *= 255.0
    rgb = np.empty((H, W, 3), dtype=np.uint8)
    for channel in range(3):
        value = (_TEXTURE_COLORS[:, channel] * gain[channel]).take(class_index)
        value *= texture
        value += (colors[:, channel] * gain[channel]).take(class_index)
        value *= light
        value += shine
        np.clip(value, 0.5, 255.5, out=value)
        rgb[..., channel] = value
    shade = (lambert * (_RENDER_SHADES - 1) + 0.5).astype(np.uint8)
    # Depth in steps of 1/16 scene unit (finer than the point clouds resolve): exact in float32, a ZIP EXR 6x smaller.
    depth = np.round(depth * 16.0) * (1.0 / 16.0)
    return {"translation": rgb, "input": classes * np.uint8(_RENDER_SHADES) + shade, "classes": classes, "depth": depth}


def generate_sim2real(root: str | Path, scenes: int = 7, views_per_scene: int = 100, seed: int = 0,
                      progress: bool = True) -> Path:
    """Write ``scenes`` x ``views_per_scene`` views (scenes ``1..``, views ``0000..``) under ``root`` in the Sim2Real
    layout, overwriting files of the same names; returns ``root``. Same arguments give byte-identical files."""
    if not (isinstance(scenes, int) and scenes > 0):
        raise ValueError(f"scenes must be a positive int, got {scenes!r}")
    if not (isinstance(views_per_scene, int) and 0 < views_per_scene <= 10000):
        raise ValueError(f"views_per_scene must be an int in 1..10000, got {views_per_scene!r}")
    root = Path(root)
    for folder in (path.parent for scene in range(1, scenes + 1) for path in sample_paths(root, scene, 0).values()):
        folder.mkdir(parents=True, exist_ok=True)
    jobs = [(root, seed, scene, view) for scene in range(1, scenes + 1) for view in range(views_per_scene)]
    with tqdm(total=len(jobs), desc="generating Sim2Real views", unit="view", disable=not progress) as bar:
        for _ in ordered_map(_write_view, jobs):
            bar.update()
    return root


@lru_cache(maxsize=2)
def _scene(seed: int, scene: int) -> tuple[_SceneStyle, _SceneAnatomy]:
    """A scene's style and anatomy, built once per worker process for all the views of the scene it renders."""
    rng = np.random.default_rng([seed, scene])
    return _SceneStyle(rng), _SceneAnatomy(rng)


def _write_view(job: tuple[Path, int, int, int]) -> None:
    """Render one view of one scene and write its four files."""
    root, seed, scene, view = job
    sample = _render_view(*_scene(seed, scene), np.random.default_rng([seed, scene, view]))
    paths = sample_paths(root, scene, view)
    write_png(paths["translation"], sample["translation"])
    write_png(paths["input"], sample["input"], _RENDER_PALETTE)  # palette PNGs: they decode to exactly those colours
    write_png(paths["segmentation"], sample["classes"], _CLASS_PALETTE)
    write_depth_exr(paths["depth"], sample["depth"])


def ensure_builtin_sim2real(cache_dir: str | Path, views_per_scene: int, seed: int = 0, progress: bool = True) -> Path:
    """The root of the built-in dataset (7 scenes x ``views_per_scene``), generated on first use (``data.build_once``)
    into a folder of its own per (generator version, size, seed), so a run sees exactly the views of its size."""
    scenes = 7

    def generate(staging: Path) -> None:
        generate_sim2real(staging, scenes, views_per_scene, seed, progress)
        manifest = {"generator_version": GENERATOR_VERSION, "scenes": scenes, "views_per_scene": views_per_scene,
                    "seed": seed, "width": W, "height": H}
        (staging / "builtin_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    return build_once(Path(cache_dir) / f"sim2real_builtin_v{GENERATOR_VERSION}_{scenes}x{views_per_scene}_seed{seed}",
                      generate)
