"""The dualmode family's run settings (seed 003): a fixed box around the lesion."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings

DUALMODE_MODES = ("le,des", "le", "des")  # the modes the network reads: both (seed 003), or one


def mode_energies(modes: str) -> tuple[str, ...]:
    """``dualmode_modes`` -> the energies the network reads, in the boxes' order: ("LE", "DES"), ("LE",), ("DES",)."""
    return tuple(m.strip().upper() for m in modes.split(","))


@dataclass(frozen=True)
class DualModeSettings(Settings):
    box_size: int = 256
    box_jitter: float = 0.05  # max shift of the box per axis, as a fraction of its side
    # Validation and test boxes moved off the lesion centre by this many px (of the cached,
    # native-resolution image), in a direction drawn once per lesion breast and view from the
    # run's seed (LE and DES of a view alike): seed 003's robustness test (10, 20, 40 px on its
    # 256-px boxes). 0 (the default): centred boxes. Training keeps its jitter; no tensor depends on it.
    test_box_shift: float = 0.0
    # le,des (the default): seed 003's dual-mode network, one backbone per mode. le or des: one
    # mode's backbone, abstraction layer and head alone (a single-mode ablation; the boxes, and
    # so the lesions, are the dual-mode network's). In the model signature.
    dualmode_modes: str = "le,des"

    def check(self, bad: Bad) -> None:
        if self.box_size < 1:
            raise bad("box_size", "must be at least 1")
        if not 0 <= self.box_jitter < 0.5:
            raise bad("box_jitter", "must be in [0, 0.5)")
        if not 0 <= self.test_box_shift <= 4096:
            raise bad("test_box_shift", "must be a distance in px, from 0 to 4096")
        if self.dualmode_modes not in DUALMODE_MODES:
            raise bad("dualmode_modes", f"must be one of {' | '.join(DUALMODE_MODES)}")
