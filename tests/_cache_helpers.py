"""A tiny synthetic preprocessed cache (the format of docs/ARCHITECTURE.md) for the training tests.

Each case is a 32^3 volume at 4 mm: a body ellipsoid (CT 0.5, PET ~1 SUV), air outside (0, 0),
and in most cases one bright PET sphere (SUV 6-9) which is the lesion label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autopetseg.io_utils import save_npy, write_json
from autopetseg.planning.plans import ComputeBudget, ConfigurationPlan, NetworkTopology, NormalizationPlan, Plans

DATASET = "Dataset900_TinyTrain"
CONFIGURATION = "3d_fullres"
SPACING_ZYX = (4.0, 4.0, 4.0)


def tiny_plans(patch=(32, 32, 32), batch_size=2, features=(8, 16, 32)) -> Plans:
    n = len(features)
    topology = NetworkTopology(
        features_per_stage=list(features),
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        kernel_sizes=[[3, 3, 3]] * n,
        num_res_units=2,
    )
    conf = ConfigurationPlan(CONFIGURATION, CONFIGURATION, list(SPACING_ZYX), list(patch), batch_size, topology)
    return Plans(DATASET, ComputeBudget("cpu"), list(SPACING_ZYX), NormalizationPlan(), {CONFIGURATION: conf})


def make_case(rng: np.random.Generator, shape=(32, 32, 32), lesion=True):
    """(image (2, z, y, x) float32, seg uint8) of one phantom."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    center = np.asarray(shape, dtype=np.float32)[:, None, None, None] / 2
    radii = np.asarray([s * 0.42 for s in shape], dtype=np.float32)[:, None, None, None]
    body = (((grid - center) / radii) ** 2).sum(0) <= 1.0
    pet = np.where(body, 1.0 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
    ct = np.where(body, 0.5 + 0.02 * rng.standard_normal(shape), 0.0).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    if lesion:
        c = rng.uniform(0.35, 0.65, size=3) * np.asarray(shape)
        r = rng.uniform(2.5, 4.0)
        sphere = ((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r
        seg[sphere] = 1
        pet[sphere] = rng.uniform(6.0, 9.0)
    return np.stack([pet, ct]), seg


def write_tiny_cache(root: Path, n_cases: int = 10, n_lesion_free: int = 3, seed: int = 0, shape=(32, 32, 32), plans: Plans | None = None) -> Path:
    """Write ``<root>/<DATASET>/`` (dataset.json, plans.json, 3d_fullres/*); returns the dataset folder."""
    rng = np.random.default_rng(seed)
    dataset_dir = Path(root) / DATASET
    data_dir = dataset_dir / CONFIGURATION
    cases = []
    for i in range(n_cases):
        case_id = f"case_{i:03d}"
        image, seg = make_case(rng, shape, lesion=i >= n_lesion_free)
        fg = np.argwhere(seg > 0).astype(np.int32)
        save_npy(data_dir / f"{case_id}.npy", image)
        save_npy(data_dir / f"{case_id}_seg.npy", seg)
        save_npy(data_dir / f"{case_id}_fg.npy", fg.reshape(-1, 3))
        write_json(
            data_dir / f"{case_id}.json",
            {
                "case_id": case_id,
                # The case as if its PET were this very grid (no crop, no resampling).
                "geometry": {"shape_zyx": list(shape), "spacing_zyx": list(SPACING_ZYX), "origin_xyz": [0.0, 0.0, 0.0],
                             "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]},
                "bbox_zyx": [[0, s] for s in shape],
                "shape_after_crop_zyx": list(shape),
                "spacing_zyx": list(SPACING_ZYX),
                "shape_after_resample_zyx": list(shape),
                "n_lesion_voxels": int(seg.sum()),
                "cohort": "NEGATIVE" if i < n_lesion_free else "LYMPHOMA",
                "patient": f"patient_{i:03d}",
            },
        )
        cases.append({"case_id": case_id, "patient": f"patient_{i:03d}", "cohort": "NEGATIVE" if i < n_lesion_free else "LYMPHOMA", "clinical": {}})
    write_json(dataset_dir / "dataset.json", {"layout": "synthetic", "root": str(root), "cases": cases})
    (plans or tiny_plans()).save(dataset_dir / "plans.json")
    return dataset_dir
