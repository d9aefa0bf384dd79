"""docs/seed-recipes.md: every documented command parses and validates as the CLI would run it,
and selects the seed's own settings (issue 17 item 2)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from fedbreast.cli import _parse_overrides, build_parser
from fedbreast.shared.config import RunConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "seed-recipes.md"


def commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return [shlex.split(b.replace("\\\n", " "))[1:] for b in blocks]  # drop "fedbreast"


def test_every_seed_recipe_parses_and_selects_the_seeds_settings() -> None:
    found = {}
    for argv in commands():
        args = build_parser().parse_args(argv)
        cfg = RunConfig(**_parse_overrides(args))  # the run config the command would start with
        found[cfg.model] = cfg
    assert sorted(found) == ["birads", "dualmode", "latefusion", "mgus", "multiview"]
    b = found["birads"]
    assert (b.optimizer, b.lr, b.batch_size, b.patch_size, b.n_patches, b.freeze) == (
        "adam",
        1e-4,
        200,
        227,
        200,
        "backbone",
    )
    assert b.patient_finetune and b.birads_group_list == ("mass_shape", "mass_margin", "internal_enhancement", "bpe")
    m = found["multiview"]
    assert (m.backbone, m.head, m.head_dropout, m.image_h, m.image_w, m.window) == (
        "vgg16_bn",
        "vgg_fc",
        0.5,
        512,
        256,
        "fixed",
    )
    assert (m.momentum, m.weight_decay, m.batch_size, m.decay_rounds) == (0.9, 5e-4, 8, (10, 30, 40))
    g = found["mgus"]
    assert (g.backbone, g.mgus_fusion_layers, g.mgus_training) == ("googlenet", 7, "two-step")
    d = found["dualmode"]
    assert (d.backbone, d.freeze, d.box_size, d.test_box_shift) == ("inception_v3", "backbone", 299, 20)
    lf = found["latefusion"]
    assert lf.square_resize and (lf.image_h, lf.image_w) == (256, 256)
