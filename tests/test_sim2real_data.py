"""The Sim2Real loader and the built-in generator, on tiny data in the real on-disk format (512 x 256)."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
import torch
from PIL import Image

from sim2real.dataset import (
    CLASS_COLORS,
    NUM_CLASSES,
    POINT_SCALE,
    SPLITS,
    Sim2RealDataset,
    classes_to_colors,
    colors_to_classes,
    default_intrinsics,
    read_depth_exr,
    read_rgb,
    read_segmentation,
    sample_paths,
    write_depth_exr,
)
import sim2real.synthetic as synthetic
from sim2real.synthetic import ensure_builtin_sim2real, generate_sim2real

H, W = 256, 512
VIEWS = 2


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory) -> Path:
    """7 scenes x 2 views of built-in data (read only: tests that modify files make their own)."""
    return generate_sim2real(tmp_path_factory.mktemp("sim2real"), scenes=7, views_per_scene=VIEWS, progress=False)


@pytest.fixture
def one_view_root(tmp_path) -> Path:
    """A writable dataset of one scene with one view."""
    return generate_sim2real(tmp_path / "data", scenes=1, views_per_scene=1, progress=False)


def _write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _write_view(root: Path, scene: int, view: int, rgb: np.ndarray, classes: np.ndarray, depth: np.ndarray) -> None:
    """One hand-made view in the on-disk layout (RGB PNGs, as the real data is stored)."""
    paths = sample_paths(root, scene, view)
    _write_rgb_png(paths["translation"], rgb)
    _write_rgb_png(paths["segmentation"], classes_to_colors(classes))
    paths["depth"].parent.mkdir(parents=True, exist_ok=True)
    write_depth_exr(paths["depth"], depth)


def test_layout_and_default_intrinsics(builtin_root):
    paths = sample_paths(builtin_root, 3, 1)
    assert paths["translation"] == (
        builtin_root / "translation_random_views/random_views/scene_3/translation/translation0001.png"
    )
    assert paths["input"] == builtin_root / "input_random_views/random_views/scene_3/input/input0001.png"
    assert paths["segmentation"] == (
        builtin_root / "segmentation_random_views/random_views/scene_3/segmentation/segmentation0001.png"
    )
    assert paths["depth"] == builtin_root / "depth_random_views/random_views/scene_3/depth/depth0001.exr"
    for path in paths.values():
        assert path.is_file()
    assert read_rgb(paths["translation"]).shape == (H, W, 3)
    assert read_rgb(paths["input"]).shape == (H, W, 3)
    assert read_depth_exr(paths["depth"]).shape == (H, W)
    np.testing.assert_allclose(default_intrinsics(), [[256, 0, 255.5], [0, 256, 127.5], [0, 0, 1]], atol=1e-9)


def test_colour_mapping_is_exact(tmp_path):
    classes = np.arange(H * W).reshape(H, W) % NUM_CLASSES
    rgb = np.array(CLASS_COLORS, dtype=np.uint8)[classes]
    np.testing.assert_array_equal(colors_to_classes(rgb), classes)
    np.testing.assert_array_equal(classes_to_colors(classes), rgb)
    _write_rgb_png(tmp_path / "seg.png", rgb)
    read = read_segmentation(tmp_path / "seg.png")
    assert read.dtype == np.int64
    np.testing.assert_array_equal(read, classes)
    for class_id, name in enumerate(["liver", "fat/stomach", "abdominal wall", "gallbladder", "ligament"]):
        assert colors_to_classes(np.array([[CLASS_COLORS[class_id]]], dtype=np.uint8))[0, 0] == class_id, name


def test_unknown_colour_is_an_error_naming_file_and_colour(tmp_path):
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[:] = CLASS_COLORS[2]
    rgb[10, 20] = (0, 0, 254)  # one step from liver: must not be rounded to it
    rgb[30, 40] = (12, 34, 56)
    path = tmp_path / "segmentation0003.png"
    _write_rgb_png(path, rgb)
    with pytest.raises(ValueError) as error:
        read_segmentation(path)
    message = str(error.value)
    assert str(path) in message and "(0, 0, 254)" in message and "(12, 34, 56)" in message
    ignored = read_segmentation(path, unknown_colors="ignore", ignore_index=255)
    assert ignored[10, 20] == 255 and ignored[30, 40] == 255
    assert (ignored == 2).sum() == H * W - 2
    with pytest.raises(ValueError, match="ignore_index"):
        read_segmentation(path, unknown_colors="ignore", ignore_index=3)


def test_unknown_colour_in_dataset_error_or_ignore_index(one_view_root):
    seg_path = sample_paths(one_view_root, 1, 0)["segmentation"]
    rgb = read_rgb(seg_path).copy()
    rgb[100:104, 200:204] = (128, 128, 128)  # inside the centre crop (columns 128..383)
    _write_rgb_png(seg_path, rgb)
    with pytest.raises(ValueError, match=str(seg_path)):
        Sim2RealDataset(one_view_root, scenes=[1])[0]
    for ignore_index in (255, -1):
        sample = Sim2RealDataset(one_view_root, scenes=[1], unknown_colors="ignore", ignore_index=ignore_index)[0]
        mask = sample["mask"]
        assert (mask[100:104, 72:76] == ignore_index).all()
        assert int((mask == ignore_index).sum()) == 16
        assert ((mask >= 0) & (mask < NUM_CLASSES)).sum() == 256 * 256 - 16


def test_exr_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    depth = (rng.random((H, W)) * 300.0).astype(np.float32)
    depth[0, :4] = [1e-30, -7.25, 3.4e38, 0.1]  # not representable in half precision
    path = tmp_path / "depth0000.exr"
    write_depth_exr(path, depth)
    with OpenEXR.File(str(path), separate_channels=True) as exr:  # the file itself: one float channel 'Y'
        assert list(exr.channels()) == ["Y"]
        assert exr.channels()["Y"].pixels.dtype == np.float32
    read = read_depth_exr(path)
    assert read.dtype == np.float32 and read.shape == (H, W)
    np.testing.assert_array_equal(read, depth)


def test_exr_half_pixels_and_wrong_channel(tmp_path):
    half = np.full((4, 6), 123.5, dtype=np.float16)
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION}, {"Y": half}) as exr:
        exr.write(str(tmp_path / "half.exr"))
    read = read_depth_exr(tmp_path / "half.exr")
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, np.full((4, 6), 123.5, dtype=np.float32))
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION}, {"Z": half.astype(np.float32)}) as exr:
        exr.write(str(tmp_path / "z.exr"))
    with pytest.raises(ValueError, match=r"z\.exr.*'Y'"):
        read_depth_exr(tmp_path / "z.exr")


def test_split_by_scene(builtin_root):
    for split, scenes in SPLITS.items():
        dataset = Sim2RealDataset(builtin_root, split=split, image_size=32, num_points=16)
        assert len(dataset) == VIEWS * len(scenes)
        assert sorted({scene for scene, _ in dataset.views}) == list(scenes)
        assert {dataset[i]["scene"] for i in range(len(dataset))} == set(scenes)
    assert SPLITS == {"train": (1, 2, 3, 4), "val": (5, 6), "test": (7,)}
    explicit = Sim2RealDataset(builtin_root, scenes=[7, 2], image_size=32, num_points=16)
    assert [(explicit[i]["scene"], explicit[i]["index"]) for i in range(len(explicit))] == [
        (7, 0), (7, 1), (2, 0), (2, 1)
    ]
    with pytest.raises(ValueError, match="split"):
        Sim2RealDataset(builtin_root, split="training")
    with pytest.raises(FileNotFoundError, match="scene_8"):
        Sim2RealDataset(builtin_root, scenes=[8])


def test_sample_shapes_crop_and_resize(builtin_root):
    dataset = Sim2RealDataset(builtin_root, split="val", image_size=256, num_points=1024)
    sample = dataset[1]
    assert sample["rgb"].dtype == torch.float32 and sample["rgb"].shape == (3, 256, 256)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (256, 256)
    assert sample["points"].dtype == torch.float32 and sample["points"].shape == (1024, 3)
    assert (sample["scene"], sample["index"]) == (5, 1)
    paths = sample_paths(builtin_root, 5, 1)
    # At 256 the centre crop (columns 128..383) is not resampled at all.
    crop = read_rgb(paths["translation"])[:, 128:384].transpose(2, 0, 1)
    np.testing.assert_array_equal(sample["rgb"].numpy(), crop / np.float32(255))
    np.testing.assert_array_equal(sample["mask"].numpy(), read_segmentation(paths["segmentation"])[:, 128:384])

    small = Sim2RealDataset(builtin_root, split="val", image_size=64, num_points=100)[1]
    assert small["rgb"].shape == (3, 64, 64) and small["points"].shape == (100, 3)
    assert 0.0 <= small["rgb"].min() and small["rgb"].max() <= 1.0
    # Nearest resizing keeps labels, and the 4x4 block average of the full-size crop matches bilinear.
    full_mask = sample["mask"].numpy()
    assert set(np.unique(small["mask"].numpy())) <= set(np.unique(full_mask))
    block = sample["rgb"].numpy().reshape(3, 64, 4, 64, 4).mean(axis=(2, 4))
    assert np.abs(block - small["rgb"].numpy()).mean() < 0.02
    # Same sample twice: identical (seeded per view); another seed: another subset of the same cloud.
    np.testing.assert_array_equal(dataset[1]["points"], sample["points"])
    other = Sim2RealDataset(builtin_root, split="val", seed=1)[1]["points"]
    assert not torch.equal(other, sample["points"])


def test_point_cloud_of_a_plane_with_known_intrinsics(tmp_path):
    rgb = np.full((H, W, 3), 90, dtype=np.uint8)
    classes = np.zeros((H, W), dtype=np.int64)
    _write_view(tmp_path, 1, 0, rgb, classes, np.full((H, W), 200.0, dtype=np.float32))

    def coordinates(focal):
        K = np.array([[focal, 0, 255.5], [0, focal, 127.5], [0, 0, 1]])
        dataset = Sim2RealDataset(tmp_path, scenes=[1], num_points=256 * 256, intrinsics=K)
        return dataset[0]["points"].numpy().astype(np.float64) * POINT_SCALE

    points = coordinates(256.0)
    # The crop's principal point is (127.5, 127.5), the centre of pixels 0..255, so the centroid of the
    # plane is (0, 0, 200): centred points are the camera coordinates minus (0, 0, 200).
    grid = (np.arange(256) - 127.5) * 200.0 / 256.0
    np.testing.assert_allclose(np.sort(np.unique(points[:, 0].round(4))), grid.round(4), atol=1e-3)
    np.testing.assert_allclose(np.sort(np.unique(points[:, 1].round(4))), grid.round(4), atol=1e-3)
    np.testing.assert_allclose(points[:, 2], 0.0, atol=1e-4)
    # All 256 x 256 pixels are used exactly once when num_points equals the pixel count.
    assert len({(round(x, 3), round(y, 3)) for x, y in points[:, :2]}) == 256 * 256
    # Half the focal length: twice the extent.
    np.testing.assert_allclose(np.abs(coordinates(128.0)[:, :2]).max(), 2 * grid.max(), rtol=1e-5)


def test_tilted_plane_is_centred_and_scaled(tmp_path):
    u = np.arange(W, dtype=np.float32)
    depth = np.broadcast_to(100.0 + 0.25 * u, (H, W)).astype(np.float32)
    _write_view(tmp_path, 1, 0, np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.int64), depth)
    points = Sim2RealDataset(tmp_path, scenes=[1], num_points=4096)[0]["points"].numpy().astype(np.float64)
    # Camera coordinates of the crop pixels (default intrinsics: f = 256, crop principal point 127.5).
    uc, vc = np.meshgrid(np.arange(256.0), np.arange(256.0))
    z = 100.0 + 0.25 * (uc + 128.0)
    camera = np.stack([(uc - 127.5) * z / 256.0, (vc - 127.5) * z / 256.0, z], axis=-1).reshape(-1, 3)
    expected = (camera - camera.mean(axis=0)) / POINT_SCALE
    # Every sampled point is one of the expected points.
    lookup = {tuple(p) for p in expected.round(3)}
    assert all(tuple(p) in lookup for p in points.round(3))


def test_missing_files_name_the_file(one_view_root, tmp_path):
    paths = sample_paths(one_view_root, 1, 0)
    paths["depth"].unlink()
    with pytest.raises(FileNotFoundError, match=str(paths["depth"])):
        Sim2RealDataset(one_view_root, scenes=[1])
    write_depth_exr(paths["depth"], np.ones((H, W), np.float32))
    paths["segmentation"].unlink()
    with pytest.raises(FileNotFoundError, match=str(paths["segmentation"])):
        Sim2RealDataset(one_view_root, scenes=[1])
    shutil.rmtree(paths["segmentation"].parent)
    with pytest.raises(FileNotFoundError, match=str(paths["segmentation"].parent)):
        Sim2RealDataset(one_view_root, scenes=[1])
    empty = tmp_path / "empty" / "translation_random_views/random_views/scene_1/translation"
    empty.mkdir(parents=True)
    for name in ("segmentation", "depth"):
        sample_paths(tmp_path / "empty", 1, 0)[name].parent.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no translation"):
        Sim2RealDataset(tmp_path / "empty", scenes=[1])


@pytest.mark.parametrize("name", ["translation", "segmentation", "depth"])
def test_corrupt_files_name_the_file(one_view_root, name):
    path = sample_paths(one_view_root, 1, 0)[name]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated
    dataset = Sim2RealDataset(one_view_root, scenes=[1])
    with pytest.raises(ValueError, match=str(path)):
        dataset[0]
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=str(path)):
        dataset[0]


def test_size_mismatch_and_empty_depth_are_errors(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    classes = np.zeros((H, W), np.int64)
    _write_view(tmp_path, 1, 0, rgb, classes, np.zeros((H, W // 2), np.float32))
    with pytest.raises(ValueError, match="depth0000.exr.*differs"):
        Sim2RealDataset(tmp_path, scenes=[1])[0]
    write_depth_exr(sample_paths(tmp_path, 1, 0)["depth"], np.full((H, W), np.nan, np.float32))
    with pytest.raises(ValueError, match="depth0000.exr.*no finite depth"):
        Sim2RealDataset(tmp_path, scenes=[1])[0]


def test_generated_views_are_plausible(builtin_root):
    seen, with_liver = set(), 0
    for scene in range(1, 8):
        for view in range(VIEWS):
            paths = sample_paths(builtin_root, scene, view)
            classes = read_segmentation(paths["segmentation"])  # raises on any non-class colour
            depth = read_depth_exr(paths["depth"])
            seen |= set(np.unique(classes[:, 128:384]).tolist())
            assert np.isfinite(depth).all() and depth.min() > 0
            assert (depth < 300).mean() > 0.95
            if (classes == 0).any() and (classes == 2).any():  # the camera may look away from the liver
                assert depth[classes == 0].mean() < depth[classes == 2].mean()  # liver in front of the wall
                with_liver += 1
            render = read_rgb(paths["input"])
            translation = read_rgb(paths["translation"])
            assert render.std() > 10 and translation.std() > 10
    assert seen == set(range(NUM_CLASSES))  # every class appears in the centre crops
    assert with_liver >= 7 * VIEWS - 2  # the liver is in (almost) every view


def _corresponding_pixels(pose_a, pose_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pixel of view a: the nearest pixel of view b showing the same world point, as int
    [H, W] rows and columns, and whether it lies inside view b, bool [H, W]."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    view_x, view_y = (u - (W - 1) / 2) / H, (v - (H - 1) / 2) / H
    (a00, a01), (a10, a11) = pose_a.matrix
    world_x = pose_a.target[0] + a00 * view_x + a01 * view_y - pose_b.target[0]
    world_y = pose_a.target[1] + a10 * view_x + a11 * view_y - pose_b.target[1]
    inverse = np.linalg.inv(np.array(pose_b.matrix))
    column = np.rint((inverse[0, 0] * world_x + inverse[0, 1] * world_y) * H + (W - 1) / 2).astype(int)
    row = np.rint((inverse[1, 0] * world_x + inverse[1, 1] * world_y) * H + (H - 1) / 2).astype(int)
    inside = (column >= 0) & (column < W) & (row >= 0) & (row < H)
    return np.clip(row, 0, H - 1), np.clip(column, 0, W - 1), inside


def _interior(classes: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels whose 5 x 5 neighbourhood has a single class (off the class boundaries)."""
    padded = np.pad(classes, 2, mode="edge")
    interior = np.ones(classes.shape, dtype=bool)
    for dy in range(5):
        for dx in range(5):
            interior &= padded[dy : dy + H, dx : dx + W] == classes
    return interior


