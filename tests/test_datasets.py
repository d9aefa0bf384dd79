"""Datasets for every model family, the balanced sampler and batched augmentation, on real DICOM caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_preprocess import breast_image, circle_lesion, make_record
from torch.utils.data import DataLoader

from fedbreast.shared.data.augment import AugmentConfig, augment, sample_theta
from fedbreast.shared.data.cache import build_cache, open_cache
from fedbreast.shared.data.datasets import (
    ExamDataset,
    LesionBoxDataset,
    LesionPatchDataset,
    MammoUSPairDataset,
    ModalityViewDataset,
    NormalPatchDataset,
    class_balanced_sampler,
    make_loader,
)
from fedbreast.shared.data.manifest import MAMMO_VIEWS
from fedbreast.shared.data.preprocess import PRESETS, PreprocessConfig, lesion_mask
from fedbreast.shared.data.schema import Label, Lesion, ShapeKind, Split

FIXED = PreprocessConfig(window="dicom", crop_breast=True, pad="aspect", size=(64, 32), orientation="chest_left")
NATIVE = PreprocessConfig(window="dicom", crop_breast=True, pad="none", size=None, orientation="none")
ROWS, COLS = 160, 120
BLOB = (0.3, 0.5, 0.08)
WHOLE = Lesion(kind=ShapeKind.BOX, points=((0.0, 0.0), (COLS - 1.0, ROWS - 1.0)))


def _exam(
    root: Path,
    p: str,
    energies: tuple[str, ...],
    labels: dict[str, Label | None],
    lesions: dict[str, tuple[Lesion, ...]],
    split: Split,
    skip: tuple[str, ...] = (),
) -> list:
    recs = []
    for lat, chest in (("L", "left"), ("R", "right")):
        blob = BLOB if lesions.get(lat) else None
        for view in ("CC", "MLO"):
            for e in energies:
                if f"{lat}{view}-{e}" in skip:
                    continue
                recs.append(
                    make_record(
                        root,
                        f"{p}{lat}{view}{e}",
                        breast_image(ROWS, COLS, chest=chest, blob=blob, seed=len(recs)),
                        patient=p,
                        exam=f"E{p}",
                        laterality=lat,
                        view=view,
                        energy=e,
                        label=labels.get(lat),
                        lesions=lesions.get(lat, ()),
                        split=split,
                    )
                )
    return recs


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("site")
    dcm = root / "dicom"
    les_l = (circle_lesion(ROWS, COLS, "left", BLOB),)
    les_r = (circle_lesion(ROWS, COLS, "right", BLOB),)
    cem = ("LE", "DES")
    recs = []
    # P0: complete CEM, left malignant (outlined), right normal; two ultrasound images of the left breast.
    recs += _exam(dcm, "P0", cem, {"L": Label.MALIGNANT, "R": Label.NORMAL}, {"L": les_l}, Split.TRAIN)
    # P1: CEM missing RMLO-DES; left benign (outlined).
    recs += _exam(dcm, "P1", cem, {"L": Label.BENIGN}, {"L": les_l}, Split.TRAIN, skip=("RMLO-DES",))
    # P2: FFDM, test split; left unlabelled, right benign (outlined).
    recs += _exam(dcm, "P2", ("FFDM",), {"R": Label.BENIGN}, {"R": les_r}, Split.TEST)
    # P3: CEM; left malignant with a lesion covering everything, right benign without an outline.
    recs += _exam(dcm, "P3", cem, {"L": Label.MALIGNANT, "R": Label.BENIGN}, {"L": (WHOLE,)}, Split.TRAIN)
    us_img = (np.random.default_rng(1).random((100, 140)) * 200).astype(np.uint8)
    us_les = (Lesion(kind=ShapeKind.ELLIPSE, points=((70.0, 50.0), (20.0, 12.0))),)
    for k, les in enumerate((us_les, ())):
        recs.append(
            make_record(
                dcm,
                f"us{k}",
                us_img,
                patient="P0",
                exam="US0",
                laterality="L",
                view="US_TRANS",
                energy="NA",
                modality="US",
                label=Label.MALIGNANT,
                lesions=les,
                split=Split.TRAIN,
                window=None,
            )
        )
    mg = [r for r in recs if r.modality.value == "MG"]
    us = [r for r in recs if r.modality.value == "US"]
    for cfg in (FIXED, NATIVE):
        assert build_cache(root, mg, cfg).failed == 0
    assert build_cache(root, us, PRESETS["us"]).failed == 0
    return {
        "recs": recs,
        "by_name": {Path(r.path).stem: r for r in recs},
        "fixed": open_cache(root, FIXED),
        "native": open_cache(root, NATIVE),
        "us": open_cache(root, PRESETS["us"]),
    }


# --- four-view exams -------------------------------------------------------------------------------


def test_exam_dataset_cem(site: dict) -> None:
    ds = ExamDataset(site["recs"], site["fixed"], split="train", channels="cem")
    assert ds.exams == ["EP0", "EP3"] and len(ds) == 2
    assert ds.skipped == {"EP1": "missing view: RMLO-DES", "US0": "no mammography: ultrasound only"}
    s = ds[0]
    assert s["x"].shape == (4, 2, 64, 32) and s["x"].dtype == torch.float32
    for v, view in enumerate(MAMMO_VIEWS):  # MAMMO_VIEWS order, LE then DES
        for c, e in enumerate(("LE", "DES")):
            expected = site["fixed"].get(site["by_name"][f"P0{view}{e}"].sha256).astype(np.float32)
            assert np.array_equal(s["x"][v, c].numpy(), expected)
    assert s["y"].tolist() == [1.0, 0.0] and s["y_mask"].tolist() == [True, True]
    assert ds.labels().tolist() == [1.0, 1.0]


def test_exam_dataset_channel_modes(site: dict) -> None:
    ffdm = ExamDataset(site["recs"], site["fixed"], channels="ffdm")
    assert ffdm.exams == ["EP0", "EP1", "EP2", "EP3"]  # EP1's LE views are complete
    b = ffdm.__getitems__([0, 2])
    assert b["x"].shape == (2, 4, 1, 64, 32)
    assert np.array_equal(
        b["x"][0, 0, 0].numpy(), site["fixed"].get(site["by_name"]["P0LCCLE"].sha256).astype(np.float32)
    )
    assert b["y"][1].tolist() == [0.0, 0.0] and b["y_mask"][1].tolist() == [False, True]  # P2: left unlabelled
    assert np.isnan(ffdm.labels()).sum() == 0 and ffdm.labels()[2] == 0.0
    le = ExamDataset(site["recs"], site["fixed"], channels="le_only")
    assert le.exams == ["EP0", "EP1", "EP3"] and le.skipped["EP2"].startswith("wrong modality")
    assert le.skip_summary() == {"wrong modality": 1, "no mammography": 1}
    des = ExamDataset(site["recs"], site["fixed"], channels="des_only")  # seed 004's CESM-alone input
    assert des.exams == ["EP0", "EP3"] and des.skipped["EP1"] == "missing view: RMLO-DES"
    assert des.skipped["EP2"].startswith("wrong modality: 'des_only' needs a DES image")
    assert np.array_equal(
        des[0]["x"][0, 0].numpy(), site["fixed"].get(site["by_name"]["P0LCCDES"].sha256).astype(np.float32)
    )
    with pytest.raises(ValueError, match="ExamDataset.channels"):
        ExamDataset(site["recs"], site["fixed"], channels="rgb")
    with pytest.raises(ValueError, match="size=None"):
        ExamDataset(site["recs"], site["native"])


def test_exam_dataset_through_dataloader(site: dict) -> None:
    ds = ExamDataset(site["recs"], site["fixed"], channels="ffdm", dtype=torch.float16)
    loader = make_loader(ds, batch_size=3, num_workers=2, pin_memory=False)
    batches = list(loader)
    assert [b["x"].shape[0] for b in batches] == [3, 1]
    assert batches[0]["x"].dtype == torch.float16 and sorted(torch.cat([b["index"] for b in batches]).tolist()) == [
        0,
        1,
        2,
        3,
    ]
    with pytest.raises(TypeError, match="passthrough_collate"):
        next(iter(DataLoader(ds, batch_size=2)))


# --- seed 000 patches ------------------------------------------------------------------------------


def test_lesion_patches(site: dict) -> None:
    P, N = 24, 12
    ds = LesionPatchDataset(site["recs"], site["native"], patch=P, n_patches=N, seed=0)
    assert len(ds.images) == 14 and len(ds) == 14 * N  # every outlined mammogram
    b = ds.__getitems__(np.arange(len(ds)))
    assert b["x"].shape == (len(ds), 1, P, P)
    boxes = ds.patch_boxes(np.arange(len(ds)))
    for k in range(0, len(ds), 5):
        r = ds.images[int(b["image"][k])]
        cache = site["native"]
        t, l_, bt, br = boxes[k]
        mask = lesion_mask(r.lesions, cache.geometry(r.sha256), cache.shape(r.sha256))
        assert mask[t:bt, l_:br].any()  # centred on a lesion pixel (shifted inwards at borders)
        assert np.array_equal(b["x"][k, 0].numpy(), cache.get(r.sha256)[t:bt, l_:br].astype(np.float32))
        label = {"P0": 1.0, "P1": 0.0, "P2": 0.0, "P3": 1.0}[r.patient]
        assert b["y"][k] == label and b["y_mask"][k]
    assert ds.patients() == ["P0", "P1", "P2", "P3"]
    p1 = ds.indices_for_patient("P1")
    assert len(p1) == 4 * N and {ds.images[i].patient for i in ds.__getitems__(p1)["image"].tolist()} == {"P1"}
    again = LesionPatchDataset(site["recs"], site["native"], patch=P, n_patches=N, seed=0)
    other = LesionPatchDataset(site["recs"], site["native"], patch=P, n_patches=N, seed=1)
    assert np.array_equal(again.patch_boxes(range(len(ds))), boxes)
    assert not np.array_equal(other.patch_boxes(range(len(ds))), boxes)
    assert LesionPatchDataset(site["recs"], site["native"], split="test", patch=P, n_patches=N).patients() == ["P2"]


def test_normal_patches_never_touch_a_lesion(site: dict) -> None:
    P, N, margin = 24, 12, 3
    cache = site["native"]
    ds = NormalPatchDataset(site["recs"], cache, patch=P, n_patches=N, margin=margin, seed=0)
    assert len(ds) > 0 and (ds.labels() == 0).all()
    boxes = ds.patch_boxes(np.arange(len(ds)))
    images = ds.__getitems__(np.arange(len(ds)))["image"].numpy()
    for k in range(len(ds)):
        r = ds.images[images[k]]
        t, l_, bt, br = boxes[k]
        H, W = cache.shape(r.sha256)
        assert 0 <= t and bt <= H and 0 <= l_ and br <= W
        if r.lesions:
            mask = lesion_mask(r.lesions, cache.geometry(r.sha256), (H, W))
            assert not mask[max(t - margin, 0) : bt + margin, max(l_ - margin, 0) : br + margin].any()
        img = cache.get(r.sha256)
        assert img[(t + bt) // 2, (l_ + br) // 2] > 0.05  # centred in the breast, not the background


def test_no_normal_tissue_is_a_reason_not_an_error(site: dict) -> None:
    ds = NormalPatchDataset(site["recs"], site["native"], patch=24, n_patches=12, margin=3)
    assert "P3" not in ds.patients() and len(ds.indices_for_patient("P3")) == 0
    reason = ds.patient_skipped["P3"]
    assert "no normal tissue" in reason and "breast labelled benign" in reason
    by_name = site["by_name"]
    assert ds.skipped[by_name["P3LCCLE"].path].startswith("no normal tissue")
    assert ds.skipped[by_name["P3RCCLE"].path].startswith("no lesion outline")
    tiny = NormalPatchDataset(site["recs"], site["native"], patch=500, n_patches=4)
    assert len(tiny) == 0 and tiny.patients() == [] and "smaller than a 500-px patch" in tiny.patient_skipped["P0"]


# --- seed 003 boxes --------------------------------------------------------------------------------


def test_lesion_boxes(site: dict) -> None:
    cache = site["native"]
    ds = LesionBoxDataset(site["recs"], cache, box=32, jitter=0.1, seed=0)
    assert ds.breasts == [("P0", "EP0", "L"), ("P1", "EP1", "L"), ("P3", "EP3", "L")]
    assert ds.skipped == {"P2/EP2/R": "missing view: RCC-LE"}
    s = ds[0]
    assert s["x"].shape == (2, 2, 32, 32) and s["y"] == 1.0
    corners = ds.boxes(0)
    assert np.array_equal(corners[:, 0], corners[:, 1])  # LE and DES of a view share the box
    r = site["by_name"]["P0LCCLE"]
    x0, y0, x1, y1 = circle_lesion(ROWS, COLS, "left", BLOB).bbox()
    centre = cache.geometry(r.sha256).map_points([[(x0 + x1) / 2, (y0 + y1) / 2]])[0]
    top, left = corners[0, 0]
    assert abs(top + 16 - centre[1]) <= 0.1 * 32 + 1 and abs(left + 16 - centre[0]) <= 0.1 * 32 + 1
    assert np.array_equal(ds[0]["x"], s["x"])  # reproducible within an epoch
    ds.set_epoch(1)
    assert not np.array_equal(ds.boxes(0), corners)
    ffdm = LesionBoxDataset(site["recs"], cache, box=32, energies=("FFDM",))
    assert ffdm.breasts == [("P2", "EP2", "R")] and ffdm[0]["x"].shape == (2, 1, 32, 32)


# --- seed 004 modality x view ----------------------------------------------------------------------


def test_modality_view_slots(site: dict) -> None:
    cache = site["fixed"]
    ds = ModalityViewDataset(site["recs"], cache)
    assert len(ds) == 8 and not ds.skipped
    avail = {key: ds[i]["available"].tolist() for i, key in enumerate(ds.breasts)}
    assert avail[("P0", "EP0", "L")] == [True, True, True, True]
    assert avail[("P1", "EP1", "R")] == [True, True, True, False]
    assert avail[("P2", "EP2", "L")] == [True, True, False, False]
    assert ds.missing_slots == {"CESM-MLO": 3, "CESM-CC": 2}  # P1 right MLO; both P2 (FFDM) breasts
    i = ds.breasts.index(("P2", "EP2", "L"))
    s = ds[i]
    assert s["x"].shape == (4, 1, 64, 32) and not s["x"][2:].any() and s["x"][0].any()
    assert not s["y_mask"]  # P2 left is unlabelled
    j = ds.breasts.index(("P0", "EP0", "L"))
    le = cache.get(site["by_name"]["P0LCCLE"].sha256).astype(np.float32)
    des = cache.get(site["by_name"]["P0LCCDES"].sha256).astype(np.float32)
    assert np.array_equal(ds[j]["x"][0, 0].numpy(), le) and np.array_equal(ds[j]["x"][2, 0].numpy(), des)


# --- seed 002 mammography + ultrasound ------------------------------------------------------------


def test_mammo_us_pairs(site: dict) -> None:
    ds = MammoUSPairDataset(site["recs"], site["native"], site["us"], crop=32, seed=0)
    assert len(ds) == 8  # LE / FFDM images with an outline, one lesion each
    b = ds.__getitems__(range(len(ds)))
    assert b["mg"].shape == (8, 1, 32, 32) and b["us"].shape == (8, 1, 32, 32)
    has_us = b["has_us"].tolist()
    patients = [ds.samples[i][0].patient for i in range(len(ds))]
    assert has_us == [p == "P0" for p in patients]
    assert all(b["us"][k].abs().sum() > 0 for k in range(8) if has_us[k])
    assert all(not b["us"][k].any() for k in range(8) if not has_us[k])
    assert all(b["mg"][k].abs().sum() > 0 for k in range(8))
    # The blob is the brightest thing in the mammography crop's centre.
    assert b["mg"][0, 0, 12:20, 12:20].mean() > b["mg"][0, 0, :4, :4].mean()
    no_us = MammoUSPairDataset(site["recs"], site["native"], None, crop=32)
    nb = no_us.__getitems__(range(len(no_us)))
    assert not nb["has_us"].any() and not nb["us"].any() and len(no_us) == 8
    assert all(r.startswith("not cached: no ultrasound cache") for r in no_us.skipped.values())


# --- sampler -------------------------------------------------------------------------------------


def test_class_balanced_sampler() -> None:
    labels = [0, 0, 0, 0, 0, 0, 1, float("nan")]
    s = class_balanced_sampler(labels, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = np.array(list(s))
    assert 7 not in drawn and 0.45 < (drawn == 6).mean() < 0.55
    assert len(class_balanced_sampler(labels)) == 7
    with pytest.raises(ValueError, match="no labelled samples"):
        class_balanced_sampler([float("nan"), -1])


# --- augmentation --------------------------------------------------------------------------------


def test_augment_shared_across_views() -> None:
    base = torch.rand(3, 1, 2, 16, 12)
    x = base.expand(3, 4, 2, 16, 12).contiguous()
    shared = augment(x, AugmentConfig(), torch.Generator().manual_seed(0), shared_across_views=True)
    assert shared.shape == x.shape and not torch.equal(shared, x)
    for k in range(1, 4):
        assert torch.equal(shared[:, k], shared[:, 0])
    indep = augment(x, AugmentConfig(), torch.Generator().manual_seed(0), shared_across_views=False)
    assert any(not torch.equal(indep[b, k], indep[b, 0]) for b in range(3) for k in range(1, 4))
    again = augment(x, AugmentConfig(), torch.Generator().manual_seed(0), shared_across_views=True)
    assert torch.equal(shared, again)  # deterministic with a seeded generator


def test_augment_exact_flips_and_rot90() -> None:
    x = torch.rand(2, 4, 3, 10, 6)
    only_h = AugmentConfig(rotation_deg=0, hflip_p=1.0, vflip_p=0.0, zoom=0, shift=0)
    torch.testing.assert_close(augment(x, only_h), x.flip(-1), atol=1e-5, rtol=0)
    only_v = AugmentConfig(rotation_deg=0, hflip_p=0.0, vflip_p=1.0, zoom=0, shift=0)
    torch.testing.assert_close(augment(x, only_v), x.flip(-2), atol=1e-5, rtol=0)
    sq = torch.rand(16, 1, 1, 8, 8)
    r90 = AugmentConfig(rotation_deg=0, hflip_p=0, vflip_p=0, zoom=0, shift=0, rot90=True)
    out = augment(sq, r90, torch.Generator().manual_seed(3))
    seen = set()
    for b in range(16):
        k = next(k for k in range(4) if torch.allclose(out[b, 0, 0], torch.rot90(sq[b, 0, 0], k, (0, 1)), atol=1e-5))
        seen.add(k)
    assert len(seen) > 1
    half = augment(x.half(), AugmentConfig(), torch.Generator().manual_seed(0))
    assert half.dtype == torch.float16 and augment(x[:, 0], only_h).shape == (2, 3, 10, 6)
    # A pure rotation stays a rotation on a non-square image: the matrix has unit determinant in pixels.
    th = sample_theta(5, 10, 6, AugmentConfig(hflip_p=0, vflip_p=0, zoom=0, shift=0, rotation_deg=30))
    det = th[:, 0, 0] * th[:, 1, 1] - th[:, 0, 1] * th[:, 1, 0]
    torch.testing.assert_close(det, torch.ones(5))
    with pytest.raises(ValueError, match="AugmentConfig.hflip_p"):
        AugmentConfig(hflip_p=2)
    with pytest.raises(ValueError, match="augment: expected"):
        augment(torch.rand(4, 4), only_h)
