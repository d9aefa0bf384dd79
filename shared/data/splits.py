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
