"""Simulated hospitals as real DICOM exports: ``fedbreast site generate``.

Each site is written the way a radiology department would hand it over, so the
simulation exercises the same ingest as a real site::

    SITE_DIR/dicom/<raw patient id>/<study>/IM0001.dcm ...
    SITE_DIR/annotations.csv     docs/annotations.md format (labels, outlines, BI-RADS)
    SITE_DIR/truth.csv           simulation-only ground truth (latent p, true descriptors)
    SITE_DIR/generation.json     the site profile, seed and summary

Sites differ the way real ones do (modalities, vendor intensity curve, noise, bit depth,
image size, prevalence, case count, a few compressed files, BI-RADS spelling); see
docs/generated-data.md for the label model and the oracle AUC.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from . import phantom
from .dicom_writer import DicomMeta, write_dicom
from .rules import ConfigError
from .schema import MODALITY_SETS

ANNOTATION_COLUMNS = (
    "patient_id",
    "accession_number",
    "laterality",
    "view",
    "energy",
    "label",
    "roi_shape",
    "roi",
    "mass_shape",
    "mass_margin",
    "internal_enhancement",
    "bpe",
    "density",
    "birads",
)
TRUTH_COLUMNS = (
    "patient_id",
    "laterality",
    "has_lesion",
    "p_malignant",
    "label",
    "mass_shape",
    "mass_margin",
    "internal_enhancement",
    "radius_mm",
    "enh_strength",
    "bpe",
    "density",
    "us_orientation",
    "us_posterior",
)

# ------------------------------------------------------------------ label model
# Logit weights of the true descriptors (centred so b0 carries the prevalence). Shape,
# margin and enhancement pattern are the classic CEM malignancy cues; size and uptake
# are continuous and visible too. SCORE_SCALE tunes how separable the latent is
# (calibrated so the breast-level oracle AUC is ~0.93-0.95, docs/generated-data.md).
W_SHAPE = {"round": -0.9, "oval": -0.6, "irregular": 0.9}
W_MARGIN = {"circumscribed": -1.1, "irregular": 0.4, "spiculated": 1.3}
W_ENH = {"homogeneous": -0.7, "heterogeneous": 0.3, "rim": 0.9}
W_SIZE, W_UPTAKE, W_DENSITY = 0.7, 0.5, 0.6
SCORE_SCALE = 1.5

P_SHAPE = {"round": 0.25, "oval": 0.35, "irregular": 0.40}
P_MARGIN_GIVEN_SHAPE = {
    "round": (0.60, 0.25, 0.15),
    "oval": (0.60, 0.25, 0.15),
    "irregular": (0.12, 0.43, 0.45),
}
P_ENH = {"homogeneous": 0.40, "heterogeneous": 0.35, "rim": 0.25}
P_DENSITY = {"a": 0.10, "b": 0.40, "c": 0.38, "d": 0.12}
P_BPE = {"minimal": 0.32, "mild": 0.35, "moderate": 0.21, "marked": 0.12}
# DES amplitude of background enhancement; marked BPE rivals a lesion's own uptake.
BPE_AMP = {"minimal": 0.015, "mild": 0.04, "moderate": 0.08, "marked": 0.14}
ENH_MEDIAN, ENH_LOGSD = 0.16, 0.30
# Mass density on LE / FFDM: the fraction of the fat along its chord that the mass replaces
# (BI-RADS high / equal / low density); high-density masses are more often malignant.
LE_CONTRAST_MEDIAN, LE_CONTRAST_LOGSD = 0.68, 0.18
# Equivalent radius: 10-36 mm diameters, median 19 mm, as masses worked up with CEM.
RADIUS_MEDIAN_MM, RADIUS_LOGSD = 9.5, 0.32
RADIUS_RANGE_MM = (5.0, 18.0)
P_BILATERAL_NORMAL = 0.08  # patients recalled for nothing: both breasts normal
P_EXPLICIT_NORMAL_ROW = 0.3  # contralateral breast gets an explicit `normal` row
READER_SWAP = 0.12  # descriptor reported as a neighbouring category
READER_LOGIT_SD = 0.6  # reader's assessment noise on the latent logit

ORDERED = {
    "mass_shape": phantom.SHAPES,
    "mass_margin": phantom.MARGINS,
    "internal_enhancement": phantom.ENHANCEMENTS,
    "bpe": tuple(BPE_AMP),
    "density": tuple(P_DENSITY),
}


@dataclass
class SiteProfile:
    """How one simulated hospital acquires and exports its images."""

    name: str
    n_patients: int
    modalities: str = "cem"  # cem | ffdm | ffdm+us
    image_hw: tuple[int, int] = (600, 400)  # mammogram rows, cols
    pixel_spacing_mm: float = 0.45
    bits_stored: int = 14  # 12 / 14 / 16 (stored in 16-bit words)
    vendor: str = "Acme Mammo"
    # vendor curve: stored = max * (offset + gain * signal ** gamma), signal in [0, 1]
    gamma: float = 1.0
    offset: float = 0.03
    gain: float = 0.9
    noise: float = 0.012  # quantum-like noise sd at signal 1, as a fraction of full scale
    prevalence: float = 0.45  # fraction of lesion breasts that are malignant (in expectation)
    transfer_syntax: dict[str, float] = field(default_factory=lambda: {"explicit": 1.0})
    us_hw: tuple[int, int] = (360, 480)
    us_spacing_mm: float = 0.12
    annotation_style: str = "canonical"  # canonical | verbose ("Spiculated", "BPE mild", "ACR C", "4A")

    def __post_init__(self) -> None:
        self.image_hw = (int(self.image_hw[0]), int(self.image_hw[1]))
        self.us_hw = (int(self.us_hw[0]), int(self.us_hw[1]))
        if self.modalities not in MODALITY_SETS:
            raise ConfigError(f"modalities must be one of {MODALITY_SETS}, got {self.modalities!r}")
        if self.bits_stored not in (8, 10, 12, 14, 15, 16):
            raise ConfigError(f"bits_stored must be 8..16, got {self.bits_stored}")
        if not 0.0 < self.prevalence < 1.0:
            raise ConfigError(f"prevalence must be in (0, 1), got {self.prevalence}")
        if self.n_patients < 1:
            raise ConfigError(f"n_patients must be >= 1, got {self.n_patients}")
        if min(self.image_hw) < 96:
            raise ConfigError(f"image_hw {self.image_hw} is too small for a breast; use >= 96 px")
        if not self.transfer_syntax or any(w < 0 for w in self.transfer_syntax.values()):
            raise ConfigError("transfer_syntax needs non-negative weights")

    @property
    def energies(self) -> tuple[str, ...]:
        return ("LE", "DES") if self.modalities == "cem" else ("FFDM",)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SiteSummary:
    name: str
    path: Path
    n_patients: int
    n_images: int
    n_malignant_breasts: int
    modalities: str
    oracle_auc: float  # AUC of the latent p vs the drawn labels, all breasts (normal p = 0)
    n_breasts: int = 0
    n_lesion_breasts: int = 0
    oracle_auc_lesions: float = float("nan")  # the same over lesion breasts only (benign vs malignant)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


# ------------------------------------------------------------------ site profiles

_TEMPLATES: tuple[dict[str, Any], ...] = (
    dict(
        modalities="cem",
        image_hw=(600, 400),
        pixel_spacing_mm=0.45,
        bits_stored=14,
        vendor="Acme Mammo",
        gamma=0.85,
        offset=0.04,
        gain=0.90,
        noise=0.010,
        prevalence=0.50,
    ),
    dict(
        modalities="ffdm",
        image_hw=(640, 480),
        pixel_spacing_mm=0.40,
        bits_stored=12,
        vendor="Borealis Imaging",
        gamma=1.25,
        offset=0.02,
        gain=0.85,
        noise=0.018,
        prevalence=0.35,
        transfer_syntax={"explicit": 0.92, "rle": 0.04, "jpeg2000": 0.04},
        annotation_style="verbose",
    ),
    dict(
        modalities="ffdm+us",
        image_hw=(512, 384),
        pixel_spacing_mm=0.50,
        bits_stored=16,
        vendor="Cygnus Medical",
        gamma=1.0,
        offset=0.08,
        gain=0.80,
        noise=0.007,
        prevalence=0.60,
        us_hw=(360, 480),
        us_spacing_mm=0.12,
    ),
)
_SIZE_FACTORS = (1.0, 0.7, 1.3)
_PREVALENCE_CYCLE = (0.0, -0.05, 0.05, -0.1, 0.1)


def default_profiles(n_sites: int, patients_per_site: int, modalities: str | None = None) -> list[SiteProfile]:
    """Heterogeneous sites cycling CEM / FFDM / FFDM+US; later cycles perturb the curve,
    noise and prevalence so no two sites are identical. Sizes average ``patients_per_site``.
    ``modalities`` gives every site that acquisition (a consortium of one kind of hospital)
    and keeps the rest of each site's profile: vendor curve, image size, noise, prevalence."""
    if n_sites < 1:
        raise ConfigError(f"n_sites must be >= 1, got {n_sites}")
    if patients_per_site < 1:  # (sizes are scaled per site and floored at 2: 0 would silently become 2)
        raise ConfigError(f"patients per site must be >= 1, got {patients_per_site}")
    if modalities is not None and modalities not in MODALITY_SETS:
        raise ConfigError(f"modalities must be one of {MODALITY_SETS}, got {modalities!r}")
    profiles = []
    for i in range(n_sites):
        t = dict(_TEMPLATES[i % len(_TEMPLATES)])
        if modalities is not None:
            t["modalities"] = modalities
        cycle = i // len(_TEMPLATES)
        if cycle:
            t["gamma"] = round(t["gamma"] * (1.0 + 0.08 * ((cycle % 3) - 1)), 3)
            t["noise"] = round(t["noise"] * (1.0 + 0.25 * (cycle % 2)), 4)
            t["prevalence"] = float(np.clip(t["prevalence"] + _PREVALENCE_CYCLE[cycle % 5], 0.3, 0.6))
            t["vendor"] = f"{t['vendor']} {['', 'II', 'III', 'IV'][cycle % 4]}".strip()
        n = max(2, int(round(patients_per_site * _SIZE_FACTORS[i % len(_SIZE_FACTORS)])))
        profiles.append(SiteProfile(name=f"site-{i + 1}", n_patients=n, **t))
    return profiles


