"""The cyclegan family's run settings (seed 004's FFDM -> CESM translator)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings

# all: generators and discriminators averaged like any network (FedAvg of the whole CycleGAN).
# generators: discriminators stay at each site (its own, on its disk, across rounds), the
# generators are averaged; the coordinator never sees a discriminator trained on a site's images.
CYCLEGAN_AGGREGATES = ("all", "generators")


@dataclass(frozen=True)
class CycleGANSettings(Settings):
    # Zhu et al. 2017 (CycleGAN), the losses seed 004 names: least-squares adversarial,
    # cycle consistency (weight lambda_cycle = 10) and identity (lambda_identity x lambda_cycle,
    # 0.5 x 10) losses. Seed 004 gives no weights of its own; these are the CycleGAN paper's.
    cyclegan_lambda_cycle: float = 10.0
    cyclegan_lambda_identity: float = 0.5
    # A paired L1 term (pix2pix-style) between the synthetic and the real DES of the same view:
    # a departure from seed 004 (a CycleGAN uses no pairing), 0 (off) by default. CEM sites hold
    # both images of every view, so it is selectable; docs/virtual-cesm.md measures both.
    cyclegan_lambda_paired: float = 0.0
    # Generator width (first conv's filters) and residual blocks: CycleGAN's are 64 and 9 at
    # 256 px; these defaults suit CPU federations at 128 px (tensors depend on both).
    cyclegan_filters: int = 16
    cyclegan_blocks: int = 3
    # generators (the default): the discriminators, the networks that look at a site's real
    # images most directly (the usual target of membership inference on GANs), never leave it;
    # measured against "all" in docs/virtual-cesm.md (no loss of quality at one seed).
    cyclegan_aggregate: str = "generators"

    def check(self, bad: Bad) -> None:
        for name in ("cyclegan_lambda_cycle", "cyclegan_lambda_identity", "cyclegan_lambda_paired"):
            if not 0 <= getattr(self, name) <= 1000:  # NaN and inf fail too
                raise bad(name, "must be in [0, 1000]")
        if self.cyclegan_filters < 1:
            raise bad("cyclegan_filters", "must be >= 1")
        if self.cyclegan_blocks < 0:
            raise bad("cyclegan_blocks", "must be >= 0")
        if self.cyclegan_aggregate not in CYCLEGAN_AGGREGATES:
            raise bad("cyclegan_aggregate", f"must be one of {' | '.join(CYCLEGAN_AGGREGATES)}")
        if getattr(self, "model", None) != "cyclegan":
            return
        # Mixed into the run config: what a GAN run cannot do, refused before any site sees it.
        if getattr(self, "dp", "off") != "off":
            raise bad("dp", "the cyclegan family trains without DP (no DP-SGD for GAN pairs here); set dp = off")
        h, w = getattr(self, "image_h", 0), getattr(self, "image_w", 0)
        # Divisible by 4: the generator's two downsamplings undo exactly; at least 32: the
        # PatchGAN's last layers need a 4 x 4 map.
        if h != w or h % 4 or h < 32:
            raise bad(
                "image_h",
                f"cyclegan needs square images, side >= 32 and divisible by 4 (seed 004: 256); got {h}x{w}",
            )
