"""The model families, one registry entry each (see base.py for what an entry holds).

Adding a family: a package next to these with its ``FAMILY`` (docs/adding-a-family.md), and
one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from fedbreast.shared.families import birads, dualmode, latefusion, mgus, multiview
from fedbreast.shared.families.base import Family

FAMILIES: dict[str, Family] = {
    f.name: f for f in (multiview.FAMILY, birads.FAMILY, dualmode.FAMILY, mgus.FAMILY, latefusion.FAMILY)
}


def family_of(name: str) -> Family:
    """The registered family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model {name!r} is not a registered family; known: {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "family_of"]
