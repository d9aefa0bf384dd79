"""Seed 004: modality-view late fusion weighted by validation MCC."""

from fedbreast.shared.families.aggregation import average_where_trained
from fedbreast.shared.families.base import Family
from fedbreast.shared.families.latefusion.fusion import after_evaluate
from fedbreast.shared.families.latefusion.settings import LateFusionSettings

FAMILY = Family(
    name="latefusion",
    seed="004",
    title="modality-view late fusion with MCC weights",
    unit="breast",
    count_unit="breast",
    task_path="fedbreast.shared.families.latefusion.task:LateFusionTask",
    model_path="fedbreast.shared.families.latefusion.model:build",
    settings=LateFusionSettings,  # square-resize: seed 004's square slot images
    preset=dict(
        model="latefusion", backbone="resnet18", image_h=128, image_w=128, batch_size=8, lr=0.01, augment=False
    ),
    after_train=average_where_trained,  # FFDM-only sites leave the CESM networks as they were
    after_evaluate=after_evaluate,  # the sites' summed confusion counts become the fusion weights
)
