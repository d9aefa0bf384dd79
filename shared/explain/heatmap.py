"""What a family's ``Task.explain`` yields: one heatmap on one view image of one scored unit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbreast.shared.data.schema import ImageRecord


@dataclass
class ViewHeatmap:
    """A heatmap over the (preprocessed) image the model saw for one view of one unit.

    ``image`` and ``heat`` share one (H, W) grid; ``heat`` is in [0, 1]. ``lesion`` is the
    outlined lesion rasterised on that grid when the site's annotations give one (the
    pointing game needs it; new studies usually have none). ``record`` is the source image
    (its DICOM header gives a Secondary Capture its study)."""

    patient: str
    exam: str
    laterality: str
    view: str  # "CC", "MLO", "US", ... (with the energy where it matters: "CC-DES")
    image: np.ndarray
    heat: np.ndarray
    method: str  # "Grad-CAM++", "Grad-CAM", "patch score map"
    score: float | None = None  # the unit's score (the same as its predictions.csv row)
    unit: str = ""  # the unit within the breast, for lesion families ("lesion-2")
    lesion: np.ndarray | None = None
    record: ImageRecord | None = None

    def __post_init__(self) -> None:
        if self.image.shape != self.heat.shape:
            raise ValueError(f"heatmap {self.heat.shape} and image {self.image.shape} must share one grid")
        if self.lesion is not None and self.lesion.shape != self.heat.shape:
            raise ValueError(f"lesion mask {self.lesion.shape} and heatmap {self.heat.shape} must share one grid")

    @property
    def name(self) -> str:
        """A file-name stem unique within a site's predictions: local ids only."""
        parts = [self.patient, self.exam, self.laterality, self.unit, self.view]
        return "_".join(p for p in parts if p).replace("/", "-")


__all__ = ["ViewHeatmap"]
