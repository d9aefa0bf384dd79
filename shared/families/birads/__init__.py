"""Seed 000: lesion patches fused with the BI-RADS lexicon, and patient-specific fine-tuning."""

from fedbreast.shared.families.base import Family
from fedbreast.shared.families.birads.settings import BiradsSettings, notes

FAMILY = Family(
    name="birads",
    seed="000",
    title="BI-RADS multimodal fusion on lesion patches",
    unit="lesion",
    count_unit="lesion",
    task_path="fedbreast.shared.families.birads.task:BiradsTask",
    model_path="fedbreast.shared.families.birads.model:build",
    settings=BiradsSettings,
    notes=notes,
    signature_keys=("patch_size", "patch_energies", "birads_fusion", "decision_fusion", "birads_groups"),
    input_size_keys=("patch_size",),
    # DES patches at CEM sites and FFDM patches at FFDM sites, so every site takes part.
    # `augment` is on only where it was measured to help (docs/model-families.md).
    preset=dict(
        model="birads",
        backbone="rawnet",
        patch_size=64,
        n_patches=32,
        patch_energies="DES,FFDM",
        batch_size=64,
        lr=0.01,
        augment=False,
    ),
)
