"""Pure-numpy synthesis of breast images: compressed-breast mammograms (FFDM / CEM LE and
DES) and breast ultrasound, with a parametric lesion shared by every view.

Everything here returns *physical* signals as float32 in [0, 1] (bright = dense in LE /
FFDM, bright = iodine uptake in DES, bright = echogenic in US). Vendor intensity curves,
bit depth and detector noise belong to a site and are applied by :mod:`generate`.

Frames and conventions
----------------------
Mammograms are rendered in a canonical frame with the chest wall at column 0 and the
nipple pointing to +x (how the left breast is stored); :func:`render_mammogram` mirrors
right breasts so their chest wall is on the image's right, and mirrors the outline with
them. Lesion outlines are in stored-image pixels (x = column, y = row). Ellipse angles
are in degrees from the +x (column) axis towards the +y (row) axis, as in OpenCV.

A lesion is described once (:class:`LesionSpec`, in millimetres, view independent) and
placed per view with its own rotation and a small scale change, because CC and MLO are
two projections of the same 3-D mass: same size and same distance from the nipple, but a
different 2-D outline orientation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("round", "oval", "irregular")
MARGINS = ("circumscribed", "irregular", "spiculated")
ENHANCEMENTS = ("homogeneous", "heterogeneous", "rim")

# Fraction of the breast area covered by dense tissue for ACR density a..d.
DENSE_FRACTION = {"a": 0.08, "b": 0.25, "c": 0.50, "d": 0.75}

# Physical signal levels of the LE / FFDM image (display sense, before the vendor curve).
AIR, FAT, DENSE, SKIN, PECTORAL = 0.03, 0.30, 0.78, 0.50, 0.74
# Even the densest-looking region is not dense through the whole compressed thickness:
# there the glandular tissue fills GLAND_MAX_FRACTION of the path (and reads as DENSE).
# A mass replaces part of the remaining fat, so it still adds attenuation on top of
# glandular tissue (partly masked) instead of vanishing into it.
GLAND_MAX_FRACTION = 0.65
FULL_DENSE = FAT + (DENSE - FAT) / GLAND_MAX_FRACTION  # signal of a path that is dense throughout
# DES baseline inside / outside the breast; glandular residual left after recombination.
DES_BASE, DES_AIR, DES_GLANDULAR_RESIDUAL = 0.32, 0.22, 0.02


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # = 1 / (1 + exp(-x)), without overflow warnings


# --------------------------------------------------------------------------- textures


@functools.lru_cache(maxsize=16)
def _power_law_filter(
    h: int, w: int, beta: float, spacing_mm: float, corner_mm: float, anisotropy: float
) -> np.ndarray:
    """Amplitude filter ~ f^(-beta/2) (so power ~ f^-beta), flattened below 1/corner_mm so one
    huge blob cannot dominate the breast; frequencies in cycles/mm so texture is physical."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None] / spacing_mm
    fx = np.fft.fftfreq(w).astype(np.float32)[None, :] / spacing_mm
    f2 = (fx * anisotropy) ** 2 + (fy / anisotropy) ** 2 + (1.0 / corner_mm) ** 2
    amp = f2 ** (-beta / 4.0)
    amp[0, 0] = 0.0
    return amp.astype(np.float32)


