"""Anatomy of the synthetic PET/CT phantom: an adult template in millimetres, painted onto any grid.

The template is an adult about 1.76 m tall in SimpleITK's LPS patient axes (x towards the
patient's left, y posterior, z superior), soles at z = 0, written in array order (z, y, x). A
``BodyFrame`` maps template millimetres to physical millimetres by a per-axis scale and an
offset, so one phantom can be rasterised at any spacing, and the child-sized "tiny" body is
the same template scaled down. Every shape is axis-aligned in the template, which keeps its
test separable: per-axis terms on 1-D coordinate vectors, one broadcast add and compare over
the shape's bounding box only.

A grid gets a map of tissue classes (``Tissue``); PET and CT values come from per-case lookup
tables (``Anatomy.pet_lut``, ``CT_HU``). Numbers (HU, SUV) are typical adult FDG values: liver
SUV about 2, brain 6–12, bladder very high, myocardium from blood-pool level ("off", fasting) to
very high; CT lungs about -800 HU, bone several hundred HU, fat -100 HU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from autopetseg.data.imageio import Geometry


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    SOFT = 2  # muscle and other soft tissue
    LUNG = 3
    BONE = 4  # cortical bone: skull, ribs, long bones
    MARROW = 5  # spine and pelvis: bone in CT, marrow uptake in PET
    BRAIN = 6
    BLOOD = 7  # cardiac blood pool, aorta
    MYOCARDIUM = 8
    LIVER = 9
    SPLEEN = 10
    KIDNEY = 11
    BLADDER = 12
    BOWEL = 13
    BOWEL_HOT = 14  # bowel loops with high physiological uptake (not lesions)
    BOWEL_GAS = 15
    BROWN_FAT = 16  # activated brown fat: hot in PET, fat in CT (not lesions)


CT_HU = {
    Tissue.AIR: -1000.0, Tissue.FAT: -100.0, Tissue.SOFT: 40.0, Tissue.LUNG: -800.0,
    Tissue.BONE: 800.0, Tissue.MARROW: 550.0, Tissue.BRAIN: 35.0, Tissue.BLOOD: 40.0,
    Tissue.MYOCARDIUM: 45.0, Tissue.LIVER: 60.0, Tissue.SPLEEN: 48.0, Tissue.KIDNEY: 35.0,
    Tissue.BLADDER: 10.0, Tissue.BOWEL: 25.0, Tissue.BOWEL_HOT: 25.0, Tissue.BOWEL_GAS: -700.0,
    Tissue.BROWN_FAT: -70.0,
}
# Organs may only replace these (never air or subcutaneous fat): keeps organs inside the body.
INTERIOR = (Tissue.SOFT, Tissue.LUNG, Tissue.BONE, Tissue.MARROW, Tissue.BLOOD)


def lookup_table(values: dict[Tissue, float]) -> np.ndarray:
    lut = np.zeros(len(Tissue), np.float32)
    for tissue, value in values.items():
        lut[int(tissue)] = value
    return lut


# ----------------------------------------------------------------------------- shapes (template mm)


def _inverse_square(radius: np.ndarray) -> np.ndarray:
    """1/r², with a huge value where the radius vanished (the point is then outside)."""
    radius = np.asarray(radius, np.float32)
    return np.where(radius > 0, 1.0 / np.maximum(radius, 1e-6) ** 2, np.float32(1e12)).astype(np.float32)


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # (z, y, x)
    semi: tuple[float, float, float]

    def bbox(self):
        c, s = np.asarray(self.centre), np.asarray(self.semi)
        return c - s, c + s

    def shrunk(self, mm: float) -> "Ellipsoid":
        return Ellipsoid(self.centre, tuple(max(s - mm, 0.0) for s in self.semi))

    def inside(self, z, y, x) -> np.ndarray:
        (cz, cy, cx), (az, ay, ax) = self.centre, self.semi
        return ((z - cz) / az) ** 2 + ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1.0


@dataclass(frozen=True)
class VerticalTube:
    """An elliptic tube along z whose half-widths follow piecewise-linear profiles of z."""

    z_knots: tuple[float, ...]
    half_y: tuple[float, ...]
    half_x: tuple[float, ...]
    centre_y: float = 0.0
    centre_x: float = 0.0
    shrink: float = 0.0  # mm taken off both half-widths (inner layers: muscle under the fat)

    def bbox(self):
        lo = (self.z_knots[0], self.centre_y - max(self.half_y), self.centre_x - max(self.half_x))
        hi = (self.z_knots[-1], self.centre_y + max(self.half_y), self.centre_x + max(self.half_x))
        return np.asarray(lo), np.asarray(hi)

    def shrunk(self, mm: float) -> "VerticalTube":
        return VerticalTube(self.z_knots, self.half_y, self.half_x, self.centre_y, self.centre_x, self.shrink + mm)

    def normalised_radius_sq(self, z, y, x) -> np.ndarray:
        zz = z.ravel()
        inv_y = _inverse_square(np.interp(zz, self.z_knots, self.half_y) - self.shrink).reshape(z.shape)
        inv_x = _inverse_square(np.interp(zz, self.z_knots, self.half_x) - self.shrink).reshape(z.shape)
        return (y - self.centre_y) ** 2 * inv_y + (x - self.centre_x) ** 2 * inv_x

    def inside(self, z, y, x) -> np.ndarray:
        in_z = (z >= self.z_knots[0]) & (z <= self.z_knots[-1])
        return (self.normalised_radius_sq(z, y, x) <= 1.0) & in_z


@dataclass(frozen=True)
class RibCage:
    """Bone stripes (one rib per ``period`` mm of z) in a ring just inside the torso's muscle."""

    torso: VerticalTube
    z_range: tuple[float, float]
    ring: tuple[float, float] = (0.80, 0.90)  # normalised radius of the ring
    period: float = 30.0
    duty: float = 0.35  # share of each period that is rib

    def bbox(self):
        lo, hi = self.torso.bbox()
        lo[0], hi[0] = self.z_range
        return lo, hi

    def inside(self, z, y, x) -> np.ndarray:
        r2 = self.torso.normalised_radius_sq(z, y, x)
        stripe = np.cos(2 * np.pi * z / self.period) > np.cos(np.pi * self.duty)
        in_z = (z >= self.z_range[0]) & (z <= self.z_range[1])
        return (r2 >= self.ring[0] ** 2) & (r2 <= self.ring[1] ** 2) & stripe & in_z


