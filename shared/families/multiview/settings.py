"""The multiview family's run settings (seed 001)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings

SINGLE_CHANNELS = ("le", "des")


@dataclass(frozen=True)
class MultiviewSettings(Settings):
    # Dropout in the multi-view network's head (shared/models/multiview.py): after every hidden FC
    # of the faithful vgg_fc head (seed 001's released code: 0.5), on the per-view embeddings of
    # the pooled head. 0 (the default) keeps the earlier runs' model; no tensor depends on it.
    head_dropout: float = 0.0
    # Seed 001's two-stage training: for the first K rounds the shared CNN trains alone, each view
    # image classified on its breast's label by a per-image head (the network's cnn_head), the
    # fusion layers held as initialised; from round K + 1 the fusion network trains end to end
    # from that CNN. 0 (the default): end to end from round 1, the earlier runs' model (K > 0
    # adds the per-image head's tensors, the same in every round).
    multiview_cnn_rounds: int = 0
    # The image a one-channel network (in-channels = 1) reads: "le" (the low-energy image at a CEM
    # site, the FFDM image elsewhere: the earlier runs' model) or "des" (the recombined image
    # alone: seed 003's DES-only and seed 004's CESM-alone arms; a site without DES, acquired or
    # virtual, answers "unable"). No tensor depends on it.
    single_channel: str = "le"

    def check(self, bad: Bad) -> None:
        if not 0 <= self.head_dropout < 1:
            raise bad("head_dropout", "must be in [0, 1)")
        if self.single_channel not in SINGLE_CHANNELS:
            raise bad("single_channel", f"must be one of {', '.join(SINGLE_CHANNELS)}")
        if self.single_channel != "le" and getattr(self, "in_channels", 1) != 1:
            raise bad("single_channel", "chooses the image of a one-channel network: it needs in-channels = 1")
        if self.multiview_cnn_rounds < 0:
            raise bad("multiview_cnn_rounds", "must not be negative")
        # Mixed into the run config: a multiview run whose fusion network would never train.
        rounds = getattr(self, "rounds", None)
        if getattr(self, "model", None) == "multiview" and rounds is not None and self.multiview_cnn_rounds >= rounds:
            raise bad("multiview_cnn_rounds", f"must be below rounds ({rounds}): the fusion network trains after it")
