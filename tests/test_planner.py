"""The planner: budget → patch/network/batch, anisotropic spacing as nnU-Net, the GDFL paper's
settings, plans.json editable by hand and validated on load.

Fingerprints are built directly from per-case spacings and body-cropped shapes, so that each test
states the data it plans for (a whole-body study at 2 mm is about 500 × 180 × 220 voxels).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from autopetseg.errors import InputError
from autopetseg.planning.fingerprint import (
    CaseFingerprint,
    Fingerprint,
    IntensityStats,
    LesionStats,
    summarize_lesions,
)
from autopetseg.planning.planner import (
    PlannerSettings,
    count_parameters,
    plan_experiment,
    plan_topology,
)
from autopetseg.planning.plans import ComputeBudget, Plans
from autopetseg.preprocessing.preprocessor import normalize_ct

WHOLE_BODY_2MM = (500, 180, 220)


def make_fingerprint(spacings, crop_shapes, lesion_suv=None) -> Fingerprint:
    """A fingerprint of cases with these PET spacings and body-cropped shapes (z, y, x)."""
    cases = []
    for i, (spacing, shape) in enumerate(zip(spacings, crop_shapes)):
        lesions = [LesionStats(10, 0.08, 9.0, 5.0)] if i % 2 == 0 else []
        cases.append(CaseFingerprint(f"case{i:03d}", [float(s) for s in spacing], [int(v) + 20 for v in shape],
                                     [[10, 10 + int(v)] for v in shape], [int(v) for v in shape], 1000, lesions))
    rng = np.random.default_rng(0)
    body = IntensityStats.of(rng.gamma(2.0, 0.7, 5000))
    lesion = IntensityStats.of(np.asarray(lesion_suv if lesion_suv is not None else rng.uniform(3, 30, 500)))
    ct = IntensityStats.of(rng.normal(0, 300, 5000))
    return Fingerprint(
        cases=cases,
        intensity={"PET": {"body": body, "lesion": lesion}, "CT": {"body": ct, "lesion": ct}},
        lesions=summarize_lesions(cases),
        median_spacing_zyx=np.median(np.asarray(spacings, float), axis=0).tolist(),
        median_shape_zyx=np.median(np.asarray(crop_shapes, float), axis=0).tolist(),
        median_shape_after_crop_zyx=np.median(np.asarray(crop_shapes, float), axis=0).tolist(),
    )


def whole_body(n=6, spacing=(2.0, 2.0, 2.0), shape=WHOLE_BODY_2MM) -> Fingerprint:
    return make_fingerprint([spacing] * n, [shape] * n)


def gpu(gb: float) -> ComputeBudget:
    return ComputeBudget(device="cuda", gpu_memory_gb=gb)


def cpu(seconds: float = 1.0) -> ComputeBudget:
    return ComputeBudget(device="cpu", cpu_seconds_per_iteration=seconds)


def check_consistent(conf, cap_zyx=None):
    """Every configuration: patch divisible by the network's total stride, within the median shape."""
    assert all(p % t == 0 for p, t in zip(conf.patch_size, conf.network.total_stride))
    assert conf.network.n_stages >= 2 and conf.batch_size >= 1
    if cap_zyx is not None:
        assert all(p <= c for p, c in zip(conf.patch_size, cap_zyx))


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_smaller_gpu_budget_gives_smaller_or_equal_patch_network_and_batch(configuration):
    fp = whole_body()
    budgets = [gpu(4), gpu(8), gpu(24)]
    confs = [plan_experiment(fp, b, (configuration,)).configuration(configuration) for b in budgets]
    for small, large in zip(confs, confs[1:]):
        assert np.prod(small.patch_size) <= np.prod(large.patch_size)
        assert small.network.n_stages <= large.network.n_stages
        assert all(f <= g for f, g in zip(small.network.features_per_stage, large.network.features_per_stage))
        assert count_parameters(small.network) <= count_parameters(large.network)
        assert small.batch_size <= large.batch_size
    for budget, conf in zip(budgets, confs):
        assert conf.notes["estimated_gpu_memory_gb"] <= budget.gpu_memory_gb
        check_consistent(conf)
    # Not all equal: the budget does change the plan.
    assert confs[0].batch_size * np.prod(confs[0].patch_size) < confs[2].batch_size * np.prod(confs[2].patch_size)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_cpu_plan_is_smaller_than_the_smallest_gpu_plan(configuration):
    fp = whole_body()
    on_cpu = plan_experiment(fp, cpu(), (configuration,)).configuration(configuration)
    on_gpu = plan_experiment(fp, gpu(4), (configuration,)).configuration(configuration)
    assert on_cpu.network.n_stages <= on_gpu.network.n_stages
    assert all(f < g for f, g in zip(on_cpu.network.features_per_stage, on_gpu.network.features_per_stage))
    assert count_parameters(on_cpu.network) < count_parameters(on_gpu.network) / 4
    assert on_cpu.batch_size <= on_gpu.batch_size
    if configuration == "3d_fullres":
        assert np.prod(on_cpu.patch_size) < np.prod(on_gpu.patch_size)
    # (2d: the shallow CPU network may take the whole median slice, which the deep GPU network's
    # total stride of 64 rounds down; its time per iteration is what the CPU budget bounds.)
    check_consistent(on_cpu, WHOLE_BODY_2MM if configuration == "3d_fullres" else WHOLE_BODY_2MM[::2])