# The adult template. Torso profile: (z, half-depth y, half-width x) from crotch to neck top.
TORSO = VerticalTube(
    z_knots=(780, 900, 1030, 1150, 1300, 1420, 1450, 1475, 1560),
    half_y=(100, 110, 100, 105, 110, 105, 80, 58, 55),
    half_x=(150, 170, 150, 155, 165, 180, 120, 60, 55),
)
HEAD = Ellipsoid((1650, 0, 0), (110, 95, 75))
LEG_Z = (0, 100, 450, 800, 850)
LEG_R = (40, 45, 55, 85, 85)
LEG_X = 85.0
ARM_Z, ARM_R, ARM_X = (850, 1100, 1420), (35, 42, 45), 215.0
LUNG_LEFT = Ellipsoid((1290, -5, 85), (135, 80, 62))
LUNG_RIGHT = Ellipsoid((1290, -5, -85), (135, 80, 62))
HEART = Ellipsoid((1235, -35, 20), (60, 50, 55))
HEART_WALL_MM = 15.0
AORTA = VerticalTube((950, 1260), (12, 12), (12, 12), centre_y=45, centre_x=15)
LIVER = Ellipsoid((1130, -5, -60), (85, 85, 85))
SPLEEN = Ellipsoid((1150, 45, 90), (55, 30, 38))
KIDNEYS = (Ellipsoid((1060, 55, 65), (50, 25, 28)), Ellipsoid((1060, 55, -65), (50, 25, 28)))
SPINE = VerticalTube((880, 1560), (18, 18), (18, 18), centre_y=75)
PELVIS = (Ellipsoid((950, 40, 95), (55, 25, 50)), Ellipsoid((950, 40, -95), (55, 25, 50)))
FEMUR_Z, FEMUR_R = (450, 870), 15.0
TIBIA_Z, TIBIA_R = (40, 440), 13.0
HUMERUS_R = 11.0
SCALP_MM, SKULL_MM = 6.0, 7.0
BOWEL_BOX = ((940, -70, -90), (1060, 10, 90))  # (z, y, x) lo, hi where bowel loops wander
BLADDER_CENTRE = (880, -40, 0)
BROWN_FAT_BOX = ((1420, -20, 50), (1490, 30, 110))  # one side; mirrored in x
TEMPLATE_HEIGHT_MM = HEAD.centre[0] + HEAD.semi[0]


# ----------------------------------------------------------------------------- frame and canvas