def power_law_pair(
    shape: tuple[int, int],
    rng: np.random.Generator,
    beta: float = 3.0,
    spacing_mm: float = 1.0,
    corner_mm: float = 40.0,
    anisotropy: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Two independent zero-mean, unit-variance 1/f^beta fields from one complex FFT.

    Filtering complex white noise gives two independent real fields (real and imaginary
    parts) for the price of one transform; the generator is called thousands of times.
    """
    h, w = shape
    amp = _power_law_filter(h, w, float(beta), float(spacing_mm), float(corner_mm), float(anisotropy))
    noise = rng.standard_normal((h, w), dtype=np.float32) + 1j * rng.standard_normal((h, w), dtype=np.float32)
    field = np.fft.ifft2(noise.astype(np.complex64) * amp)
    a, b = field.real, field.imag
    return (a - a.mean()) / (a.std() + 1e-12), (b - b.mean()) / (b.std() + 1e-12)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ViewGeometry:
    """Outline of the compressed breast in one view, in pixels of the canonical frame.

    The skin edge is the superellipse ``(x/depth)^exponent + v^2 = 1`` with
    ``v = (y - nipple_y) / half`` and ``half = half_up`` above the nipple line,
    ``half_down`` below: symmetric-ish for CC, long towards the axilla for MLO.
    """

    depth: float
    nipple_y: float
    half_up: float
    half_down: float
    exponent: float
    skin: float  # skin thickness, px
    falloff: float  # width of the thickness roll-off at the periphery, px
    pect_w: float = 0.0  # MLO pectoral muscle: width along the top edge, px (0 = none)
    pect_h: float = 0.0  # ... and height along the chest wall, px
    pect_curve: float = 1.0  # >1 bows the muscle edge outwards


def sample_geometry(
    rng: np.random.Generator, view: str, hw: tuple[int, int], spacing_mm: float, size: float, nipple_shift: float
) -> ViewGeometry:
    """A plausible outline for ``view``; ``size`` in [0, 1] is the patient's breast size, so
    CC and MLO (and, nearly, left and right) of one patient are consistent."""
    h, w = hw
    fov_w = w * spacing_mm
    fov_h = h * spacing_mm
    depth_mm = min((80.0 + 70.0 * size) * (1.12 if view == "MLO" else 1.0), 0.85 * fov_w)
    if view == "CC":
        half = min(0.30 + 0.12 * size, 0.46) * fov_h
        up = half * rng.uniform(0.92, 1.08)
        down = half * rng.uniform(0.92, 1.08)
        nipple_y = h * (0.5 + nipple_shift)
        pect = (0.0, 0.0, 1.0)
    else:
        nipple_y = h * (0.56 + nipple_shift)
        up = nipple_y * spacing_mm * rng.uniform(1.15, 1.35)  # reaches the axilla at the top edge
        down = min(0.30 + 0.10 * size, 0.40) * fov_h
        pect = (
            depth_mm / spacing_mm * rng.uniform(0.30, 0.45),
            h * rng.uniform(0.35, 0.55),
            rng.uniform(1.0, 1.4),
        )
    return ViewGeometry(
        depth=depth_mm / spacing_mm,
        nipple_y=nipple_y,
        half_up=up / spacing_mm,
        half_down=down / spacing_mm,
        exponent=rng.uniform(1.6, 2.4),
        skin=rng.uniform(1.2, 2.0) / spacing_mm,
        falloff=rng.uniform(8.0, 14.0) / spacing_mm,
        pect_w=pect[0],
        pect_h=pect[1],
        pect_curve=pect[2],
    )


def _edge_terms(
    g: ViewGeometry, x: np.ndarray | np.float64, y: np.ndarray | np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """(rho, distance to skin in px): rho < 1 inside; distance from a first-order expansion."""
    half = np.where(y < g.nipple_y, g.half_up, g.half_down)
    v = (y - g.nipple_y) / half
    xr = np.maximum(x, 0.0) / g.depth
    rho = xr**g.exponent + v * v
    grad_x = g.exponent * np.maximum(xr, 1e-6) ** (g.exponent - 1.0) / g.depth
    grad_y = 2.0 * v / half
    dist = (1.0 - rho) / np.sqrt(grad_x * grad_x + grad_y * grad_y + 1e-12)
    return rho, dist


def _pectoral(g: ViewGeometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed pectoral indicator: > 0 inside the muscle triangle (MLO top chest-wall corner)."""
    if g.pect_w <= 0:
        return np.full(np.broadcast(x, y).shape, -1.0, dtype=np.float32)
    return 1.0 - (np.maximum(x, 0.0) / g.pect_w) ** g.pect_curve - y / g.pect_h


def point_clearance(g: ViewGeometry, x: float, y: float) -> float:
    """Distance in px from (x, y) to the nearest of skin, chest wall and pectoral muscle."""
    _, dist = _edge_terms(g, np.float64(x), np.float64(y))
    clear = min(float(dist), x)
    if g.pect_w > 0:
        # the pectoral edge as a line from (pect_w, 0) to (0, pect_h)
        nx, ny = 1.0 / g.pect_w, 1.0 / g.pect_h
        d_pect = (x * nx + y * ny - 1.0) / math.hypot(nx, ny)
        clear = min(clear, d_pect)
    return clear


# --------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class LesionSpec:
    """One mass, view independent, in millimetres. Descriptors are the *true* ones."""

    shape: str  # round | oval | irregular
    margin: str  # circumscribed | irregular | spiculated
    enhancement: str  # homogeneous | heterogeneous | rim
    radius_mm: float  # equivalent radius
    aspect: float  # long / short axis of the base ellipse (1 = round)
    lobes: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase) of the outline (irregular)
    ripples: tuple[tuple[int, float, float], ...]  # fine edge modulation (irregular margin)
    edge_mm: float  # 10-90% width of the edge transition (sharp = circumscribed)
    spicules: tuple[tuple[float, float, float], ...]  # (angle rad, length in radii, width mm)
    enh_strength: float  # DES enhancement amplitude (signal units)
    le_contrast: float  # dense fraction the mass adds in LE
    rim_core: float  # core / rim uptake ratio of a rim-enhancing mass
    us_echo_db: float  # echogenicity of the mass relative to glandular tissue (hypoechoic < 0)
    us_orientation: str  # parallel | not_parallel (taller than wide)
    us_posterior: str  # none | shadowing | enhancement


