"""Family settings and branch scores added for the seeds' claims 6-8 (issue 17 item 3):
dualmode's single-mode networks (``dualmode_modes``), late fusion's plain mean
(``latefusion_weights``) and per-modality scores, mgus' branch scores on the same lesions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families.dualmode.model import SingleModeNet
from fedbreast.shared.families.latefusion.task import LateFusionTask
from fedbreast.shared.families.mgus.task import BRANCHES, branch_aucs, branch_units
from fedbreast.shared.models.dualmode import DualModeNet
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.models.latefusion import LateFusionNet


def _dualmode(**kw) -> RunConfig:
    return RunConfig(model="dualmode", backbone="smallcnn", box_size=32, **kw)


def test_dualmode_modes_default_bad_value_and_signature() -> None:
    assert _dualmode().dualmode_modes == "le,des"
    with pytest.raises(ConfigError, match="dualmode"):
        _dualmode(dualmode_modes="des,le")
    sigs = {_dualmode(dualmode_modes=m).model_signature() for m in ("le,des", "le", "des")}
    assert len(sigs) == 3  # another set of tensors: a checkpoint of one mode cannot resume the other


@pytest.mark.parametrize("modes, energy", [("le", "LE"), ("des", "DES")])
def test_single_mode_network_reads_its_mode_only(modes: str, energy: str) -> None:
    assert isinstance(build_model(_dualmode()), DualModeNet)
    torch.manual_seed(0)
    net = build_model(_dualmode(dualmode_modes=modes)).eval()
    assert isinstance(net, SingleModeNet) and net.modes == (energy,)
    assert hasattr(net, energy.lower())  # Grad-CAM's layer lives where the dual-mode net has it
    x = torch.randn(3, 2, 2, 32, 32)
    out = net(x)
    assert out.shape == (3,)
    other = 1 - ("LE", "DES").index(energy)
    x2 = x.clone()
    x2[:, :, other] = torch.randn(3, 2, 32, 32)
    assert torch.allclose(net(x2), out)  # the other mode's boxes are ignored
    x2[:, :, 1 - other] += 1.0
    assert not torch.allclose(net(x2), out)


def test_latefusion_weights_setting_and_branch_scores(monkeypatch) -> None:
    assert RunConfig(model="latefusion").latefusion_weights == "mcc"
    with pytest.raises(ConfigError, match="latefusion"):
        RunConfig(model="latefusion", latefusion_weights="median")
    cfg = RunConfig(model="latefusion", latefusion_weights="mean")
    assert cfg.model_signature() == RunConfig(model="latefusion").model_signature()  # no tensor depends on it
    task = LateFusionTask()
    assert task.extra_metrics(None, None, cfg, torch.device("cpu")) == {}  # no counts: the weights stay equal

    model = LateFusionNet("smallcnn")
    model.fusion_mcc.copy_(torch.tensor([0.5, 0.1, 0.2, 0.6, 0.3, 0.9]))
    # slots ffdm_cc, ffdm_mlo, cesm_cc, cesm_mlo; breast 2 has no CESM, breast 3 no label
    p = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.9, 0.7, 0.1, 0.3], [0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    avail = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    y, m = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([True, True, True, False])
    monkeypatch.setattr(task, "_slot_probs", lambda *a: (p, avail, y, m))
    out = task.branch_predictions(model, None, "test", RunConfig(model="latefusion"), torch.device("cpu"))
    for k in ("fused", "mean", "ffdm", "cesm"):
        assert out[k][0].tolist() == [1, 0]  # the breasts with both modalities, labelled
    assert np.allclose(out["mean"][1], [(0.3 + 0.7) / 2, (0.9 + 0.2) / 2])
    assert np.allclose(out["ffdm"][1], [(0.2 * 0.5 + 0.4 * 0.1) / 0.6, 0.9])
    assert np.allclose(out["cesm"][1], [(0.6 * 0.2 + 0.8 * 0.6) / 0.8, (0.1 * 0.2 + 0.3 * 0.6) / 0.8])
    pm = np.stack([out["ffdm"][1], out["cesm"][1]], 1)
    assert np.allclose(out["fused"][1], (pm * [0.3, 0.9]).sum(1) / 1.2)


def test_mgus_branch_units_share_the_lesions_with_ultrasound() -> None:
    # samples of units 0 (with US), 1 (without) and 2 (with US); unit 0 has two appearances
    cols = {
        "unit": [np.array([0, 0, 1, 2])],
        "mg": [np.array([0.2, 0.4, 0.9, 0.6])],
        "us": [np.array([0.5, 0.7, 0.5, 0.1])],
        "fused": [np.array([0.8, 0.6, 0.5, 0.3])],
        "has_us": [np.array([True, True, False, True])],
        "y": [np.array([1, 1, 0, 0])],
        "mask": [np.ones(4, bool)],
    }
    for b in BRANCHES:
        ids, y, _ = branch_units(cols, 3, b, only_us=True)
        assert ids.tolist() == [0, 2] and y.tolist() == [1, 0]
    assert np.allclose(branch_units(cols, 3, "mg", only_us=True)[2], [0.3, 0.6])
    assert branch_units(cols, 3, "mg", only_us=False)[0].tolist() == [0, 1, 2]
    aucs = branch_aucs(cols, 3)  # the evaluate reply's: mg over every lesion, the others over US lesions
    assert aucs == {"test_auc_mg": 0.0, "test_auc_us": 1.0, "test_auc_fused": 1.0}
