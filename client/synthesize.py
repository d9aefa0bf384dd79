"""``fedbreast site synthesize``, the site's own command (so it lives with the site's code):
virtual DES for every mammography view that has none, made at the site with a trained
cyclegan generator, written into the site's own ``virtual/`` folder (DICOM files plus their
manifest rows with ``synthetic: true``: shared/data/virtual.py).

Nothing leaves the site. Each FFDM (or LE) view without a DES of its breast and view goes
through the generator's preprocessing (seed 004's: pad square, contrast stretch, resize), the
view's generator (CC or MLO), and back through the inverse geometry to the stored image's
pixel grid, so every family reads it with its own preprocessing like an acquired DES. A run
uses them only with ``virtual-des = true``.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import map_coordinates

from fedbreast.client.policy import SitePolicy
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.dicom_writer import DicomMeta, new_study_uid, write_dicom
from fedbreast.shared.data.preprocess import Geometry
from fedbreast.shared.data.schema import Energy, ImageRecord, Modality
from fedbreast.shared.data.site_data import site_records
from fedbreast.shared.data.virtual import read_virtual, virtual_dir, write_virtual
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.families.cyclegan.model import CycleGANNet
from fedbreast.shared.families.cyclegan.task import preprocessing
from fedbreast.shared.training.tasks import cached_images, read_meta

BITS = 12  # the virtual DICOM's stored range: [0, 1] -> 0..4095
MANUFACTURER = "fedbreast virtual DES (cyclegan)"


class SynthesisError(FedbreastError, ValueError):
    """A synthesis that cannot run (wrong checkpoint family, no site): the message says why."""


@dataclass
class SynthesisResult:
    site: str
    written: int = 0
    kept: int = 0  # made earlier by this same checkpoint: not written again
    has_des: int = 0  # views with an acquired DES: nothing to synthesise
    failed: dict[str, str] = field(default_factory=dict)  # source image -> why
    seconds: float = 0.0
    images_per_s: float = 0.0

    def summary(self) -> str:
        lines = [
            f"{self.site}: {self.written} virtual DES written, {self.kept} already there from this checkpoint, "
            f"{self.has_des} views have an acquired DES, {len(self.failed)} failed "
            f"({self.seconds:.1f} s, {self.images_per_s:.1f} images/s)"
        ]
        lines += [f"  failed {k}: {v}" for k, v in sorted(self.failed.items())]
        return "\n".join(lines)


def sources_without_des(records: list[ImageRecord], all_views: bool = False) -> tuple[list[ImageRecord], int]:
    """The FFDM (else LE) view images whose breast and view have no acquired DES (with
    ``all_views`` every view's, for seed 004's replacement experiment), and how many views
    have an acquired DES."""
    by_view: dict[tuple[str, str, str, str], dict[Energy, ImageRecord]] = defaultdict(dict)
    for r in records:
        if r.modality is Modality.MG and r.view.is_mammo and not r.synthetic:
            by_view[(*r.breast_key, r.view.value)].setdefault(r.energy, r)
    todo, has = [], 0
    for key in sorted(by_view):
        imgs = by_view[key]
        if Energy.DES in imgs:
            has += 1
            if not all_views:
                continue
        src = imgs.get(Energy.FFDM) or imgs.get(Energy.LE)
        if src is not None:
            todo.append(src)
    return todo, has


def to_stored_grid(synthetic: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The generator's output (preprocessed grid) resampled onto the stored image's pixels:
    each stored pixel inside the crop takes the bilinear value at its mapped position; outside
    the crop, 0 (air)."""
    rows, cols = geometry.raw_shape
    y0, x0, y1, x1 = geometry.crop
    yy, xx = np.mgrid[y0:y1, x0:x1]
    pts = geometry.map_points(np.stack([xx.ravel(), yy.ravel()], axis=1))
    out = np.zeros((rows, cols), dtype=np.float32)
    vals = map_coordinates(synthetic.astype(np.float32), [pts[:, 1], pts[:, 0]], order=1, mode="nearest")
    out[y0:y1, x0:x1] = vals.reshape(y1 - y0, x1 - x0)
    return out


