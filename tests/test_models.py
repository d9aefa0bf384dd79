"""Backbone registry and the seed-001 multi-view fusion network (tiny images, CPU)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fedbreast.shared.models import (
    VIEW_ORDER,
    MultiViewFusionNet,
    SmallCNN,
    WeightsFileError,
    available_backbones,
    build_backbone,
    count_parameters,
    faithful_vgg_report,
    float_state_keys,
    mean_probability_logit,
    model_nbytes,
    nonfloat_state_keys,
    replace_inplace_relu,
)
from fedbreast.shared.models.backbones import MIN_INPUT_PX

H, W = 64, 32
SWAP_BREASTS = [VIEW_ORDER.index(v) for v in ("RCC", "RMLO", "LCC", "LMLO")]


def _exam(b: int = 2, c: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, len(VIEW_ORDER), c, H, W, generator=g)


def test_registry_lists_required_backbones_and_rejects_unknown() -> None:
    names = available_backbones()
    assert names[0] == "resnet18"
    for n in (
        "resnet34",
        "resnet50",
        "vgg16_bn",
        "efficientnet_b0",
        "densenet121",
        "alexnet",
        "mobilenet_v3_small",
        "smallcnn",
    ):
        assert n in names
    with pytest.raises(ValueError) as exc:
        build_backbone("resnet9000", 2)
    assert all(n in str(exc.value) for n in names)


@pytest.mark.parametrize("name", available_backbones())
def test_every_backbone_maps_to_pooled_features(name: str) -> None:
    # Meta device: checks shapes and the stem adaptation without allocating or computing.
    side = max(64, MIN_INPUT_PX.get(name, 0))  # inception_v3 needs 75 px
    with torch.device("meta"):
        extractor, feat_dim = build_backbone(name, 2)
        out = extractor.eval()(torch.empty(3, 2, side, side))
    assert out.shape == (3, feat_dim)
    stem = next(m for m in extractor.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 2


@pytest.mark.parametrize("view_fusion", ["average", "concat"])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_output_is_one_logit_per_breast(view_fusion: str, in_channels: int) -> None:
    model = MultiViewFusionNet("smallcnn", in_channels=in_channels, view_fusion=view_fusion)
    out = model(_exam(b=3, c=in_channels))
    assert out.shape == (3, 2)
    assert torch.isfinite(out).all()


def test_default_model_is_resnet18_cem() -> None:
    model = MultiViewFusionNet()
    assert model.backbone_name == "resnet18" and model.in_channels == 2
    assert model(_exam()).shape == (2, 2)
    with pytest.raises(ValueError, match="LCC"):
        model(_exam(c=1))  # FFDM exam into a CEM model


@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("view_fusion", ["average", "concat"])
def test_swapping_breasts_swaps_outputs(backbone: str, view_fusion: str) -> None:
    torch.manual_seed(0)
    model = MultiViewFusionNet(backbone, view_fusion=view_fusion).eval()
    x = _exam(b=3)
    with torch.no_grad():
        out = model(x)
        swapped = model(x[:, SWAP_BREASTS])
    assert not torch.allclose(out[:, 0], out[:, 1])  # the check below is not vacuous
    torch.testing.assert_close(swapped, out.flip(1), rtol=1e-5, atol=1e-6)


def test_single_view_scores_each_view_alone_and_averages_cc_mlo() -> None:
    torch.manual_seed(0)
    model = MultiViewFusionNet("smallcnn", view_fusion="single").eval()
    x = _exam(b=3)
    with torch.no_grad():
        out = model(x)
        alone = torch.sigmoid(model.view_head(model.backbone(x.flatten(0, 1))).view(3, 4))
        changed = x.clone()
        changed[:, VIEW_ORDER.index("RCC")] = torch.randn(3, 2, H, W)
        out_changed = model(changed)
    assert out.shape == (3, 2)
    # Each view image is scored on its own; a breast is the mean of its CC and MLO probabilities.
    lcc, lmlo, rcc, rmlo = alone.unbind(1)
    torch.testing.assert_close(
        torch.sigmoid(out), torch.stack(((lcc + lmlo) / 2, (rcc + rmlo) / 2), 1), rtol=1e-5, atol=1e-6
    )
    # No left-right fusion: another right-breast image leaves the left breast's score as it was.
    torch.testing.assert_close(out_changed[:, 0], out[:, 0])
    assert not torch.allclose(out_changed[:, 1], out[:, 1])


def test_mean_probability_logit_averages_probabilities_stably() -> None:
    z1 = torch.tensor([-60.0, -2.0, 0.0, 3.0, 60.0])
    z2 = torch.tensor([60.0, 1.0, 0.0, -1.0, 59.0])
    out = mean_probability_logit(z1, z2)
    assert torch.isfinite(out).all()
    expected = (torch.sigmoid(z1.double()) + torch.sigmoid(z2.double())) / 2
    torch.testing.assert_close(torch.sigmoid(out.double()), expected, rtol=1e-6, atol=1e-7)


def _save_random_resnet18(path, num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    torch.save(ref.state_dict(), path)
    return ref


@pytest.mark.parametrize("in_channels", [1, 2])
def test_local_weights_fold_rgb_stem_into_new_channels(tmp_path, in_channels: int) -> None:
    path = tmp_path / "resnet18_imagenet.pth"
    ref = _save_random_resnet18(path)
    extractor, _ = build_backbone("resnet18", in_channels, weights_path=str(path))
    body = extractor.body
    rgb = ref.conv1.weight.detach()
    expected = rgb.mean(1, keepdim=True).repeat(1, in_channels, 1, 1) * 3 / in_channels
    torch.testing.assert_close(body.conv1.weight.detach(), expected)
    torch.testing.assert_close(body.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.testing.assert_close(body.bn1.running_var, ref.bn1.running_var)
    # The scaling keeps activations: a grey image on all channels matches grey-as-RGB.
    grey = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(body.conv1(grey.expand(-1, in_channels, -1, -1)), ref.conv1(grey.expand(-1, 3, -1, -1)))
    # The loaded weights reach the fusion model too.
    model = MultiViewFusionNet("resnet18", in_channels=in_channels, weights_path=path)
    torch.testing.assert_close(model.backbone.body.conv1.weight, body.conv1.weight)


def test_bad_weights_files_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", 2, weights_path=missing)

    wrong_keys = tmp_path / "smallcnn.pth"
    torch.save(SmallCNN(3).state_dict(), wrong_keys)
    with pytest.raises(WeightsFileError, match=r"smallcnn\.pth.*missing keys"):
        build_backbone("resnet18", 2, weights_path=wrong_keys)

    wrong_shape = tmp_path / "resnet18_10class.pth"
    _save_random_resnet18(wrong_shape, num_classes=10)
    with pytest.raises(WeightsFileError, match=r"resnet18_10class\.pth.*fc\.weight"):
        build_backbone("resnet18", 2, weights_path=wrong_shape)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match="garbage.pth"):
        build_backbone("resnet18", 2, weights_path=garbage)

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(WeightsFileError, match="tensor.pth"):
        build_backbone("resnet18", 2, weights_path=not_a_dict)


@pytest.mark.parametrize(("view_fusion", "in_channels"), [("average", 2), ("concat", 1)])
def test_faithful_vgg_analytic_size_matches_real_model(view_fusion: str, in_channels: int) -> None:
    model = MultiViewFusionNet("vgg16_bn", in_channels, view_fusion=view_fusion, head="vgg_fc", image_hw=(H, W))
    report = faithful_vgg_report((H, W), in_channels, view_fusion)
    faithful = report["faithful_vgg_fc"]
    assert faithful["flat_dim"] == 512 * (H // 32) * (W // 32)
    assert count_parameters(model) == faithful["params"]
    assert model_nbytes(model) == faithful["bytes_per_round"]
    fc1 = model.embed[1]
    assert fc1.weight.numel() + fc1.bias.numel() == faithful["fc1_params"]
    assert model(_exam(c=in_channels)).shape == (2, 2)
    with pytest.raises(ValueError, match="built for"):
        model(torch.zeros(1, 4, in_channels, 2 * H, W))


def test_report_pooled_default_matches_real_model_and_paper_scale() -> None:
    real = MultiViewFusionNet()
    report = faithful_vgg_report((512, 256))
    assert report["pooled_default"]["params"] == count_parameters(real)
    assert report["pooled_default"]["bytes_per_round"] == model_nbytes(real)
    # The paper's 512x256 VGG16 map is 512x16x8 -> 4096: the ~268M-parameter FC layer.
    assert report["faithful_vgg_fc"]["fc1_params"] == 512 * 16 * 8 * 4096 + 4096
    assert report["faithful_vgg_fc"]["params"] > 15 * report["pooled_default"]["params"]


def test_vgg_fc_head_requires_vgg16_bn() -> None:
    with pytest.raises(ValueError, match="vgg16_bn"):
        MultiViewFusionNet("smallcnn", head="vgg_fc")


def test_state_dict_is_flat_ordered_tensors_with_int_bn_counters() -> None:
    a = MultiViewFusionNet("smallcnn").state_dict()
    b = MultiViewFusionNet("smallcnn").state_dict()
    assert list(a) == list(b)
    assert all(isinstance(v, torch.Tensor) for v in a.values())
    floats, others = float_state_keys(a), nonfloat_state_keys(a)
    assert sorted(floats + others) == sorted(a)
    assert others and all(k.endswith("num_batches_tracked") for k in others)
    assert all(a[k].dtype == torch.int64 for k in others)
    assert any(k.endswith("running_mean") for k in floats)


def test_replace_inplace_relu_clears_every_inplace_flag() -> None:
    extractor, _ = build_backbone("resnet18", 2)
    assert any(getattr(m, "inplace", False) for m in extractor.modules())
    replace_inplace_relu(extractor)
    assert not any(getattr(m, "inplace", False) for m in extractor.modules())


@pytest.mark.parametrize("view_fusion", ["average", "concat"])
def test_training_steps_reduce_loss_on_fixed_batch(view_fusion: str) -> None:
    torch.manual_seed(0)
    model = MultiViewFusionNet("smallcnn", view_fusion=view_fusion)
    x = _exam(b=4, seed=3)
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_autocast_channels_last_forward_backward() -> None:
    torch.manual_seed(0)
    model = MultiViewFusionNet("resnet18").to(memory_format=torch.channels_last)
    flat = torch.randn(2 * 4, 2, H, W).contiguous(memory_format=torch.channels_last)
    x = flat.view(2, 4, 2, H, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.ones(2, 2))
    loss.backward()
    assert logits.shape == (2, 2)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_local_training_in_channels_last_gives_the_standard_step_and_standard_weights() -> None:
    """train_local trains convolutions in channels-last layout (faster on CPU); the step must be
    the one the standard layout gives, and the weights the site sends come back standard."""
    from fedbreast.shared.models.backbones import RawNetBody
    from fedbreast.shared.training.local import train_local

    torch.manual_seed(0)
    model = nn.Sequential(RawNetBody(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1))
    reference = nn.Sequential(RawNetBody(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1))
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 2, 48, 48), torch.tensor([0.0, 1.0, 1.0, 0.0])

    def loss_fn(m: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        return nn.functional.binary_cross_entropy_with_logits(m(batch["x"]).squeeze(1), batch["y"]), 4

    train_local(model, [{"x": x, "y": y}], lr=0.1, momentum=0.0, weight_decay=0.0, amp="off", loss_fn=loss_fn)

    reference.train()
    loss_fn(reference, {"x": x, "y": y})[0].backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        assert got.is_contiguous(), name  # what is sent and saved is in the standard layout
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    assert all(p.grad is None or p.grad.is_contiguous() for p in model.parameters())
