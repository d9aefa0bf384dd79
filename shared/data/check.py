"""``fedbreast site check``: can this site train, and what is wrong with its data?"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import group_exams, load_manifest, meta_mismatch, read_site_meta
from .schema import Split


@dataclass
class SiteCheck:
    site: str
    images: int = 0
    exams: int = 0
    patients: int = 0
    incomplete_exams: dict[str, list[str]] = field(default_factory=dict)  # exam -> missing views
    balance: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> breasts
    duplicates: list[list[str]] = field(default_factory=list)  # groups of paths with one content hash
    leaking_patients: list[str] = field(default_factory=list)
    unlabelled_images: int = 0
    unmatched_annotations: list[str] = field(default_factory=list)
    rejected_files: int = 0
    problems: list[str] = field(default_factory=list)  # reasons the site cannot train

    @property
    def can_train(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"can_train": self.can_train}

    def render(self, limit: int = 20) -> str:
        out = [f"site {self.site}: {self.images} images, {self.exams} exams, {self.patients} patients"]
        out.append(f"rejected at ingest: {self.rejected_files} files (see rejected.txt)")
        out.append("label balance (breasts):")
        labels = ("malignant", "benign", "normal", "unlabelled")
        out.append("  split   " + "".join(f"{lab:>12}" for lab in labels))
        for split in ("train", "val", "test", "none"):
            if split in self.balance:
                out.append(f"  {split:<8}" + "".join(f"{self.balance[split].get(lab, 0):>12}" for lab in labels))
        out.append(f"incomplete exams: {len(self.incomplete_exams)}")
        for exam, missing in list(self.incomplete_exams.items())[:limit]:
            out.append(f"  {exam}: missing {', '.join(missing)}")
        out.append(f"duplicate images: {len(self.duplicates)} groups")
        for group in self.duplicates[:limit]:
            out.append("  " + " == ".join(group))
        out.append(f"patients in more than one split: {len(self.leaking_patients)}")
        out.append(f"images without annotations: {self.unlabelled_images}")
        out.append(f"annotation rows without an image: {len(self.unmatched_annotations)}")
        for where in self.unmatched_annotations[:limit]:
            out.append(f"  {where}")
        out.append("")
        if self.can_train:
            out.append("OK: the site can train")
        else:
            out.append("CANNOT TRAIN:")
            out.extend(f"  - {p}" for p in self.problems)
        return "\n".join(out)


def check_site(site_dir: str | Path) -> SiteCheck:
    """Inspect a site directory. Raises ManifestError if the manifest cannot be read at all."""
    site_dir = Path(site_dir)
    records = load_manifest(site_dir)
    meta = read_site_meta(site_dir)
    result = SiteCheck(site=meta.get("site", site_dir.name), images=len(records))
    exams = group_exams(records)
    result.exams = len(exams)
    result.patients = len({r.patient for r in records})
    result.rejected_files = int(meta.get("rejected_files", 0))
    result.unmatched_annotations = list(meta.get("annotations", {}).get("unmatched", []))
    result.unlabelled_images = sum(r.label is None for r in records)

    for exam_id, exam in sorted(exams.items()):
        missing = exam.missing()
        if missing:
            result.incomplete_exams[exam_id] = missing

    breasts: dict[tuple[str, str, str], tuple[str, str]] = {}
    for r in records:
        split = r.split.value if r.split else "none"
        label = r.label.value if r.label else "unlabelled"
        prev = breasts.get(r.breast_key)
        if prev is None or (prev[1] == "unlabelled" and label != "unlabelled"):
            breasts[r.breast_key] = (split, label)
    balance: dict[str, Counter] = defaultdict(Counter)
    for split, label in breasts.values():
        balance[split][label] += 1
    result.balance = {s: dict(c) for s, c in sorted(balance.items())}

    by_hash: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_hash[r.sha256].append(r.path)
    result.duplicates = [sorted(paths) for paths in by_hash.values() if len(paths) > 1]

    splits_of: dict[str, set] = defaultdict(set)
    for r in records:
        splits_of[r.patient].add(r.split)
    result.leaking_patients = sorted(p for p, s in splits_of.items() if len(s) > 1)

    train = balance.get(Split.TRAIN.value, Counter())
    if not records:
        result.problems.append("the manifest is empty")
    if train.get("malignant", 0) == 0:
        result.problems.append("no malignant breast in the train split")
    if train.get("benign", 0) + train.get("normal", 0) == 0:
        result.problems.append("no benign or normal breast in the train split")
    if result.leaking_patients:
        result.problems.append(f"{len(result.leaking_patients)} patients appear in more than one split")
    mismatch = meta_mismatch(site_dir)
    if mismatch:
        result.problems.append(mismatch)
    return result
