"""Seed 003: dual-mode transfer learning on a box around the lesion (LE and recombined backbones)."""

from fedbreast.shared.families.base import Family
from fedbreast.shared.families.dualmode.settings import DualModeSettings

FAMILY = Family(
    name="dualmode",
    seed="003",
    title="dual-mode transfer learning",
    unit="lesion",
    count_unit="lesion",
    task_path="fedbreast.shared.families.dualmode.task:DualModeTask",
    model_path="fedbreast.shared.families.dualmode.model:build",
    settings=DualModeSettings,
    signature_keys=("box_size", "dualmode_modes"),
    input_size_keys=("box_size",),
    preset=dict(model="dualmode", backbone="resnet18", box_size=96, batch_size=8, lr=0.01),
)
