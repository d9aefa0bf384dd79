"""Patient-grouped, label-stratified train/val/test splits, reproducible from a seed."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace

from .schema import ImageRecord, Split

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # seed 001 uses 7:1:2


def patient_strata(records: Iterable[ImageRecord]) -> dict[str, int]:
    """Stratum of each patient: the most severe breast label (-1 = unlabelled)."""
    strata: dict[str, int] = defaultdict(lambda: -1)
    for r in records:
        sev = r.label.severity if r.label is not None else -1
        strata[r.patient] = max(strata[r.patient], sev)
    return dict(strata)


def assign_splits(
    records: list[ImageRecord], seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> list[ImageRecord]:
    """Return copies of ``records`` with ``split`` set; every image of a patient gets the same split.

    Within each stratum patients are ordered by a seeded hash of their pseudonym, so a
    patient's split does not depend on which other patients happen to be ingested in the
    same stratum order, and the same seed always gives the same split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for patient, stratum in patient_strata(records).items():
        by_stratum[stratum].append(patient)
    split_of: dict[str, Split] = {}
    for stratum in sorted(by_stratum):
        patients = sorted(by_stratum[stratum], key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
        n = len(patients)
        n_train = round(n * fractions[0])
        n_val = round(n * (fractions[0] + fractions[1])) - n_train
        for i, p in enumerate(patients):
            split_of[p] = Split.TRAIN if i < n_train else Split.VAL if i < n_train + n_val else Split.TEST
    return [replace(r, split=split_of[r.patient]) for r in records]


def assign_folds(
    records: list[ImageRecord], k: int, fold: int, seed: int = 0, val_fraction: float = 0.125
) -> list[ImageRecord]:
    """Copies of ``records`` with the splits of fold ``fold`` of a ``k``-fold cross-validation:
    patient-grouped and label-stratified like :func:`assign_splits`. Within each stratum the
    patients, in seeded-hash order, are dealt to the k folds in turn; fold ``fold`` is the test
    split, and ``val_fraction`` of the other patients (every 1/val_fraction-th in the same
    order) is validation. Over the k folds every patient is tested exactly once."""
    if k < 2 or not 0 <= fold < k:
        raise ValueError(f"k-fold: need k >= 2 and 0 <= fold < k, got k={k}, fold={fold}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for patient, stratum in patient_strata(records).items():
        by_stratum[stratum].append(patient)
    split_of: dict[str, Split] = {}
    every = max(2, round(1 / val_fraction))
    for stratum in sorted(by_stratum):
        patients = sorted(by_stratum[stratum], key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
        rest = 0
        for i, p in enumerate(patients):
            if i % k == fold:
                split_of[p] = Split.TEST
                continue
            split_of[p] = Split.VAL if rest % every == every - 1 else Split.TRAIN
            rest += 1
    return [replace(r, split=split_of[r.patient]) for r in records]