def lesion_radius(spec: LesionSpec, theta: np.ndarray, with_ripples: bool = True) -> np.ndarray:
    """Outline radius (mm) in the lesion's own frame at angle ``theta``."""
    a = math.sqrt(spec.aspect)
    rx, ry = spec.radius_mm * a, spec.radius_mm / a
    r = 1.0 / np.sqrt((np.cos(theta) / rx) ** 2 + (np.sin(theta) / ry) ** 2)
    mod = np.ones_like(theta)
    for k, amp, ph in spec.lobes + (spec.ripples if with_ripples else ()):
        mod = mod + amp * np.cos(k * theta + ph)
    return r * np.maximum(mod, 0.45)


@dataclass(frozen=True)
class Placement:
    """Where a lesion sits in one image: centre (canonical px), rotation, scale, px size."""

    cx: float
    cy: float
    rot: float  # radians
    scale: float
    spacing_mm: float


@dataclass(frozen=True)
class Outline:
    """A lesion outline as the annotation CSV writes it (stored-image pixels)."""

    kind: str  # "ellipse" | "polygon"
    points: tuple[tuple[float, float], ...]  # ellipse: ((cx, cy), (rx, ry)); polygon: vertices
    angle_deg: float = 0.0

    def mirrored(self, width: int) -> Outline:
        """The outline after mirroring the image left-right (x -> width - 1 - x)."""
        if self.kind == "ellipse":
            (cx, cy), (rx, ry) = self.points
            return Outline("ellipse", ((width - 1 - cx, cy), (rx, ry)), -self.angle_deg)
        return Outline(self.kind, tuple((width - 1 - x, y) for x, y in self.points))

    def roi_text(self) -> str:
        """The ``roi`` cell of docs/annotations.md."""
        if self.kind == "ellipse":
            (cx, cy), (rx, ry) = self.points
            return f"{cx:.1f} {cy:.1f} {rx:.1f} {ry:.1f} {self.angle_deg:.1f}"
        return ";".join(f"{x:.1f} {y:.1f}" for x, y in self.points)

    def mask(self, hw: tuple[int, int]) -> np.ndarray:
        """Boolean mask of the outline's interior (used by tests and the learnability check)."""
        yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float64)
        if self.kind == "ellipse":
            (cx, cy), (rx, ry) = self.points
            t = math.radians(self.angle_deg)
            u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
            v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
            return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        pts = np.asarray(self.points)
        inside = np.zeros(hw, dtype=bool)
        x0, y0 = pts[:, 0], pts[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for a, b, c, d in zip(x0, y0, x1, y1):  # even-odd rule, one edge at a time
            cond = (b > yy) != (d > yy)
            with np.errstate(divide="ignore", invalid="ignore"):
                xint = a + (yy - b) * (c - a) / (d - b)
            inside ^= cond & (xx < xint)
        return inside


def lesion_outline(spec: LesionSpec, pl: Placement, n_vertices: int = 28) -> Outline:
    """Ellipse for round / oval masses, polygon (no edge ripples: readers trace the
    mass body, not its spicules) for irregular ones."""
    mm2px = pl.scale / pl.spacing_mm
    if spec.shape != "irregular":
        a = math.sqrt(spec.aspect)
        rx, ry = spec.radius_mm * a * mm2px, spec.radius_mm / a * mm2px
        return Outline("ellipse", ((pl.cx, pl.cy), (rx, ry)), math.degrees(pl.rot))
    theta = np.linspace(0.0, 2 * math.pi, n_vertices, endpoint=False)
    r = lesion_radius(spec, theta, with_ripples=False) * mm2px
    xs = pl.cx + r * np.cos(theta + pl.rot)
    ys = pl.cy + r * np.sin(theta + pl.rot)
    return Outline("polygon", tuple((float(x), float(y)) for x, y in zip(xs, ys)))


@dataclass
class LesionMaps:
    """Per-pixel lesion maps on a patch whose top-left pixel is (y0, x0)."""

    y0: int
    x0: int
    mass: np.ndarray  # 0..1 mass body (soft edge)
    uptake: np.ndarray  # 0..~1 DES enhancement pattern inside the mass
    spicules: np.ndarray  # 0..1 thin radial lines
    density: np.ndarray  # 0..1 projected mass density for LE (thicker in the middle)


def lesion_maps(spec: LesionSpec, pl: Placement, rng: np.random.Generator, hw: tuple[int, int]) -> LesionMaps:
    """Render the lesion on a patch around its centre, clipped to the image."""
    mm2px = pl.scale / pl.spacing_mm
    rmax = spec.radius_mm * mm2px * 1.9
    if spec.spicules:
        rmax *= 1.0 + max(s[1] for s in spec.spicules)
    rmax = int(math.ceil(rmax)) + 3
    y0, x0 = max(int(pl.cy) - rmax, 0), max(int(pl.cx) - rmax, 0)
    y1, x1 = min(int(pl.cy) + rmax + 1, hw[0]), min(int(pl.cx) + rmax + 1, hw[1])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - pl.cx, yy - pl.cy
    rho = np.sqrt(dx * dx + dy * dy) / mm2px  # mm
    theta = np.arctan2(dy, dx) - pl.rot
    r_edge = lesion_radius(spec, theta).astype(np.float32)
    # a logistic's 10-90% rise is 4.4 scale units: edge_mm is that width
    mass = _sigmoid((r_edge - rho) * (4.4 / max(spec.edge_mm, 0.05))).astype(np.float32)

    u = rho / np.maximum(r_edge, 1e-3)  # 0 at the centre, 1 at the edge
    # a projected solid mass is thickest in the middle: chord length ~ sqrt(1 - u^2)
    chord = np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))
    if spec.enhancement == "homogeneous":
        uptake = mass * (0.55 + 0.45 * chord)
    elif spec.enhancement == "rim":
        # ring ~ outer 35% of the radius, core at rim_core of the rim's uptake
        ring = _sigmoid((u - 0.62) / 0.07)
        uptake = mass * (spec.rim_core + (1.0 - spec.rim_core) * ring)
    else:
        # blotchy uptake: a patch-scale power-law field, centre-weighted so the mass reads as one
        blot, _ = power_law_pair(mass.shape, rng, beta=3.0, spacing_mm=pl.spacing_mm, corner_mm=spec.radius_mm)
        uptake = mass * np.clip(0.6 + 0.4 * blot, 0.1, 1.3) * (0.7 + 0.3 * chord)

    spic = np.zeros_like(mass)
    if spec.spicules:
        r_px = spec.radius_mm * mm2px
        for ang, length, width_mm in spec.spicules:
            a = ang + pl.rot
            along = dx * math.cos(a) + dy * math.sin(a)
            across = np.abs(-dx * math.sin(a) + dy * math.cos(a))
            reach = r_px * (1.0 + length)
            fade = np.clip(1.0 - along / reach, 0.0, 1.0) * (along > 0.3 * r_px)
            # a spicule is widest where it leaves the mass and tapers to a thin line
            width = np.maximum(width_mm * mm2px * (0.35 + 0.65 * fade), 0.6)
            spic = np.maximum(spic, fade * np.exp(-((across / width) ** 2)))
    return LesionMaps(
        y0,
        x0,
        mass,
        uptake.astype(np.float32),
        spic.astype(np.float32),
        (mass * (0.45 + 0.55 * chord)).astype(np.float32),
    )


