"""The built-in hand-pose data: procedural articulated hands in exactly the RHD on-disk format (``generate_rhd``), read
by the code that reads the real release; ``ensure_builtin_rhd`` generates once into a cache.

A frame holds two hands: a dominant one, left or right, near the image centre 0.3-0.8 m away, and a farther one towards
the border, each a kinematic skeleton within joint limits drawn as ray-traced Lambert-shaded capsules with a forearm;
every finger has its own hue, so that pose is learnable from small crops. Frame ``i`` of a split depends only on
``(seed, split, i)``: equal arguments give byte-identical files."""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.data import build_once, ordered_map, write_png
from rhd.annotations import load_annotations, save_annotations
from rhd.dataset import DEPTH_RANGE_M, SPLITS, Frame, decode_depth

IMAGE_SIZE = 320
DATASET_DIRNAME = "RHD_published_v2"
GENERATOR_VERSION = 3  # bump whenever the files change, so that cached built-in datasets are regenerated
# Makes a dataset item of a decoded frame and its sample id (e.g. rhd.dataset.make_sample with its settings).
Sample = Callable[[Frame, int], dict]

# Right hand at rest, metres, wrist at the origin: +y along the fingers, +z out of the palm, thumb towards +x
# (a left hand is its mirror image in x). Rows: index, middle, ring, pinky MCP joints.
_FINGER_MCP_REST = np.array([[0.022, 0.088, 0.0], [0.0, 0.092, 0.0], [-0.020, 0.085, 0.0], [-0.038, 0.076, 0.0]])
_FINGER_PHALANGES = np.array([[0.040, 0.023, 0.019], [0.045, 0.027, 0.020],
                              [0.042, 0.026, 0.020], [0.033, 0.019, 0.018]])
# Resting spread of each finger away from the middle finger (degrees, towards +x is positive).
_FINGER_SPREAD_DEG = np.array([9.0, 0.0, -8.0, -17.0])
_THUMB_CMC_REST = np.array([0.020, 0.025, 0.008])
_THUMB_BONES = np.array([0.042, 0.032, 0.026])  # CMC->MCP, MCP->IP, IP->tip
_FINGER_RADIUS = np.array([0.0085, 0.0088, 0.0083, 0.0074])
_THUMB_RADIUS, _PALM_RADIUS = 0.0100, 0.0150
_FOREARM_RADIUS, _FOREARM_LENGTH = 0.026, 0.22
# Per-finger hues (thumb, index, middle, ring, pinky) blended into the skin tone.
_FINGER_HUES = np.array([[0.95, 0.15, 0.10], [0.95, 0.85, 0.10], [0.15, 0.80, 0.20],
                         [0.10, 0.45, 0.95], [0.80, 0.20, 0.85]])
_SKIN_TONES = np.array([[0.98, 0.84, 0.72], [0.90, 0.72, 0.58], [0.78, 0.57, 0.42],
                        [0.60, 0.42, 0.30], [0.42, 0.29, 0.20]])
# Palm capsules between RHD keypoints: wrist to the thumb CMC and each MCP, across the knuckles, two diagonals.
_PALM_BONES = ((0, 4), (0, 8), (0, 12), (0, 16), (0, 20), (4, 8), (8, 12), (12, 16), (16, 20), (4, 16), (4, 20))


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    skew = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * skew + (1.0 - np.cos(angle)) * skew @ skew


def _finger_chain(base: np.ndarray, forward: np.ndarray, bend: np.ndarray, lengths: np.ndarray,
                  angles: np.ndarray) -> np.ndarray:
    """Joints after ``base`` of a planar chain: bone k points along cos(phi_k) forward + sin(phi_k) bend, phi_k the
    cumulative flexion. Returns [len(lengths), 3], from the base outwards."""
    phi = np.cumsum(angles)
    directions = np.cos(phi)[:, None] * forward + np.sin(phi)[:, None] * bend
    return base + np.cumsum(lengths[:, None] * directions, axis=0)