def synthesize_site(
    site_dir: Path, ckpt: Any, workers: int = 0, batch_size: int = 8, all_views: bool = False
) -> SynthesisResult:
    """Write virtual DES for every view of ``site_dir`` without one (see the module docstring);
    ``all_views``: also for views with an acquired DES (used only under ``virtual-des-replace``)."""
    t0 = time.perf_counter()
    try:
        cfg = RunConfig.from_flower(dict(ckpt.meta.get("config", {})))
    except (TypeError, ValueError) as exc:
        raise SynthesisError(f"the checkpoint's run config is not readable: {exc}") from None
    if cfg.model != "cyclegan":
        raise SynthesisError(f"the checkpoint is a {cfg.model!r} model; synthesis needs a cyclegan checkpoint")
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SynthesisError(f"{site_dir}: no such site directory")
    cfg = cfg.replace(workers=workers)
    # The checkpoint's settings size the network and the images: held to the site's default
    # policy limits (client/policy.py), as a run's would be, before anything is built.
    limits = SitePolicy()
    for key, asked, most in (
        ("cyclegan-filters", cfg.cyclegan_filters, limits.max_cyclegan_filters),
        ("cyclegan-blocks", cfg.cyclegan_blocks, limits.max_cyclegan_blocks),
        ("image-h x image-w", cfg.image_h * cfg.image_w, limits.max_image_pixels),
    ):
        if asked > most:
            raise SynthesisError(f"the checkpoint asks for {key} = {asked}, above the site policy's {most}")
    model = CycleGANNet(cfg.cyclegan_filters, cfg.cyclegan_blocks)
    try:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpt.arrays.items()}, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SynthesisError(f"the checkpoint's arrays do not fit its own cyclegan settings: {exc}") from None
    model.eval()
    records = site_records(site_dir)
    result = SynthesisResult(site=str(read_meta(site_dir).get("site") or site_dir.name))
    todo, result.has_des = sources_without_des(records, all_views)
    tag = str(ckpt.meta.get("sha256", ""))[:16]
    previous = {v.source_sha256: v for v in read_virtual(site_dir)}
    keep = {
        s.sha256: previous[s.sha256]
        for s in todo
        if s.sha256 in previous
        and previous[s.sha256].manufacturer == f"{MANUFACTURER} {tag}"
        and Path(previous[s.sha256].path).is_file()
    }
    result.kept = len(keep)
    todo = [s for s in todo if s.sha256 not in keep]
    cache = cached_images(site_dir, todo, preprocessing(cfg), cfg) if todo else None
    made: list[ImageRecord] = list(keep.values())
    out_dir = virtual_dir(site_dir)
    n_images = 0
    t_gen = 0.0
    for view in ("cc", "mlo"):
        batch = [s for s in todo if s.view.value.lower() == view]
        for start in range(0, len(batch), batch_size):
            part = []
            for s in batch[start : start + batch_size]:
                if cache is None or not cache.has(s.sha256):
                    result.failed[Path(s.path).name] = (cache.failure(s.sha256) if cache else None) or "not readable"
                    continue
                part.append(s)
            if not part:
                continue
            x = torch.stack([torch.from_numpy(np.array(cache.get(s.sha256), dtype=np.float32)) for s in part])[:, None]  # type: ignore[union-attr]
            t = time.perf_counter()
            with torch.no_grad():
                fake = model(x, view)[:, 0].numpy()
            t_gen += time.perf_counter() - t
            n_images += len(part)
            for s, img in zip(part, fake, strict=True):
                try:
                    made.append(_write_one(out_dir, s, img, cache.geometry(s.sha256), tag))  # type: ignore[union-attr]
                except (OSError, ValueError) as exc:
                    result.failed[Path(s.path).name] = f"{type(exc).__name__}: {exc}"
    write_virtual(site_dir, made)
    result.written = len(made) - result.kept
    result.seconds = time.perf_counter() - t0
    result.images_per_s = n_images / t_gen if t_gen > 0 else 0.0
    return result


def _write_one(out_dir: Path, src: ImageRecord, synthetic: np.ndarray, geometry: Geometry, tag: str) -> ImageRecord:
    pixels = np.round(np.clip(to_stored_grid(synthetic, geometry), 0, 1) * (2**BITS - 1)).astype(np.uint16)
    path = out_dir / f"{src.sha256[:24]}-DES.dcm"
    meta = DicomMeta(
        patient_id=src.patient,  # the site's pseudonym: the file stays at the site
        study_uid=new_study_uid(),
        laterality=src.laterality.value,
        view=src.view.value,
        energy="DES",
        manufacturer=f"{MANUFACTURER} {tag}",
        pixel_spacing_mm=float(src.pixel_spacing[0]) if src.pixel_spacing else 0.1,
        bits_stored=BITS,
        series_description=f"VIRTUAL DES from {src.energy.value} (synthetic, not acquired)",
    )
    write_dicom(path, pixels, meta)
    return ImageRecord(
        site=src.site,
        patient=src.patient,
        exam=src.exam,
        laterality=src.laterality,
        view=src.view,
        modality=src.modality,
        energy=Energy.DES,
        path=str(path.resolve()),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        rows=int(pixels.shape[0]),
        cols=int(pixels.shape[1]),
        pixel_spacing=src.pixel_spacing,
        manufacturer=f"{MANUFACTURER} {tag}",
        bits_stored=BITS,
        split=src.split,
        synthetic=True,
        source_sha256=src.sha256,
    )
