"""Seed 001: multi-view dual-energy fusion over LCC, LMLO, RCC and RMLO (the default family)."""

from fedbreast.shared.families.base import Family
from fedbreast.shared.families.multiview.settings import MultiviewSettings

FAMILY = Family(
    name="multiview",
    seed="001",
    title="multi-view dual-energy fusion",
    unit="breast",
    count_unit="exam",
    task_path="fedbreast.shared.families.multiview.task:MultiviewTask",
    model_path="fedbreast.shared.families.multiview.model:build",
    settings=MultiviewSettings,
    # Its signature is the common keys alone, so checkpoints from before the registry still resume.
)
