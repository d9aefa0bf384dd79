"""The dual-mode network from the run config (or one mode of it: ``dualmode_modes``)."""

from __future__ import annotations

from torch import Tensor, nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.families.dualmode.settings import mode_energies
from fedbreast.shared.models.backbones import build_backbone
from fedbreast.shared.models.dualmode import DualModeNet

ENERGIES = ("LE", "DES")  # the boxes' mode axis


class SingleModeNet(nn.Module):
    """One mode of :class:`DualModeNet`: that mode's backbone (CC and MLO boxes in one pass),
    abstraction layer (dropout, FC to ``abstract_dim``) and a dropout + FC head. It reads the
    dual-mode input, (B, 2 views, 2 modes LE/DES, S, S), and ignores the other mode. The backbone
    is the attribute ``le`` or ``des``, as in the dual-mode network (Grad-CAM finds it there)."""

    def __init__(
        self,
        energy: str,
        backbone: str = "resnet18",
        abstract_dim: int = 512,
        dropout: float = 0.5,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = 1
        self.modes = (energy,)
        self.index = ENERGIES.index(energy)
        net, feat = build_backbone(backbone, 1, weights_path)
        self.add_module(energy.lower(), net)
        self.abstract = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * feat, abstract_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(abstract_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 2 or x.shape[2] != 2:
            raise ValueError(f"SingleModeNet expects (B, 2 views, 2 modes LE/DES, S, S), got {tuple(x.shape)}")
        b = x.shape[0]
        views = x[:, :, self.index]
        f = self.get_submodule(self.modes[0].lower())(views.reshape(b * 2, 1, *views.shape[-2:]))
        return self.head(self.abstract(f.reshape(b, -1))).squeeze(1)


def build(cfg: RunConfig) -> nn.Module:
    energies = mode_energies(cfg.dualmode_modes)
    if len(energies) == 1:
        return SingleModeNet(energies[0], backbone=cfg.backbone, weights_path=cfg.weights_path or None)
    return DualModeNet(backbone=cfg.backbone, weights_path=cfg.weights_path or None)
