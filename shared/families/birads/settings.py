"""The birads family's run settings (seed 000): lesion patches and the BI-RADS lexicon."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings

BIRADS_FUSIONS = ("none", "feature", "decision")  # none: patches only; feature: concat at FC1
DECISION_FUSIONS = ("max", "linear", "stacked")  # decision fusion of p(BI-RADS) and p(CNN)
PATCH_ENERGIES = ("LE", "DES", "FFDM")
# Seed 000's four lexicon groups: 3 + 3 + 3 + 4 = 13 one-hot elements in the paper. Our lexicon
# keeps the ACR atlas' seven margin values (the seed groups them into three) and an unknown
# slot per group, so the default vector has 21 slots.
SEED_GROUPS = ("mass_shape", "mass_margin", "internal_enhancement", "bpe")
# Groups beyond the seed's, each flagged in the report and the model card when used.
EXTRA_GROUPS = {
    "assessment": "uses the reader's assessment: the BI-RADS category (2, 3, 4, 5, ...) is the radiologist's "
    "malignancy call, close to the label, so the model's score leans on it (not a seed 000 input)",
    "density": "uses breast density (not one of seed 000's four BI-RADS groups)",
}


@dataclass(frozen=True)
class BiradsSettings(Settings):
    patch_size: int = 227
    n_patches: int = 200  # per image; the lesion score is the mean over them
    patch_energies: str = "DES"  # comma list of LE, DES, FFDM: images patches are drawn from
    birads_fusion: str = "feature"  # none | feature (concat at FC1) | decision
    decision_fusion: str = "max"  # max | linear | stacked (decision fusion only)
    fusion_alpha: float = 0.5  # linear decision fusion: alpha * p(BI-RADS) + (1 - alpha) * p(CNN)
    birads_groups: str = ",".join(SEED_GROUPS)  # seed 000; add density / assessment explicitly (flagged)

    @property
    def patch_energy_list(self) -> tuple[str, ...]:
        return tuple(e.strip().upper() for e in self.patch_energies.split(",") if e.strip())

    @property
    def birads_group_list(self) -> tuple[str, ...]:
        return tuple(g.strip() for g in self.birads_groups.split(",") if g.strip())

    def check(self, bad: Bad) -> None:
        from fedbreast.shared.data.schema import BIRADS_LEXICON

        for name, choices in (("birads_fusion", BIRADS_FUSIONS), ("decision_fusion", DECISION_FUSIONS)):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        for name in ("patch_size", "n_patches"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if not 0 <= self.fusion_alpha <= 1:
            raise bad("fusion_alpha", "must be in [0, 1]")
        energies = self.patch_energy_list
        if not energies or any(e not in PATCH_ENERGIES for e in energies):
            raise bad("patch_energies", f"must be a comma-separated list of {', '.join(PATCH_ENERGIES)}")
        groups = self.birads_group_list
        if not groups or any(g not in BIRADS_LEXICON for g in groups) or len(set(groups)) != len(groups):
            raise bad(
                "birads_groups", f"must be a comma-separated list of distinct groups among {', '.join(BIRADS_LEXICON)}"
            )


def notes(cfg: BiradsSettings) -> list[str]:
    """The birads family's flags for a run: each group beyond seed 000's four."""
    groups = cfg.birads_group_list
    return [f"birads-groups {text}" for g, text in EXTRA_GROUPS.items() if g in groups]
