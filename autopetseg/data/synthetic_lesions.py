"""Lesions of the synthetic phantom: where each cohort's lesions go, their shape and uptake.

Sites follow the cohorts of the autoPET data: lymphoma in nodal chains (neck, supraclavicular,
axilla, mediastinum, abdomen, pelvis, groin) and the spleen; lung cancer as a lung primary with
mediastinal/hilar nodes and further lung nodules; melanoma subcutaneous, in the liver, the
lungs and distant nodes. Sites are drawn in template millimetres and placed in the body with
the case's ``BodyFrame``; the lesion itself is defined in physical millimetres (round lesions
stay round in the scaled "tiny" body).

A lesion is an ellipsoid with a random orientation whose surface radius is modulated by a few
cosine "lumps" along random directions (irregular outlines). Its SUV is the local background
plus a log-uniform excess, brighter in the centre; large lesions are sometimes necrotic (a
cold core inside the lesion, still part of the mask). In CT it is soft tissue (25–45 HU), so
it shows faintly in fat and lung and hardly at all in muscle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from autopetseg.data import synthetic_anatomy as anat
from autopetseg.data.synthetic_anatomy import Anatomy, BodyFrame, Ellipsoid, Tissue

COHORTS = ("lymphoma", "lung_cancer", "melanoma", "negative")

# Nodal stations: template (z, y, x) centre and half-extent of the region nodes are drawn from;
# stations with x != 0 are bilateral (mirrored at random).
NODAL_STATIONS = {
    "cervical": ((1500, 0, 45), (35, 20, 15)),
    "supraclavicular": ((1445, -10, 70), (12, 15, 20)),
    "axillary": ((1370, 0, 140), (30, 25, 15)),
    "mediastinal": ((1320, -20, 0), (50, 20, 18)),
    "hilar": ((1280, 0, 35), (20, 15, 8)),
    "paraaortic": ((1060, 40, 25), (70, 10, 12)),
    "mesenteric": ((1020, -20, 0), (40, 30, 50)),
    "iliac": ((920, 10, 60), (30, 15, 15)),
    "inguinal": ((820, -60, 75), (20, 15, 20)),
}
# Diameter ranges (mm) per kind of site, used when the preset does not impose its own range.
SITE_DIAMETER_MM = {
    "node": (10.0, 40.0), "bulky_node": (45.0, 90.0), "spleen": (10.0, 35.0), "lung_primary": (15.0, 55.0),
    "lung_nodule": (6.0, 20.0), "liver": (8.0, 40.0), "subcutaneous": (6.0, 30.0),
}


@dataclass(frozen=True)
class LesionOptions:
    """How many lesions, how large and how bright (per preset)."""

    count: dict = field(default_factory=lambda: {"lymphoma": (2, 12), "lung_cancer": (1, 6), "melanoma": (1, 8)})
    diameter_mm: tuple[float, float] | None = None  # None: the per-site ranges above
    delta_suv: tuple[float, float] = (0.8, 15.0)  # excess over local background, log-uniform
    bulky_probability: float = 0.12
    irregular_probability: float = 0.6
    necrosis_probability: float = 0.35
    necrosis_min_diameter_mm: float = 30.0


@dataclass(frozen=True)
class Lesion:
    site: str
    centre_zyx_mm: tuple[float, float, float]  # physical
    semi_axes_mm: tuple[float, float, float]
    rotation: np.ndarray  # (3, 3): column j is lesion axis j in physical (z, y, x)
    lump_directions: np.ndarray  # (K, 3) unit vectors in the lesion frame
    lump_amplitudes: np.ndarray  # (K,) relative radius change
    lump_frequencies: np.ndarray  # (K,)
    lump_phases: np.ndarray  # (K,)
    delta_suv: float
    background_suv: float
    necrotic_fraction: float  # radius share of the cold core; 0: none
    ct_hu: float

    @property
    def nominal_diameter_mm(self) -> float:
        return 2.0 * float(np.prod(self.semi_axes_mm)) ** (1.0 / 3.0)

    @property
    def nominal_volume_ml(self) -> float:
        return 4.0 / 3.0 * np.pi * float(np.prod(self.semi_axes_mm)) / 1000.0

    def bbox(self):
        reach = max(self.semi_axes_mm) * (1.0 + float(np.abs(self.lump_amplitudes).sum()))
        c = np.asarray(self.centre_zyx_mm)
        return c - reach, c + reach

    def relative_radius(self, dz: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        """Distance from the centre over the (lumpy) surface radius in that direction: < 1 inside.

        ``dz, dy, dx`` are open (broadcastable) offsets from the centre in mm.
        """
        q = [(self.rotation[0, j] * dz + self.rotation[1, j] * dy + self.rotation[2, j] * dx) / self.semi_axes_mm[j] for j in range(3)]
        rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        safe = np.maximum(rho, 1e-6)
        surface = np.ones_like(rho)
        for d, a, f, p in zip(self.lump_directions, self.lump_amplitudes, self.lump_frequencies, self.lump_phases):
            cosine = (d[0] * q[0] + d[1] * q[1] + d[2] * q[2]) / safe
            surface += a * np.cos(f * cosine + p)
        return rho / surface

    def suv(self, t: np.ndarray) -> np.ndarray:
        """SUV at relative radius ``t`` (≤ 1): brighter in the centre, cold necrotic core."""
        value = self.background_suv + self.delta_suv * (1.0 - 0.3 * t ** 2)
        if self.necrotic_fraction > 0:
            value = np.where(t < self.necrotic_fraction, 0.6 * self.background_suv, value)
        return value.astype(np.float32)

    def hu(self, t: np.ndarray) -> np.ndarray:
        value = np.full(t.shape, self.ct_hu, np.float32)
        if self.necrotic_fraction > 0:
            value[t < self.necrotic_fraction] = self.ct_hu - 20.0
        return value


# ----------------------------------------------------------------------------- sites


def _in_ellipsoid(rng: np.random.Generator, centre, half) -> np.ndarray:
    """A uniform point inside the axis-aligned ellipsoid (template mm)."""
    v = rng.normal(size=3)
    v *= rng.random() ** (1.0 / 3.0) / np.linalg.norm(v)
    return np.asarray(centre, float) + v * np.asarray(half, float)


def _mirror(rng: np.random.Generator, point: np.ndarray) -> np.ndarray:
    if rng.random() < 0.5:
        point = point.copy()
        point[2] = -point[2]
    return point


def _node(rng: np.random.Generator, station: str) -> np.ndarray:
    centre, half = NODAL_STATIONS[station]
    return _mirror(rng, _in_ellipsoid(rng, centre, half))


def _in_organ(rng: np.random.Generator, organ: Ellipsoid, fill: float = 0.75) -> np.ndarray:
    return _in_ellipsoid(rng, organ.centre, np.asarray(organ.semi) * fill)


def _lung(rng: np.random.Generator, side: int | None = None) -> np.ndarray:
    side = side if side is not None else (1 if rng.random() < 0.5 else -1)
    return _in_organ(rng, anat.LUNG_LEFT if side > 0 else anat.LUNG_RIGHT)


def _subcutaneous(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
    """A point in the subcutaneous fat of the trunk, at a random angle around the body."""
    z = rng.uniform(850.0, 1420.0)
    half_y = np.interp(z, anat.TORSO.z_knots, anat.TORSO.half_y) - 0.5 * anatomy.fat_mm
    half_x = np.interp(z, anat.TORSO.z_knots, anat.TORSO.half_x) - 0.5 * anatomy.fat_mm
    angle = rng.uniform(0.0, 2 * np.pi)
    return np.array([z, half_y * np.sin(angle), half_x * np.cos(angle)])


def _sites(rng: np.random.Generator, cohort: str, count: int, anatomy: Anatomy, bulky_p: float) -> list[tuple[str, str, np.ndarray]]:
    """(site name, size class, template point) for each lesion of the cohort."""
    sites = []
    if cohort == "lymphoma":
        stations = rng.choice(list(NODAL_STATIONS), size=int(rng.integers(1, 4)), replace=False)
        for _ in range(count):
            if rng.random() < 0.12:
                sites.append(("spleen", "spleen", _in_organ(rng, anat.SPLEEN, 0.6)))
                continue
            station = str(rng.choice(stations))
            size = "bulky_node" if rng.random() < bulky_p else "node"
            sites.append((station, size, _node(rng, station)))
    elif cohort == "lung_cancer":
        side = 1 if rng.random() < 0.5 else -1
        sites.append(("lung", "lung_primary", _lung(rng, side)))
        for _ in range(count - 1):
            if rng.random() < 0.6:
                station = str(rng.choice(["mediastinal", "hilar", "supraclavicular"]))
                sites.append((station, "node", _node(rng, station)))
            else:
                sites.append(("lung", "lung_nodule", _lung(rng)))
    elif cohort == "melanoma":
        for _ in range(count):
            kind = rng.choice(["subcutaneous", "liver", "lung", "node"], p=[0.35, 0.2, 0.2, 0.25])
            if kind == "subcutaneous":
                sites.append(("subcutaneous", "subcutaneous", _subcutaneous(rng, anatomy)))
            elif kind == "liver":
                sites.append(("liver", "liver", _in_organ(rng, anat.LIVER)))
            elif kind == "lung":
                sites.append(("lung", "lung_nodule", _lung(rng)))
            else:
                station = str(rng.choice(["axillary", "inguinal", "cervical"]))
                sites.append((station, "node", _node(rng, station)))
    elif cohort != "negative":
        raise ValueError(f"unknown cohort {cohort!r}; expected one of {COHORTS}")
    return sites


# ----------------------------------------------------------------------------- sampling


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def sample_lesions(rng: np.random.Generator, cohort: str, anatomy: Anatomy, frame: BodyFrame, options: LesionOptions) -> list[Lesion]:
    """The lesions of one case (none for the ``negative`` cohort)."""
    if cohort == "negative":
        return []
    lo, hi = options.count[cohort]
    sites = _sites(rng, cohort, int(rng.integers(lo, hi + 1)), anatomy, options.bulky_probability)
    lesions = []
    for site, size_class, template_point in sites:
        d_lo, d_hi = options.diameter_mm or SITE_DIAMETER_MM[size_class]
        diameter = float(np.exp(rng.uniform(np.log(d_lo), np.log(d_hi))))
        aspect = rng.uniform(0.75, 1.25, size=3)
        semi = 0.5 * diameter * aspect / np.prod(aspect) ** (1.0 / 3.0)  # keeps the nominal volume
        irregular = rng.random() < options.irregular_probability
        k = 4
        necrotic = diameter >= options.necrosis_min_diameter_mm and rng.random() < options.necrosis_probability
        centre = frame.to_physical(template_point)
        lesions.append(
            Lesion(
                site=site,
                centre_zyx_mm=tuple(float(c) for c in centre),
                semi_axes_mm=tuple(float(s) for s in semi),
                rotation=_random_rotation(rng),
                lump_directions=_unit_vectors(rng, k),
                lump_amplitudes=rng.uniform(0.04, 0.12, size=k) if irregular else np.zeros(k),
                lump_frequencies=rng.uniform(2.0, 5.0, size=k),
                lump_phases=rng.uniform(0.0, 2 * np.pi, size=k),
                delta_suv=float(np.exp(rng.uniform(*np.log(options.delta_suv)))),
                background_suv=0.0,  # set below from the tissue at the centre
                necrotic_fraction=float(rng.uniform(0.3, 0.55)) if necrotic else 0.0,
                ct_hu=float(rng.uniform(25.0, 45.0)),
            )
        )
    if lesions:
        tissues = anatomy.tissue_at(np.array([les.centre_zyx_mm for les in lesions]), frame)
        lut = anatomy.pet_lut()
        soft = anatomy.suv[Tissue.SOFT]
        lesions = [replace(les, background_suv=float(lut[t]) if t != Tissue.AIR else soft) for les, t in zip(lesions, tissues)]
    return lesions


def _unit_vectors(rng: np.random.Generator, k: int) -> np.ndarray:
    v = rng.normal(size=(k, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)
