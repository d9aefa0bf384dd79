"""Seed 000: the BI-RADS multimodal patch classifier (Perek et al.), for CEM lesions.

A CNN scores square lesion patches; the lesion's score is the mean over its patches.
The BI-RADS descriptors enter either by feature fusion (the encoded vector concatenated
to the output of the first FC layer) or by decision fusion with a classifier trained on
BI-RADS alone. The seed's BI-RADS classifier is an SVM; here it is a linear (logistic)
model trained by SGD in the same federated loop, so its weights are model arrays that
FedAvg averages. The stacked fusion (the seed's score-level SVM) is likewise a 2-input
logistic layer trained federated on the two classifiers' logits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fedbreast.shared.data.schema import BIRADS_LEXICON, BiRads
from fedbreast.shared.families.birads.settings import BIRADS_FUSIONS, DECISION_FUSIONS

from .backbones import build_backbone

log = logging.getLogger("fedbreast.models")

ALL_GROUPS = tuple(BIRADS_LEXICON)


class BiradsEncoder:
    """BI-RADS descriptors -> a fixed binary vector: per group one slot per lexicon value
    plus an ``unknown`` slot.

    Multi-valued entries ("Round - Oval", parsed at ingest into several tokens) set every
    matching slot. An empty group sets its unknown slot; a token outside the lexicon also
    sets it and is counted in ``unknown_values`` (with a warning), never an error.
    """

    def __init__(self, groups: Sequence[str] = ALL_GROUPS) -> None:
        bad = [g for g in groups if g not in BIRADS_LEXICON]
        if bad:
            raise ValueError(f"BiradsEncoder: unknown BI-RADS group(s) {bad}; expected among {list(BIRADS_LEXICON)}")
        self.groups = tuple(groups)
        self.slots: list[str] = []
        self._offset: dict[str, int] = {}
        for g in self.groups:
            self._offset[g] = len(self.slots)
            self.slots += [f"{g}={v}" for v in BIRADS_LEXICON[g]] + [f"{g}=unknown"]
        self.unknown_values = 0

    @property
    def dim(self) -> int:
        return len(self.slots)

    def encode(self, birads: BiRads | dict) -> np.ndarray:
        d = birads.to_dict() if isinstance(birads, BiRads) else dict(birads or {})
        vec = np.zeros(self.dim, dtype=np.float32)
        for g in self.groups:
            values = BIRADS_LEXICON[g]
            raw = d.get(g) or ()
            tokens = [raw] if isinstance(raw, str) else list(raw)
            known = False
            for tok in tokens:
                t = str(tok).strip().lower()
                if t in values:
                    vec[self._offset[g] + values.index(t)] = 1.0
                    known = True
                elif t:
                    self.unknown_values += 1
                    log.warning("BI-RADS %s value %r is outside the lexicon; encoded as unknown", g, tok)
            if not known:
                vec[self._offset[g] + len(values)] = 1.0
        return vec

    def encode_many(self, items: Iterable[BiRads | dict]) -> np.ndarray:
        rows = [self.encode(b) for b in items]
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class BiradsNet(nn.Module):
    """(B, 1, P, P) patches [+ (B, D) BI-RADS vectors] -> per-patch CNN logits.

    backbone features -> FC1 (``hidden``) -> ReLU, dropout -> [concat BI-RADS: feature
    fusion] -> FC2 -> 1 logit. With ``birads_fusion="decision"`` the CNN sees pixels only;
    ``birads_logit`` is the BI-RADS-only linear classifier and :meth:`fuse` combines the
    lesion-level probabilities (max, linear with ``alpha``, or the stacked logistic layer).
    """

    def __init__(
        self,
        backbone: str = "rawnet",
        birads_dim: int = 37,
        birads_fusion: str = "feature",
        decision_fusion: str = "max",
        alpha: float = 0.5,
        hidden: int = 256,
        dropout: float = 0.5,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        if birads_fusion not in BIRADS_FUSIONS:
            raise ValueError(f"birads_fusion must be one of {BIRADS_FUSIONS}, got {birads_fusion!r}")
        if decision_fusion not in DECISION_FUSIONS:
            raise ValueError(f"decision_fusion must be one of {DECISION_FUSIONS}, got {decision_fusion!r}")
        self.in_channels = 1
        self.birads_fusion, self.decision_fusion, self.alpha = birads_fusion, decision_fusion, float(alpha)
        self.backbone, feat = build_backbone(backbone, 1, weights_path)
        self.fc1 = nn.Linear(feat, hidden)
        self.drop = nn.Dropout(dropout)
        extra = birads_dim if birads_fusion == "feature" else 0
        self.fc2 = nn.Linear(hidden + extra, 1)
        if birads_fusion == "decision":
            self.birads_clf = nn.Linear(birads_dim, 1)  # the BI-RADS-only classifier
            self.stack = nn.Linear(2, 1)  # stacked fusion over the two logits
            with torch.no_grad():  # start as the mean of the two logits
                self.stack.weight.fill_(0.5)
                self.stack.bias.zero_()

    def forward(self, x: Tensor, birads: Tensor | None = None) -> Tensor:
        h = self.drop(torch.relu(self.fc1(self.backbone(x))))
        if self.birads_fusion == "feature":
            if birads is None:
                raise ValueError("BiradsNet with feature fusion needs the BI-RADS vectors")
            h = torch.cat([h, birads.to(h.dtype)], dim=1)
        return self.fc2(h).squeeze(1)

    def birads_logit(self, birads: Tensor) -> Tensor:
        return self.birads_clf(birads.float()).squeeze(1)

    def stacked_logit(self, cnn_logit: Tensor, birads_logit: Tensor) -> Tensor:
        return self.stack(torch.stack([cnn_logit.float(), birads_logit.float()], dim=1)).squeeze(1)

    def fuse(self, p_cnn: Tensor, birads: Tensor) -> Tensor:
        """Lesion-level malignancy probability from the mean patch probability ``p_cnn``."""
        if self.birads_fusion != "decision":
            return p_cnn
        b = self.birads_logit(birads)
        p_b = torch.sigmoid(b)
        if self.decision_fusion == "max":
            return torch.maximum(p_cnn, p_b)
        if self.decision_fusion == "linear":
            return self.alpha * p_b + (1 - self.alpha) * p_cnn
        return torch.sigmoid(self.stacked_logit(logit(p_cnn), b))