def _camera_offset(anatomy, pose) -> float:
    """The depth a view adds to the scene's relative depths: the camera distance less the wall's mean
    plane under the optical axis."""
    slope_x, slope_y = anatomy.wall_slope
    return pose.distance - slope_x * pose.target[0] - slope_y * pose.target[1]


def test_views_of_a_scene_share_its_anatomy():
    """A scene is one fixed anatomy and its views random camera poses: where two views see the same world
    point they show the same class, at depths that differ exactly by the cameras' offsets."""
    style, anatomy = synthetic._scene(0, 3)
    assert synthetic._scene(0, 3)[1] is anatomy  # built once per scene (and worker)
    overlaps = []
    for view_a, view_b in [(0, 1), (2, 3), (4, 5)]:
        rngs = [np.random.default_rng([0, 3, view]) for view in (view_a, view_b)]
        poses = [synthetic._CameraPose.draw(np.random.default_rng([0, 3, view])) for view in (view_a, view_b)]
        a, b = (synthetic._render_view(style, anatomy, rng) for rng in rngs)
        assert not np.array_equal(a["classes"], b["classes"])  # the camera moved
        row, column, inside = _corresponding_pixels(*poses)
        seen = inside & _interior(a["classes"])
        overlaps.append(seen.mean())
        np.testing.assert_array_equal(b["classes"][row, column][seen], a["classes"][seen])
        shift = b["depth"][row, column][seen] - a["depth"][seen]
        expected = _camera_offset(anatomy, poses[1]) - _camera_offset(anatomy, poses[0])
        # Up to the depth across half a pixel (nearest corresponding pixels on sloped surfaces).
        assert np.percentile(np.abs(shift - expected), 99) < 1.0
    assert max(overlaps) > 0.3  # the pairs do overlap
    # Another scene seen from the very same pose (drawn first from the view's generator) differs.
    other = synthetic._render_view(*synthetic._scene(0, 4), np.random.default_rng([0, 3, 0]))
    same_pose = synthetic._render_view(style, anatomy, np.random.default_rng([0, 3, 0]))
    assert (other["classes"] != same_pose["classes"]).mean() > 0.2


