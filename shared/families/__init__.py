"""The model families, one registry entry each (see base.py for what an entry holds).

Adding a family: a package next to these with its ``FAMILY`` (docs/adding-a-family.md), and
one line in :data:`FAMILIES`; a family with run settings of its own adds its ``Settings``
class as one more base of :class:`FamilySettings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families import birads, cyclegan, dualmode, latefusion, mgus, multiview
from fedbreast.shared.families.base import Family
from fedbreast.shared.families.birads.settings import BiradsSettings
from fedbreast.shared.families.cyclegan.settings import CycleGANSettings
from fedbreast.shared.families.dualmode.settings import DualModeSettings
from fedbreast.shared.families.latefusion.settings import LateFusionSettings
from fedbreast.shared.families.mgus.settings import MgusSettings
from fedbreast.shared.families.multiview.settings import MultiviewSettings

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (multiview.FAMILY, birads.FAMILY, dualmode.FAMILY, mgus.FAMILY, latefusion.FAMILY, cyclegan.FAMILY)
}


@dataclass(frozen=True)
class FamilySettings(
    BiradsSettings, CycleGANSettings, DualModeSettings, LateFusionSettings, MgusSettings, MultiviewSettings
):
    """Every family's own run settings: ``RunConfig`` (shared/config.py) is built on it, so
    they stay flat keys of the run config, as Flower carries them, and typed attributes."""


def family_of(name: str) -> Family:
    """The registered family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model {name!r} is not a registered family; known: {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "FamilySettings", "family_of"]
