"""Seed 002: mammography + ultrasound descriptor fusion."""

from fedbreast.shared.families.aggregation import average_where_trained
from fedbreast.shared.families.base import Family
from fedbreast.shared.families.mgus.settings import MgusSettings

FAMILY = Family(
    name="mgus",
    seed="002",
    title="mammography + ultrasound descriptor fusion",
    unit="lesion",
    count_unit="lesion",
    task_path="fedbreast.shared.families.mgus.task:MgusTask",
    model_path="fedbreast.shared.families.mgus.model:build",
    settings=MgusSettings,
    signature_keys=("crop_size", "descriptor_dim", "mgus_loss", "mgus_fusion_layers"),
    input_size_keys=("crop_size",),
    preset=dict(
        model="mgus",
        backbone="resnet18",
        crop_size=96,
        batch_size=16,
        lr=0.01,
        mgus_modality_rounds=2,
        rounds=5,
        augment=False,
    ),
    after_train=average_where_trained,  # sites without ultrasound leave that branch as it was
)
