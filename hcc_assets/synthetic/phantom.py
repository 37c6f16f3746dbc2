"""A deformable abdomen phantom defined in LPS world millimetres.

Every synthetic series and every reference mask samples this one truth, so they agree whatever
the slice geometry. LPS: x grows toward the patient's left, y toward posterior, z toward head;
the liver therefore sits at negative x, the spleen at positive x and positive y.

Shapes are smooth deformed ellipsoids ("blobs") and axial prisms (body wall, spine, vessels),
painted in order; later layers win. Lesions are painted last and only over liver.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


class Tissue(enum.IntEnum):
    AIR = 0
    SOFT = 1  # muscle, bowel, everything in the abdomen without its own class
    FAT = 2
    LIVER = 3
    SPLEEN = 4
    KIDNEY = 5
    BONE = 6
    CSF = 7
    VESSEL = 8
    LESION = 9


LABEL_BACKGROUND, LABEL_LIVER, LABEL_SPLEEN = 0, 1, 2
# Reference-mask label of each tissue: lesions are part of the liver.
TISSUE_TO_LABEL = np.zeros(len(Tissue), np.uint8)
TISSUE_TO_LABEL[[Tissue.LIVER, Tissue.LESION]] = LABEL_LIVER
TISSUE_TO_LABEL[Tissue.SPLEEN] = LABEL_SPLEEN


@dataclass(frozen=True, eq=False)
class Blob:
    """Ellipsoid whose surface radius is modulated by a few smooth waves over the direction."""

    center: np.ndarray  # (3,) mm
    axes: np.ndarray  # (3, 3) rotation, columns are the blob's axes in world
    semi_axes: np.ndarray  # (3,) mm
    wave_vectors: np.ndarray  # (n, 3)
    wave_amplitudes: np.ndarray  # (n,)
    wave_phases: np.ndarray  # (n,)
    planar = False  # depends on all three coordinates (class attribute, not a field)

    @property
    def radius(self) -> float:
        return float(self.semi_axes.max() * (1.0 + np.abs(self.wave_amplitudes).sum()))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.center - self.radius, self.center + self.radius

    def contains(self, points: np.ndarray) -> np.ndarray:
        local = ((points - self.center) @ self.axes) / self.semi_axes
        r = np.sqrt(np.einsum("...i,...i->...", local, local))
        # The waves move the surface by at most `slack`: only that shell needs them evaluated.
        slack = np.abs(self.wave_amplitudes).sum()
        inside = r < 1.0 - slack
        shell = np.flatnonzero((r >= 1.0 - slack) & (r < 1.0 + slack))
        direction = local.reshape(-1, 3)[shell] / r.reshape(-1)[shell, None]
        waves = np.sin(direction @ self.wave_vectors.T + self.wave_phases) @ self.wave_amplitudes
        inside.reshape(-1)[shell] = r.reshape(-1)[shell] < 1.0 + waves
        return inside

    def grown(self, margin_mm: float) -> Blob:
        return Blob(
            self.center,
            self.axes,
            self.semi_axes + margin_mm,
            self.wave_vectors,
            self.wave_amplitudes,
            self.wave_phases,
        )


@dataclass(frozen=True, eq=False)
class Prism:
    """Axial cross-section (ellipse with angular harmonics 2..4), infinite along z."""

    center_xy: np.ndarray  # (2,)
    semi_axes_xy: np.ndarray  # (2,)
    harmonics: np.ndarray  # (3, 2): cos/sin amplitudes of harmonics 2, 3, 4
    planar = True  # depends on x and y only

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = self.semi_axes_xy * (1.0 + np.abs(self.harmonics).sum())
        lo, hi = self.center_xy - half, self.center_xy + half
        return np.r_[lo, -np.inf], np.r_[hi, np.inf]

    def contains(self, points: np.ndarray) -> np.ndarray:
        x = (points[..., 0] - self.center_xy[0]) / self.semi_axes_xy[0]
        y = (points[..., 1] - self.center_xy[1]) / self.semi_axes_xy[1]
        rho = np.sqrt(x * x + y * y)
        slack = np.abs(self.harmonics).sum()
        inside = rho < 1.0 - slack
        shell = np.flatnonzero((rho >= 1.0 - slack) & (rho < 1.0 + slack))
        if shell.size:
            # cos/sin of 2θ..4θ by complex powers: no trigonometry.
            rho_s = rho.reshape(-1)[shell]
            c1, s1 = x.reshape(-1)[shell] / rho_s, y.reshape(-1)[shell] / rho_s
            c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
            c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
            c4, s4 = c2 * c2 - s2 * s2, 2 * c2 * s2
            (a2, b2), (a3, b3), (a4, b4) = self.harmonics
            surface = 1.0 + a2 * c2 + b2 * s2 + a3 * c3 + b3 * s3 + a4 * c4 + b4 * s4
            inside.reshape(-1)[shell] = rho_s < surface
        return inside


@dataclass(frozen=True, eq=False)
class Outside:
    """Everything outside `inner`, looked at only within `outer`'s bounds.

    With `over` = the body's tissues this paints the subcutaneous fat ring without evaluating
    the outer body surface a second time.
    """

    inner: Prism
    outer: Prism
    planar = True  # depends on x and y only

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.outer.bounds()

    def contains(self, points: np.ndarray) -> np.ndarray:
        return ~self.inner.contains(points)


Shape = Blob | Prism | Outside


@dataclass(frozen=True, eq=False)
class Layer:
    tissue: Tissue
    shape: Shape
    over: tuple[Tissue, ...] | None = None  # paint only over these tissues; None = over anything


# A region provider maps a world bounding box (and whether the shape ignores z) to blocks of
# (index into the output arrays, points there); a planar block may hold a single slice that
# stands for the whole block.
# The index is flat voxel numbers (point lists) or a tuple of slices (grids).
BlockIndex = npt.NDArray[np.intp] | tuple[slice, ...]
Block = tuple[BlockIndex, np.ndarray]
Region = Callable[[np.ndarray, np.ndarray, bool], list[Block]]


@dataclass(frozen=True, eq=False)
class Phantom:
    layers: tuple[Layer, ...]
    lesions: tuple[Blob, ...]
    center: np.ndarray  # (3,) body centre in x/y, liver centre in z: where a scan is planned

    def tissue_at(self, points_lps: np.ndarray, lesions: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Tissue codes and lesion ids (0 = none, n = n-th lesion) at points (..., 3) in LPS mm."""
        points = np.asarray(points_lps, dtype=float)
        flat = points.reshape(-1, 3)

        def region(lo: np.ndarray, hi: np.ndarray, planar: bool) -> list[Block]:
            index = np.flatnonzero(np.all((flat >= lo) & (flat <= hi), axis=1))
            return [(index, flat[index])]

        tissue, lesion_id = self._paint(flat.shape[:1], region, lesions)
        return tissue.reshape(points.shape[:-1]), lesion_id.reshape(points.shape[:-1])

    def labels_at(self, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference labels (0 background, 1 liver incl. lesions, 2 spleen) and lesion ids."""
        tissue, lesion_id = self.tissue_at(points_lps)
        return TISSUE_TO_LABEL[tissue], lesion_id

    def tissue_on_grid(self, affine_lps: np.ndarray, shape_kji: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Tissue and lesion ids at the voxel centres of a grid, arrays indexed [k, j, i].

        Same result as `tissue_at` on the grid's points, but each shape visits only the voxels
        its bounding box can reach (slice by slice for the z-invariant prisms of an oblique
        grid), and on axial grids prisms are evaluated on one slice: that keeps a 256x256x50
        volume cheap.
        """
        affine = np.asarray(affine_lps, dtype=float)
        extent = np.array(shape_kji[::-1])  # (ni, nj, nk)
        axial = not np.any(affine[:2, 2])
        # Slice planes far from axial (coronal, sagittal) cannot be walked in x/y: go 3-D.
        walkable = abs(np.linalg.det(affine[:2, :2])) > 0.1 * np.prod(np.linalg.norm(affine[:2, :2], axis=0))
        in_plane = np.linalg.inv(affine[:2, :2]) if walkable else None  # (x, y) -> (i, j)
        inverse = np.linalg.inv(affine)
        cache: dict[tuple, np.ndarray] = {}  # body and fat ring share blocks: build points once

        def points(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
            key = (*start, *stop)
            if key not in cache:
                i, j, k = (np.arange(a, b, dtype=float) for a, b in zip(start, stop))
                cache[key] = (
                    affine[:3, 3]
                    + k[:, None, None, None] * affine[:3, 2]
                    + j[None, :, None, None] * affine[:3, 1]
                    + i[None, None, :, None] * affine[:3, 0]
                )
            return cache[key]

        def index(start: np.ndarray, stop: np.ndarray) -> tuple[slice, ...]:
            return tuple(slice(a, b) for a, b in zip(start[::-1], stop[::-1]))

        def box(corners_ijk: np.ndarray, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
            start = np.clip(np.floor(corners_ijk.min(0)).astype(int), 0, extent[:2])
            stop = np.clip(np.ceil(corners_ijk.max(0)).astype(int) + 1, 0, extent[:2])
            return np.r_[start, k0], np.r_[stop, k1]

        def region(lo: np.ndarray, hi: np.ndarray, planar: bool) -> list[Block]:
            lo, hi = np.clip(lo, -1e6, 1e6), np.clip(hi, -1e6, 1e6)
            if not (planar and walkable):
                corners = np.array(
                    [[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
                )
                ijk = (corners @ inverse.T)[:, :3]
                start, stop = box(ijk[:, :2], 0, 0)
                k0, k1 = np.clip([np.floor(ijk[:, 2].min()), np.ceil(ijk[:, 2].max()) + 1], 0, extent[2]).astype(int)
                start[2], stop[2] = k0, k1
                return [(index(start, stop), points(start, stop))]
            assert in_plane is not None  # walkable, so the in-plane inverse exists
            corners_xy = np.array([[a, b] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])])
            slices = [0] if axial else range(extent[2])
            blocks: list[Block] = []
            for k in slices:
                origin_xy = affine[:2, 3] + k * affine[:2, 2]
                start, stop = box((corners_xy - origin_xy) @ in_plane.T, k, k + 1)
                if np.all(stop > start):
                    where = index(start, np.r_[stop[:2], extent[2] if axial else k + 1])
                    blocks.append((where, points(start, stop)))
            return blocks

        return self._paint(tuple(shape_kji), region, lesions=True)

    def _paint(self, shape: tuple[int, ...], region: Region, lesions: bool) -> tuple[np.ndarray, np.ndarray]:
        tissue = np.zeros(shape, np.uint8)
        lesion_id = np.zeros(shape, np.uint8)
        for layer, number in self._layers_with_lesions(lesions):
            for where, points in region(*layer.shape.bounds(), layer.shape.planar):
                if points.size == 0:
                    continue
                block = tissue[where]
                # A single-slice planar block stands for all slices of its index: broadcast.
                inside = np.broadcast_to(layer.shape.contains(points), block.shape).copy()
                if layer.over is not None:
                    inside &= _allowed(layer.over)[block]
                block[inside] = layer.tissue
                tissue[where] = block
                if number:
                    ids = lesion_id[where]
                    ids[inside] = number
                    lesion_id[where] = ids
        return tissue, lesion_id

    def _layers_with_lesions(self, lesions: bool) -> Iterator[tuple[Layer, int]]:
        yield from ((layer, 0) for layer in self.layers)
        if lesions:
            for number, blob in enumerate(self.lesions, start=1):
                yield Layer(Tissue.LESION, blob, over=(Tissue.LIVER,)), number


def _allowed(tissues: tuple[Tissue, ...]) -> np.ndarray:
    """Lookup table tissue code -> may be painted over (faster than np.isin on big blocks)."""
    table = np.zeros(256, bool)
    table[list(tissues)] = True
    return table


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _blob(
    rng: np.random.Generator, center, semi_axes, max_tilt_deg: float, bumpiness: float, yaw_deg: float = 0.0
) -> Blob:
    tilt = rng.uniform(-max_tilt_deg, max_tilt_deg, 3) + np.array([0.0, 0.0, yaw_deg])
    n_waves = 3
    return Blob(
        center=np.asarray(center, float),
        axes=rotation_matrix(tilt),
        semi_axes=np.asarray(semi_axes, float),
        wave_vectors=rng.normal(0.0, 1.6, (n_waves, 3)),
        wave_amplitudes=rng.uniform(0.3, 1.0, n_waves) * bumpiness,
        wave_phases=rng.uniform(0, 2 * np.pi, n_waves),
    )


def _circle(x: float, y: float, radius_x: float, radius_y: float | None = None) -> Prism:
    return Prism(np.array([x, y]), np.array([radius_x, radius_y or radius_x]), np.zeros((3, 2)))


def random_phantom(
    anatomy_rng: np.random.Generator, lesion_rng: np.random.Generator, n_lesions: int, lungs: bool = False
) -> Phantom:
    """A plausible abdomen with per-patient size, shape and position; `n_lesions` HCC lesions.

    Anatomy and lesions draw from separate generators so a patient's organs do not change
    with whether (or how many) lesions they get. `lungs`: the lung bases above the diaphragm
    (signal void, as on T2), drawn after every other organ, so the rest of the anatomy is the
    same with or without them; without them the slices above the liver dome show soft tissue.
    """
    u = anatomy_rng.uniform
    body_x, body_y = u(-10, 10), u(-10, 10)
    z_liver = u(-40, 40)  # table position
    semi_body = np.array([u(155, 195), u(112, 140)])
    fat = u(10, 30)  # subcutaneous fat thickness; NAFLD cohorts run heavy
    harmonics = anatomy_rng.normal(0, 0.025, (3, 2))
    outer = Prism(np.array([body_x, body_y]), semi_body, harmonics)
    inner = Prism(outer.center_xy, semi_body - fat, harmonics)

    spine_y = body_y + semi_body[1] - fat - u(35, 45)
    vertebra = u(17, 21)
    spine = _circle(body_x, spine_y, vertebra)
    canal = _circle(body_x, spine_y + vertebra + 9, 7)
    aorta = _circle(body_x + u(15, 22), spine_y - vertebra - 12, u(9, 12))
    ivc = _circle(body_x - u(20, 26), spine_y - vertebra - 18, u(12, 15), u(8, 11))

    kidneys = [
        _blob(
            anatomy_rng,
            [body_x + side * u(60, 72), spine_y + u(-15, -5), z_liver - u(70, 90)],
            [u(22, 28), u(25, 32), u(48, 58)],
            10,
            0.05,
            yaw_deg=side * u(10, 25),
        )
        for side in (-1, 1)
    ]
    spleen = _blob(
        anatomy_rng,
        [body_x + u(70, 88), body_y + u(25, 45), z_liver + u(10, 30)],
        [u(25, 33), u(45, 58), u(45, 60)],
        10,
        0.06,
        yaw_deg=u(30, 50),
    )
    right_lobe = _blob(
        anatomy_rng, [body_x - u(55, 70), body_y - u(0, 12), z_liver], [u(70, 88), u(62, 75), u(65, 85)], 10, 0.06
    )
    left_lobe = _blob(
        anatomy_rng,
        [body_x + u(5, 20), body_y - u(35, 50), z_liver + u(10, 25)],
        [u(45, 60), u(22, 30), u(40, 55)],
        10,
        0.06,
    )

    soft_only = (Tissue.SOFT,)
    domes = (_top(right_lobe), _top(spleen))
    lung_layers = _lung_bases(anatomy_rng, body_x, body_y, domes) if lungs else ()

    layers = (
        Layer(Tissue.SOFT, outer),
        *(Layer(Tissue.FAT, k.grown(8.0), over=soft_only) for k in kidneys),  # perirenal fat
        *(Layer(Tissue.KIDNEY, k) for k in kidneys),
        Layer(Tissue.SPLEEN, spleen),
        Layer(Tissue.LIVER, right_lobe),
        Layer(Tissue.LIVER, left_lobe),
        Layer(Tissue.VESSEL, aorta),
        Layer(Tissue.VESSEL, ivc),
        Layer(Tissue.BONE, spine),
        Layer(Tissue.CSF, canal),
        # Then the fat ring clips organs that reach the body wall.
        Layer(Tissue.FAT, Outside(inner, outer), over=tuple(t for t in Tissue if t != Tissue.AIR)),
        *lung_layers,
    )
    center = np.array([body_x, body_y, z_liver])
    anatomy = Phantom(layers=layers, lesions=(), center=center)
    lesions = _place_lesions(anatomy, right_lobe, lesion_rng, n_lesions, z_liver)
    return Phantom(layers=layers, lesions=lesions, center=center)


def _top(blob: Blob) -> float:
    """Height (LPS z) of a blob's dome, ignoring its tilt and surface waves."""
    return float(blob.center[2] + blob.semi_axes[2])


def _lung_bases(
    anatomy_rng: np.random.Generator, body_x: float, body_y: float, domes: tuple[float, float]
) -> tuple[Layer, ...]:
    """Right and left lung bases, painted last over soft tissue only: each dips 20-60 mm below its
    dome (liver, spleen), which it leaves whole, so it wraps the dome as the costophrenic recesses
    do, inside the body wall (the fat ring), spine and vessels."""
    u = anatomy_rng.uniform
    return tuple(
        Layer(
            Tissue.AIR,
            over=(Tissue.SOFT,),
            shape=_blob(
                anatomy_rng,
                [body_x + side * u(50, 70), body_y + u(-5, 15), top + u(50, 70)],
                [u(55, 70), u(70, 90), u(90, 110)],
                8,
                0.05,
            ),
        )
        for side, top in zip((-1, 1), domes)
    )


def _sphere_directions(n: int) -> np.ndarray:
    """Evenly spread unit vectors (Fibonacci sphere)."""
    index = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * index / n)
    azimuth = np.pi * (1 + 5**0.5) * index
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


# Lesions stay within this distance (mm, along z) of the liver centre, where even the shortest
# default scan (26 slices of 5.5 mm, centred within 15 mm of it) sees them. Scans must not be
# planned around lesions: that would put label signal into a null cohort.
LESION_Z_BAND = 50.0
# Drawn lesion radius (mm): 3-7 cm across, the size of the resected tumours of TCGA-LIHC (the
# study's HCC source) rather than of surveillance-detected early HCC. Lesions 1-3.5 cm across
# (the former 5-17.5 mm) are 0.004-0.1% of a 128x128x64 volume: invisible to the deep arm's
# globally pooled features (benchmarks/classifier_separation.py). A lesion that does not fit
# shrinks, down to MIN_LESION_RADIUS.
LESION_RADIUS = (15.0, 35.0)
MIN_LESION_RADIUS = 5.0


def _place_lesions(
    anatomy: Phantom, lobe: Blob, rng: np.random.Generator, count: int, z_center: float
) -> tuple[Blob, ...]:
    """Lesions (see LESION_RADIUS) whose bounding sphere lies in liver and clear of each other."""
    probe = np.concatenate([_sphere_directions(160), 0.6 * _sphere_directions(40), np.zeros((1, 3))])
    placed: list[Blob] = []
    for _ in range(count):
        radius = rng.uniform(*LESION_RADIUS)
        for attempt in range(400):
            if attempt and attempt % 100 == 0:
                radius = max(MIN_LESION_RADIUS, radius * 0.8)  # crowded or small liver: try smaller
            direction = rng.normal(size=3)
            offset = direction / np.linalg.norm(direction) * rng.uniform(0, 0.8) ** (1 / 3)
            center = lobe.center + lobe.axes @ (offset * lobe.semi_axes)
            blob = _blob(rng, center, radius * rng.uniform(0.85, 1.15, 3), 90, 0.03)
            if abs(blob.center[2] - z_center) + blob.radius > LESION_Z_BAND:
                continue
            if any(np.linalg.norm(blob.center - p.center) < blob.radius + p.radius + 2 for p in placed):
                continue
            tissue, _ = anatomy.tissue_at(blob.center + blob.radius * probe, lesions=False)
            if np.all(tissue == Tissue.LIVER):
                placed.append(blob)
                break
    return tuple(placed)
