"""shared/explain: our plumbing around pytorch-grad-cam gives the library's own maps; the
pointing game and its random baseline; overlays and Secondary Captures a viewer can open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from fedbreast.shared.data.dicom_writer import DicomMeta, write_dicom
from fedbreast.shared.data.schema import Energy, ImageRecord, Laterality, Modality, View
from fedbreast.shared.explain import ViewHeatmap
from fedbreast.shared.explain.cam import class_activation_maps, class_activation_maps_for, logit
from fedbreast.shared.explain.pointing import energy_inside, peak, pointing_hit, pointing_score
from fedbreast.shared.explain.render import overlay_rgb, write_png, write_secondary_capture


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).relu().mean(dim=(2, 3)))


@pytest.mark.parametrize(("method", "library"), [("Grad-CAM", GradCAM), ("Grad-CAM++", GradCAMPlusPlus)])
def test_our_maps_are_the_librarys_own(method: str, library: type) -> None:
    net, x = TwoHeads(), torch.rand(3, 1, 16, 12)
    with library(model=net, target_layers=[net.body]) as cam:
        want = [cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * 3) for c in (0, 1)]
    got, out = class_activation_maps_for([[logit(0)] * 3, [logit(1)] * 3], net, [net.body], x, method)
    for w, g in zip(want, got):
        assert g.shape == (3, 16, 12) and np.allclose(g, w, atol=1e-5)
    one, _ = class_activation_maps(net, [net.body], x, [logit(1)] * 3, method)
    assert np.allclose(one, want[1], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(out, net(x))  # the scores come from the same forward pass
    assert all(p.requires_grad for p in net.parameters()) and not net.training  # the caller's model as it was


def test_pointing_game_energy_and_the_random_baseline() -> None:
    lesion = np.zeros((10, 10), bool)
    lesion[2:4, 2:4] = True  # 4 % of the image
    on = np.zeros((10, 10), np.float32)
    on[3, 3] = 1.0
    off = np.zeros((10, 10), np.float32)
    off[8, 8] = 1.0
    assert pointing_hit(on, lesion) and not pointing_hit(off, lesion)
    assert energy_inside(on, lesion) == 1.0 and energy_inside(off, lesion) == 0.0
    plateau = np.zeros((10, 10), np.float32)
    plateau[3:9, 3:9] = 1.0  # a top window touching the lesion at one corner: its centre is outside
    assert peak(plateau) == (6, 6) and not pointing_hit(plateau, lesion)
    image = np.ones((10, 10), np.float32)
    score = pointing_score(
        [ViewHeatmap("p", "e", "L", "CC", image, h, "Grad-CAM", lesion=lesion) for h in (on, off)]
        + [ViewHeatmap("p", "e", "R", "CC", image, on, "Grad-CAM")]  # no outline: not counted
    ).as_dict()
    assert score == {
        "images": 2,
        "hit_rate": 0.5,
        "energy_inside": 0.5,
        "random_hit_rate": pytest.approx(0.04),
        "random_energy_inside": pytest.approx(0.04),
    }
    assert pointing_score([]).as_dict()["hit_rate"] is None  # no NaN in JSON


def test_overlay_png_and_a_secondary_capture_in_the_source_study(tmp_path: Path) -> None:
    src = write_dicom(
        tmp_path / "src.dcm",
        np.full((20, 16), 900, np.uint16),
        DicomMeta(patient_id="HOSP-77", study_uid="1.2.826.0.1.3680043.8.498.1", accession="ACC9"),
    )
    rec = ImageRecord(
        site="s", patient="p1", exam="e1", laterality=Laterality("L"), view=View("CC"), modality=Modality("MG"),
        energy=Energy("FFDM"), path=str(src), sha256="0" * 64, rows=20, cols=16,
    )  # fmt: skip
    heat = np.linspace(0, 1, 20 * 16, dtype=np.float32).reshape(20, 16)
    hm = ViewHeatmap(
        "p1", "e1", "L", "CC", np.random.default_rng(0).random((20, 16)), heat, "Grad-CAM", 0.7, record=rec
    )
    rgb = overlay_rgb(hm)
    assert rgb.shape == (20, 16, 3) and rgb.dtype == np.uint8
    assert rgb[-1, -1, 0] > rgb[-1, -1, 2] and rgb[0, 0, 2] > rgb[0, 0, 0]  # jet: hot red, cold blue
    png = write_png(hm, tmp_path / "h" / f"{hm.name}.png")
    assert png.stat().st_mode & 0o777 == 0o600
    dcm = write_secondary_capture(hm, tmp_path / "h.dcm", "1.2.826.0.1.3680043.8.498.2")
    ds = pydicom.dcmread(dcm)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.Modality == "OT"
    assert (ds.PatientID, ds.StudyInstanceUID, ds.AccessionNumber) == ("HOSP-77", "1.2.826.0.1.3680043.8.498.1", "ACC9")
    assert np.array_equal(ds.pixel_array, rgb) and "not for diagnosis" in ds.SeriesDescription
    assert "score 0.7000" in ds.ImageComments
    # The source gone: a study of its own under the local id, never a crash.
    src.unlink()
    ds2 = pydicom.dcmread(write_secondary_capture(hm, tmp_path / "h2.dcm", "1.2.3"))
    assert ds2.PatientID == "p1" and ds2.StudyInstanceUID != ds.StudyInstanceUID