def test_gpu_patches_are_cubes_in_mm_until_capped_by_the_body():
    plans = {gb: plan_experiment(whole_body(), gpu(gb)).configuration("3d_fullres") for gb in (4, 8, 24)}
    for gb in (4, 8):  # 2 mm isotropic, the body is wider than these patches: cubes
        assert len(set(plans[gb].patch_size)) == 1, plans[gb].patch_size
    assert plans[4].patch_size[0] < plans[8].patch_size[0]
    assert 112 <= plans[8].patch_size[0] <= 160  # "about 128-160 voxels per side" (planner docstring)
    # 24 GB: y reaches the body's width (180 → 160 after rounding to the stride of 32).
    assert plans[24].patch_size[1] == 160 and plans[24].patch_size[0] >= 192


def test_cpu_budget_sets_a_small_network_and_a_time_estimate():
    fp = whole_body()
    for seconds in (0.25, 1.0, 4.0):
        conf = plan_experiment(fp, cpu(seconds)).configuration("3d_fullres")
        assert conf.notes["estimated_seconds_per_iteration"] <= seconds
        assert conf.network.features_per_stage[0] == 16 and max(conf.network.features_per_stage) <= 128
        assert conf.network.n_stages <= 4 and conf.batch_size == 2
        check_consistent(conf, WHOLE_BODY_2MM)
    small = plan_experiment(fp, cpu(0.25)).configuration("3d_fullres")
    large = plan_experiment(fp, cpu(1.0)).configuration("3d_fullres")
    assert np.prod(small.patch_size) < np.prod(large.patch_size)


def test_a_time_budget_sizes_the_cpu_plan_for_its_iterations(tmp_path):
    """``plan_and_preprocess --device cpu --time-budget``: the plan is sized for budget / N estimated
    seconds per iteration (N measured by benchmarks/patch_for_time.py), the budget is kept as given
    (so the plans are reused), and a longer budget never gives a smaller patch."""
    fp = whole_body()
    n = PlannerSettings().cpu.iterations_for_time_budget
    plans = {t: plan_experiment(fp, ComputeBudget(device="cpu", time_budget_s=t), ("3d_fullres", "2d")) for t in (
        60.0, 10 * 60.0, 60 * 60.0)}
    sizes = [np.prod(p.configuration("3d_fullres").patch_size) for p in plans.values()]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    for t, p in plans.items():
        assert p.budget == ComputeBudget(device="cpu", time_budget_s=t)  # as given: reused next time
        for conf in p.configurations.values():
            target = max(t / n, PlannerSettings().cpu.min_seconds_per_iteration)
            assert conf.notes["budget"]["cpu_seconds_per_iteration"] == pytest.approx(target)
            assert conf.notes["estimated_seconds_per_iteration"] <= target or not conf.notes["fits_budget"]
    # the same plan as the equivalent seconds per iteration
    assert (plan_experiment(fp, cpu(600.0 / n)).configuration("3d_fullres").patch_size
            == plans[600.0].configuration("3d_fullres").patch_size)
    plans[600.0].save(tmp_path / "plans.json")
    assert Plans.load(tmp_path / "plans.json").budget.time_budget_s == 600.0
    with pytest.raises(ValueError, match="CPU plan"):
        plan_experiment(fp, ComputeBudget(device="cuda", time_budget_s=600.0))
    with pytest.raises(ValueError, match="positive"):
        plan_experiment(fp, ComputeBudget(device="cpu", time_budget_s=0.0))


