"""RHD data side: annotation pickle (restricted unpickler), frame decoding, RHDDataset conventions, and the
built-in generator. Fixtures are tiny datasets written in the real RHD layout at the real 320x320 size."""

import functools
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rhd.synthetic as synthetic
from rhd.annotations import AnnotationError, UnsafePickleError, load_annotations, save_annotations
from rhd.dataset import RHDDataset, choose_hand, make_sample, read_frame
from rhd.synthetic import IMAGE_SIZE, encode_depth, ensure_builtin_rhd, generate_rhd


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """Six generated frames (4 training, 2 evaluation); tests that modify files work on copies."""
    return generate_rhd(tmp_path_factory.mktemp("rhd"), 4, 2, seed=3, progress=False)


@pytest.fixture
def dataset_copy(generated, tmp_path) -> Path:
    return Path(shutil.copytree(generated, tmp_path / "RHD_published_v2"))


def raw_annotations(root: Path, split: str = "training") -> dict:
    # Our own generator wrote this file, so the plain (unrestricted) unpickler is a fair independent reader.
    with open(root / split / f"anno_{split}.pickle", "rb") as file:
        return pickle.load(file)


# --- annotation pickle -------------------------------------------------------------------------------------

def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "anno_training.pickle"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafePickleError) as caught:
        load_annotations(path)
    assert str(path) in str(caught.value) and "os.system" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("__builtin__", "getattr"), ("numpy", "load"),
                                          ("subprocess", "Popen"), ("numpy.lib.npyio", "load")])
def test_restricted_unpickler_refuses_other_globals(tmp_path, module, name):
    path = tmp_path / "anno.pickle"
    path.write_bytes(f"c{module}\n{name}\n(S'x'\ntR.".encode())
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        load_annotations(path)


def test_codecs_encode_admitted_only_for_latin1(tmp_path):
    path = tmp_path / "anno.pickle"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(AnnotationError, match=str(path)):
        load_annotations(path)


def _entry(rng):
    return {"xyz": rng.normal(size=(42, 3)).astype(np.float32), "uv_vis": rng.normal(size=(42, 3)).astype(np.float32),
            "K": rng.normal(size=(3, 3)).astype(np.float32)}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_loads_legit_pickles(tmp_path, protocol):
    rng = np.random.default_rng(0)
    data = {5: _entry(rng), 2: {**_entry(rng), "extra": {1, 2}, "note": b"bytes", "s": np.float64(1.5)}}
    path = tmp_path / "anno.pickle"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_annotations(path)
    assert list(loaded) == [2, 5]
    for key in data:
        assert set(loaded[key]) == {"xyz", "uv_vis", "K"}
        for field in ("xyz", "uv_vis", "K"):
            np.testing.assert_array_equal(loaded[key][field], data[key][field])


def _py2_array(array: np.ndarray) -> bytes:
    """A float32 array as Python 2 / numpy 1.x pickled it (protocol 2, byte strings as STRING opcodes)."""
    raw = array.astype("<f4").tobytes()
    data = b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw
    shape = b"".join(b"K" + bytes([n]) for n in array.shape) + b"\x86"
    dtype = b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            b"(K\x01" + shape + dtype + b"\x89" + data + b"tb")


def test_loads_python2_numpy1_pickle(tmp_path):
    entry = _entry(np.random.default_rng(1))
    body = b"".join(b"U" + bytes([len(k)]) + k.encode() + _py2_array(entry[k]) for k in ("xyz", "uv_vis", "K"))
    path = tmp_path / "anno_training.pickle"
    path.write_bytes(b"\x80\x02}K\x07}(" + body + b"us.")
    loaded = load_annotations(path)
    assert list(loaded) == [7]
    for field in ("xyz", "uv_vis", "K"):
        np.testing.assert_array_equal(loaded[7][field], entry[field])


def test_annotation_errors_name_the_file(tmp_path):
    missing = tmp_path / "anno_training.pickle"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_annotations(missing)
    good = tmp_path / "good.pickle"
    save_annotations(good, {0: _entry(np.random.default_rng(2))})
    truncated = tmp_path / "truncated.pickle"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(AnnotationError, match=str(truncated)):
        load_annotations(truncated)
    bad_shape = tmp_path / "bad_shape.pickle"
    bad_shape.write_bytes(pickle.dumps({0: {**_entry(np.random.default_rng(3)), "xyz": np.zeros((21, 3))}}))
    with pytest.raises(AnnotationError, match=r"bad_shape.pickle: sample 0: field 'xyz' must have shape \(42, 3\)"):
        load_annotations(bad_shape)