# ------------------------------------------------------------------ lesion latent


def _choice(rng: np.random.Generator, probs: dict[str, float] | tuple[tuple[str, ...], tuple[float, ...]]) -> str:
    keys, p = (tuple(probs), tuple(probs.values())) if isinstance(probs, dict) else probs
    return keys[int(rng.choice(len(keys), p=np.asarray(p) / sum(p)))]


def _draw_descriptors(rng: np.random.Generator) -> dict[str, Any]:
    """True morphology / uptake of one mass and its score (logit without the site intercept)."""
    shape = _choice(rng, P_SHAPE)
    margin = _choice(rng, (phantom.MARGINS, P_MARGIN_GIVEN_SHAPE[shape]))
    enh = _choice(rng, P_ENH)
    z_size = float(np.clip(rng.normal(), -2.2, 2.2))
    z_uptake = float(np.clip(rng.normal(), -2.2, 2.2))
    z_density = float(np.clip(rng.normal(), -2.2, 2.2))
    score = (
        W_SHAPE[shape] + W_MARGIN[margin] + W_ENH[enh] + W_SIZE * z_size + W_UPTAKE * z_uptake + W_DENSITY * z_density
    )
    return dict(
        shape=shape,
        margin=margin,
        enhancement=enh,
        z_size=z_size,
        z_uptake=z_uptake,
        z_density=z_density,
        score=SCORE_SCALE * score,
    )


