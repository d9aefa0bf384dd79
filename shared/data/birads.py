"""Reading BI-RADS descriptors from free text into the canonical lexicon tokens.

Radiology exports spell things many ways ("Speculated", "Heterogenous", "Round - Oval",
"BPE: mild", "4A"). One function maps a raw cell to lexicon tokens and reports what it
could not map, so callers can count unknown values instead of crashing on them.
"""

from __future__ import annotations

import re

from .schema import BIRADS_LEXICON

# Misspellings and synonyms seen in real exports -> canonical token.
SYNONYMS: dict[str, str] = {
    "speculated": "spiculated",
    "spiculed": "spiculated",
    "heterogenous": "heterogeneous",
    "hetrogeneous": "heterogeneous",
    "homogenous": "homogeneous",
    "homogeneus": "homogeneous",
    "ring": "rim",
    "rim_enhancement": "rim",
    "ill_defined": "indistinct",
    "illdefined": "indistinct",
    "well_defined": "circumscribed",
    "non_circumscribed": "not_circumscribed",
    "noncircumscribed": "not_circumscribed",
    "lobulated": "microlobulated",
    "ovoid": "oval",
    "minimal_bpe": "minimal",
    "none": "minimal",
}

_SPLIT = re.compile(r"\s*\|\s*|\s+-\s+|\s*/\s*|\s*,\s*|\s*\$\s*")
_PREFIX = re.compile(r"^(bpe|density|acr|birads|bi_rads|category|cat)[:_\s]*")


def canonical_token(raw: str) -> str:
    tok = raw.strip().lower()
    tok = re.sub(r"[\s\-]+", "_", tok)
    tok = _PREFIX.sub("", tok).strip("_:. ")
    return SYNONYMS.get(tok, tok)


def parse_birads_cell(group: str, raw: str | None) -> tuple[tuple[str, ...], list[str]]:
    """Map a raw cell of BI-RADS ``group`` to lexicon tokens.

    Returns ``(tokens, unknown)``: the recognised tokens in first-seen order, and the raw
    pieces that are not in the lexicon (the caller decides whether to warn or count).
    Blank cells give ``((), [])``.
    """
    if group not in BIRADS_LEXICON:
        raise ValueError(f"unknown BI-RADS group {group!r}; expected one of {sorted(BIRADS_LEXICON)}")
    if raw is None:
        return (), []
    text = str(raw).strip()
    if not text or text.lower() in ("nan", "na", "n/a", "-", "unknown"):
        return (), []
    allowed = BIRADS_LEXICON[group]
    tokens: list[str] = []
    unknown: list[str] = []
    # Try the whole cell first so "not circumscribed" is not split on its space.
    pieces = [text] if canonical_token(text) in allowed else [p for p in _SPLIT.split(text) if p]
    for piece in pieces:
        tok = canonical_token(piece)
        if group == "density" and tok in ("1", "2", "3", "4"):
            tok = "abcd"[int(tok) - 1]  # ACR 1-4 as exported by older systems
        if tok in allowed:
            if tok not in tokens:
                tokens.append(tok)
        else:
            unknown.append(piece)
    return tuple(tokens), unknown