# --- frames ------------------------------------------------------------------------------------------------

def test_depth_png_decoding(dataset_copy):
    depth_path = dataset_copy / "training" / "depth" / "00001.png"
    rng = np.random.default_rng(4)
    high = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    low = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    high[0, :3], low[0, :3] = [0, 255, 0x12], [0, 255, 0x34]
    Image.fromarray(np.stack([high, low, np.zeros_like(high)], axis=-1)).save(depth_path)
    depth = read_frame(dataset_copy, "training", 1).depth
    assert depth.dtype == np.float32 and depth.shape == (IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(depth, (high * 256.0 + low) / 65535.0 * 5.0, rtol=1e-6)
    np.testing.assert_allclose(depth[0, :3], [0.0, 5.0, 0x1234 / 65535 * 5.0], rtol=1e-6)

    # Round trip through the generator's encoder: error at most half a quantisation step (5 m / 65535 / 2).
    known = rng.uniform(0.0, 5.0, size=(IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    Image.fromarray(encode_depth(known)).save(depth_path)
    assert np.abs(read_frame(dataset_copy, "training", 1).depth - known).max() <= 5.0 / 65535 / 2 + 1e-6


def test_read_frame_decodes_everything(generated):
    frame = read_frame(generated, "evaluation", 1)
    assert frame.color.dtype == np.uint8 and frame.color.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert frame.mask.dtype == np.uint8 and frame.mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(frame.color, np.asarray(Image.open(generated / "evaluation/color/00001.png")))
    raw = raw_annotations(generated, "evaluation")[1]
    np.testing.assert_array_equal(frame.xyz, raw["xyz"])
    np.testing.assert_array_equal(frame.K, raw["K"])


def _write_mask(root: Path, index: int, left: int, right: int, extra: dict[int, int]) -> None:
    """A mask with ``left`` pixels of id 5, ``right`` of id 30, and ``extra`` {id: count} of other ids."""
    flat = np.zeros(IMAGE_SIZE * IMAGE_SIZE, dtype=np.uint8)
    start = 0
    for label, count in [(5, left), (30, right), *extra.items()]:
        flat[start:start + count] = label
        start += count
    Image.fromarray(flat.reshape(IMAGE_SIZE, IMAGE_SIZE)).save(root / "training" / "mask" / f"{index:05d}.png")


@pytest.mark.parametrize("left, right, extra, expected", [
    (10, 9, {}, 0), (9, 10, {}, 1), (10, 10, {}, 1),
    (10, 9, {1: 500, 40: 500}, 0),  # person id 1 and out-of-range ids count for neither hand
    (3, 0, {17: 2, 18: 4}, 0),  # 17 is the left palm, 18 the right thumb
    (0, 0, {2: 1, 33: 2}, 1),
])
def test_hand_choice_counts_mask_pixels(dataset_copy, left, right, extra, expected):
    _write_mask(dataset_copy, 0, left, right, extra)
    item = RHDDataset(dataset_copy, "training", crop_size=32, num_points=8)[0]
    assert int(item["hand"]) == expected
    raw = raw_annotations(dataset_copy)[0]
    kept = raw["xyz"][21 * expected:21 * expected + 21].astype(np.float64)
    restored = item["keypoints"].double() * item["scale"].double() + item["root"].double()
    np.testing.assert_allclose(restored.numpy(), kept, atol=1e-6)


def test_generated_frames_exercise_both_hands(generated):
    chosen = []
    for split, count in (("training", 4), ("evaluation", 2)):
        dataset = RHDDataset(generated, split, crop_size=32, num_points=8)
        for i in range(count):
            mask = np.asarray(Image.open(generated / split / "mask" / f"{i:05d}.png"))
            counts = np.bincount(mask.ravel(), minlength=256)
            left, right = counts[2:18].sum(), counts[18:34].sum()
            assert left != right
            chosen.append(int(dataset[i]["hand"]))
            assert chosen[-1] == int(right > left)
            assert choose_hand(read_frame(generated, split, i).mask) == chosen[-1]
    assert set(chosen) == {0, 1}


@pytest.mark.parametrize("crop_size", [64, 256])
def test_crop_intrinsics_and_normalisation(generated, crop_size):
    dataset = RHDDataset(generated, "training", crop_size=crop_size, num_points=32)
    raw = raw_annotations(generated)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["rgb"].shape == (3, crop_size, crop_size) and item["rgb"].dtype == torch.float32
        assert 0.0 <= float(item["rgb"].min()) and float(item["rgb"].max()) <= 1.0
        keypoints, scale, root = item["keypoints"].double(), item["scale"].double(), item["root"].double()
        np.testing.assert_array_equal(keypoints[12].numpy(), np.zeros(3))
        assert float((keypoints[12] - keypoints[11]).norm()) == pytest.approx(1.0, abs=1e-6)
        hand = int(item["hand"])
        xyz = raw[i]["xyz"][21 * hand:21 * hand + 21].astype(np.float64)
        np.testing.assert_allclose(root.numpy(), xyz[12], atol=1e-7)
        assert float(scale) == pytest.approx(np.linalg.norm(xyz[12] - xyz[11]), rel=1e-6)
        # The crop intrinsics project the de-normalised keypoints onto the crop uv.
        projected = (keypoints * scale + root) @ item["K"].double().T
        reprojected = (projected[:, :2] / projected[:, 2:]).numpy()
        np.testing.assert_allclose(reprojected, item["uv"].double().numpy(), atol=2e-3)
        np.testing.assert_array_equal(item["visible"].numpy(), raw[i]["uv_vis"][21 * hand:21 * hand + 21, 2] == 1)
        assert item["hand"].dtype == torch.int64 and int(item["index"]) == i


def test_crop_pixels_follow_crop_intrinsics(dataset_copy):
    """A linear ramp image, cropped: each crop pixel holds the ramp value at the source point its crop K maps
    it to, and area outside the image is padded with 127."""
    u = np.arange(IMAGE_SIZE, dtype=np.float64)
    ramp = np.stack([np.broadcast_to(0.75 * u[None, :], (IMAGE_SIZE, IMAGE_SIZE)),
                     np.broadcast_to(0.75 * u[:, None], (IMAGE_SIZE, IMAGE_SIZE)),
                     np.full((IMAGE_SIZE, IMAGE_SIZE), 50.0)], axis=-1)
    for index in range(4):
        Image.fromarray(np.rint(ramp).astype(np.uint8)).save(dataset_copy / "training" / "color" / f"{index:05d}.png")
    # Move sample 3's hands so keypoint 12 projects near the top-left corner: its crop must overflow the image.
    annotations = raw_annotations(dataset_copy)
    entry = annotations[3]
    K = entry["K"].astype(np.float64)
    for side in (0, 1):
        hand = entry["xyz"][21 * side:21 * side + 21].astype(np.float64)
        depth = hand[12, 2]
        target = depth * np.array([(12.0 - K[0, 2]) / K[0, 0], (9.0 - K[1, 2]) / K[1, 1], 1.0])
        moved = hand - hand[12] + target
        projected = moved @ K.T
        entry["xyz"][21 * side:21 * side + 21] = moved
        entry["uv_vis"][21 * side:21 * side + 21, :2] = projected[:, :2] / projected[:, 2:]
    save_annotations(dataset_copy / "training" / "anno_training.pickle", annotations)

    # Small crops: one crop pixel spans several source pixels, so a half-pixel slip shows in the ramp values.
    dataset = RHDDataset(dataset_copy, "training", crop_size=16, num_points=8)
    for index in range(4):
        item = dataset[index]
        crop = np.rint(item["rgb"].permute(1, 2, 0).numpy() * 255.0)
        frame_K = annotations[index]["K"].astype(np.float64)
        crop_K = item["K"].double().numpy()
        grid = np.arange(16, dtype=np.float64)
        # Crop pixel -> source pixel: undo the crop K, apply the frame K (both share the ray).
        src_u = (grid - crop_K[0, 2]) / crop_K[0, 0] * frame_K[0, 0] + frame_K[0, 2]
        src_v = (grid - crop_K[1, 2]) / crop_K[1, 1] * frame_K[1, 1] + frame_K[1, 2]
        # Away from the image border (the filter's support there mixes in padding) the ramp is reproduced.
        step = src_u[1] - src_u[0]
        inner_u = (src_u > step + 1) & (src_u < IMAGE_SIZE - 2 - step)
        inner_v = (src_v > step + 1) & (src_v < IMAGE_SIZE - 2 - step)
        assert inner_u.sum() > 4 and inner_v.sum() > 4
        inside = crop[np.ix_(inner_v, inner_u)]
        shape = inside.shape[:2]
        np.testing.assert_allclose(inside[..., 0], np.broadcast_to(0.75 * src_u[None, inner_u], shape), atol=1.01)
        np.testing.assert_allclose(inside[..., 1], np.broadcast_to(0.75 * src_v[inner_v, None], shape), atol=1.01)
        outside = (src_u[None, :] < -1 - step) | (src_v[:, None] < -1 - step)
        if index == 3:
            assert outside.sum() > 16
        np.testing.assert_array_equal(crop[outside], np.full((outside.sum(), 3), 127.0))


def test_point_cloud_is_the_hand_near_the_root(generated):
    reference = RHDDataset(generated, "training", crop_size=32, num_points=16)
    for i in range(4):
        frame = read_frame(generated, "training", i)
        hand = choose_hand(frame.mask)
        ids = frame.mask.astype(int)
        in_hand = (ids >= 2 + 16 * hand) & (ids <= 17 + 16 * hand)
        K = frame.K
        v, u = np.nonzero(in_hand)
        z = frame.depth[v, u].astype(np.float64)
        candidates = np.stack([(u - K[0, 2]) * z / K[0, 0], (v - K[1, 2]) * z / K[1, 1], z], axis=1)
        root = frame.xyz[21 * hand + 12]
        eligible = np.linalg.norm(candidates - root, axis=1) < 0.2
        assert eligible.sum() > 100
        for num_points in (16, int(eligible.sum()) + 500):
            item = RHDDataset(generated, "training", crop_size=32, num_points=num_points)[i]
            assert item["points"].shape == (num_points, 3) and item["points"].dtype == torch.float32
            points = item["points"].double().numpy() * float(item["scale"]) + item["root"].double().numpy()
            # Every point projects onto a hand pixel of the chosen hand, at that pixel's depth, near the root...
            pixel = points @ K.T
            pixel = pixel[:, :2] / pixel[:, 2:]
            assert np.abs(pixel - np.rint(pixel)).max() < 1e-3
            pu, pv = np.rint(pixel).astype(int).T
            assert in_hand[pv, pu].all()
            np.testing.assert_allclose(points[:, 2], frame.depth[pv, pu], atol=1e-5)
            assert (np.linalg.norm(points - root, axis=1) < 0.2).all()
            # ...and they are a subset of the eligible pixels, or all of them (plus repeats) when too few.
            distinct = len(np.unique(np.stack([pu, pv], axis=1), axis=0))
            assert distinct == min(num_points, int(eligible.sum()))
        np.testing.assert_array_equal(reference[i]["points"].numpy(), reference[i]["points"].numpy())
    other_seed = RHDDataset(generated, "training", crop_size=32, num_points=16, seed=1)
    assert not torch.equal(other_seed[0]["points"], reference[0]["points"])


def test_missing_and_corrupt_files_are_named(dataset_copy, generated):
    color = dataset_copy / "training" / "color" / "00002.png"
    color.unlink()
    dataset = RHDDataset(dataset_copy, "training", crop_size=32, num_points=8)
    with pytest.raises(FileNotFoundError, match=str(color)):
        dataset[2]
    depth = dataset_copy / "training" / "depth" / "00001.png"
    depth.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=str(depth)):
        dataset[1]
    (dataset_copy / "evaluation" / "anno_evaluation.pickle").unlink()
    with pytest.raises(FileNotFoundError, match="anno_evaluation.pickle"):
        RHDDataset(dataset_copy, "evaluation")
    with pytest.raises(FileNotFoundError, match="did you mean"):
        RHDDataset(generated.parent, "training")
    with pytest.raises(ValueError, match="split"):
        RHDDataset(generated, "validation")
    with pytest.raises(ValueError, match=r"\[17\]"):
        RHDDataset(generated, "training", indices=[0, 17])


# --- generator ---------------------------------------------------------------------------------------------

def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_layout_and_annotations(generated):
    for split, count in (("training", 4), ("evaluation", 2)):
        names = sorted(p.name for p in (generated / split / "color").iterdir())
        assert names == [f"{i:05d}.png" for i in range(count)]
        for folder, mode in (("color", "RGB"), ("depth", "RGB"), ("mask", "L")):
            for name in names:
                image = Image.open(generated / split / folder / name)
                assert image.mode == mode and image.size == (IMAGE_SIZE, IMAGE_SIZE)
        annotations = raw_annotations(generated, split)
        assert list(annotations) == list(range(count))
        for i, entry in annotations.items():
            assert set(entry) == {"xyz", "uv_vis", "K"}
            assert {v.shape for v in entry.values()} == {(42, 3), (3, 3)}
            K = entry["K"].astype(np.float64)
            assert K[0, 0] == K[1, 1] and 263 <= K[0, 0] <= 306 and K[0, 2] == K[1, 2] == 160
            xyz = entry["xyz"].astype(np.float64)
            projected = xyz @ K.T
            uv = projected[:, :2] / projected[:, 2:]
            np.testing.assert_allclose(entry["uv_vis"][:, :2], uv, atol=1e-3)
            flags = entry["uv_vis"][:, 2]
            assert set(np.unique(flags)) <= {0.0, 1.0}
            outside = np.any((np.rint(uv) < 0) | (np.rint(uv) >= IMAGE_SIZE), axis=1)
            assert not np.any(flags[outside] == 1)
            mask = np.asarray(Image.open(generated / split / "mask" / f"{i:05d}.png"))
            dominant_root_z = min(xyz[12, 2], xyz[33, 2])
            assert 0.3 <= dominant_root_z <= 0.8
            assert set(np.unique(mask)) <= set(range(34)) and 1 in mask


def test_generator_is_deterministic(tmp_path):
    first = generate_rhd(tmp_path / "a", 2, 1, seed=11, progress=False)
    second = generate_rhd(tmp_path / "b", 2, 1, seed=11, progress=False)
    other = generate_rhd(tmp_path / "c", 2, 1, seed=12, progress=False)
    assert _tree_bytes(first) == _tree_bytes(second)
    assert (first / "training/color/00000.png").read_bytes() != (other / "training/color/00000.png").read_bytes()
    with pytest.raises(FileExistsError, match=str(first)):
        generate_rhd(tmp_path / "a", 1, 1, seed=11, progress=False)


def _capsules(seed: int) -> tuple[np.ndarray, np.ndarray, list]:
    """A random colour and a flat depth background, and 12 random overlapping capsules with their palm normals (some
    None); the last two repeat the first two under other mask ids, so that some pixels tie."""
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    capsules = []
    for i in range(10):
        a = np.array([*rng.uniform(-0.1, 0.1, size=2), rng.uniform(0.4, 0.9)])
        b = a + rng.uniform(-0.1, 0.1, size=3)
        palm = None if i % 3 == 0 else rng.normal(size=3)
        capsules.append((synthetic._Capsule(a, b, float(rng.uniform(0.005, 0.04)), 2 + i, rng.uniform(size=3)), palm))
    capsules += [(capsule._replace(mask_id=20 + i), palm) for i, (capsule, palm) in enumerate(capsules[:2])]
    return color, np.full((IMAGE_SIZE, IMAGE_SIZE), 1.0, dtype=np.float32), capsules


@pytest.mark.parametrize("seed", range(4))
def test_capsules_drawn_together_equal_capsules_drawn_one_at_a_time(seed):
    camera = (280.0, IMAGE_SIZE / 2, np.array([0.3, -0.2, -0.93]), 0.3)
    color, depth, capsules = _capsules(seed)
    mask = synthetic._draw(capsules, color, depth, *camera)
    color_in_turn, depth_in_turn, _ = _capsules(seed)
    mask_in_turn = np.zeros_like(mask)
    for capsule in capsules:  # a z-buffer with a strict depth test: a tie keeps the earlier capsule
        drawn = synthetic._draw([capsule], color_in_turn, depth_in_turn, *camera)
        mask_in_turn = np.where(drawn > 0, drawn, mask_in_turn)
    np.testing.assert_array_equal(color, color_in_turn)
    np.testing.assert_array_equal(depth, depth_in_turn)
    np.testing.assert_array_equal(mask, mask_in_turn)
    assert {2, 3} <= set(np.unique(mask)) and not {20, 21} & set(np.unique(mask))
    assert (mask > 0).sum() > 2000  # the capsules cover a good part of the image


def test_ensure_builtin_rhd_caches_and_regenerates(tmp_path, monkeypatch):
    calls = []
    real_generate = synthetic.generate_rhd

    def counting_generate(*args, **kwargs):
        calls.append(args[1:3])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_rhd", counting_generate)
    small, large = (f"rhd_builtin_v{synthetic.GENERATOR_VERSION}_seed0_{n}x1" for n in (2, 3))
    path = ensure_builtin_rhd(tmp_path, 2, 1, seed=0, progress=False)
    assert path == tmp_path / small / "RHD_published_v2"
    assert len(list((path / "training" / "color").iterdir())) == 2
    assert ensure_builtin_rhd(tmp_path, 2, 1, seed=0, progress=False) == path
    assert calls == [(2, 1)]
    larger = ensure_builtin_rhd(tmp_path, 3, 1, seed=0, progress=False)
    assert calls == [(2, 1), (3, 1)] and larger == tmp_path / large / "RHD_published_v2"
    assert len(RHDDataset(larger, "training", crop_size=16, num_points=4)) == 3
    assert len(list((path / "training" / "color").iterdir())) == 2  # the smaller one is left as it was

    def interrupted(root, *args, **kwargs):
        (Path(root) / "RHD_published_v2" / "training").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_rhd", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin_rhd(tmp_path, 2, 2, seed=5, progress=False)
    # The finished datasets are untouched and no partial folder is left behind.
    assert sorted(os.listdir(tmp_path)) == [".lock", small, large]
    assert len(list((larger / "training" / "color").iterdir())) == 3


def test_the_cache_serves_smaller_runs_and_generates_larger_ones_from_its_frames(tmp_path, monkeypatch):
    calls = []
    real_generate = synthetic.generate_rhd

    def counting_generate(*args, **kwargs):
        calls.append((args[1:3], kwargs.get("reuse") is not None))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_rhd", counting_generate)
    path = ensure_builtin_rhd(tmp_path / "cache", 3, 1, seed=4, progress=False)
    assert ensure_builtin_rhd(tmp_path / "cache", 2, 1, seed=4, progress=False) == path  # fewer frames: reused
    assert calls == [((3, 1), False)]
    # More evaluation frames: a dataset for both requests, made with the frames it had (not drawn again).
    larger = ensure_builtin_rhd(tmp_path / "cache", 1, 2, seed=4, progress=False)
    assert calls == [((3, 1), False), ((3, 2), True)]
    assert _tree_bytes(larger) == _tree_bytes(real_generate(tmp_path / "fresh", 3, 2, seed=4, progress=False))
    assert ensure_builtin_rhd(tmp_path / "cache", 3, 1, seed=4, progress=False) == path  # the smallest that serves


def test_a_dataset_a_run_reads_is_never_changed_or_deleted_by_another_run(tmp_path):
    """A run streams its built-in frames from the cache while another run, of other sizes or another seed,
    needs other data: the first run's files stay the very same files, frame for frame."""
    path = ensure_builtin_rhd(tmp_path, 3, 1, seed=0, progress=False)
    reading = RHDDataset(path, "training", crop_size=16, num_points=4)
    before = [reading[i]["rgb"] for i in range(3)]
    files = {p: p.stat().st_ino for p in path.rglob("*.png")}
    ensure_builtin_rhd(tmp_path, 4, 1, seed=0, progress=False)  # grown
    ensure_builtin_rhd(tmp_path, 3, 1, seed=5, progress=False)  # another seed
    assert all(torch.equal(reading[i]["rgb"], rgb) for i, rgb in enumerate(before))
    assert {p: p.stat().st_ino for p in files if p.exists()} == files  # not deleted, not replaced


def test_samples_made_while_rendering_equal_those_decoded_from_the_written_files(tmp_path):
    """The first run of the built-in data takes its samples from the rendering processes instead of decoding the
    files they wrote: every field must be exactly what reading the files gives, and only frames rendered are made."""
    sample = functools.partial(make_sample, crop_size=24, num_points=32, seed=2)
    small = ensure_builtin_rhd(tmp_path, 2, 1, seed=6, progress=False)
    samples: dict = {}
    root = ensure_builtin_rhd(tmp_path, 4, 2, seed=6, progress=False, sample=sample, samples=samples)
    assert root != small
    assert {split: sorted(made) for split, made in samples.items()} == {"training": [2, 3], "evaluation": [1]}
    for split, made in samples.items():
        decoded = RHDDataset(root, split, crop_size=24, num_points=32, seed=2)
        served = RHDDataset(root, split, crop_size=24, num_points=32, seed=2, samples=made)
        for index, item in made.items():
            expected = decoded[index]
            assert item.keys() == expected.keys()
            for key, value in expected.items():
                assert value.dtype == item[key].dtype and torch.equal(value, item[key]), (split, index, key)
            assert served[index] is item