@dataclass(frozen=True)
class BodyFrame:
    """physical (z, y, x) mm = offset + scale * template mm."""

    scale_zyx: tuple[float, float, float]
    offset_zyx: tuple[float, float, float]

    def to_physical(self, template_zyx) -> np.ndarray:
        return np.asarray(self.offset_zyx) + np.asarray(self.scale_zyx) * np.asarray(template_zyx, float)


def axis_coordinates_mm(geometry: Geometry) -> list[np.ndarray]:
    """Physical coordinates of the voxel centres along z, y and x (identity direction)."""
    origin_zyx = tuple(reversed(geometry.origin_xyz))
    return [o + s * np.arange(n) for o, s, n in zip(origin_zyx, geometry.spacing_zyx, geometry.shape_zyx)]


def box_slices(axes: list[np.ndarray], lo_zyx, hi_zyx) -> tuple[slice, slice, slice] | None:
    """Index slices of the voxels whose centres lie in [lo, hi]; ``None`` when there are none."""
    slices = []
    for axis, lo, hi in zip(axes, lo_zyx, hi_zyx):
        i0, i1 = int(np.searchsorted(axis, lo, "left")), int(np.searchsorted(axis, hi, "right"))
        if i1 <= i0:
            return None
        slices.append(slice(i0, i1))
    return tuple(slices)


class TissueCanvas:
    """A tissue-class map on one grid, painted shape by shape inside each shape's bounding box."""

    def __init__(self, geometry: Geometry, frame: BodyFrame):
        self.frame = frame
        self.axes = axis_coordinates_mm(geometry)
        scale, offset = frame.scale_zyx, frame.offset_zyx
        self.template_axes = [((a - o) / s).astype(np.float32) for a, o, s in zip(self.axes, offset, scale)]
        self.classes = np.zeros(geometry.shape_zyx, np.uint8)

    def paint(self, shape, tissue: Tissue, over: tuple[Tissue, ...] | None = None) -> None:
        lo, hi = shape.bbox()
        slices = box_slices(self.axes, self.frame.to_physical(lo), self.frame.to_physical(hi))
        if slices is None:
            return
        tz, ty, tx = (a[s] for a, s in zip(self.template_axes, slices))
        mask = shape.inside(tz[:, None, None], ty[None, :, None], tx[None, None, :])
        view = self.classes[slices]
        mask = np.broadcast_to(mask, view.shape)
        if over is not None:
            allowed = np.zeros(len(Tissue), bool)
            allowed[[int(t) for t in over]] = True
            mask = mask & allowed[view]
        np.copyto(view, np.uint8(tissue), where=mask)


# ----------------------------------------------------------------------------- per-case anatomy


@dataclass(frozen=True)
class AnatomyOptions:
    """Probabilities and ranges of the case-to-case variation."""

    scale_jitter: float = 0.06  # body size varies by ± this share per axis
    shift_mm: float = 10.0  # template mm, in-plane position of the body in the field of view
    fat_mm: tuple[float, float] = (8.0, 30.0)
    arms_probability: float = 0.5
    brown_fat_probability: float = 0.3
    myocardium_off_probability: float = 0.35
    bowel_loops: tuple[int, int] = (2, 4)
    bowel_segments: tuple[int, int] = (6, 12)
    hot_bowel_probability: float = 0.4
    # Bowel and brown-fat blobs are sized in physical mm (not template mm) so that they stay
    # round, and visible at the PET resolution, in a scaled-down body too.
    bowel_radius_mm: tuple[float, float] = (10.0, 15.0)
    brown_fat_radius_mm: tuple[float, float] = (6.0, 14.0)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@dataclass