def place_lesion(
    rng: np.random.Generator,
    g: ViewGeometry,
    spec: LesionSpec,
    dist_from_nipple_mm: float,
    spacing_mm: float,
    scale: float,
) -> Placement:
    """Put the lesion ``dist_from_nipple_mm`` from the nipple, fully inside the breast.

    The nipple distance is what radiologists match between CC and MLO, so it is shared by
    the views; the angle around the nipple is free. If no angle fits, the lesion moves
    towards the nipple until one does.
    """
    r_px = spec.radius_mm * scale / spacing_mm * 1.15 * math.sqrt(spec.aspect)
    need = r_px + 4.0 / spacing_mm + g.skin
    d = dist_from_nipple_mm / spacing_mm
    for _ in range(12):
        for _ in range(24):
            phi = rng.uniform(-1.0, 1.0)
            cx, cy = g.depth - d * math.cos(phi), g.nipple_y + d * math.sin(phi)
            if point_clearance(g, cx, cy) >= need:
                return Placement(cx, cy, rng.uniform(0, math.pi), scale, spacing_mm)
        d = max(d * 0.85, need * 1.05)
    # Fall back to the point on the nipple axis that is furthest from every edge.
    xs = np.linspace(need, g.depth - need, 32)
    best = max(xs, key=lambda x: point_clearance(g, float(x), g.nipple_y + 0.1 * g.half_down))
    return Placement(float(best), g.nipple_y + 0.1 * g.half_down, rng.uniform(0, math.pi), scale, spacing_mm)