def site_intercept(prevalence: float) -> float:
    """Intercept b0 with E[sigmoid(b0 + score)] = prevalence, from a fixed Monte-Carlo sample
    (fixed seed: the intercept is part of the site definition, not of a run)."""
    return _intercept_cached(round(float(prevalence), 6))


_INTERCEPTS: dict[float, float] = {}


def _intercept_cached(prevalence: float) -> float:
    if prevalence not in _INTERCEPTS:
        rng = np.random.default_rng(20260101)
        scores = np.array([_draw_descriptors(rng)["score"] for _ in range(4000)])
        lo, hi = -10.0, 10.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(mid + scores)))) < prevalence:
                lo = mid
            else:
                hi = mid
        _INTERCEPTS[prevalence] = 0.5 * (lo + hi)
    return _INTERCEPTS[prevalence]


def _build_lesion(rng: np.random.Generator, d: dict[str, Any], p: float) -> phantom.LesionSpec:
    """Turn the latent descriptors into the geometry the renderer draws."""
    shape, margin = d["shape"], d["margin"]
    radius = float(np.clip(RADIUS_MEDIAN_MM * math.exp(RADIUS_LOGSD * d["z_size"]), *RADIUS_RANGE_MM))
    aspect = {"round": rng.uniform(1.0, 1.15), "oval": rng.uniform(1.45, 2.0), "irregular": rng.uniform(1.0, 1.6)}[
        shape
    ]
    lobes: tuple[tuple[int, float, float], ...] = ()
    if shape == "irregular":
        ks = rng.choice(np.arange(2, 7), size=3, replace=False)
        lobes = tuple((int(k), float(rng.uniform(0.14, 0.28)), float(rng.uniform(0, 2 * math.pi))) for k in ks)
    ripples: tuple[tuple[int, float, float], ...] = ()
    if margin != "circumscribed":
        amp = (0.04, 0.08) if margin == "irregular" else (0.02, 0.04)
        ks = rng.choice(np.arange(8, 18), size=4, replace=False)
        ripples = tuple((int(k), float(rng.uniform(*amp)), float(rng.uniform(0, 2 * math.pi))) for k in ks)
    edge = {"circumscribed": (0.3, 0.6), "irregular": (1.5, 3.0), "spiculated": (1.0, 2.0)}[margin]
    spicules: tuple[tuple[float, float, float], ...] = ()
    if margin == "spiculated":
        n = int(rng.integers(8, 15))
        base = np.sort(rng.uniform(0, 2 * math.pi, n))
        # (angle, length in radii, width at the base in mm; spicules taper outwards)
        spicules = tuple((float(a), float(rng.uniform(0.7, 1.8)), float(rng.uniform(0.7, 1.3))) for a in base)
    not_parallel = rng.random() < 0.10 + 0.55 * p
    u = rng.random()
    posterior = "shadowing" if u < 0.08 + 0.60 * p else ("enhancement" if u > 1.0 - 0.35 * (1.0 - p) else "none")
    return phantom.LesionSpec(
        shape=shape,
        margin=margin,
        enhancement=d["enhancement"],
        radius_mm=radius,
        aspect=float(aspect),
        lobes=lobes,
        ripples=ripples,
        edge_mm=float(rng.uniform(*edge)),
        spicules=spicules,
        enh_strength=float(ENH_MEDIAN * math.exp(ENH_LOGSD * d["z_uptake"])),
        le_contrast=float(np.clip(LE_CONTRAST_MEDIAN * math.exp(LE_CONTRAST_LOGSD * d["z_density"]), 0.4, 1.0)),
        rim_core=float(rng.uniform(0.15, 0.40)),
        us_echo_db=float(rng.uniform(-24.0, -15.0)),
        us_orientation="not_parallel" if not_parallel else "parallel",
        us_posterior=posterior,
    )