def _sample_hand(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """A right hand in its own frame (``_FINGER_MCP_REST``): keypoints [21, 3] (RHD order), their radii, its size."""
    size = rng.uniform(0.85, 1.15)

    def jitter(count: int) -> np.ndarray:  # per-bone (and per-joint-position) variation of +-5 %
        return rng.uniform(0.95, 1.05, size=count)

    keypoints, radii = np.zeros((21, 3)), np.zeros(21)
    palm_normal = np.array([0.0, 0.0, 1.0])
    grip, spread = rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)
    for finger in range(4):
        mcp = _FINGER_MCP_REST[finger] * size * jitter(3)
        curl = np.clip(grip + rng.uniform(-0.4, 0.4), 0.0, 1.0)
        spread_deg = _FINGER_SPREAD_DEG[finger] * spread * (1.0 - curl)  # curled fingers close up
        abduction = np.deg2rad(np.clip(spread_deg + rng.normal(0.0, 4.0), -20.0, 20.0))
        flex_mcp = np.clip(-15.0 + 100.0 * curl + rng.normal(0.0, 8.0), -20.0, 90.0)
        flex_pip = np.clip(105.0 * curl + rng.normal(0.0, 10.0), 0.0, 110.0)
        flex_dip = np.clip(0.67 * flex_pip + rng.normal(0.0, 8.0), 0.0, 80.0)
        forward = _rotation(palm_normal, -abduction) @ (mcp / np.linalg.norm(mcp))
        joints = _finger_chain(mcp, forward, palm_normal, _FINGER_PHALANGES[finger] * size * jitter(3),
                               np.deg2rad([flex_mcp, flex_pip, flex_dip]))
        first = 5 + 4 * finger
        keypoints[first:first + 4] = np.concatenate([joints[::-1], mcp[None]])  # tip, DIP, PIP, MCP
        radii[first:first + 3] = _FINGER_RADIUS[finger] * size
        radii[first + 3] = _PALM_RADIUS * size
    # Thumb: the metacarpal leaves the CMC abducted in the palm plane and opposed towards the palm; the MCP and IP
    # joints bend it across the palm (towards the pinky side and out of the palm).
    cmc = _THUMB_CMC_REST * size * jitter(3)
    abduction, opposition = np.deg2rad(rng.uniform(15.0, 60.0)), np.deg2rad(rng.uniform(0.0, 50.0))
    in_plane = np.array([np.sin(abduction), np.cos(abduction), 0.0])
    forward = np.cos(opposition) * in_plane + np.sin(opposition) * palm_normal
    bend = palm_normal - 0.6 * np.array([1.0, 0.0, 0.0])
    bend -= (bend @ forward) * forward
    bend /= np.linalg.norm(bend)
    flex = np.deg2rad([0.0, rng.uniform(0.0, 50.0), rng.uniform(0.0, 80.0)])
    joints = _finger_chain(cmc, forward, bend, _THUMB_BONES * size * jitter(3), flex)
    keypoints[1:5] = np.concatenate([joints[::-1], cmc[None]])  # tip, IP, MCP, CMC
    radii[1:4] = _THUMB_RADIUS * size
    radii[[0, 4]] = _PALM_RADIUS * size
    return keypoints, radii, size


def _sample_orientation(rng: np.random.Generator) -> np.ndarray:
    """Rotation from the hand frame to the camera frame (x right, y down, z forward)."""
    palm_to_camera = np.diag([1.0, -1.0, -1.0])  # fingers up in the image, palm towards the camera
    flip = _rotation([0.0, 1.0, 0.0], np.pi) if rng.random() < 0.5 else np.eye(3)  # back of the hand instead
    tilt = _rotation([1.0, 0.0, 0.0], np.deg2rad(rng.uniform(-50.0, 50.0))) @ _rotation(
        [0.0, 1.0, 0.0], np.deg2rad(rng.uniform(-50.0, 50.0)))
    roll = _rotation([0.0, 0.0, 1.0], np.deg2rad(rng.uniform(-90.0, 90.0)))
    return roll @ tilt @ palm_to_camera @ flip