class Anatomy:
    """One case's anatomy in template mm and its physiological uptake (SUV per tissue)."""

    fat_mm: float
    arms: bool
    bladder: Ellipsoid
    bowel: list[tuple[Ellipsoid, Tissue]]
    brown_fat: list[Ellipsoid]
    suv: dict[Tissue, float] = field(default_factory=dict)

    @classmethod
    def sample(cls, rng: np.random.Generator, options: AnatomyOptions, scale_zyx) -> "Anatomy":
        """Draw one case; ``scale_zyx`` (template → physical) sizes the blobs given in mm."""
        fat = float(rng.uniform(*options.fat_mm))
        arms = bool(rng.random() < options.arms_probability)
        bladder = Ellipsoid(BLADDER_CENTRE, tuple(float(v) for v in rng.uniform((25, 30, 35), (40, 45, 55))))
        per_mm = 1.0 / np.asarray(scale_zyx, float)  # physical mm → template mm per axis
        bowel = _sample_bowel(rng, options, per_mm)
        brown_fat = _sample_brown_fat(rng, options, per_mm) if rng.random() < options.brown_fat_probability else []
        blood = float(rng.uniform(1.3, 2.0))
        myocardium_on = rng.random() >= options.myocardium_off_probability
        liver = float(np.clip(rng.normal(2.0, 0.25), 1.4, 2.8))
        suv = {
            Tissue.FAT: float(rng.uniform(0.25, 0.4)), Tissue.SOFT: float(rng.uniform(0.6, 0.9)),
            Tissue.LUNG: float(rng.uniform(0.3, 0.5)), Tissue.BONE: 0.4,
            Tissue.MARROW: float(rng.uniform(1.4, 2.4)), Tissue.BRAIN: float(rng.uniform(6.0, 12.0)),
            Tissue.BLOOD: blood,
            Tissue.MYOCARDIUM: _loguniform(rng, 2.5, 12.0) if myocardium_on else 1.1 * blood,
            Tissue.LIVER: liver, Tissue.SPLEEN: liver * float(rng.uniform(0.75, 0.95)),
            Tissue.KIDNEY: float(rng.uniform(3.0, 7.0)), Tissue.BLADDER: _loguniform(rng, 8.0, 60.0),
            Tissue.BOWEL: float(rng.uniform(1.2, 2.5)), Tissue.BOWEL_HOT: float(rng.uniform(3.0, 7.0)),
            Tissue.BOWEL_GAS: 0.2, Tissue.BROWN_FAT: float(rng.uniform(2.5, 9.0)),
        }
        return cls(fat, arms, bladder, bowel, brown_fat, suv)

    def pet_lut(self) -> np.ndarray:
        return lookup_table(self.suv)

    def organ_centres(self) -> dict[str, tuple[float, float, float]]:
        """Template (z, y, x) centres of organs a test or a report may probe."""
        return {
            "brain": HEAD.centre, "liver": LIVER.centre, "spleen": SPLEEN.centre,
            "lung_left": LUNG_LEFT.centre, "lung_right": LUNG_RIGHT.centre,
            "bladder": self.bladder.centre, "spine": (1200.0, SPINE.centre_y, SPINE.centre_x),
        }

    def paint(self, canvas: TissueCanvas) -> np.ndarray:
        """Paint the whole body onto ``canvas`` (order matters: later shapes win)."""
        fat = self.fat_mm
        legs = [VerticalTube(LEG_Z, LEG_R, LEG_R, centre_x=side * LEG_X) for side in (-1, 1)]
        arms = [VerticalTube(ARM_Z, ARM_R, ARM_R, centre_x=side * ARM_X) for side in (-1, 1)] if self.arms else []
        for limb in [TORSO, *legs, *arms]:
            canvas.paint(limb, Tissue.FAT)
        canvas.paint(HEAD, Tissue.SOFT)
        canvas.paint(TORSO.shrunk(fat), Tissue.SOFT, over=(Tissue.FAT,))
        for limb in legs + arms:
            canvas.paint(limb.shrunk(0.5 * fat), Tissue.SOFT, over=(Tissue.FAT,))

        canvas.paint(LUNG_LEFT, Tissue.LUNG, over=INTERIOR)
        canvas.paint(LUNG_RIGHT, Tissue.LUNG, over=INTERIOR)
        canvas.paint(RibCage(TORSO.shrunk(fat), (1130, 1420)), Tissue.BONE, over=INTERIOR)
        canvas.paint(SPINE, Tissue.MARROW, over=INTERIOR)
        for wing in PELVIS:
            canvas.paint(wing, Tissue.MARROW, over=INTERIOR)
        for side in (-1, 1):
            x = side * LEG_X
            canvas.paint(VerticalTube(FEMUR_Z, (FEMUR_R,) * 2, (FEMUR_R,) * 2, centre_x=x), Tissue.BONE, over=INTERIOR)
            canvas.paint(VerticalTube(TIBIA_Z, (TIBIA_R,) * 2, (TIBIA_R,) * 2, centre_x=x), Tissue.BONE, over=INTERIOR)
            if self.arms:
                humerus = VerticalTube((ARM_Z[0], ARM_Z[-1]), (HUMERUS_R,) * 2, (HUMERUS_R,) * 2, centre_x=side * ARM_X)
                canvas.paint(humerus, Tissue.BONE, over=INTERIOR)
        canvas.paint(HEAD.shrunk(SCALP_MM), Tissue.BONE)
        canvas.paint(HEAD.shrunk(SCALP_MM + SKULL_MM), Tissue.BRAIN)

        canvas.paint(HEART, Tissue.MYOCARDIUM, over=INTERIOR)
        canvas.paint(HEART.shrunk(HEART_WALL_MM), Tissue.BLOOD, over=(Tissue.MYOCARDIUM,))
        canvas.paint(AORTA, Tissue.BLOOD, over=INTERIOR)
        for organ, tissue in ((LIVER, Tissue.LIVER), (SPLEEN, Tissue.SPLEEN), (self.bladder, Tissue.BLADDER)):
            canvas.paint(organ, tissue, over=INTERIOR)
        for kidney in KIDNEYS:
            canvas.paint(kidney, Tissue.KIDNEY, over=INTERIOR)
        for segment, tissue in self.bowel:
            canvas.paint(segment, tissue, over=(Tissue.SOFT, Tissue.BOWEL, Tissue.BOWEL_HOT))
        for blob in self.brown_fat:
            canvas.paint(blob, Tissue.BROWN_FAT, over=(Tissue.SOFT, Tissue.FAT))
        return canvas.classes

    def tissue_map(self, geometry: Geometry, frame: BodyFrame) -> np.ndarray:
        """uint8 (z, y, x) map of ``Tissue`` classes on ``geometry``."""
        return self.paint(TissueCanvas(geometry, frame))

    def tissue_at(self, points_zyx_mm: np.ndarray, frame: BodyFrame) -> np.ndarray:
        """The tissue class at each physical point (a one-voxel grid per point)."""
        out = []
        for z, y, x in np.atleast_2d(points_zyx_mm):
            point = Geometry((1, 1, 1), (1.0, 1.0, 1.0), (float(x), float(y), float(z)), (1, 0, 0, 0, 1, 0, 0, 0, 1))
            out.append(int(self.tissue_map(point, frame)[0, 0, 0]))
        return np.asarray(out, np.uint8)


