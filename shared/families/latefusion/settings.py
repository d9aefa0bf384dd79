"""The latefusion family's run settings (seed 004): the slot images' size."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings

LATEFUSION_WEIGHTS = ("mcc", "mean")


@dataclass(frozen=True)
class LateFusionSettings(Settings):
    # The slot images are padded to a square, then resized. False (the default, the earlier
    # runs'): resized to image-h x image-w, which squashes the square when the two differ.
    # True (seed 004: pad square, resize to 256 x 256): resized to a square of side
    # max(image-h, image-w), so the breast keeps its aspect (the defaults' 256 x 128 give 256 x 256).
    # No tensor depends on it (the slot networks pool globally).
    square_resize: bool = False
    # mcc (the default, seed 004): the views, then the modalities, are fused by validation-MCC
    # weighted means. mean: plain means of the available slots (the sites send no validation
    # confusion counts, so the weights stay equal). No tensor depends on it; training neither.
    latefusion_weights: str = "mcc"

    def check(self, bad: Bad) -> None:
        if not isinstance(self.square_resize, bool):
            raise bad("square_resize", "must be true or false")
        if self.latefusion_weights not in LATEFUSION_WEIGHTS:
            raise bad("latefusion_weights", f"must be one of {' | '.join(LATEFUSION_WEIGHTS)}")

    def slot_size(self, image_h: int, image_w: int) -> tuple[int, int]:
        """The (rows, cols) the slot images are resized to."""
        if self.square_resize:
            side = max(image_h, image_w)
            return (side, side)
        return (image_h, image_w)
