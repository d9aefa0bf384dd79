"""Torch datasets over a site manifest and its preprocessed cache, one per model family.

Every dataset:

* decides at construction which samples exist and records why the others do not
  (``skipped``: key -> reason; ``skip_summary()`` counts reasons);
* returns dicts of tensors; ``__getitems__(indices)`` builds a whole batch at once from the
  memmaps (torch's DataLoader calls it instead of ``__getitem__`` per index), so the
  DataLoader must be given ``collate_fn=passthrough_collate`` (``make_loader`` does that);
* labels breasts malignant = 1, benign / normal = 0; an unlabelled sample has
  ``y_mask = False`` and ``y = 0`` rather than being dropped, so it can still be predicted;
* exposes ``labels()`` (NaN = unlabelled) for :func:`class_balanced_sampler`.

Images come out as float32 by default; pass ``dtype=torch.float16`` to keep the cache's
half precision through pinning and the host-to-device copy and convert on the GPU.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler, get_worker_info

from .cache import ImageCache
from .manifest import MAMMO_VIEWS, group_exams
from .preprocess import lesion_mask, mapped_bbox, otsu_threshold
from .schema import Energy, ImageRecord, Label, Lesion, Modality, Split

# --- batches and loaders ---------------------------------------------------------------------


class Batch(dict):
    """A batch already collated by ``__getitems__`` (key -> tensor with a leading batch dim)."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            raise TypeError(
                "this dataset returns whole batches from __getitems__; build the DataLoader with "
                "collate_fn=fedbreast.shared.data.datasets.passthrough_collate (or use make_loader)"
            )
        return super().__getitem__(key)


def passthrough_collate(batch: Any) -> Any:
    """collate_fn for datasets whose ``__getitems__`` already returns a collated Batch."""
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int = 32,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    num_workers: int = 2,
    pin_memory: bool | None = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader wired for these datasets (batched fetch, pinning when CUDA is present)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        generator=generator,
        collate_fn=passthrough_collate,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