def _sample_bowel(rng: np.random.Generator, options: AnatomyOptions, per_mm: np.ndarray) -> list[tuple[Ellipsoid, Tissue]]:
    """Bowel loops as random walks of overlapping spheres in the lower abdomen, some hot, some
    with gas pockets: physiological hot spots a model must not call lesions."""
    lo, hi = np.asarray(BOWEL_BOX[0], float), np.asarray(BOWEL_BOX[1], float)
    segments: list[tuple[Ellipsoid, Tissue]] = []
    for _ in range(int(rng.integers(options.bowel_loops[0], options.bowel_loops[1] + 1))):
        tissue = Tissue.BOWEL_HOT if rng.random() < options.hot_bowel_probability else Tissue.BOWEL
        semi = float(rng.uniform(*options.bowel_radius_mm)) * per_mm
        point = rng.uniform(lo, hi)
        direction = rng.normal(size=3)
        for _ in range(int(rng.integers(options.bowel_segments[0], options.bowel_segments[1] + 1))):
            segments.append((Ellipsoid(tuple(point), tuple(semi)), tissue))
            if rng.random() < 0.2:
                segments.append((Ellipsoid(tuple(point), tuple(0.5 * semi)), Tissue.BOWEL_GAS))
            direction = direction / np.linalg.norm(direction) + 0.8 * rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            step = 1.2 * semi * direction
            bounced = (point + step < lo) | (point + step > hi)
            step[bounced] *= -1  # bounce off the box walls so loops stay in the abdomen
            point = np.clip(point + step, lo, hi)
    return segments


def _sample_brown_fat(rng: np.random.Generator, options: AnatomyOptions, per_mm: np.ndarray) -> list[Ellipsoid]:
    """Symmetric clusters of small blobs in the supraclavicular fat."""
    lo, hi = np.asarray(BROWN_FAT_BOX[0], float), np.asarray(BROWN_FAT_BOX[1], float)
    blobs = []
    for _ in range(int(rng.integers(3, 7))):
        z, y, x = rng.uniform(lo, hi)
        semi = tuple(float(v) for v in rng.uniform(*options.brown_fat_radius_mm, size=3) * per_mm)
        blobs += [Ellipsoid((z, y, x), semi), Ellipsoid((z, y, -x), semi)]
    return blobs