# --------------------------------------------------------------------------- mammography


@dataclass
class MammoRender:
    le: np.ndarray  # LE / FFDM signal, float32 [0, 1]
    des: np.ndarray | None  # DES signal (CEM only)
    breast_mask: np.ndarray  # bool, stored orientation
    outline: Outline | None  # lesion outline, stored orientation


def render_mammogram(
    g: ViewGeometry,
    hw: tuple[int, int],
    spacing_mm: float,
    density: str,
    rng: np.random.Generator,
    laterality: str,
    lesion: tuple[LesionSpec, Placement] | None = None,
    bpe_amp: float | None = None,
) -> MammoRender:
    """One view of one breast. ``bpe_amp`` None renders LE / FFDM only; a float also renders
    the co-registered DES image (same compression, so same anatomy and lesion position)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rho, dist = _edge_terms(g, xx, yy)
    inside = rho < 1.0
    thick = np.sqrt(np.clip(dist / g.falloff, 0.0, 1.0))
    pect = np.clip(_pectoral(g, xx, yy) * 8.0 + 0.5, 0.0, 1.0) * inside  # soft-edged muscle

    # Fibroglandular tissue: ducts run chest wall -> nipple, hence the anisotropy.
    tex, tex2 = power_law_pair((h, w), rng, beta=3.0, spacing_mm=spacing_mm, corner_mm=35.0, anisotropy=1.4)
    # dense tissue sits behind the nipple, away from skin, chest wall and muscle
    envelope = 1.1 * np.clip(1.0 - rho, 0.0, 1.0) - 0.9 * np.exp(-xx / (0.12 * g.depth)) - 2.0 * pect
    field = tex + envelope
    sample = field[inside & (pect < 0.5)][::7]
    thr = np.quantile(sample, 1.0 - DENSE_FRACTION[density]) if sample.size else 0.0
    gland = _sigmoid((field - thr) / 0.45).astype(np.float32)
    gland *= 0.85 + 0.15 * _sigmoid(2.0 * tex2)  # finer variation inside dense regions

    # projected fraction of the path that is dense (glandular tissue, then the mass)
    dense = GLAND_MAX_FRACTION * gland
    maps = None
    outline = None
    if lesion is not None:
        spec, pl = lesion
        maps = lesion_maps(spec, pl, rng, hw)
        outline = lesion_outline(spec, pl)
        sl = (slice(maps.y0, maps.y0 + maps.mass.shape[0]), slice(maps.x0, maps.x0 + maps.mass.shape[1]))
        patch = dense[sl]
        # the mass replaces fat along its chord; where the path is already mostly dense
        # there is little fat left to replace: this is how dense breasts mask lesions
        add = np.clip(spec.le_contrast * (maps.density + 0.7 * maps.spicules), 0.0, 1.0)
        dense[sl] = 1.0 - (1.0 - patch) * (1.0 - add)

    le = thick * (FAT + (FULL_DENSE - FAT) * dense)
    le = np.where(pect > 0, (1 - pect) * le + pect * PECTORAL * (0.93 + 0.07 * tex2) * thick, le)
    skin = (dist < g.skin) & inside
    le = np.where(skin, np.maximum(le, SKIN * np.sqrt(thick + 0.3)), le)
    le = np.where(inside, le, AIR).astype(np.float32)

    des = None
    if bpe_amp is not None:
        # BPE: patchy uptake of normal glandular tissue, an independent pattern per exam
        bpe = gland * _sigmoid(1.8 * tex2 + 0.5)
        des = DES_BASE + DES_GLANDULAR_RESIDUAL * (gland - 0.5) + bpe_amp * bpe
        des = des + 0.05 * (1.0 - thick)  # thickness-edge artefact at the periphery
        if maps is not None:
            assert lesion is not None  # maps are the lesion's
            spec = lesion[0]
            sl = (slice(maps.y0, maps.y0 + maps.mass.shape[0]), slice(maps.x0, maps.x0 + maps.mass.shape[1]))
            des[sl] += spec.enh_strength * (maps.uptake + 0.45 * maps.spicules)
        des = np.where(inside, des, DES_AIR).astype(np.float32)

    if laterality == "R":
        le = le[:, ::-1]
        des = des[:, ::-1] if des is not None else None
        inside = inside[:, ::-1]
        outline = outline.mirrored(w) if outline is not None else None
    return MammoRender(
        np.ascontiguousarray(le),
        None if des is None else np.ascontiguousarray(des),
        np.ascontiguousarray(inside),
        outline,
    )


# --------------------------------------------------------------------------- ultrasound


@functools.lru_cache(maxsize=4)
def _psf_filter(h: int, w: int, axial_px: float, lateral_px: float) -> np.ndarray:
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.fftfreq(w).astype(np.float32)[None, :]
    return np.exp(-2 * math.pi**2 * ((fy * axial_px) ** 2 + (fx * lateral_px) ** 2)).astype(np.float32)


@dataclass
class UltrasoundRender:
    image: np.ndarray  # float32 [0, 1], display brightness
    outline: Outline | None


def render_ultrasound(
    hw: tuple[int, int],
    spacing_mm: float,
    rng: np.random.Generator,
    lesion: LesionSpec | None = None,
    view: str = "TRANS",
) -> UltrasoundRender:
    """A B-mode image: skin, subcutaneous fat, fibroglandular layer, pectoral muscle.

    Speckle is the envelope of scatterers (amplitude ~ sqrt(echogenicity)) convolved with
    an anisotropic PSF, then log-compressed, so lesion edges blur like real speckle does.
    The mass (if any) is hypoechoic with the same outline family as on the mammogram;
    malignant-looking masses are more often taller than wide and shadow posteriorly.
    """
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = yy * spacing_mm
    wobble, wobble2 = power_law_pair((h, w), rng, beta=3.0, spacing_mm=spacing_mm, corner_mm=15.0, anisotropy=2.0)
    # Echogenicity in dB relative to skin; B-mode contrast lives on a log scale.
    lateral_mm = xx[:1, :] * spacing_mm

    def undulation(amp_mm: float) -> np.ndarray:
        """A smooth lateral wave (3 random sinusoids, 12-45 mm periods) for a layer boundary."""
        out = np.zeros_like(lateral_mm)
        for _ in range(3):
            out += np.sin(2 * math.pi * lateral_mm / rng.uniform(12.0, 45.0) + rng.uniform(0, 2 * math.pi))
        return amp_mm / 3.0 * out

    skin_end = 1.8 + undulation(0.3)
    fat_end = rng.uniform(5.0, 9.0) + undulation(2.0)
    gland_end = rng.uniform(22.0, 30.0) + undulation(4.0)
    muscle_start = gland_end + rng.uniform(2.0, 5.0)
    striation = np.cos(2 * math.pi * (depth - 0.3 * wobble) / rng.uniform(1.2, 2.0))
    db = np.where(depth < skin_end, 0.0, -16.0 + 2.5 * wobble)  # skin, then subcutaneous fat lobules
    db = np.where((depth >= fat_end) & (depth < gland_end), -6.0 + 3.0 * np.clip(wobble2, -2, 2), db)
    db = np.where((depth >= gland_end) & (depth < muscle_start), -17.0, db)  # retromammary fat
    db = np.where(depth >= muscle_start, -11.0 + 4.0 * striation, db).astype(np.float32)

    outline = None
    if lesion is not None:
        cx = w * rng.uniform(0.38, 0.62)
        cy_mm = rng.uniform(11.0, 20.0)
        # parallel = long axis horizontal (typical of benign masses); the LONG view cuts
        # the mass along another plane, hence its own scale
        rot = 0.0 if lesion.us_orientation == "parallel" else math.pi / 2
        rot += rng.normal(0.0, 0.12)
        scale = 1.0 if view == "TRANS" else rng.uniform(0.85, 1.05)
        # A mass larger than the field of view is shown by a plane that cuts it off centre,
        # so its section is smaller; the whole outline stays inside the image.
        r_out = float(
            lesion_radius(lesion, np.linspace(0.0, 2 * math.pi, 64, endpoint=False), with_ripples=False).max()
        )
        scale = min(scale, 0.42 * min(h, w) * spacing_mm / r_out)
        r_mm = r_out * scale
        cy_mm = float(np.clip(cy_mm, min(r_mm + 4.0, 0.5 * h * spacing_mm), h * spacing_mm - r_mm - 2.0))
        cy = cy_mm / spacing_mm
        pl = Placement(cx, cy, rot, scale, spacing_mm)
        maps = lesion_maps(lesion, pl, rng, hw)
        outline = lesion_outline(lesion, pl)
        sl = (slice(maps.y0, maps.y0 + maps.mass.shape[0]), slice(maps.x0, maps.x0 + maps.mass.shape[1]))
        # internal echoes follow the uptake pattern: heterogeneous masses look heterogeneous
        inner = -6.0 + lesion.us_echo_db + 4.0 * (maps.uptake / max(float(maps.uptake.max()), 1e-6) - 0.8)
        patch = db[sl] * (1.0 - maps.mass) + inner * maps.mass
        if lesion.margin == "spiculated":  # echogenic halo / spicules around the mass
            patch = np.maximum(patch, -3.0 - 10.0 * (1.0 - maps.spicules * (1.0 - maps.mass)))
        db[sl] = patch
        # posterior acoustic feature under the mass, fading with depth
        cols = np.nonzero(maps.mass.max(axis=0) > 0.5)[0]
        half_w = (cols.max() - cols.min()) / 2.0 if cols.size else lesion.radius_mm / spacing_mm
        col = np.exp(-(((xx[0] - cx) / max(half_w * 0.9, 2.0)) ** 4))
        below = np.clip((yy - cy) / (lesion.radius_mm / spacing_mm), 0.0, 1.0)
        post = below * col[None, :] * np.exp(-np.maximum(yy - cy, 0) * spacing_mm / 25.0)
        if lesion.us_posterior == "shadowing":
            db = db - 14.0 * post
        elif lesion.us_posterior == "enhancement":
            db = db + 5.0 * post

    db = db - 0.08 * depth  # residual attenuation the scanner's TGC leaves
    scat = (rng.standard_normal((h, w), dtype=np.float32) + 1j * rng.standard_normal((h, w), dtype=np.float32)).astype(
        np.complex64
    )
    amp = np.power(10.0, db / 20.0, dtype=np.float32)
    psf = _psf_filter(h, w, 0.15 / spacing_mm, 0.3 / spacing_mm)
    rf = np.fft.ifft2(np.fft.fft2(scat * amp) * psf)
    env = np.abs(rf) / math.sqrt(2.0 * float(np.mean(psf * psf)))  # unit mean power at 0 dB
    dynamic_range = 50.0
    img = (20.0 * np.log10(env + 1e-6) + dynamic_range - 4.0) / dynamic_range
    return UltrasoundRender(np.clip(img, 0.0, 1.0).astype(np.float32), outline)
