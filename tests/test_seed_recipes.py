"""docs/seed-recipes.md: every documented command parses and validates as the CLI would run it,
and selects the seed's own settings (issue 17 item 2)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from fedbreast.cli import _parse_overrides, build_parser
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families import family_of
from fedbreast.shared.families.multiview.task import MultiviewTask, per_image_loss
from fedbreast.shared.models.multiview import MultiViewFusionNet, _head_params, count_parameters, mean_probability_logit

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
    assert (m.view_fusion, m.multiview_cnn_rounds, m.rounds) == ("concat", 10, 50)  # two-stage training
    g = found["mgus"]
    assert (g.backbone, g.mgus_fusion_layers, g.mgus_training) == ("googlenet", 7, "two-step")
    d = found["dualmode"]
    assert (d.backbone, d.freeze, d.box_size, d.test_box_shift) == ("inception_v3", "backbone", 299, 20)
    lf = found["latefusion"]
    assert lf.square_resize and (lf.image_h, lf.image_w) == (256, 256)


# ---- seed 001's left-right fusion and two-stage training ---------------------------------------------

TINY = dict(backbone="smallcnn", image_h=32, image_w=32, amp="off", workers=0, augment=False, batch_size=2)


def _exams(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of two random 4-view exams, every breast labelled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 2, 32, 32, generator=g)
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * (n // 2))
    return [{"x": x[i : i + 2], "y": y[i : i + 2], "y_mask": torch.ones(2, 2, dtype=torch.bool)} for i in (0, 2)]


class _Site:
    """What MultiviewTask.train asks of a site: its train loader."""

    def loader(self, split: str, batch_size: int, **_: object) -> list[dict[str, torch.Tensor]]:
        return _exams()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed_modules(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """The top-level modules with a tensor the step changed (backbone, cc_head, cnn_head, ...)."""
    return {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_the_seed_001_options_are_validated_at_the_edge_naming_the_key() -> None:
    assert RunConfig.from_flower({"view-fusion": "left-right"}).view_fusion == "left-right"
    assert RunConfig.from_flower({"multiview-cnn-rounds": 2, "rounds": 3}).multiview_cnn_rounds == 2
    assert RunConfig.from_flower({"single-channel": "des", "in-channels": 1}).single_channel == "des"
    for raw, key in (
        ({"view-fusion": "left_right"}, "view-fusion"),
        ({"multiview-cnn-rounds": -1}, "multiview-cnn-rounds"),
        ({"multiview-cnn-rounds": 3, "rounds": 3}, "multiview-cnn-rounds"),  # the fusion network never trains
        ({"single-channel": "cesm"}, "single-channel"),
        ({"single-channel": "des"}, "single-channel"),  # a two-channel network reads both images
    ):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flower(raw)
    # Another family's run is not refused for it.
    assert RunConfig(model="dualmode", multiview_cnn_rounds=5, rounds=3).multiview_cnn_rounds == 5


def test_left_right_fusion_scores_each_breast_from_its_own_and_the_contralateral_view() -> None:
    torch.manual_seed(0)
    model = MultiViewFusionNet("smallcnn", view_fusion="left-right").eval()
    x = torch.randn(3, 4, 2, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 2)  # one logit per breast (left, right)
        lcc, lmlo, rcc, rmlo = model.embeddings(x).unbind(1)
        head = model.pair_head  # one FC for every view image, on [own, contralateral] of its view
        left = mean_probability_logit(head(torch.cat((lcc, rcc), 1)), head(torch.cat((lmlo, rmlo), 1)))
        right = mean_probability_logit(head(torch.cat((rcc, lcc), 1)), head(torch.cat((rmlo, lmlo), 1)))
        torch.testing.assert_close(out, torch.cat((left, right), 1))
        other = x.clone()
        other[:, 2] = torch.randn(3, 2, 32, 32)  # another right CC image changes the left breast's score
        assert not torch.allclose(model(other)[:, 0], out[:, 0])
        swapped = model(x[:, [2, 3, 0, 1]])  # the breasts swapped: the scores swap
        torch.testing.assert_close(swapped, out.flip(1))
    assert count_parameters(head) == _head_params(model.embed_dim, "left-right")


def test_default_multiview_model_has_no_per_image_head() -> None:
    build = family_of("multiview").build_model
    default = build(RunConfig(**TINY))
    assert not any(k.startswith("cnn_head") for k in default.state_dict())
    two_stage = build(RunConfig(**TINY, multiview_cnn_rounds=1))
    assert set(two_stage.state_dict()) == set(default.state_dict()) | {"cnn_head.weight", "cnn_head.bias"}
    # Other tensors, another signature: a checkpoint of one cannot resume the other.
    assert RunConfig(**TINY, multiview_cnn_rounds=1).model_signature() != RunConfig(**TINY).model_signature()


@pytest.mark.parametrize("view_fusion, fusion", [("average", {"cc_head", "mlo_head"}), ("left-right", {"pair_head"})])
def test_two_stage_training_trains_the_cnn_first_then_the_fusion_network(view_fusion: str, fusion: set[str]) -> None:
    cfg = RunConfig(**TINY, view_fusion=view_fusion, multiview_cnn_rounds=2, rounds=3, lr=0.05)
    torch.manual_seed(0)
    model = family_of("multiview").build_model(cfg)
    task = MultiviewTask()
    keys = set(model.state_dict())
    for server_round in (1, 2, 3):
        before = _state(model)
        stats = task.train(model, _Site(), cfg, server_round, torch.device("cpu"))
        assert stats.examples == 4 and set(model.state_dict()) == keys  # the tensor set never changes
        changed = _changed_modules(model, before)
        if server_round <= 2:  # the CNN alone, through its per-image head; the fusion layers as they are
            assert changed == {"backbone", "cnn_head"}, (server_round, changed)
        else:  # the fusion network end to end from that CNN; the per-image head as it is
            assert changed == {"backbone"} | fusion, (server_round, changed)
        assert all(p.requires_grad for p in model.parameters())  # the held layers are released after


def test_two_stage_first_stage_classifies_each_view_image_on_its_breasts_label() -> None:
    torch.manual_seed(0)
    model = MultiViewFusionNet("smallcnn", view_fusion="concat", cnn_head=True)
    batch = _exams()[0]
    loss_fn = per_image_loss(None, 2, torch.device("cpu"), dp=False)
    loss, n = loss_fn(model, batch)
    z = model.view_logits(batch["x"])
    assert z.shape == (2, 4) and n == 2
    y = batch["y"][:, [0, 0, 1, 1]]  # LCC, LMLO: the left breast's label; RCC, RMLO: the right's
    torch.testing.assert_close(loss, nn.functional.binary_cross_entropy_with_logits(z, y))
    # Under "single" the per-image head is the model's own view head: no extra tensors.
    single = MultiViewFusionNet("smallcnn", view_fusion="single", cnn_head=True)
    assert single.image_head() is single.view_head and single.two_stage_held(False) == []