def class_balanced_sampler(
    labels: Sequence[float] | np.ndarray, num_samples: int | None = None, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """Draw samples with replacement so every class is equally likely (unlabelled: never drawn).

    ``labels`` are class ids (0/1, or more classes); NaN or negative means unlabelled.
    ``num_samples`` defaults to the number of labelled samples (one "epoch").
    """
    lab = np.asarray(labels, dtype=np.float64).ravel()
    valid = np.isfinite(lab) & (lab >= 0)
    if not valid.any():
        raise ValueError("class_balanced_sampler: labels: no labelled samples to draw from")
    cls = np.rint(lab[valid]).astype(np.int64)
    counts = np.bincount(cls)
    weights = np.zeros(len(lab), dtype=np.float64)
    weights[valid] = 1.0 / counts[cls]
    n = int(valid.sum()) if num_samples is None else int(num_samples)
    return WeightedRandomSampler(
        torch.as_tensor(weights),  # type: ignore[arg-type]  # annotated Sequence[float]; it calls torch.as_tensor on it
        n,
        replacement=True,
        generator=generator,
    )


# --- helpers ---------------------------------------------------------------------------------


def _filter_split(records: Iterable[ImageRecord], split: Split | str | None) -> list[ImageRecord]:
    if split is None:
        return list(records)
    s = Split(split)
    return [r for r in records if r.split == s]


def _label_value(label: Label | None) -> float:
    return float("nan") if label is None else float(label.is_malignant)


def _breast_labels(records: Iterable[ImageRecord]) -> dict[tuple[str, str, str], Label | None]:
    """Most severe label over the images of each breast of an exam (patient, exam, laterality)."""
    out: dict[tuple[str, str, str], Label | None] = {}
    for r in records:
        cur = out.get(r.breast_key)
        if cur is None or (r.label is not None and r.label.severity > cur.severity):
            out[r.breast_key] = r.label
    return out


def _stable_int(text: str) -> int:
    """A per-file seed that does not depend on PYTHONHASHSEED or on the sha256 being hex."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _not_cached(cache: ImageCache, r: ImageRecord) -> str:
    why = cache.failure(r.sha256)
    return f"not cached: {r.path}: " + (why.split(": ", 1)[-1] if why else "not built for this config")


def _check_indices(indices: Sequence[int], n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for a dataset of {n} samples")
    return np.where(idx < 0, idx + n, idx)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.float64)


def _check_dtype(owner: str, dtype: torch.dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{owner}.dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    return dtype


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised output tensor; in a DataLoader worker it lives in shared memory (as
    default_collate does it), so handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)


def _to_dtype(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(arr)
    return t if t.dtype == dtype else t.to(dtype)


def _window(arr: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """arr[top:top+h, left:left+w] with zeros where the window leaves the image."""
    H, W = arr.shape
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
    out = np.zeros((h, w), dtype=arr.dtype)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = arr[y0:y1, x0:x1]
    return out


class _CachedDataset(Dataset):
    collate_fn = staticmethod(passthrough_collate)

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}
        self._y = np.zeros(0, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._y)

    def __getitems__(self, indices: Sequence[int]) -> Batch:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([int(i)])
        return {k: v[0] for k, v in batch.items()}

    def skip_summary(self) -> Counter:
        """How many were skipped for each kind of reason (the text before the first colon)."""
        return Counter(reason.split(":", 1)[0] for reason in self.skipped.values())

    def labels(self) -> np.ndarray:
        """Per-sample label (1 malignant, 0 benign/normal, NaN unlabelled) for class balancing."""
        return self._y.astype(np.float64).copy()


def _label_arrays(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float32)
    mask = np.isfinite(v)
    return np.where(mask, v, 0.0).astype(np.float32), mask


# --- seed 001: four-view exams -----------------------------------------------------------------

CHANNEL_MODES = ("cem", "ffdm", "le_only", "des_only")


class ExamDataset(_CachedDataset):
    """One sample per exam with all four mammography views, (4, C, H, W) in MAMMO_VIEWS order.

    ``channels``: "cem" -> C=2 (LE, DES), CEM exams only; "ffdm" -> C=1, the FFDM image, or
    the LE image of a CEM exam (an LE is an FFDM-equivalent), so FFDM and CEM sites train
    one model; "le_only" -> C=1, LE of CEM exams only (the ablation); "des_only" -> C=1, the DES
    image (acquired, or virtual at an FFDM site with virtual DES) of exams that have one.
    Labels: ``y`` (2,) = [left, right] breast, ``y_mask`` (2,) marks labelled breasts.
    ``fill_missing`` (scoring only; training skips such exams): a missing or uncached view is
    a blank (zero) slot instead, and ``missing[i]`` names exam i's blank slots ("RCC-LE").
    """

    def __init__(
        self,
        records: Iterable[ImageRecord],
        cache: ImageCache,
        split: Split | str | None = None,
        channels: str = "cem",
        dtype: torch.dtype = torch.float32,
        fill_missing: bool = False,
    ) -> None:
        super().__init__()
        if channels not in CHANNEL_MODES:
            raise ValueError(f"ExamDataset.channels: {channels!r} is not one of {CHANNEL_MODES}")
        if cache.fixed_shape is None:
            raise ValueError(f"ExamDataset: cache {cache.cache_dir} has size=None; exams need a fixed-size config")
        self.cache, self.channels, self.dtype = cache, channels, _check_dtype("ExamDataset", dtype)
        self.C = 2 if channels == "cem" else 1
        exams = group_exams(_filter_split(records, split))
        self.exams: list[str] = []
        self.patients: list[str] = []
        self.missing: list[list[str]] = []
        shas: list[str] = []
        ys: list[list[float]] = []
        for key in sorted(exams):
            ex = exams[key]
            energies = self._energies(ex.energies)
            if not ex.images:
                self.skipped[key] = "no mammography: ultrasound only"
                continue
            if energies is None:
                need = "a DES image" if channels == "des_only" else "a CEM exam"
                self.skipped[key] = f"wrong modality: {channels!r} needs {need}, this one has {sorted(ex.energies)}"
                continue
            row, reason, blank = [], None, []
            for v in MAMMO_VIEWS:
                for e in energies:
                    r = ex.images.get((v[0], v[1:], e))
                    if r is None:
                        reason = f"missing view: {v}-{e}"
                    elif not cache.has(r.sha256):
                        reason = _not_cached(cache, r)
                    else:
                        row.append(r.sha256)
                        continue
                    if fill_missing:
                        blank.append(f"{v}-{e}" + ("" if r is None else " (not cached)"))
                        row.append("")  # locate(): a blank slot, gathered as zeros
                        reason = None
                        continue
                    break
                if reason:
                    break
            if reason:
                self.skipped[key] = reason
                continue
            self.exams.append(key)
            self.patients.append(ex.patient)
            self.missing.append(blank)
            shas.extend(row)
            ys.append([_label_value(ex.breast_label("L")), _label_value(ex.breast_label("R"))])
        shard, rows = cache.locate(shas)
        self._shard = shard.reshape(-1, 4 * self.C)
        self._row = rows.reshape(-1, 4 * self.C)
        yv = np.asarray(ys, dtype=np.float32).reshape(-1, 2)
        self._y2, self._m2 = _label_arrays(yv.ravel().tolist())
        self._y2, self._m2 = self._y2.reshape(-1, 2), self._m2.reshape(-1, 2)
        # Exam-level label for balancing: malignant if either breast is.
        exam_y = np.where(self._m2, self._y2, -1.0).max(axis=1, initial=-1.0)
        self._y = np.where(exam_y >= 0, exam_y, np.nan).astype(np.float32)

    def _energies(self, present: set[str]) -> tuple[str, ...] | None:
        if self.channels == "cem":
            if "FFDM" in present and "DES" in present and "LE" not in present:
                return ("FFDM", "DES")  # an FFDM exam with virtual DES (shared/data/virtual.py)
            return ("LE", "DES") if present & {"LE", "DES"} else None
        if self.channels == "le_only":
            return ("LE",) if "LE" in present else None
        if self.channels == "des_only":
            return ("DES",) if "DES" in present else None
        return ("FFDM",) if "FFDM" in present or not present & {"LE"} else ("LE",)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = _check_indices(indices, len(self))
        H, W = self.cache.fixed_shape  # type: ignore[misc]
        x = _batch_tensor((len(idx), 4, self.C, H, W), self.dtype)
        self.cache.gather(self._shard[idx].ravel(), self._row[idx].ravel(), out=x.numpy().reshape(-1, H, W))
        return Batch(
            x=x,
            y=torch.from_numpy(self._y2[idx]),
            y_mask=torch.from_numpy(self._m2[idx]),
            index=torch.from_numpy(idx),
        )


# --- seed 000: lesion and normal-tissue patches ------------------------------------------------


class _PatchDataset(_CachedDataset):
    """Square patches from single images; grouped by patient for per-patient fine-tuning."""

    def __init__(
        self,
        records: Iterable[ImageRecord],
        cache: ImageCache,
        split: Split | str | None,
        patch: int,
        n_patches: int,
        seed: int,
        energies: Sequence[str] | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if patch < 1 or n_patches < 1:
            raise ValueError(f"{type(self).__name__}: patch and n_patches must be >= 1, got {patch}, {n_patches}")
        if energies is not None:
            for e in energies:
                Energy(e)  # raises naming the bad value
        self.cache, self.patch, self.n_patches, self.seed = cache, int(patch), int(n_patches), int(seed)
        self.dtype = _check_dtype(type(self).__name__, dtype)
        recs = _filter_split(records, split)
        breast_label = _breast_labels(recs)
        self.images: list[ImageRecord] = []
        self.patient_skipped: dict[str, str] = {}
        img, top, left, ys = [], [], [], []
        for r in sorted(
            recs, key=lambda r: (r.patient, r.exam, r.laterality.value, r.view.value, r.energy.value, r.sha256)
        ):
            if r.modality is not Modality.MG or not r.view.is_mammo:
                continue
            if energies is not None and r.energy.value not in energies:
                continue
            if not cache.has(r.sha256):
                self.skipped[r.path] = _not_cached(cache, r)
                continue
            rng = np.random.default_rng([self.seed, _stable_int(r.sha256)])
            centres, label, reason = self._centres(r, breast_label.get(r.breast_key), rng)
            if reason:
                self.skipped[r.path] = reason
                continue
            H, W = cache.shape(r.sha256)
            P = self.patch
            # Top-left corners, shifted inwards at the border so patches hold image, not padding.
            t = np.clip(centres[:, 0] - P // 2, 0, max(H - P, 0))
            l_ = np.clip(centres[:, 1] - P // 2, 0, max(W - P, 0))
            img.append(np.full(len(centres), len(self.images), dtype=np.int64))
            top.append(t)
            left.append(l_)
            ys.append(np.full(len(centres), label, dtype=np.float32))
            self.images.append(r)
        self._img = np.concatenate(img) if img else np.zeros(0, np.int64)
        self._top = np.concatenate(top).astype(np.int64) if top else np.zeros(0, np.int64)
        self._left = np.concatenate(left).astype(np.int64) if left else np.zeros(0, np.int64)
        self._y = np.concatenate(ys) if ys else np.zeros(0, np.float32)
        self._yv, self._ym = _label_arrays(self._y.tolist())
        self._by_patient: dict[str, np.ndarray] = {}
        patient_of = np.array([r.patient for r in self.images], dtype=object)
        for p in sorted(set(patient_of.tolist())):
            self._by_patient[p] = (
                np.flatnonzero(patient_of[self._img] == p) if len(self._img) else np.zeros(0, np.int64)
            )
        reasons: dict[str, list[str]] = defaultdict(list)
        for r in recs:
            if r.path in self.skipped:
                reasons[r.patient].append(self.skipped[r.path])
        for p, rs in reasons.items():
            if p not in self._by_patient:
                self.patient_skipped[p] = "; ".join(sorted(set(rs)))

    def _centres(
        self, r: ImageRecord, breast_label: Label | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, float, str | None]:  # pragma: no cover - overridden
        raise NotImplementedError

    def patients(self) -> list[str]:
        """Patients with at least one patch (see ``patient_skipped`` for those without)."""
        return list(self._by_patient)

    def indices_for_patient(self, patient: str) -> np.ndarray:
        """Sample indices of one patient's patches (empty if the patient has none)."""
        return self._by_patient.get(patient, np.zeros(0, dtype=np.int64))

    def patch_boxes(self, indices: Sequence[int]) -> np.ndarray:
        """(N, 4) [top, left, bottom, right) of patches in their preprocessed image."""
        idx = _check_indices(indices, len(self))
        P = self.patch
        return np.stack([self._top[idx], self._left[idx], self._top[idx] + P, self._left[idx] + P], axis=1)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = _check_indices(indices, len(self))
        P = self.patch
        out = np.zeros((len(idx), P, P), dtype=np.float16)
        images = self._img[idx]
        for im in np.unique(images):
            sel = np.flatnonzero(images == im)
            arr = self.cache.get(self.images[int(im)].sha256)
            H, W = arr.shape
            if H < P or W < P:  # small image: pad once so every window exists
                arr = np.pad(arr, ((0, max(0, P - H)), (0, max(0, P - W))))
            windows = np.lib.stride_tricks.sliding_window_view(arr, (P, P))
            out[sel] = windows[self._top[idx[sel]], self._left[idx[sel]]]
        return Batch(
            x=_to_dtype(out, self.dtype)[:, None],
            y=torch.from_numpy(self._yv[idx]),
            y_mask=torch.from_numpy(self._ym[idx]),
            index=torch.from_numpy(idx),
            image=torch.from_numpy(images),
        )


class LesionPatchDataset(_PatchDataset):
    """``n_patches`` patches of ``patch`` px per image, centred on random lesion pixels (seed 000).

    Centres are drawn once, reproducibly from ``seed`` and the file's hash, without replacement
    when the lesion has enough pixels. Label: the breast's label. Use a native-resolution
    cache (preset "patches") so patches keep the original resolution.
    """

    def __init__(
        self,
        records: Iterable[ImageRecord],
        cache: ImageCache,
        split: Split | str | None = None,
        patch: int = 227,
        n_patches: int = 200,
        seed: int = 0,
        energies: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(records, cache, split, patch, n_patches, seed, energies, dtype)

    def _centres(
        self, r: ImageRecord, breast_label: Label | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, float, str | None]:
        if not r.lesions:
            return np.zeros((0, 2), np.int64), 0.0, "no lesion outline"
        mask = lesion_mask(r.lesions, self.cache.geometry(r.sha256), self.cache.shape(r.sha256))
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            return (
                np.zeros((0, 2), np.int64),
                0.0,
                "lesion outside image: the outline falls outside the preprocessed image",
            )
        pick = rng.choice(len(ys), size=self.n_patches, replace=len(ys) < self.n_patches)
        return np.stack([ys[pick], xs[pick]], axis=1), _label_value(breast_label), None


class NormalPatchDataset(_PatchDataset):
    """Patches of tissue outside every lesion, labelled benign (seed 000's patient-specific fine-tuning).

    A centre qualifies when it lies in the breast (Otsu foreground of the preprocessed
    image), the whole patch fits in the image, and the patch grown by ``margin`` px on
    each side touches no lesion pixel. An image of a breast labelled benign/malignant but
    without outlines is skipped: its normal tissue cannot be told from its lesion. Images or
    patients with nothing to sample yield no patches and a reason in ``skipped`` /
    ``patient_skipped``, never an exception.
    """

    def __init__(
        self,
        records: Iterable[ImageRecord],
        cache: ImageCache,
        split: Split | str | None = None,
        patch: int = 227,
        n_patches: int = 200,
        seed: int = 0,
        margin: int = 16,
        energies: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if margin < 0:
            raise ValueError(f"NormalPatchDataset.margin: expected >= 0, got {margin}")
        self.margin = int(margin)
        super().__init__(records, cache, split, patch, n_patches, seed, energies, dtype)

    def _centres(
        self, r: ImageRecord, breast_label: Label | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, float, str | None]:
        none = np.zeros((0, 2), np.int64)
        if not r.lesions and breast_label is not None and breast_label is not Label.NORMAL:
            return none, 0.0, f"no lesion outline: breast labelled {breast_label.value}, its normal tissue is unknown"
        H, W = self.cache.shape(r.sha256)
        P = self.patch
        if H < P or W < P:
            return none, 0.0, f"no normal tissue: image {H}x{W} is smaller than a {P}-px patch"
        img = self.cache.get(r.sha256)
        s = max(1, max(H, W) // 512)
        t = otsu_threshold(img[::s, ::s])
        if t is None:
            return none, 0.0, "no normal tissue: blank image"
        ok = np.zeros((H, W), dtype=bool)
        h = P // 2
        ok[h : h + H - P + 1, h : h + W - P + 1] = True  # centres whose whole patch fits
        ok &= img > t
        if r.lesions:
            lesion = lesion_mask(r.lesions, self.cache.geometry(r.sha256), (H, W)).astype(np.uint8)
            # Max filter of the patch size + margin marks every centre whose patch would touch a lesion.
            blocked = ndimage.maximum_filter(lesion, size=P + 2 * self.margin, mode="constant", cval=0)
            ok &= blocked == 0
        ys, xs = np.nonzero(ok)
        if len(ys) == 0:
            why = f"every {P}-px patch in the breast overlaps a lesion (margin {self.margin} px)"
            return none, 0.0, f"no normal tissue: {why}"
        pick = rng.choice(len(ys), size=self.n_patches, replace=len(ys) < self.n_patches)
        return np.stack([ys[pick], xs[pick]], axis=1), 0.0, None


# --- seed 003: fixed box around the lesion -----------------------------------------------------


def _largest_lesion(lesions: Sequence[Lesion]) -> Lesion:
    def area(les: Lesion) -> float:
        x0, y0, x1, y1 = les.bbox()
        return (x1 - x0) * (y1 - y0)

    return max(lesions, key=area)


class _EpochMixin:
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the random parts (jitter, ultrasound choice) for a new epoch, reproducibly."""
        self.epoch = int(epoch)


class LesionBoxDataset(_EpochMixin, _CachedDataset):
    """Per lesion breast, a ``box``-px square around the lesion in CC and MLO, LE and DES (seed 003).

    Returns x of shape (2 views [CC, MLO], len(energies), box, box). The box centre is the
    centre of the view's largest lesion outline; each call shifts it by up to ``jitter`` of
    the box per axis, the same shift for LE and DES of a view (they stay aligned),
    reproducibly from (seed, epoch, index). ``shift`` (px) moves each view's centre by that
    distance in a direction drawn once per lesion breast from (seed, the breast's key), the
    same for LE and DES of the view and for every epoch (seed 003's robustness test: 10, 20,
    40 px in a randomly picked direction). Use a native-resolution cache (preset "roi_box").
    """

    VIEWS = ("CC", "MLO")

    def __init__(
        self,
        records: Iterable[ImageRecord],
        cache: ImageCache,
        split: Split | str | None = None,
        box: int = 256,
        jitter: float = 0.05,
        seed: int = 0,
        energies: Sequence[str] = ("LE", "DES"),
        dtype: torch.dtype = torch.float32,
        shift: float = 0.0,
    ) -> None:
        super().__init__()
        if box < 1 or not 0 <= jitter < 0.5:
            raise ValueError(f"LesionBoxDataset: box must be >= 1 and jitter in [0, 0.5), got {box}, {jitter}")
        if not (math.isfinite(shift) and shift >= 0):
            raise ValueError(f"LesionBoxDataset: shift must be a finite distance >= 0 px, got {shift}")
        self.cache, self.box, self.jitter, self.seed = cache, int(box), float(jitter), int(seed)
        self.shift = float(shift)
        self.dtype = _check_dtype("LesionBoxDataset", dtype)
        self.energies = tuple(Energy(e).value for e in energies)
        recs = _filter_split(records, split)
        labels = _breast_labels(recs)
        by_breast: dict[tuple[str, str, str], dict[tuple[str, str], ImageRecord]] = defaultdict(dict)
        for rec in recs:
            if rec.modality is Modality.MG and rec.view.is_mammo:
                by_breast[rec.breast_key].setdefault((rec.view.value, rec.energy.value), rec)
        self.breasts: list[tuple[str, str, str]] = []
        shas: list[list[str]] = []
        centres: list[list[tuple[float, float]]] = []
        ys: list[float] = []
        for key in sorted(by_breast):
            imgs = by_breast[key]
            if not any(r.lesions for r in imgs.values()):
                continue  # not a lesion breast
            row, cen, reason = [], [], None
            for view in self.VIEWS:
                outlined = [imgs[(view, e)] for e in self.energies if (view, e) in imgs and imgs[(view, e)].lesions]
                outlined += [r for (v, _), r in imgs.items() if v == view and r.lesions]
                if not outlined:
                    reason = f"no lesion outline: none in {view}"
                    break
                lesion = _largest_lesion(outlined[0].lesions)
                for e in self.energies:
                    r = imgs.get((view, e))
                    if r is None:
                        reason = f"missing view: {key[2]}{view}-{e}"
                    elif not cache.has(r.sha256):
                        reason = _not_cached(cache, r)
                    if reason:
                        break
                    assert r is not None  # a missing view set reason above
                    x0, y0, x1, y1 = mapped_bbox(lesion, cache.geometry(r.sha256))
                    row.append(r.sha256)
                    cen.append(((y0 + y1) / 2, (x0 + x1) / 2))
                if reason:
                    break
            if reason:
                self.skipped["/".join(key)] = reason
                continue
            self.breasts.append(key)
            shas.append(row)
            centres.append(cen)
            ys.append(_label_value(labels.get(key)))
        E = len(self.energies)
        self._shas = np.asarray(shas, dtype=object).reshape(-1, 2, E)
        self._centre = np.asarray(centres, dtype=np.float64).reshape(-1, 2, E, 2)
        offsets = [box_shift(self.seed, key, self.shift) for key in self.breasts]  # (2 views, [dy, dx]) each
        self._offset = np.asarray(offsets, dtype=np.float64).reshape(-1, 2, 1, 2)  # shared by LE and DES
        self._y = np.asarray(ys, dtype=np.float32)
        self._yv, self._ym = _label_arrays(ys)

    def boxes(self, index: int) -> np.ndarray:
        """(2 views, E, 2) top-left corners the sample at ``index`` uses in this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        shift = rng.uniform(-self.jitter, self.jitter, size=(2, 1, 2)) * self.box  # shared by LE and DES
        return np.rint(self._centre[index] - self.box / 2 + shift + self._offset[index]).astype(np.int64)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = _check_indices(indices, len(self))
        E, B = len(self.energies), self.box
        out = np.zeros((len(idx), 2, E, B, B), dtype=np.float16)
        for k, i in enumerate(idx):
            corners = self.boxes(int(i))
            for v in range(2):
                for e in range(E):
                    arr = self.cache.get(self._shas[i, v, e])
                    top, left = corners[v, e]
                    # Keep the box inside the image when it can be; pad only smaller images.
                    top = int(np.clip(top, 0, max(arr.shape[0] - B, 0)))
                    left = int(np.clip(left, 0, max(arr.shape[1] - B, 0)))
                    out[k, v, e] = _window(arr, top, left, B, B)
        return Batch(
            x=_to_dtype(out, self.dtype),
            y=torch.from_numpy(self._yv[idx]),
            y_mask=torch.from_numpy(self._ym[idx]),
            index=torch.from_numpy(idx),
        )


def box_shift(seed: int, key: Sequence[str], distance: float) -> np.ndarray:
    """(2 views [CC, MLO], 2 [dy, dx]): a shift of ``distance`` px in a direction drawn per view
    from (seed, the lesion breast's key), the same at every call (zeros when ``distance`` is 0)."""
    if distance == 0:
        return np.zeros((2, 2))
    digest = hashlib.sha256("/".join(key).encode()).digest()
    rng = np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])
    angle = rng.uniform(0.0, 2 * math.pi, size=2)
    return distance * np.stack([np.sin(angle), np.cos(angle)], axis=1)


# --- seed 004: modality x view slots ----------------------------------------------------------

MODALITY_VIEW_SLOTS = (("FFDM", "CC"), ("FFDM", "MLO"), ("CESM", "CC"), ("CESM", "MLO"))


class ModalityViewDataset(_CachedDataset):
    """Per breast, the four (modality, view) images FFDM-CC, FFDM-MLO, CESM-CC, CESM-MLO (seed 004).

    FFDM slots take the FFDM image, else the LE image (an FFDM-equivalent); CESM slots take
    the DES image. x: (4, 1, H, W) with zeros where a slot is empty; ``available`` (4,) marks
    the filled slots, so the late-fusion model (or a synthetic-CESM generator) knows what is real.
    """

    def __init__(
        self,
        records: Iterable[ImageRecord],
        cache: ImageCache,
        split: Split | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if cache.fixed_shape is None:
            raise ValueError(f"ModalityViewDataset: cache {cache.cache_dir} has size=None; needs a fixed-size config")
        self.cache, self.dtype = cache, _check_dtype("ModalityViewDataset", dtype)
        recs = _filter_split(records, split)
        labels = _breast_labels(recs)
        by_breast: dict[tuple[str, str, str], dict[tuple[str, str], ImageRecord]] = defaultdict(dict)
        for rec in recs:
            if rec.modality is Modality.MG and rec.view.is_mammo:
                by_breast[rec.breast_key].setdefault((rec.energy.value, rec.view.value), rec)
        self.breasts: list[tuple[str, str, str]] = []
        self.missing_slots: Counter = Counter()
        shas: list[str] = []
        ys: list[float] = []
        for key in sorted(by_breast):
            imgs = by_breast[key]
            row = []
            for modality, view in MODALITY_VIEW_SLOTS:
                sources = ("FFDM", "LE") if modality == "FFDM" else ("DES",)
                r = next((imgs[(e, view)] for e in sources if (e, view) in imgs), None)
                if r is None or not cache.has(r.sha256):
                    self.missing_slots[f"{modality}-{view}" + ("" if r is None else " (not cached)")] += 1
                    row.append("")
                else:
                    row.append(r.sha256)
            if not any(row):
                self.skipped["/".join(key)] = "no image: none of FFDM-CC, FFDM-MLO, CESM-CC, CESM-MLO is cached"
                continue
            self.breasts.append(key)
            shas.extend(row)
            ys.append(_label_value(labels.get(key)))
        shard, rows = cache.locate(shas)
        self._shard, self._row = shard.reshape(-1, 4), rows.reshape(-1, 4)
        self._avail = self._shard >= 0
        self._y = np.asarray(ys, dtype=np.float32)
        self._yv, self._ym = _label_arrays(ys)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = _check_indices(indices, len(self))
        H, W = self.cache.fixed_shape  # type: ignore[misc]
        x = _batch_tensor((len(idx), 4, 1, H, W), self.dtype)
        self.cache.gather(self._shard[idx].ravel(), self._row[idx].ravel(), out=x.numpy().reshape(-1, H, W))
        return Batch(
            x=x,
            available=torch.from_numpy(self._avail[idx]),
            y=torch.from_numpy(self._yv[idx]),
            y_mask=torch.from_numpy(self._ym[idx]),
            index=torch.from_numpy(idx),
        )


# --- seed 002: mammography + ultrasound lesion pairs ------------------------------------------


def _square_crop(arr: np.ndarray, bbox: tuple[float, float, float, float], margin: float, out: int) -> torch.Tensor:
    """Square crop around an (x0, y0, x1, y1) box grown by ``margin`` per side, resized to out x out."""
    x0, y0, x1, y1 = bbox
    side = max(x1 - x0, y1 - y0, 1.0) * (1 + 2 * margin)
    side_px = max(8, int(round(side)))
    top = int(round((y0 + y1) / 2 - side_px / 2))
    left = int(round((x0 + x1) / 2 - side_px / 2))
    # Shift inwards when the image is large enough, so the crop holds tissue rather than padding.
    H, W = arr.shape
    top = int(np.clip(top, 0, H - side_px)) if H >= side_px else top
    left = int(np.clip(left, 0, W - side_px)) if W >= side_px else left
    win = torch.from_numpy(_window(arr, top, left, side_px, side_px).astype(np.float32))
    return F.interpolate(win[None, None], size=(out, out), mode="bilinear", antialias=True, align_corners=False)[0]


class MammoUSPairDataset(_EpochMixin, _CachedDataset):
    """A mammography lesion crop paired with an ultrasound crop of the same breast (seed 002).

    One sample per (mammography image, lesion outline) among ``mg_energies``. The ultrasound
    partner is drawn per epoch among the breast's cached US images (those with an outline
    preferred; the crop is the outline's box, or the whole image without one). Breasts
    without ultrasound (or ``cache_us=None``: a site with no US) give a zero US tensor and
    ``has_us=False``, so they still train the mammography branch. Label: the lesion's own
    label when the outline carries one, else the breast's.
    """

    def __init__(
        self,
        records: Iterable[ImageRecord],
        cache_mg: ImageCache,
        cache_us: ImageCache | None,
        split: Split | str | None = None,
        crop: int = 224,
        margin: float = 0.15,
        mg_energies: Sequence[str] = ("FFDM", "LE"),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if crop < 1 or margin < 0:
            raise ValueError(f"MammoUSPairDataset: crop must be >= 1 and margin >= 0, got {crop}, {margin}")
        self.cache_mg, self.cache_us = cache_mg, cache_us
        self.crop, self.margin, self.seed = int(crop), float(margin), int(seed)
        self.dtype = _check_dtype("MammoUSPairDataset", dtype)
        energies = {Energy(e).value for e in mg_energies}
        recs = _filter_split(records, split)
        labels = _breast_labels(recs)
        us_of: dict[tuple[str, str], list[ImageRecord]] = defaultdict(list)
        for r in recs:
            if r.modality is Modality.US:
                if cache_us is not None and cache_us.has(r.sha256):
                    us_of[(r.patient, r.laterality.value)].append(r)
                else:
                    self.skipped[r.path] = (
                        "not cached: no ultrasound cache" if cache_us is None else _not_cached(cache_us, r)
                    )
        for rs in us_of.values():
            rs.sort(key=lambda r: r.sha256)
        self.samples: list[tuple[ImageRecord, int]] = []
        self._us: list[list[ImageRecord]] = []
        ys: list[float] = []
        for r in sorted(
            recs, key=lambda r: (r.patient, r.exam, r.laterality.value, r.view.value, r.energy.value, r.sha256)
        ):
            if r.modality is not Modality.MG or r.energy.value not in energies:
                continue
            if not r.lesions:
                continue
            if not cache_mg.has(r.sha256):
                self.skipped[r.path] = _not_cached(cache_mg, r)
                continue
            us = us_of.get((r.patient, r.laterality.value), [])
            outlined = [u for u in us if u.lesions]
            for k, lesion in enumerate(r.lesions):
                self.samples.append((r, k))
                self._us.append(outlined or us)
                ys.append(_label_value(lesion.label if lesion.label is not None else labels.get(r.breast_key)))
        self._y = np.asarray(ys, dtype=np.float32)
        self._yv, self._ym = _label_arrays(ys)
        self._has_us = np.array([bool(u) for u in self._us], dtype=bool)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = _check_indices(indices, len(self))
        n, c = len(idx), self.crop
        mg = torch.zeros(n, 1, c, c)
        us = torch.zeros(n, 1, c, c)
        for k, i in enumerate(idx):
            r, li = self.samples[int(i)]
            arr = self.cache_mg.get(r.sha256)
            mg[k] = _square_crop(arr, mapped_bbox(r.lesions[li], self.cache_mg.geometry(r.sha256)), self.margin, c)
            candidates = self._us[int(i)]
            if candidates and self.cache_us is not None:
                rng = np.random.default_rng([self.seed, self.epoch, int(i)])
                u = candidates[int(rng.integers(len(candidates)))]
                uarr = self.cache_us.get(u.sha256)
                if u.lesions:
                    bbox = mapped_bbox(_largest_lesion(u.lesions), self.cache_us.geometry(u.sha256))
                    us[k] = _square_crop(uarr, bbox, self.margin, c)
                else:
                    us[k] = _square_crop(uarr, (0.0, 0.0, uarr.shape[1] - 1.0, uarr.shape[0] - 1.0), 0.0, c)
        return Batch(
            mg=mg.to(self.dtype),
            us=us.to(self.dtype),
            has_us=torch.from_numpy(self._has_us[idx]),
            y=torch.from_numpy(self._yv[idx]),
            y_mask=torch.from_numpy(self._ym[idx]),
            index=torch.from_numpy(idx),
        )


__all__ = [
    "Batch",
    "ExamDataset",
    "LesionBoxDataset",
    "LesionPatchDataset",
    "MODALITY_VIEW_SLOTS",
    "MammoUSPairDataset",
    "ModalityViewDataset",
    "NormalPatchDataset",
    "class_balanced_sampler",
    "make_loader",
    "passthrough_collate",
]
