"""The multiview family's run settings (seed 001)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings


@dataclass(frozen=True)
class MultiviewSettings(Settings):
    # Dropout in the multi-view network's head (shared/models/multiview.py): after every hidden FC
    # of the faithful vgg_fc head (seed 001's released code: 0.5), on the per-view embeddings of
    # the pooled head. 0 (the default) keeps the earlier runs' model; no tensor depends on it.
    head_dropout: float = 0.0

    def check(self, bad: Bad) -> None:
        if not 0 <= self.head_dropout < 1:
            raise bad("head_dropout", "must be in [0, 1)")
