"""Coronal MIP pictures: orientation, aspect ratio, contours, and ``evaluate --png``."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from autopetseg.cli import main
from autopetseg.data.imageio import Geometry
from autopetseg.inference.pictures import coronal_mip, render_mip_png
from _image_helpers import Grid, write_flat_case, write_volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _geometry(shape, spacing=(4.0, 4.0, 4.0), direction=IDENTITY, origin=(0.0, 0.0, 0.0)) -> Geometry:
    return Geometry(tuple(shape), tuple(spacing), tuple(origin), tuple(direction))


def _colour_pixels(rgb: np.ndarray, channel: int) -> int:
    """Pixels where ``channel`` clearly dominates the other two (red 0, green 1)."""
    others = [c for c in range(3) if c != channel]
    return int(np.count_nonzero((rgb[..., channel] > 0.5) & (rgb[..., others].max(-1) < 0.35)))


def test_mip_puts_the_head_on_top_whatever_the_file_orientation():
    shape = (20, 6, 8)
    pet = np.zeros(shape, np.float32)
    pet[17, 3, 2] = 9.0  # superior (high z), patient's right (low x in LPS)
    mip, aspect = coronal_mip(pet, _geometry(shape))
    assert mip.shape == (20, 8) and aspect == pytest.approx(1.0)
    assert np.unravel_index(mip.argmax(), mip.shape) == (2, 2)  # near the top row, left column

    # The same patient stored with z and x flipped (index axes running inferior and right):
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    mip2, _ = coronal_mip(pet[::-1, :, ::-1].copy(), _geometry(shape, direction=flipped, origin=(28.0, 0.0, 76.0)))
    np.testing.assert_array_equal(mip2, mip)


def test_png_has_physical_aspect_and_both_contours(tmp_path):
    shape = (30, 12, 20)  # z 30 × 8 mm = 240 mm tall, x 20 × 2 mm = 40 mm wide
    geometry = _geometry(shape, spacing=(8.0, 2.0, 2.0))
    pet = np.full(shape, 1.0, np.float32)
    gt = np.zeros(shape, np.uint8)
    gt[10:16, 4:8, 6:12] = 1
    pet[gt > 0] = 8.0
    pred = np.zeros(shape, np.uint8)
    pred[12:18, 4:8, 8:14] = 1
    path = render_mip_png(tmp_path / "case.png", pet, geometry, gt, pred, title="case")
    image = imread(path)
    height, width = image.shape[:2]
    assert height > 2.5 * width  # 240 mm by 40 mm
    rgb = image[..., :3]
    assert _colour_pixels(rgb, 0) > 20 and _colour_pixels(rgb, 1) > 20  # red prediction, green ground truth
    assert rgb.min() < 0.2 and rgb.max() > 0.9  # a dark lesion on a light body: not a blank picture
    assert not list(tmp_path.glob(".case.png*"))  # no temporary file left behind


def test_png_without_masks_has_no_contours(tmp_path):
    shape = (16, 8, 16)
    pet = np.random.default_rng(0).uniform(0, 4, shape).astype(np.float32)
    image = imread(render_mip_png(tmp_path / "plain.png", pet, _geometry(shape)))
    rgb = image[..., :3]
    assert _colour_pixels(rgb, 0) == 0 and _colour_pixels(rgb, 1) == 0
    assert rgb.std() > 0.05


def test_evaluate_png_writes_one_picture_per_case(tmp_path):
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "eval"
    grid = Grid(shape_zyx=(12, 12, 12))
    labels = {}
    for i, case in enumerate(("a", "b")):
        paths = write_flat_case(gt_dir, case, grid=grid, seed=i)
        labels[case] = paths["label"]
    # prediction of "a" = its ground truth; "b" has no prediction
    import SimpleITK as sitk

    write_volume(pred_dir / "a.nii.gz", sitk.GetArrayFromImage(sitk.ReadImage(str(labels["a"]))), grid)
    code = main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "--png"])
    assert code == 1  # "b" has no prediction
    pngs = sorted(p.name for p in (out / "png").iterdir())
    assert pngs == ["a.png", "b.png"]
    rgb_a = imread(out / "png" / "a.png")[..., :3]
    rgb_b = imread(out / "png" / "b.png")[..., :3]
    assert _colour_pixels(rgb_a, 0) > 0 and _colour_pixels(rgb_b, 0) == 0  # red only where predicted
    assert _colour_pixels(rgb_b, 1) > 0