def test_plans_are_deterministic():
    fp = make_fingerprint([(3.0, 4.0, 4.0), (5.0, 2.0, 2.0), (4.0, 3.0, 3.0)] * 3, [(200, 120, 140)] * 9)
    a = plan_experiment(fp, gpu(8), ("3d_fullres", "2d"), dataset_name="D")
    b = plan_experiment(fp, gpu(8), ("3d_fullres", "2d"), dataset_name="D")
    assert a == b


# --------------------------------------------------------------------------- spacing


def test_target_spacing_is_the_median_per_axis():
    # 4 × 4 × 3 mm (x, y, z) and 2 × 2 × 5 mm studies mixed: no axis is 3 × coarser, so the median.
    spacings = [(3.0, 4.0, 4.0), (3.0, 4.0, 4.0), (5.0, 2.0, 2.0), (5.0, 2.0, 2.0), (4.0, 3.0, 3.0)]
    plans = plan_experiment(make_fingerprint(spacings, [(200, 100, 100)] * 5), gpu(8))
    assert plans.target_spacing_zyx == [4.0, 3.0, 3.0]
    assert plans.configuration("3d_fullres").spacing_zyx == [4.0, 3.0, 3.0]


def test_coarse_axis_takes_its_10th_percentile_when_anisotropic():
    z = [6.0, 7.0, 8.0, 8.0, 10.0, 12.0]  # median 8 > 3 × 1.5 mm in-plane
    plans = plan_experiment(make_fingerprint([(s, 1.5, 1.5) for s in z], [(60, 300, 300)] * 6), gpu(8))
    assert plans.target_spacing_zyx == pytest.approx([np.percentile(z, 10), 1.5, 1.5])
    # ... but never finer than the in-plane spacing.
    z = [1.0, 1.0, 8.0, 8.0, 8.0, 8.0]
    plans = plan_experiment(make_fingerprint([(s, 2.0, 2.0) for s in z], [(60, 300, 300)] * 6), gpu(8))
    assert plans.target_spacing_zyx == pytest.approx([2.0, 2.0, 2.0])


def test_anisotropic_2x2x5_mm_is_not_pooled_or_convolved_along_z_at_first():
    fp = make_fingerprint([(5.0, 2.0, 2.0)] * 4, [(80, 200, 200)] * 4)
    conf = plan_experiment(fp, gpu(8)).configuration("3d_fullres")
    net = conf.network
    assert conf.spacing_zyx == [5.0, 2.0, 2.0]
    assert net.kernel_sizes[0] == [1, 3, 3]  # z is 2.5 × coarser: no convolution across slices
    assert net.strides[1] == [1, 2, 2]  # ... and no pooling along z until y, x reach 4 mm
    assert all(s[0] == 2 for s in net.strides[2:-1]) and all(k == [3, 3, 3] for k in net.kernel_sizes[1:])
    # The patch covers about the same millimetres along each axis (a cube in mm, 2 mm steps).
    extent = np.asarray(conf.patch_size) * np.asarray(conf.spacing_zyx)
    assert extent.max() / extent.min() < 1.3
    # 4 × 4 × 3 mm: isotropic enough, every stage pools every axis with 3 × 3 × 3 kernels.
    conf = plan_experiment(make_fingerprint([(3.0, 4.0, 4.0)] * 4, [(300, 100, 110)] * 4), gpu(8)).configuration("3d_fullres")
    assert conf.network.strides[1] == [2, 2, 2] and all(k == [3, 3, 3] for k in conf.network.kernel_sizes)