def test_nearer_camera_sees_the_anatomy_larger_and_nearer(monkeypatch):
    """The pose's distance scales the image by 215 / distance and shifts the depth by the same amount."""
    style, anatomy = synthetic._scene(0, 1)
    (center_x, center_y), _, _ = anatomy.lobes[0]
    far, near = (synthetic._CameraPose((center_x, center_y), 0.3, distance) for distance in (235.0, 190.0))
    views = []
    for pose in (far, near):
        monkeypatch.setattr(synthetic._CameraPose, "draw", classmethod(lambda cls, rng, pose=pose: pose))
        views.append(synthetic._render_view(style, anatomy, np.random.default_rng(0)))
    far_view, near_view = views
    for view in views:  # the whole liver in view
        classes = view["classes"]
        assert (classes == 0).any() and not (classes[[0, -1]] == 0).any() and not (classes[:, [0, -1]] == 0).any()
    liver_far, liver_near = ((view["classes"] == 0).sum() for view in views)
    np.testing.assert_allclose(liver_near / liver_far, (235.0 / 190.0) ** 2, rtol=0.02)
    row, column, inside = _corresponding_pixels(far, near)
    seen = inside & _interior(far_view["classes"])
    shift = near_view["depth"][row, column][seen] - far_view["depth"][seen]
    assert abs(np.median(shift) + 45.0) < 0.1