# A capsule to draw: endpoints a, b [3] (camera frame), its radius, mask id and albedo colour [3] in [0, 1].
_Capsule = NamedTuple("_Capsule", [("a", np.ndarray), ("b", np.ndarray), ("radius", float), ("mask_id", int),
                                   ("color", np.ndarray)])


def _dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise u [N, 3] . v [N, 3] or [3], left to right: a BLAS call's bits depend on the row's place in it."""
    return u[:, 0] * v[..., 0] + u[:, 1] * v[..., 1] + u[:, 2] * v[..., 2]


def _bounds(a: tuple[float, ...], b: tuple[float, ...], r: float, focal: float,
            center: float) -> tuple[int, int, int, int] | None:
    if min(a[2], b[2]) - r <= 1e-3:
        return 0, IMAGE_SIZE, 0, IMAGE_SIZE
    # x/z over the box [x +- r] x [z +- r] is extreme at its corners; a capsule projects into its end spheres' hull.
    us, vs = ([(end[axis] + e) / (end[2] + f) for end in (a, b) for f in (-r, r) for e in (-r, r)]
              for axis in (0, 1))
    u0, v0 = (max(int(np.floor(focal * min(w) + center)) - 1, 0) for w in (us, vs))
    u1, v1 = (min(int(np.ceil(focal * max(w) + center)) + 2, IMAGE_SIZE) for w in (us, vs))
    return None if u0 >= u1 or v0 >= v1 else (u0, u1, v0, v1)


def _draw(capsules: list[tuple[_Capsule, np.ndarray | None]], color: np.ndarray, depth: np.ndarray, focal: float,
          center: float, light: np.ndarray, ambient: float) -> np.ndarray:
    """Z-buffer ``capsules``, each with the palm normal (camera frame) whose side it lightens or None, in order into
    colour uint8 [320, 320, 3] and depth float32 [320, 320] metres (the background, in place) by exact ray-capsule
    intersection; returns their mask ids uint8 [320, 320]. A pixel shows its nearest hit, on a tie the earlier
    capsule's, as drawing them one at a time would; all boxes' pixels as one flat array (one ~600-pixel capsule at a
    time, numpy's per-call overhead took most of a frame's time)."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    boxes, params = [], []
    for capsule, palm in capsules:
        # Python floats: the per-capsule constants in float64, each rounded once to float32 below.
        a, b, r = tuple(map(float, capsule.a)), tuple(map(float, capsule.b)), float(capsule.radius)
        if box := _bounds(a, b, r, focal, center):
            ba = tuple(q - p for p, q in zip(a, b))
            baba, baoa = sum(q * q for q in ba), -sum(q * p for q, p in zip(ba, a))
            aa, bb, r2 = sum(p * p for p in a), sum(q * q for q in b), r * r
            params.append((*ba, *a, baba, baoa, baba * aa - baoa * baoa - r2 * baba, aa - r2, bb - r2, r,
                           *capsule.color, *(np.zeros(3) if palm is None else palm), capsule.mask_id))
            boxes.append(box)
    if not boxes:
        return mask
    u0, u1, v0, v1 = np.array(boxes).T
    counts = (u1 - u0) * (v1 - v0)  # element e: a pixel of the box of capsule owner[e], in the capsules' order
    owner = np.repeat(np.arange(len(boxes)), counts)
    row, col = np.divmod(np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts),
                         np.repeat(u1 - u0, counts))
    row, col = row + v0[owner], col + u0[owner]
    constants = np.array(params).astype(np.float32)
    ba0, ba1, ba2, a0, a1, a2, baba, baoa, body, cap_a, cap_b, r = np.repeat(constants[:, :12].T, counts, axis=1)
    # Ray through pixel (u, v) (integer coordinates are pixel centres): d = (x[u], x[v], 1), so t is the z-depth.
    x = ((np.arange(IMAGE_SIZE) - center) / focal).astype(np.float32)
    x, y = x[col], x[row]
    dd = 1.0 + x * x + y * y
    bard = ba0 * x + ba1 * y + ba2  # d . (b - a)
    da = a0 * x + a1 * y + a2  # d . a
    with np.errstate(invalid="ignore", divide="ignore"):
        # Body: the infinite cylinder around the axis, hit between the end planes.
        qa = baba * dd - bard * bard
        qb = -baba * da - baoa * bard
        qh = qb * qb - qa * body
        t_body = (-qb - np.sqrt(qh)) / qa
        along = baoa + t_body * bard
        t = np.where((qh > 0) & (along > 0) & (along < baba) & (t_body > 0), t_body, np.float32(np.inf))
        # Caps: the end spheres, |t d - c|^2 = r^2 (d . b = d . a + d . (b - a)).
        for dc, cc in ((da, cap_a), (da + bard, cap_b)):
            sh = dc * dc - dd * cc
            t_cap = (dc - np.sqrt(sh)) / dd
            t = np.where((sh > 0) & (t_cap > 0) & (t_cap < t), t_cap, t)
    pixel, background = row * IMAGE_SIZE + col, depth.reshape(-1)
    nearest = background.copy()
    np.minimum.at(nearest, pixel, t)
    wins = np.flatnonzero((t == nearest[pixel]) & (t < background[pixel]))
    first = np.full(background.size, len(t))
    np.minimum.at(first, pixel[wins], wins)  # the earliest capsule's element where several tie
    won = first[first < len(t)]
    tw, k, xw = t[won], owner[won], x[won]
    # The outward normal is (p - q) / r with q the closest axis point to the hit p = t d.
    s = np.clip((tw * bard[won] + baoa[won]) / baba[won], 0.0, 1.0)
    hit = tw[:, None] * np.stack([xw, y[won], np.ones_like(xw)], axis=1)
    normal = (hit - constants[k, 3:6] - s[:, None] * constants[k, 0:3]) / r[won][:, None]
    shade = ambient + (1.0 - ambient) * np.clip(_dot(normal, light.astype(np.float32)), 0.0, None)
    albedo = constants[k, 12:15]
    albedo = np.where((_dot(normal, constants[k, 15:18]) > 0.0)[:, None], albedo + 0.3 * (1.0 - albedo), albedo)
    at = (row[won], col[won])
    depth[at], mask[at] = tw, constants[k, 18]
    color[at] = np.clip(np.rint(albedo * (255.0 * shade[:, None])), 0, 255).astype(np.uint8)
    return mask