def test_very_anisotropic_axis_keeps_kernel_1_for_two_stages():
    topo = plan_topology([32, 256, 256], [6.4, 1.5, 1.5], 8, 32, 320, PlannerSettings())
    assert topo.strides[:4] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert topo.kernel_sizes[:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]


@pytest.mark.parametrize("spacing, patch", [
    ((5.0, 2.0, 2.0), (40, 192, 160)), ((3.0, 4.0, 4.0), (96, 160, 160)), ((6.4, 1.5, 1.5), (32, 256, 256)),
    ((2.0, 2.0, 2.0), (128, 128, 128)), ((1.0, 1.0, 8.0), (256, 256, 16)), ((2.0, 2.0), (448, 192)),
    ((2.5, 0.8, 0.8), (64, 320, 320)), ((4.0, 4.0, 3.0), (128, 96, 160)), ((3.0, 9.0), (320, 40)),
])
def test_topology_matches_nnunet_v2(spacing, patch):
    nnunet = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.network_topology",
                                 reason="nnunetv2 (the 'bench' extra) is not installed")
    _, pools, kernels, _, _ = nnunet.get_pool_and_conv_props(list(spacing), list(patch), 4, 999999)
    topo = plan_topology(list(patch), list(spacing), 99, 32, 320, PlannerSettings())
    assert topo.strides == [list(p) for p in pools]
    assert topo.kernel_sizes == [list(k) for k in kernels]


# --------------------------------------------------------------------------- 2d, normalization, paper


def test_2d_configuration_uses_coronal_slices_of_the_3d_data():
    plans = plan_experiment(whole_body(), gpu(8), ("3d_fullres", "2d"))
    conf = plans.configuration("2d")
    assert conf.slice_axis == 1 and conf.ndim == 2
    assert conf.data_identifier == plans.configuration("3d_fullres").data_identifier
    assert conf.spacing_zyx == plans.target_spacing_zyx
    check_consistent(conf, (WHOLE_BODY_2MM[0], WHOLE_BODY_2MM[2]))
    assert conf.batch_size > plans.configuration("3d_fullres").batch_size


def test_gdfl_paper_settings_on_a_large_gpu():
    fp = make_fingerprint([(3.0, 4.0, 4.0)] * 8, [(330, 110, 120)] * 8)  # ≥ 192 voxels per axis at 2 mm
    plans = plan_experiment(fp, gpu(80), settings=PlannerSettings.gdfl())
    conf = plans.configuration("3d_fullres")
    assert plans.target_spacing_zyx == [2.0, 2.0, 2.0]
    assert conf.patch_size == [192, 192, 192]
    assert conf.network.features_per_stage == [32, 64, 128, 256, 512]
    assert conf.network.strides == [[1, 1, 1]] + [[2, 2, 2]] * 4 and conf.network.num_res_units == 2
    assert count_parameters(conf.network) == 19_223_525  # the paper's count
    assert conf.notes["estimated_gpu_memory_gb"] <= 80
    # CT clipped to [-1024, 1024] HU and scaled to [0, 1]; PET kept in SUV.
    assert plans.normalization.ct_clip_hu == (-1024.0, 1024.0) and plans.normalization.pet_clip_suv is None
    hu = np.array([-3000.0, -1024.0, 0.0, 512.0, 1024.0, 3000.0], dtype=np.float32)
    assert normalize_ct(hu, plans.normalization) == pytest.approx([0, 0, 0.5, 0.75, 1, 1])
    # At 8 GB the same settings give a smaller patch that fits.
    small = plan_experiment(fp, gpu(8), settings=PlannerSettings.gdfl()).configuration("3d_fullres")
    assert np.prod(small.patch_size) < 192**3 and small.notes["estimated_gpu_memory_gb"] <= 8