def test_texture_tile_wraps_and_is_larger_than_any_view():
    """The texture maps repeat over the world without seams, and no view is wide enough to show a texture
    twice."""
    field = np.empty((synthetic._TILE[0] + 1, synthetic._TILE[1] + 1), dtype=np.float32)
    synthetic._smooth_field(np.random.default_rng(0), (8, 8), field)
    np.testing.assert_array_equal(field[:, -1], field[:, 0])
    np.testing.assert_array_equal(field[-1], field[0])
    # The steps across the seam are like those inside the tile.
    steps = np.abs(np.diff(np.concatenate([field[:, :-1], field[:, :-1]], axis=1), axis=1))
    assert steps[:, synthetic._TILE[1] - 1].max() <= steps.max()
    # The bounding box of a view at the smallest zoom, over all rolls up to the largest, in tile pixels.
    corners = np.array([[x, y] for x in (-W / 2, W / 2) for y in (-H / 2, H / 2)])
    scale = synthetic._DISTANCE[1] / synthetic._REFERENCE_DISTANCE
    for roll in np.linspace(-synthetic._ROLL, synthetic._ROLL, 61):
        rotation = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
        extent = np.ptp(corners @ rotation.T * scale, axis=0)
        assert extent[0] < synthetic._TILE[1] and extent[1] < synthetic._TILE[0]