def _hand_capsules(keypoints: np.ndarray, radii: np.ndarray, side: int, skin: np.ndarray,
                   hue_weight: float) -> list[_Capsule]:
    """Capsules of one hand: three per finger (mask ids tip to palm, as the keypoints run) and the palm."""
    id_base = 2 + 16 * side
    capsules = []
    for finger in range(5):
        first = 1 + 4 * finger
        finger_color = (1.0 - hue_weight) * skin + hue_weight * _FINGER_HUES[finger]
        for segment in range(3):
            tint = 1.12 - 0.1 * segment  # lighter towards the tip, so the joints show in the image
            capsules.append(_Capsule(keypoints[first + segment], keypoints[first + segment + 1],
                                     float(min(radii[first + segment], radii[first + segment + 1])),
                                     id_base + 3 * finger + segment, np.clip(finger_color * tint, 0.0, 1.0)))
    return capsules + [_Capsule(keypoints[i], keypoints[j], float(radii[0]), id_base + 15, skin)
                       for i, j in _PALM_BONES]


def _background(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Colour uint8 [320, 320, 3]: a coarse grid of random colours mixed with a linear two-colour gradient, upsampled
    bicubically (low-frequency texture); depth float32 [320, 320]: a slanted far plane in metres."""
    cells = int(rng.integers(3, 8))
    ramp = np.linspace(-1.0, 1.0, cells)
    angle = rng.uniform(0.0, 2 * np.pi)
    mix = (0.5 + 0.5 * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]))[..., None]
    colour_a, colour_b = rng.uniform(0.0, 1.0, size=(2, 3))
    coarse = 0.6 * rng.uniform(0.0, 1.0, size=(cells, cells, 3)) + 0.4 * ((1 - mix) * colour_a + mix * colour_b)
    coarse_u8 = np.rint(coarse * 255).astype(np.uint8)
    color = np.array(Image.fromarray(coarse_u8).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
    z0, slope = rng.uniform(1.5, 4.0), rng.uniform(-0.25, 0.25, size=2)
    pixel_ramp = np.linspace(-1.0, 1.0, IMAGE_SIZE, dtype=np.float32)
    depth = np.float32(z0) * (1.0 + float(slope[0]) * pixel_ramp[None, :] + float(slope[1]) * pixel_ramp[:, None])
    return color, np.clip(depth, 1.0, DEPTH_RANGE_M - 0.05)


def synthesize_frame(rng: np.random.Generator) -> Frame:
    """Render one random frame (see the module docstring for what varies), in float32 and uint8 [320, 320]."""
    focal, center = rng.uniform(263.0, 306.0), IMAGE_SIZE / 2
    K = np.array([[focal, 0.0, center], [0.0, focal, center], [0.0, 0.0, 1.0]], dtype=np.float32)
    dominant = int(rng.integers(2))
    color, depth = _background(rng)
    light = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0), -rng.uniform(0.6, 1.6)])
    light, ambient = light / np.linalg.norm(light), rng.uniform(0.25, 0.4)
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.9, 1.1, size=3)
    hue_weight, sleeve = rng.uniform(0.45, 0.75), rng.uniform(0.1, 0.9, size=3)

    xyz, joint_radius = np.zeros((42, 3)), np.zeros(42)
    capsules: list[tuple[_Capsule, np.ndarray | None]] = []
    dominant_depth = rng.uniform(0.3, 0.8)
    for side in (dominant, 1 - dominant):
        local, radii, size = _sample_hand(rng)
        if side == 0:
            local = local * np.array([-1.0, 1.0, 1.0])
        rotation = _sample_orientation(rng)
        if side == dominant:
            z = dominant_depth
            u, v = center + rng.uniform(-50.0, 50.0, size=2)
        else:
            z = min(dominant_depth + rng.uniform(0.1, 0.4), 1.2)
            angle, radius = rng.uniform(0.0, 2 * np.pi), rng.uniform(130.0, 260.0)
            u, v = center + radius * np.cos(angle), center + radius * np.sin(angle)
        root = z * np.array([(u - center) / focal, (v - center) / focal, 1.0])
        keypoints = (local - local[12]) @ rotation.T + root
        xyz[21 * side:21 * side + 21] = keypoints
        joint_radius[21 * side:21 * side + 21] = radii
        palm_normal = rotation @ np.array([0.0, 0.0, 1.0])
        capsules += [(capsule, palm_normal) for capsule in _hand_capsules(keypoints, radii, side, skin, hue_weight)]
        # The forearm leaves the wrist away from the fingers, starting just outside the wrist joint.
        arm = keypoints[0] - keypoints[12]
        arm /= np.linalg.norm(arm)
        start = keypoints[0] + 0.035 * size * arm
        capsules.append((_Capsule(start, start + _FOREARM_LENGTH * size * arm, _FOREARM_RADIUS * size, 1, sleeve),
                         None))
    mask = _draw(capsules, color, depth, focal, center, light, ambient)

    xyz = xyz.astype(np.float32)
    projected = xyz.astype(np.float64) @ K.astype(np.float64).T
    uv = projected[:, :2] / projected[:, 2:]
    pixel = np.rint(uv).astype(np.int64)
    inside = np.all((pixel >= 0) & (pixel < IMAGE_SIZE), axis=1)
    # Visible: at its pixel the z-buffer is not closer than the joint's radius (plus 5 mm of slack).
    surface = np.full(42, -np.inf)
    surface[inside] = depth[pixel[inside, 1], pixel[inside, 0]]
    visible = inside & (surface >= xyz[:, 2] - joint_radius - 0.005)
    uv_vis = np.concatenate([uv, visible[:, None].astype(np.float64)], axis=1).astype(np.float32)
    return Frame(color, depth, mask, xyz, uv_vis, K)


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """RHD's depth PNG pixels: metres [H, W] (clipped to [0, 5]) -> uint8 [H, W, 3] with the top byte of
    round(d / 5 * 65535) in R, the bottom byte in G and B = 0."""
    code = np.rint(np.clip(depth, 0.0, DEPTH_RANGE_M) / DEPTH_RANGE_M * 65535.0).astype(np.uint16)
    return np.stack([code >> 8, code & 0xFF, np.zeros_like(code)], axis=-1).astype(np.uint8)


def _write_split(split_dir: Path, split_code: int, count: int, seed: int, bar: tqdm, reuse: Path | None = None,
                 sample: Sample | None = None) -> dict[int, dict]:
    """Frames 0..count-1 of one split, those that ``reuse`` (a split of this generator and seed) holds hard-linked from
    it (frame i depends only on (seed, split, i): the same bytes); returns ``sample(frame, i)`` of those rendered."""
    for folder in ("color", "depth", "mask"):
        (split_dir / folder).mkdir(parents=True)
    annotations, samples = {}, {}
    if reuse is not None:
        old = load_annotations(reuse / f"anno_{reuse.name}.pickle")
        annotations = {index: entry for index, entry in old.items() if index < count}
        for index in annotations:
            for folder in ("color", "depth", "mask"):
                source, target = reuse / folder / f"{index:05d}.png", split_dir / folder / f"{index:05d}.png"
                try:
                    os.link(source, target)
                except OSError:  # a file system without hard links
                    shutil.copyfile(source, target)
            bar.update(1)
    jobs = [(split_dir, split_code, seed, index, sample) for index in range(len(annotations), count)]
    for index, annotation, made in ordered_map(_write_frame, jobs):
        annotations[index] = annotation
        if sample is not None:
            samples[index] = {key: torch.from_numpy(value) for key, value in made.items()}
        bar.update(1)
    save_annotations(split_dir / f"anno_{split_dir.name}.pickle", annotations)
    return samples


def _write_frame(job: tuple[Path, int, int, int, Sample | None]) -> tuple[int, dict[str, np.ndarray], dict | None]:
    """Render frame ``index`` of a split and write its three PNGs; returns (index, its annotation, ``sample`` of the
    frame as ``read_frame`` will decode it, its tensors as arrays, or None)."""
    split_dir, split_code, seed, index, sample = job
    frame = synthesize_frame(np.random.default_rng([seed, split_code, index]))
    depth = encode_depth(frame.depth)
    for folder, pixels in (("color", frame.color), ("depth", depth), ("mask", frame.mask)):
        write_png(split_dir / folder / f"{index:05d}.png", pixels)
    annotation = {"xyz": frame.xyz, "uv_vis": frame.uv_vis, "K": frame.K}
    if sample is None:
        return index, annotation, None
    # What the files hold: depth quantised to 16 bits; annotations float32 (save_annotations), read back as float64.
    read = {name: value.astype(np.float32).astype(np.float64) for name, value in annotation.items()}
    made = sample(Frame(frame.color, decode_depth(depth), frame.mask, **read), index)
    # As arrays: each tensor leaving a worker process holds a file descriptor, and a split's worth exceeds the limit.
    return index, annotation, {key: value.numpy() for key, value in made.items()}


def generate_rhd(root: str | os.PathLike, num_training: int, num_evaluation: int, seed: int = 0,
                 progress: bool = True, reuse: str | os.PathLike | None = None, sample: Sample | None = None,
                 samples: dict[str, dict[int, dict]] | None = None) -> Path:
    """Write a synthetic dataset in the RHD layout (ids 0..n-1 per split) under ``root``, never into an existing one,
    and return ``root/RHD_published_v2``. reuse: such a folder of this generator and seed, whose frames are linked
    instead of drawn again (the same bytes). sample, samples: ``samples[split][i] = sample(frame, i)`` for every frame
    rendered here, made from the frame in memory as the files will read: no need to decode what was just written."""
    for name, value in (("num_training", num_training), ("num_evaluation", num_evaluation)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    dataset = Path(root) / DATASET_DIRNAME
    if dataset.exists():
        raise FileExistsError(f"{dataset} already exists; generate_rhd writes a fresh dataset only")
    with tqdm(total=num_training + num_evaluation, desc="built-in RHD", unit="frame", disable=not progress) as bar:
        for split_code, (split, count) in enumerate(zip(SPLITS, (num_training, num_evaluation))):
            made = _write_split(dataset / split, split_code, int(count), seed, bar,
                                None if reuse is None else Path(reuse) / split, sample)
            if samples is not None:
                samples[split] = made
    return dataset


def _cached_sizes(folder: Path, seed: int) -> tuple[int, int] | None:
    """The (training, evaluation) frames of a finished built-in dataset of this generator and ``seed``."""
    try:
        found = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    same = found.get("generator_version") == GENERATOR_VERSION and found.get("seed") == seed
    return (found["num_training"], found["num_evaluation"]) if same else None


def ensure_builtin_rhd(cache_dir: str | os.PathLike, num_training: int, num_evaluation: int, seed: int = 0,
                       progress: bool = True, sample: Sample | None = None,
                       samples: dict[str, dict[int, dict]] | None = None) -> Path:
    """The ``RHD_published_v2`` folder of a built-in dataset under ``cache_dir`` with at least ``num_training`` and
    ``num_evaluation`` frames: the smallest cached one that has them (a dataset's first n frames are those of one of n),
    else a new one (``data.build_once``) linking the largest cached one's frames. None is changed or deleted. sample,
    samples: as ``generate_rhd``'s, when it generates."""
    cache_dir, seed = Path(cache_dir), int(seed)
    cached = {f: sizes for f in sorted(cache_dir.glob("rhd_builtin*")) if (sizes := _cached_sizes(f, seed))}
    if serving := [folder for folder, (t, e) in cached.items() if t >= num_training and e >= num_evaluation]:
        return min(serving, key=lambda folder: sum(cached[folder])) / DATASET_DIRNAME
    largest = max(cached, key=lambda folder: sum(cached[folder]), default=None)
    have = cached[largest] if largest else (0, 0)
    sizes = (max(int(num_training), have[0]), max(int(num_evaluation), have[1]))

    def generate(staging: Path) -> None:
        generate_rhd(staging, *sizes, seed=seed, progress=progress,
                     reuse=None if largest is None else largest / DATASET_DIRNAME, sample=sample, samples=samples)
        manifest = dict(generator_version=GENERATOR_VERSION, num_training=sizes[0], num_evaluation=sizes[1], seed=seed)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    folder = cache_dir / f"rhd_builtin_v{GENERATOR_VERSION}_seed{seed}_{sizes[0]}x{sizes[1]}"
    return build_once(folder, generate) / DATASET_DIRNAME