def test_pet_clip_at_a_lesion_percentile():
    suv = np.linspace(2.0, 40.0, 1001)
    fp = make_fingerprint([(2.0, 2.0, 2.0)] * 2, [(100, 100, 100)] * 2, lesion_suv=suv)
    plans = plan_experiment(fp, gpu(8), settings=PlannerSettings(pet_clip_lesion_percentile=99.5))
    assert plans.normalization.pet_clip_suv == pytest.approx(np.percentile(suv, 99.5))
    fp.intensity["PET"]["lesion"] = None  # no lesion voxel in the data
    with pytest.raises(InputError, match="no lesion voxels"):
        plan_experiment(fp, gpu(8), settings=PlannerSettings(pet_clip_lesion_percentile=99.5))


def test_parameter_count_matches_the_built_network():
    torch = pytest.importorskip("torch")
    from autopetseg.models.networks import build_network, count_parameters as count_built

    torch.manual_seed(0)
    fp = make_fingerprint([(5.0, 2.0, 2.0)] * 3, [(60, 150, 150)] * 3)
    for budget, configuration in ((cpu(), "3d_fullres"), (cpu(), "2d"), (gpu(4), "2d")):
        topo = plan_experiment(fp, budget, (configuration,)).configuration(configuration).network
        assert count_parameters(topo) == count_built(build_network("resunet", topo))


def test_bad_requests():
    with pytest.raises(InputError, match="unknown configuration"):
        plan_experiment(whole_body(), gpu(8), ("3d_lowres",))
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        plan_experiment(whole_body(), gpu(0))


# --------------------------------------------------------------------------- plans.json


@pytest.fixture(scope="module")
def planned() -> Plans:
    return plan_experiment(whole_body(), gpu(8), ("3d_fullres", "2d"), dataset_name="Dataset001_X")


@pytest.fixture
def plans_file(planned, tmp_path):
    path = tmp_path / "plans.json"
    planned.save(path)
    return planned, path


def test_plans_round_trip_and_hand_edits_are_kept(plans_file):
    plans, path = plans_file
    assert Plans.load(path) == plans
    raw = json.loads(path.read_text())
    conf = raw["configurations"]["3d_fullres"]
    conf["patch_size"] = [64, 96, 96]
    conf["batch_size"] = 5
    conf["network"]["features_per_stage"] = [24, 48, 96, 192, 320, 320]
    raw["normalization"]["pet_clip_suv"] = 30
    path.write_text(json.dumps(raw, indent=1))
    loaded = Plans.load(path)
    edited = loaded.configuration("3d_fullres")
    assert (edited.patch_size, edited.batch_size) == ([64, 96, 96], 5)
    assert edited.network.features_per_stage[0] == 24 and loaded.normalization.pet_clip_suv == 30.0


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["configurations"]["3d_fullres"].update(patch_size=[100, 128, 128]), "divisible by the total stride"),
    (lambda r: r["configurations"]["3d_fullres"].update(batch_size="two"), "batch_size"),
    (lambda r: r["configurations"]["3d_fullres"]["network"].update(kernel_sizes=[[3, 3]] * 6), "kernel"),
    (lambda r: r["configurations"]["3d_fullres"]["network"]["strides"].pop(), "one entry per stage"),
    (lambda r: r["configurations"]["2d"].update(slice_axis=3), "slice_axis"),
    (lambda r: r["normalization"].update(ct_clip_hu=[1024, -1024]), "ct_clip_hu"),
    (lambda r: r["budget"].update(device="tpu"), "device"),
    (lambda r: r.pop("target_spacing_zyx"), "missing field"),
    (lambda r: r["configurations"]["3d_fullres"].update(patch=[1, 2, 3]), "patch"),
    (lambda r: r.update(version=2), "version"),
])
def test_a_bad_hand_edit_gives_a_clear_error(plans_file, edit, message):
    _, path = plans_file
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=message) as info:
        Plans.load(path)
    assert str(path) in str(info.value)


def test_plans_json_that_is_not_json(plans_file):
    _, path = plans_file
    path.write_text(path.read_text().replace('"batch_size": ', '"batch_size" '))
    with pytest.raises(InputError, match="invalid plans file"):
        Plans.load(path)
