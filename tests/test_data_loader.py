"""The training data loader: extra per-case arrays, patient labels, 2D slices, determinism.

Everything runs on tiny arrays: the cache of ``_cache_helpers`` (32^3 phantoms) or in-memory
cases whose voxel values encode their own (z, y, x) coordinates, so that a patch shows where it
was cut from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from _cache_helpers import write_tiny_cache
from autopetseg.errors import InputError
from autopetseg.io_utils import save_npy
from autopetseg.training.config import AugmentationConfig
from autopetseg.training.data_loader import (
    NO_CASE_LABEL,
    CachedCase,
    PatchSampler,
    augmentation_input_size,
    load_cached_case,
    make_train_loader,
    mirror_axes_in_plane,
)

# max_shift_voxels equal in all four: the sampler then draws the same centres for a seed.
OFF = AugmentationConfig(enabled=False, max_shift_voxels=2)
# Every spatial transform on every sample (and all mirror axes), no intensity transform.
SPATIAL = AugmentationConfig(p_rotation=1.0, p_scale=1.0, p_elastic=1.0, p_gamma=0.0, p_noise=0.0, max_shift_voxels=2)
# Only the intensity transforms: the patch is cut, not resampled.
INTENSITY = AugmentationConfig(
    p_rotation=0.0, p_scale=0.0, p_elastic=0.0, p_gamma=1.0, p_noise=1.0, mirror_axes=(), max_shift_voxels=2
)
ALL = dataclasses.replace(SPATIAL, p_gamma=1.0, p_noise=1.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The tiny cache plus ``<case>_petcopy.npy`` (float32) and ``<case>_pet16.npy`` (float16) extras."""
    root = tmp_path_factory.mktemp("preprocessed")
    data_dir = write_tiny_cache(root, n_cases=6, n_lesion_free=2, seed=0) / "3d_fullres"
    for i in range(6):
        pet = np.load(data_dir / f"case_{i:03d}.npy")[0]
        save_npy(data_dir / f"case_{i:03d}_petcopy.npy", pet.astype(np.float32))
        save_npy(data_dir / f"case_{i:03d}_pet16.npy", pet.astype(np.float16))
    return data_dir


def _cases(data_dir: Path, extras=(), labels=None) -> list[CachedCase]:
    labels = labels or {}
    return [
        load_cached_case(
            data_dir,
            f"case_{i:03d}",
            extras={name: data_dir / f"case_{i:03d}_{name}.npy" for name in extras},
            case_label=labels.get(i),
        )
        for i in range(6)
    ]


def _batches(cases, patch, aug, n=3, batch_size=2, share=0.5, seed=3, **kw) -> list[dict[str, torch.Tensor]]:
    loader = make_train_loader(cases, patch, batch_size, share, aug, seed=seed, **kw)
    return [next(loader) for _ in range(n)]