def test_generator_is_deterministic(tmp_path):
    first = generate_sim2real(tmp_path / "a", scenes=2, views_per_scene=2, seed=5, progress=False)
    again = generate_sim2real(tmp_path / "b", scenes=2, views_per_scene=2, seed=5, progress=False)
    fewer = generate_sim2real(tmp_path / "c", scenes=1, views_per_scene=1, seed=5, progress=False)
    other = generate_sim2real(tmp_path / "d", scenes=1, views_per_scene=1, seed=6, progress=False)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 * 2 * 4
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == files
    for relative in files:
        assert filecmp.cmp(first / relative, again / relative, shallow=False), relative
    # A view does not depend on how many views are generated; another seed gives another view.
    for path in (p for p in fewer.rglob("*") if p.is_file()):
        relative = path.relative_to(fewer)
        assert filecmp.cmp(path, first / relative, shallow=False)
        assert not filecmp.cmp(path, other / relative, shallow=False)


def test_ensure_builtin_generates_once_per_configuration(tmp_path, monkeypatch):
    root = ensure_builtin_sim2real(tmp_path, views_per_scene=1, seed=0, progress=False)
    assert len(Sim2RealDataset(root, split="train", image_size=16, num_points=8)) == 4
    assert len(Sim2RealDataset(root, split="test", image_size=16, num_points=8)) == 1
    assert sorted(os.listdir(tmp_path)) == [".lock", root.name]  # no staging folder left behind

    import sim2real.synthetic as synthetic

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached data was regenerated")

    monkeypatch.setattr(synthetic, "generate_sim2real", must_not_run)
    assert ensure_builtin_sim2real(tmp_path, views_per_scene=1, seed=0) == root
    with pytest.raises(AssertionError, match="regenerated"):
        ensure_builtin_sim2real(tmp_path, views_per_scene=1, seed=1)
    assert sorted(os.listdir(tmp_path)) == [".lock", root.name]  # the failed attempt cleaned up
    with pytest.raises(AssertionError, match="regenerated"):
        ensure_builtin_sim2real(tmp_path, views_per_scene=2, seed=0)