# ------------------------------------------------------------------ reader model


def _reader(rng: np.random.Generator, group: str, true: str) -> str:
    """What a radiologist writes: usually the truth, sometimes a neighbouring category."""
    cats = ORDERED[group]
    if rng.random() >= READER_SWAP:
        return true
    i = cats.index(true)
    j = i + (1 if i == 0 else -1 if i == len(cats) - 1 else int(rng.choice((-1, 1))))
    return cats[j]


def _assessment(p_reader: float) -> str:
    """BI-RADS assessment from the reader's (noisy) malignancy estimate."""
    for limit, cat in ((0.03, "2"), (0.10, "3"), (0.30, "4a"), (0.60, "4b"), (0.90, "4c")):
        if p_reader < limit:
            return cat
    return "5"


_VERBOSE = {"bpe": "BPE {}", "density": "ACR {}"}


def _style(profile: SiteProfile, group: str, value: str) -> str:
    """Spell a token the way the site's reporting system exports it."""
    if profile.annotation_style != "verbose" or not value:
        return value
    if group in _VERBOSE:
        return _VERBOSE[group].format(value.upper() if group == "density" else value)
    if group == "birads":
        return value.upper()
    return value.capitalize()


# ------------------------------------------------------------------ pixels -> DICOM


def _to_stored(signal: np.ndarray, profile: SiteProfile, rng: np.random.Generator, noise_gain: float) -> np.ndarray:
    """Vendor curve + signal-dependent noise + quantisation to ``bits_stored``."""
    maxv = float(2**profile.bits_stored - 1)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    s = signal + (profile.noise * noise_gain) * np.sqrt(signal + 0.05) * noise
    s = np.clip(s, 0.0, 1.0)
    v = maxv * (profile.offset + profile.gain * s**profile.gamma)
    return np.rint(np.clip(v, 0.0, maxv)).astype(np.uint16)