def _coordinate_case(shape=(12, 14, 16), case_id="coords") -> CachedCase:
    """Channel 0 = 1 + z·10000 + y·100 + x (0 only in padding), channel 1 = its negative; label =
    (z + y + x) odd; one extra equal to channel 0."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    code = (1 + z * 10000 + y * 100 + x).astype(np.float32)
    seg = ((z + y + x) % 2).astype(np.uint8)
    return CachedCase(
        case_id, np.stack([code, -code]), seg, np.argwhere(seg > 0), (1.0, 1.0, 1.0), extras={"cue": code.copy()}
    )


def _decode(value: float) -> np.ndarray:
    v = int(round(value)) - 1
    return np.asarray([v // 10000, (v // 100) % 100, v % 100])


def _expected_slice(shape, slice_axis: int, anchor_zyx, anchor_pos, patch) -> tuple[np.ndarray, np.ndarray]:
    """(code, label) of the 2D patch through voxel ``anchor_zyx`` seen at patch position ``anchor_pos``."""
    in_plane = [a for a in range(3) if a != slice_axis]
    code = np.zeros(patch, dtype=np.float32)
    seg = np.zeros(patch, dtype=np.uint8)
    for p in range(patch[0]):
        for q in range(patch[1]):
            zyx = np.array(anchor_zyx)
            zyx[in_plane[0]] += p - anchor_pos[0]
            zyx[in_plane[1]] += q - anchor_pos[1]
            if np.all(zyx >= 0) and np.all(zyx < shape):
                code[p, q] = 1 + zyx[0] * 10000 + zyx[1] * 100 + zyx[2]
                seg[p, q] = zyx.sum() % 2
    return code, seg


# --------------------------------------------------------------------------- extras
def test_extras_are_opened_memory_mapped_and_checked(data_dir, tmp_path):
    case = load_cached_case(data_dir, "case_003", extras={"pet16": data_dir / "case_003_pet16.npy"}, case_label=1)
    assert isinstance(case.extras["pet16"], np.memmap) and case.extras["pet16"].dtype == np.float16
    assert case.case_label == 1
    assert load_cached_case(data_dir, "case_003").extras == {} and load_cached_case(data_dir, "case_003").case_label is None

    with pytest.raises(InputError) as missing:
        load_cached_case(data_dir, "case_003", extras={"cue": tmp_path / "nope.npy"})
    assert missing.value.case == "case_003" and missing.value.file.endswith("nope.npy")
    save_npy(tmp_path / "small.npy", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(InputError) as wrong:
        load_cached_case(data_dir, "case_003", extras={"cue": tmp_path / "small.npy"})
    assert wrong.value.case == "case_003" and wrong.value.file.endswith("small.npy") and "(4, 4, 4)" in str(wrong.value)
    with pytest.raises(ValueError, match="target"):
        load_cached_case(data_dir, "case_003", extras={"target": data_dir / "case_003_pet16.npy"})


def test_cases_with_different_extras_cannot_share_a_stream(data_dir):
    cases = _cases(data_dir, extras=("petcopy",))
    cases[2] = load_cached_case(data_dir, "case_002")
    with pytest.raises(ValueError, match="same extra arrays"):
        make_train_loader(cases, (8, 8, 8), 2, 0.5, OFF, seed=0)


@pytest.mark.parametrize("name, atol", [("petcopy", 1e-5), ("pet16", 1e-2)])
def test_extras_follow_the_image_through_rotation_scaling_and_mirroring(data_dir, name, atol):
    plain = _batches(_cases(data_dir), (12, 12, 12), OFF)
    spatial = _batches(_cases(data_dir, extras=(name,)), (12, 12, 12), SPATIAL)
    for p, b in zip(plain, spatial):
        assert b[name].dtype == torch.float32 and b[name].shape == (2, 1, 12, 12, 12)
        # The same centres (the sampler's draws do not depend on the augmentation), so a
        # difference from the unaugmented patch shows the spatial transforms did act.
        assert not torch.allclose(b["data"][:, :1], p["data"][:, :1])
        torch.testing.assert_close(b[name], b["data"][:, :1], atol=atol, rtol=0)


def test_extras_are_not_gamma_or_noise_transformed(data_dir):
    plain = _batches(_cases(data_dir), (12, 12, 12), OFF)
    intensity = _batches(_cases(data_dir, extras=("petcopy",)), (12, 12, 12), INTENSITY)
    for p, b in zip(plain, intensity):
        assert not torch.allclose(b["data"], p["data"])  # gamma and noise changed PET and CT
        assert torch.equal(b["petcopy"], p["data"][:, :1])  # the extra is the unaugmented PET


def test_extras_do_not_change_image_or_target_for_the_same_seed(data_dir):
    without = _batches(_cases(data_dir), (12, 12, 12), ALL)
    with_extras = _batches(_cases(data_dir, extras=("petcopy", "pet16")), (12, 12, 12), ALL)
    for a, b in zip(without, with_extras):
        assert set(b) == set(a) | {"petcopy", "pet16"}
        for key in a:
            assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- case labels
def test_case_labels_ride_along_with_minus_one_when_missing(data_dir):
    labels = {2: 1, 3: 0, 5: 1}  # cases 0, 1, 4 have none
    cases = _cases(data_dir, labels=labels)
    sampler = PatchSampler(cases, (8, 8, 8), 0.5, 2, np.random.default_rng(0))
    batch = sampler.sample_batch(40)
    expected = [labels.get(int(c[-3:]), NO_CASE_LABEL) for c in batch["case_ids"]]
    assert batch["case_label"].tolist() == expected and NO_CASE_LABEL in expected and 1 in expected

    streamed = _batches(cases, (8, 8, 8), OFF, n=4, batch_size=4)
    assert all(b["case_label"].dtype == torch.int64 and b["case_label"].shape == (4,) for b in streamed)
    assert set(torch.cat([b["case_label"] for b in streamed]).tolist()) <= {NO_CASE_LABEL, 0, 1}
    assert "case_label" not in _batches(_cases(data_dir), (8, 8, 8), OFF, n=1)[0]


# --------------------------------------------------------------------------- 2D
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_patches_are_one_slice_across_the_axis_with_the_inplane_box(slice_axis):
    case = _coordinate_case()
    shape = np.asarray(case.seg.shape)
    patch = (6, 10)
    batches = _batches([case], patch, OFF, n=4, batch_size=3, share=0.5, slice_axis=slice_axis)
    for batch in batches:
        assert batch["data"].shape == (3, 2, *patch) and batch["target"].shape == (3, 1, *patch)
        assert batch["cue"].shape == (3, 1, *patch)
        for b in range(3):
            code = batch["data"][b, 0].numpy()
            anchor_pos = np.argwhere(code > 0)[0]
            anchor = _decode(code[tuple(anchor_pos)])
            want_code, want_seg = _expected_slice(shape, slice_axis, anchor, anchor_pos, patch)
            assert np.array_equal(code, want_code)
            assert np.array_equal(batch["data"][b, 1].numpy(), -want_code)
            assert np.array_equal(batch["target"][b, 0].numpy(), want_seg)
            assert np.array_equal(batch["cue"][b, 0].numpy(), want_code)
            # The box starts at centre - size // 2: a voxel of the volume for uniform patches, at
            # most max_shift_voxels = 2 off in-plane (none across) for lesion-centred ones.
            centre = anchor.copy()
            in_plane = [a for a in range(3) if a != slice_axis]
            for i, a in enumerate(in_plane):
                centre[a] += patch[i] // 2 - anchor_pos[i]
            slack = np.where(np.arange(3) == slice_axis, 0, 2 if bool(batch["foreground"][b]) else 0)
            assert np.all(centre >= -slack) and np.all(centre < shape + slack)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_lesion_centred_2d_patches_contain_lesion_voxels(data_dir, slice_axis):
    aug = dataclasses.replace(OFF, max_shift_voxels=3)
    batches = _batches(_cases(data_dir), (12, 12), aug, n=3, batch_size=4, share=1.0, slice_axis=slice_axis)
    for batch in batches:
        assert bool(batch["foreground"].all())
        assert all(int(batch["target"][b].sum()) > 0 for b in range(4))


def test_neighbour_slices_are_channels_in_channel_major_order():
    case = _coordinate_case()
    shape = np.asarray(case.seg.shape)
    batches = _batches([case], (6, 8), OFF, n=4, batch_size=3, share=0.0, slice_axis=1, neighbours=1)
    for batch in batches:
        assert batch["data"].shape == (3, 6, 6, 8)  # 2 channels x 3 slices
        assert batch["target"].shape == (3, 1, 6, 8) and batch["cue"].shape == (3, 1, 6, 8)
        for b in range(3):
            centre = batch["data"][b, 1].numpy()  # channel 0, offset 0
            anchor_pos = np.argwhere(centre > 0)[0]
            anchor = _decode(centre[tuple(anchor_pos)])
            for j in (-1, 0, 1):
                neighbour = anchor.copy()
                neighbour[1] += j
                if 0 <= neighbour[1] < shape[1]:
                    want, _ = _expected_slice(shape, 1, neighbour, anchor_pos, (6, 8))
                else:
                    want = np.zeros((6, 8), np.float32)  # outside the volume
                assert np.array_equal(batch["data"][b, 0 * 3 + j + 1].numpy(), want)
                assert np.array_equal(batch["data"][b, 1 * 3 + j + 1].numpy(), -want)
            want_code, want_seg = _expected_slice(shape, 1, anchor, anchor_pos, (6, 8))
            assert np.array_equal(batch["target"][b, 0].numpy(), want_seg)
            assert np.array_equal(batch["cue"][b, 0].numpy(), want_code)


def test_2d_augmentation_moves_extras_and_neighbours_with_the_image(data_dir):
    cases = _cases(data_dir, extras=("petcopy",))
    spatial = _batches(cases, (12, 12), SPATIAL, n=3, batch_size=3, slice_axis=1, neighbours=1)
    for b in spatial:
        assert b["data"].shape == (3, 6, 12, 12) and b["target"].shape == (3, 1, 12, 12)
        torch.testing.assert_close(b["petcopy"], b["data"][:, 1:2], atol=1e-5, rtol=0)  # PET, centre slice
    plain = _batches(cases, (12, 12), OFF, n=3, batch_size=3, slice_axis=1, neighbours=1)
    intensity = _batches(cases, (12, 12), INTENSITY, n=3, batch_size=3, slice_axis=1, neighbours=1)
    for p, b in zip(plain, intensity):
        assert not torch.allclose(b["data"], p["data"])
        assert torch.equal(b["petcopy"], p["petcopy"]) and torch.equal(b["target"], p["target"])


def test_2d_layout_is_checked():
    case = _coordinate_case()
    with pytest.raises(ValueError, match="slice_axis"):
        make_train_loader([case], (6, 8), 2, 0.5, OFF, seed=0)
    with pytest.raises(ValueError, match="2D"):
        make_train_loader([case], (6, 8, 8), 2, 0.5, OFF, seed=0, slice_axis=0)
    with pytest.raises(ValueError, match="2D"):
        make_train_loader([case], (6, 8, 8), 2, 0.5, OFF, seed=0, neighbours=1)


def test_mirror_axes_and_read_size_in_2d():
    assert mirror_axes_in_plane((0, 1, 2), None) == (0, 1, 2)
    assert mirror_axes_in_plane((0, 1, 2), 1) == (0, 1)  # z, x of a coronal slice
    assert mirror_axes_in_plane((0, 2), 0) == (1,)  # x of an axial slice
    assert mirror_axes_in_plane((0,), 0) == ()
    aug = AugmentationConfig(p_elastic=0.0)
    rot = abs(np.cos(np.pi / 12)) + abs(np.sin(np.pi / 12))
    assert augmentation_input_size((20, 30), aug) == [int(np.ceil(20 * 1.1 * rot)), int(np.ceil(30 * 1.1 * rot))]
    assert augmentation_input_size((20, 30, 30), aug)[0] == int(np.ceil(20 * 1.1))
    assert augmentation_input_size((20, 30), OFF) == [20, 30]


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("patch, kw", [((12, 12, 12), {}), ((12, 12), {"slice_axis": 2, "neighbours": 1})])
def test_same_seed_same_batches_with_zero_and_one_worker_and_on_resume(data_dir, patch, kw):
    cases = _cases(data_dir, extras=("pet16",), labels={3: 1, 4: 0})
    inline = _batches(cases, patch, ALL, n=4, **kw)
    worker = _batches(cases, patch, ALL, n=4, num_workers=1, **kw)
    resumed = _batches(cases, patch, ALL, n=2, start_batch=2, **kw)
    for a, b in zip(inline, worker):
        assert a.keys() == b.keys() == {"data", "target", "foreground", "pet16", "case_label"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(inline[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(inline[0]["data"], _batches(cases, patch, ALL, n=1, seed=4, **kw)[0]["data"])
