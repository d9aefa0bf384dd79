"""A site's training data as the ClientApp sees it: manifest -> cache -> per-split loaders.

In deployment every Flower message starts a fresh ClientApp process, so everything
expensive (preprocessing) lives in the on-disk cache; in simulation the process lives on,
and :func:`open_site` also memoises the opened site per (site dir, preprocessing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.cache import build_cache, open_cache
from fedbreast.shared.data.datasets import ExamDataset, make_loader
from fedbreast.shared.data.manifest import ManifestError, load_manifest, read_site_meta
from fedbreast.shared.data.preprocess import PRESETS, PreprocessConfig
from fedbreast.shared.data.schema import ImageRecord
from fedbreast.shared.data.virtual import virtual_records
from fedbreast.shared.errors import FedbreastError


class SiteUnavailable(FedbreastError, RuntimeError):
    """This site cannot take part (no manifest, empty data, missing modality); the message says why."""


def preprocess_for(cfg: RunConfig) -> PreprocessConfig:
    """The multi-view input definition; every site must use the same one for a shared model."""
    base = PRESETS["multiview"]
    return PreprocessConfig(**{**base.to_dict(), "window": cfg.window, "size": (cfg.image_h, cfg.image_w)})


@dataclass
class SiteData:
    site_dir: Path
    name: str
    records: list[ImageRecord]
    datasets: dict[str, ExamDataset] = field(default_factory=dict)

    def loader(self, split: str, batch_size: int, shuffle: bool, workers: int, seed: int = 0):
        import torch

        ds = self.datasets[split]
        gen = torch.Generator().manual_seed(seed)
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=gen)

    def exams(self, split: str) -> int:
        return len(self.datasets[split])


def channels_for(records: list[ImageRecord], in_channels: int, single_channel: str = "le") -> str:
    """Dataset channel mode for this site: CEM sites give LE+DES, FFDM-only sites give FFDM
    (and FFDM+DES with virtual DES); a one-channel network reads ``single_channel``'s image
    (multiview setting ``single-channel``: "le", LE or FFDM; "des", DES alone)."""
    energies = {r.energy.value for r in records}
    if in_channels == 1 and single_channel == "des":
        return "des_only"
    # An FFDM site with virtual DES (virtual-des = true) trains as a CEM site: (FFDM, DES) pairs.
    if in_channels == 2 and "DES" in energies and energies & {"LE", "FFDM"}:
        return "cem"
    return "ffdm"


def site_records(path: Path, virtual_des: bool = False, replace: float = 0.0, seed: int = 0) -> list[ImageRecord]:
    """The site's manifest rows; SiteUnavailable (saying why) when it is missing, bad or empty.
    ``virtual_des`` (run config ``virtual-des``): with the virtual DES images the site made
    (``fedbreast site synthesize``, shared/data/virtual.py) for views that have no real one,
    and for the fraction ``replace`` of its CEM patients (``virtual-des-replace``, chosen by
    ``seed``) instead of their real DES."""
    try:
        records = load_manifest(path)
    except ManifestError as exc:
        raise SiteUnavailable(str(exc)) from None
    if not records:
        raise SiteUnavailable(f"{path}: the manifest is empty")
    if virtual_des:
        try:
            virtual, replaced = virtual_records(path, records, replace, seed)
            records = [r for r in records if r.sha256 not in replaced] + virtual
        except ValueError as exc:
            raise SiteUnavailable(f"virtual-des: {exc}") from None
    return records


@lru_cache(maxsize=4)
def open_site(
    site_dir: str,
    cfg_key: str,
    in_channels: int,
    window: str,
    image_h: int,
    image_w: int,
    workers: int,
    virtual_des: bool = False,
    replace: float = 0.0,
    seed: int = 0,
    single_channel: str = "le",
) -> SiteData:
    """Load the manifest, warm the cache, and build the per-split datasets (memoised)."""
    path = Path(site_dir)
    records = site_records(path, virtual_des, replace, seed)
    cfg = RunConfig(in_channels=in_channels, window=window, image_h=image_h, image_w=image_w)
    pre = preprocess_for(cfg)
    mammo = [r for r in records if r.view.is_mammo]
    build_cache(path, mammo, pre, workers=max(1, workers))
    cache = open_cache(path, pre)
    channels = channels_for(mammo, in_channels, single_channel)
    name = read_site_meta(path).get("site", path.name)
    data = SiteData(site_dir=path, name=name, records=records)
    for split in ("train", "val", "test"):
        data.datasets[split] = ExamDataset(mammo, cache, split=split, channels=channels)
    if data.exams("train") == 0:
        reasons = sorted(set(data.datasets["train"].skipped.values()))[:3]
        raise SiteUnavailable(f"{path}: no complete exam in the train split ({'; '.join(reasons) or 'no train exams'})")
    return data


def site_for(site_dir: str | Path, cfg: RunConfig) -> SiteData:
    return open_site(
        str(Path(site_dir).resolve()),
        cfg.model_signature(),
        cfg.in_channels,
        cfg.window,
        cfg.image_h,
        cfg.image_w,
        cfg.workers,
        cfg.virtual_des,
        cfg.virtual_des_replace,
        cfg.seed,
        cfg.single_channel,
    )