def _window(pixels: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    vals = pixels[mask][::11]
    if vals.size == 0:
        vals = pixels.ravel()
    lo, hi = np.percentile(vals, (1.0, 99.5))
    return float(round((lo + hi) / 2.0)), float(max(round(hi - lo), 1.0))


def _uid(seed: int, *parts: object) -> str:
    # pydicom's own root: with prefix=None pydicom ignores entropy_srcs and returns a
    # random UUID-based UID, which would break byte-identical regeneration.
    return str(generate_uid(entropy_srcs=[str(seed), *map(str, parts)]))


# ------------------------------------------------------------------ one patient


@dataclass
class _PatientTask:
    profile: SiteProfile
    out_dir: Path
    seed: int
    index: int
    intercept: float


@dataclass
class _PatientResult:
    rows: list[dict[str, str]]
    truth: list[dict[str, str]]
    n_images: int
    breasts: list[tuple[float, int, bool]]  # (latent p, malignant, has lesion)


@dataclass
class _Drawn:
    """One simulated patient's hidden truth, drawn from the patient's own stream."""

    density: str
    bpe: str
    bpe_amp: float
    size: float  # breast size in [0, 1]
    lesion_lat: str  # the breast that has the lesion, if there is one
    spec: phantom.LesionSpec | None  # None: both breasts normal
    p: float  # the lesion's true probability of malignancy
    malignant: bool
    dist_frac: float  # lesion depth as a fraction of the CC depth
    mlo_scale: float


def _draw_patient(r: np.random.Generator, intercept: float) -> _Drawn:
    density = _choice(r, P_DENSITY)
    bpe = _choice(r, P_BPE)
    bpe_amp = BPE_AMP[bpe] * r.uniform(0.8, 1.2)
    size = float(r.beta(2.0, 2.0))
    has_lesion = r.random() >= P_BILATERAL_NORMAL
    lesion_lat = "L" if r.random() < 0.5 else "R"
    desc = _draw_descriptors(r)
    p = 1.0 / (1.0 + math.exp(-(intercept + desc["score"])))
    malignant = bool(r.random() < p)
    spec = _build_lesion(r, desc, p) if has_lesion else None
    return _Drawn(
        density, bpe, bpe_amp, size, lesion_lat, spec, p, malignant, r.uniform(0.25, 0.8), r.uniform(0.9, 1.1)
    )


class _Study:
    """Writes one patient's study: numbered DICOM files sharing the study's identifiers."""

    def __init__(self, task: _PatientTask, pid: str, accession: str, r_syntax: np.random.Generator) -> None:
        prof = task.profile
        self.task, self.prof, self.pid, self.accession, self.r_syntax = task, prof, pid, accession, r_syntax
        self.uid = _uid(task.seed, prof.name, pid, "study")
        idx = task.index
        self.date = f"{2019 + idx % 6}{1 + idx % 12:02d}{1 + (idx * 7) % 28:02d}"
        self.dir = task.out_dir / "dicom" / pid / f"ST{zlib.crc32(self.uid.encode()) % 10**6:06d}"
        self.syntaxes = tuple(prof.transfer_syntax)
        weights = np.asarray([prof.transfer_syntax[k] for k in self.syntaxes], dtype=float)
        self.weights = weights / weights.sum()
        self.n_images = 0

    def write(
        self, pixels: np.ndarray, lat: str, view: str, energy: str, modality: str, bits: int, win: tuple | None
    ) -> None:
        self.n_images += 1
        prof, seed = self.prof, self.task.seed
        syntax = self.syntaxes[int(self.r_syntax.choice(len(self.syntaxes), p=self.weights))]
        meta = DicomMeta(
            patient_id=self.pid,
            study_uid=self.uid,
            accession=self.accession,
            modality=modality,
            laterality=lat,
            view=view,
            energy=energy,
            manufacturer=prof.vendor,
            pixel_spacing_mm=prof.pixel_spacing_mm if modality == "MG" else prof.us_spacing_mm,
            bits_stored=bits,
            window=win,
            transfer_syntax=syntax,
            study_date=self.date,
            series_uid=_uid(seed, prof.name, self.pid, "series", lat, view, energy),
            sop_instance_uid=_uid(seed, prof.name, self.pid, "sop", lat, view, energy),
            extra={"SeriesNumber": self.n_images, "InstanceNumber": 1},
        )
        write_dicom(self.dir / f"IM{self.n_images:04d}.dcm", pixels, meta)


def _write_mammograms(
    study: _Study, d: _Drawn, r_render: np.random.Generator, r_store: np.random.Generator
) -> dict[tuple[str, str], phantom.Outline]:
    """CC and MLO of both breasts, each energy of the profile; returns the lesion outlines by (side, view)."""
    prof = study.prof
    hw, sp = prof.image_hw, prof.pixel_spacing_mm
    cem = prof.modalities == "cem"
    outlines: dict[tuple[str, str], phantom.Outline] = {}
    for lat in ("L", "R"):
        cc_depth_mm = None
        for view in ("CC", "MLO"):
            g = phantom.sample_geometry(r_render, view, hw, sp, d.size, float(r_render.normal(0.0, 0.025)))
            if view == "CC":
                cc_depth_mm = g.depth * sp
            les = None
            if d.spec is not None and lat == d.lesion_lat:
                assert cc_depth_mm is not None  # CC comes first in the view loop
                scale = 1.0 if view == "CC" else d.mlo_scale
                pl = phantom.place_lesion(r_render, g, d.spec, d.dist_frac * cc_depth_mm, sp, scale)
                les = (d.spec, pl)
            img = phantom.render_mammogram(g, hw, sp, d.density, r_render, lat, les, d.bpe_amp if cem else None)
            if img.outline is not None:
                outlines[(lat, view)] = img.outline
            for energy in prof.energies:
                signal = img.des if energy == "DES" else img.le
                assert signal is not None  # DES is rendered for the CEM profiles that store it
                px = _to_stored(signal, prof, r_store, 1.8 if energy == "DES" else 1.0)
                study.write(px, lat, view, energy, "MG", prof.bits_stored, _window(px, img.breast_mask))
    return outlines


def _write_ultrasound(study: _Study, d: _Drawn, r_us: np.random.Generator) -> dict[tuple[str, str], phantom.Outline]:
    """The lesion's TRANS (and often LONG) scan, sometimes the other breast's; returns the outlines."""
    prof = study.prof
    scans: list[tuple[str, str, bool]] = []
    if d.spec is not None:
        scans.append((d.lesion_lat, "TRANS", True))
        if r_us.random() < 0.6:
            scans.append((d.lesion_lat, "LONG", True))
    other = "R" if d.lesion_lat == "L" else "L"
    if d.spec is None or r_us.random() < 0.3:
        scans.append((other, "TRANS", False))
    outlines: dict[tuple[str, str], phantom.Outline] = {}
    for lat, us_view, with_lesion in scans:
        us = phantom.render_ultrasound(prof.us_hw, prof.us_spacing_mm, r_us, d.spec if with_lesion else None, us_view)
        px = np.rint(us.image * 255.0).astype(np.uint8)
        study.write(px, lat, us_view, "NA", "US", 8, None)
        if us.outline is not None:
            outlines[(lat, us_view)] = us.outline
    return outlines


def _simulate_patient(task: _PatientTask) -> _PatientResult:
    prof, idx = task.profile, task.index
    ss = np.random.SeedSequence([task.seed, zlib.crc32(prof.name.encode()), idx])
    r_patient, r_render, r_store, r_syntax, r_reader, r_us = (np.random.default_rng(s) for s in ss.spawn(6))
    pid = f"{prof.name.upper().replace('-', '')}P{idx + 1:05d}"
    accession = f"A{zlib.crc32(f'{task.seed}/{prof.name}/{idx}'.encode()) % 10**8:08d}"
    d = _draw_patient(r_patient, task.intercept)
    study = _Study(task, pid, accession, r_syntax)
    outlines = _write_mammograms(study, d, r_render, r_store)
    us_outlines = _write_ultrasound(study, d, r_us) if prof.modalities == "ffdm+us" else {}
    rows, truth, breasts = _annotate(prof, pid, accession, d, outlines, us_outlines, r_reader)
    return _PatientResult(rows, truth, study.n_images, breasts)


def _annotate(
    prof: SiteProfile,
    pid: str,
    accession: str,
    d: _Drawn,
    outlines: dict[tuple[str, str], phantom.Outline],
    us_outlines: dict[tuple[str, str], phantom.Outline],
    r_reader: np.random.Generator,
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[tuple[float, int, bool]]]:
    """The reader's annotation rows (descriptors as a radiologist reads them), the hidden truth
    per breast, and (p, malignant, has lesion) per breast for the oracle AUC."""
    cem = prof.modalities == "cem"
    spec, p, malignant, density, bpe = d.spec, d.p, d.malignant, d.density, d.bpe
    rows: list[dict[str, str]] = []
    dens_read = _reader(r_reader, "density", density)
    bpe_read = _reader(r_reader, "bpe", bpe) if cem else ""

    def row(lat: str, **kw: str) -> dict[str, str]:
        r = {c: "" for c in ANNOTATION_COLUMNS}
        r.update(patient_id=pid, accession_number=accession, laterality=lat)
        r.update(kw)
        return r

    normal_desc = dict(
        label="normal",
        density=_style(prof, "density", dens_read),
        bpe=_style(prof, "bpe", bpe_read),
        birads=_style(prof, "birads", "1"),
    )
    breasts: list[tuple[float, int, bool]] = []
    truth: list[dict[str, str]] = []
    for lat in ("L", "R"):
        lesion = spec if lat == d.lesion_lat else None  # this breast's lesion, if it has one
        lesion_here = lesion is not None
        p_lat = p if lesion_here else 0.0
        label = ("malignant" if malignant else "benign") if lesion_here else "normal"
        breasts.append((p_lat, int(lesion_here and malignant), lesion_here))
        truth.append(
            {
                "patient_id": pid,
                "laterality": lat,
                "has_lesion": str(int(lesion_here)),
                "p_malignant": f"{p_lat:.6f}",
                "label": label,
                "mass_shape": lesion.shape if lesion is not None else "",
                "mass_margin": lesion.margin if lesion is not None else "",
                "internal_enhancement": lesion.enhancement if lesion is not None else "",
                "radius_mm": f"{lesion.radius_mm:.2f}" if lesion is not None else "",
                "enh_strength": f"{lesion.enh_strength:.4f}" if lesion is not None else "",
                "bpe": bpe,
                "density": density,
                "us_orientation": lesion.us_orientation if lesion is not None else "",
                "us_posterior": lesion.us_posterior if lesion is not None else "",
            }
        )
        if lesion is None:
            if spec is None or r_reader.random() < P_EXPLICIT_NORMAL_ROW:
                rows.append(row(lat, **normal_desc))
            continue
        margin_read = _reader(r_reader, "mass_margin", lesion.margin)
        if margin_read == "circumscribed" and density in ("c", "d") and r_reader.random() < 0.3:
            margin_read = "obscured"  # a dense background hides part of the margin
        logit_reader = math.log(p / (1.0 - p)) + r_reader.normal(0.0, READER_LOGIT_SD)
        rows.append(
            row(
                lat,
                label=label,
                mass_shape=_style(prof, "mass_shape", _reader(r_reader, "mass_shape", lesion.shape)),
                mass_margin=_style(prof, "mass_margin", margin_read),
                internal_enhancement=_style(
                    prof,
                    "internal_enhancement",
                    _reader(r_reader, "internal_enhancement", lesion.enhancement) if cem else "",
                ),
                bpe=_style(prof, "bpe", bpe_read),
                density=_style(prof, "density", dens_read),
                birads=_style(prof, "birads", _assessment(1.0 / (1.0 + math.exp(-logit_reader)))),
            )
        )
        # one outline per view; blank energy = both LE and DES (one compression)
        for view in ("CC", "MLO"):
            o = outlines[(lat, view)]
            rows.append(row(lat, view=view, label=label, roi_shape=o.kind, roi=o.roi_text()))
        for us_view in ("TRANS", "LONG"):
            if (lat, us_view) in us_outlines:
                o = us_outlines[(lat, us_view)]
                rows.append(row(lat, view=f"US_{us_view}", label=label, roi_shape=o.kind, roi=o.roi_text()))
    return rows, truth, breasts


# ------------------------------------------------------------------ sites


def oracle_auc(p: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC with mid-ranks for ties (all normal breasts tie at p = 0); NaN if
    one class is missing."""
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=int)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    cum = np.cumsum(counts)
    ranks = (cum - (counts - 1) / 2.0)[inv]
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _csv_text(rows: list[dict[str, str]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def generate_site(profile: SiteProfile, out_dir: str | Path, seed: int = 0, workers: int | None = None) -> SiteSummary:
    """Write one simulated hospital into ``out_dir`` and return its summary.

    Patients are independent (each has its own seed stream), so the result is
    byte-identical whatever ``workers`` is; ``workers`` None uses the machine's cores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b0 = site_intercept(profile.prevalence)
    tasks = [_PatientTask(profile, out_dir, int(seed), i, b0) for i in range(profile.n_patients)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(_simulate_patient, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
    else:
        results = [_simulate_patient(t) for t in tasks]

    rows = [r for res in results for r in res.rows]
    truth = [r for res in results for r in res.truth]
    (out_dir / "annotations.csv").write_text(_csv_text(rows, ANNOTATION_COLUMNS), encoding="utf-8")
    (out_dir / "truth.csv").write_text(_csv_text(truth, TRUTH_COLUMNS), encoding="utf-8")

    breasts = np.array([b for res in results for b in res.breasts], dtype=float).reshape(-1, 3)
    lesion = breasts[:, 2] > 0
    summary = SiteSummary(
        name=profile.name,
        path=out_dir,
        n_patients=profile.n_patients,
        n_images=sum(res.n_images for res in results),
        n_malignant_breasts=int(breasts[:, 1].sum()),
        modalities=profile.modalities,
        oracle_auc=oracle_auc(breasts[:, 0], breasts[:, 1]),
        n_breasts=len(breasts),
        n_lesion_breasts=int(lesion.sum()),
        oracle_auc_lesions=oracle_auc(breasts[lesion, 0], breasts[lesion, 1]),
    )
    meta = {"seed": int(seed), "intercept": b0, "profile": profile.to_dict(), "summary": summary.to_dict()}
    (out_dir / "generation.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def generate_federation(
    out: str | Path,
    n_sites: int = 3,
    patients_per_site: int = 100,
    seed: int = 0,
    profiles: list[SiteProfile] | None = None,
    workers: int | None = None,
    modalities: str | None = None,
) -> list[SiteSummary]:
    """Write ``out/site-1 ... site-N`` (one directory per profile, named after it)."""
    out = Path(out)
    profiles = profiles if profiles is not None else default_profiles(n_sites, patients_per_site, modalities)
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be unique, got {names}")
    return [generate_site(p, out / p.name, seed=seed, workers=workers) for p in profiles]
