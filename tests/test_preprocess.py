"""Preprocessing geometry and windowing, and the on-disk cache, on real DICOM files."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedbreast.shared.data import cache as cache_mod
from fedbreast.shared.data.cache import CacheError, build_cache, cache_dir_for, open_cache
from fedbreast.shared.data.dicom_writer import DicomMeta, write_dicom
from fedbreast.shared.data.pixels import read_pixels
from fedbreast.shared.data.preprocess import (
    PRESETS,
    Geometry,
    PreprocessConfig,
    lesion_mask,
    preprocess_image,
)
from fedbreast.shared.data.schema import (
    Energy,
    ImageRecord,
    Label,
    Laterality,
    Lesion,
    Modality,
    ShapeKind,
    Split,
    View,
)

# --- synthetic site helpers (also used by test_datasets.py) -------------------------------------


def breast_image(
    rows: int = 160,
    cols: int = 120,
    chest: str = "left",
    blob: tuple[float, float, float] | None = (0.3, 0.5, 0.1),
    seed: int = 0,
    marker: bool = False,
) -> np.ndarray:
    """uint16 half-ellipse breast against the chest wall on ``chest`` side, with a bright round blob.

    ``blob`` = (x fraction measured from the chest wall, y fraction, radius as a fraction of rows).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = 0 if chest == "left" else cols - 1
    inside = ((xx - cx) / (0.75 * cols)) ** 2 + ((yy - rows / 2) / (0.42 * rows)) ** 2 < 1
    img = np.where(inside, 1900 + 200 * rng.random((rows, cols)), 100 + 20 * rng.random((rows, cols)))
    if blob is not None:
        bx, by, br = blob_centre(rows, cols, chest, blob)
        img = np.where(((xx - bx) ** 2 + (yy - by) ** 2 < br**2) & inside, 2900, img)
    if marker:  # a burned-in label far from the breast
        img[4:10, cols - 12 : cols - 4] = 3000
    return img.astype(np.uint16)


def blob_centre(rows: int, cols: int, chest: str, blob: tuple[float, float, float]) -> tuple[float, float, float]:
    fx, fy, fr = blob
    bx = fx * cols if chest == "left" else (cols - 1) - fx * cols
    return bx, fy * rows, fr * rows


def sha_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_record(
    root: Path,
    name: str,
    pixels: np.ndarray,
    patient: str = "P1",
    exam: str = "E1",
    laterality: str = "L",
    view: str = "CC",
    energy: str = "LE",
    modality: str = "MG",
    label: Label | None = None,
    lesions: tuple[Lesion, ...] = (),
    split: Split | None = Split.TRAIN,
    window: tuple[float, float] | None = (2200.0, 1200.0),
) -> ImageRecord:
    """Write a real DICOM file and the manifest record ingest would make for it."""
    path = root / f"{name}.dcm"
    write_dicom(
        path,
        pixels,
        DicomMeta(
            patient_id=patient,
            study_uid="1.2.3." + str(abs(hash(exam)) % 10**8),
            laterality=laterality,
            view=view if modality == "MG" else "TRANS",
            energy=energy,
            modality=modality,
            window=window,
        ),
    )
    return ImageRecord(
        site="S1",
        patient=patient,
        exam=exam,
        laterality=Laterality(laterality),
        view=View(view),
        modality=Modality(modality),
        energy=Energy(energy),
        path=str(path),
        sha256=sha_of(path),
        rows=pixels.shape[0],
        cols=pixels.shape[1],
        window=window,
        label=label,
        lesions=lesions,
        split=split,
    )


def circle_lesion(
    rows: int, cols: int, chest: str, blob: tuple[float, float, float], label: Label | None = None
) -> Lesion:
    bx, by, br = blob_centre(rows, cols, chest, blob)
    return Lesion(kind=ShapeKind.CIRCLE, points=((bx, by), (br, br)), label=label)


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"window": "auto"}, "window"),
        ({"window": "fixed"}, "clip"),
        ({"window": "fixed", "clip": (3000, 1000)}, "clip"),
        ({"percentiles": (50, 10)}, "percentiles"),
        ({"pad": "mirror"}, "pad"),
        ({"pad": "aspect", "size": None}, "pad"),
        ({"size": (256, 0)}, "size"),
        ({"size": (256.5, 128)}, "size"),
        ({"orientation": "chest_right"}, "orientation"),
        ({"crop_breast": "yes"}, "crop_breast"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"PreprocessConfig\.{field}"):
        PreprocessConfig(**kwargs)


def test_config_hash_is_stable_and_sensitive() -> None:
    a = PreprocessConfig(window="fixed", clip=(1500, 3300), size=(256, 128))
    b = PreprocessConfig.from_dict(json.loads(json.dumps(a.to_dict())))  # lists from JSON -> tuples
    assert a == b and a.config_hash() == b.config_hash() and len(a.config_hash()) == 16
    assert replace(a, size=(256, 129)).config_hash() != a.config_hash()
    assert len({p.config_hash() for p in PRESETS.values()}) == len(PRESETS)
    with pytest.raises(ValueError, match="unknown field"):
        PreprocessConfig.from_dict({"sise": [1, 2]})


# --- windowing -----------------------------------------------------------------------------------


def _flat(values: list[float]) -> np.ndarray:
    return np.array([values] * 4, dtype=np.float32)


def test_fixed_window_maps_clip_to_unit_range() -> None:
    cfg = PreprocessConfig(window="fixed", clip=(1500, 3300), crop_breast=False, size=None, orientation="none")
    out, g = preprocess_image(_flat([1000, 1500, 2400, 3300, 4000]), None, cfg)
    np.testing.assert_allclose(out[0], [0, 0, 0.5, 1, 1], atol=1e-6)
    assert out.dtype == np.float32 and g.scale == (1.0, 1.0) and not g.flipped


def test_dicom_window_uses_header_and_falls_back_to_percentiles(tmp_path: Path) -> None:
    cfg = PreprocessConfig(window="dicom", crop_breast=False, size=None, orientation="none")
    rec = make_record(tmp_path, "w", breast_image(), window=(2200.0, 1200.0))
    out, _ = preprocess_image(_flat([1600, 2200, 2800]), rec, cfg)
    np.testing.assert_allclose(out[0], [0, 0.5, 1], atol=1e-6)
    # MONOCHROME1: the reader inverted v -> max + min - v, so the window must be inverted too.
    mono1 = replace(rec, photometric="MONOCHROME1")
    raw = np.array([1000, 1600, 2200, 2800, 3400], dtype=np.float32)
    inverted = _flat(list(raw.max() + raw.min() - raw))
    out1, _ = preprocess_image(inverted, mono1, cfg)
    np.testing.assert_allclose(out1[0], 1 - np.clip((raw - 1600) / 1200, 0, 1), atol=1e-6)
    no_window = replace(rec, window=None)
    ramp = np.tile(np.arange(1000, dtype=np.float32), (8, 1))
    out2, _ = preprocess_image(ramp, no_window, cfg)
    assert out2.min() == 0 and out2.max() == 1 and 0.45 < out2[0, 500] < 0.55


def test_percentile_window_and_minmax() -> None:
    ramp = np.tile(np.arange(1001, dtype=np.float32), (8, 1))
    cfg = PreprocessConfig(window="percentile", percentiles=(10, 90), crop_breast=False, size=None, orientation="none")
    out, _ = preprocess_image(ramp, None, cfg)
    assert out[0, 100] == pytest.approx(0, abs=2e-3) and out[0, 900] == pytest.approx(1, abs=2e-3)
    assert out[0, 500] == pytest.approx(0.5, abs=2e-3)
    mm = PreprocessConfig(window="fixed", clip=(0, 4000), minmax=True, crop_breast=False, size=None, orientation="none")
    out2, _ = preprocess_image(ramp + 1000, None, mm)
    assert out2.min() == 0 and out2.max() == pytest.approx(1)


# --- crop, pad, orientation ----------------------------------------------------------------------


def test_crop_to_largest_component_ignores_markers() -> None:
    img = breast_image(chest="left", marker=True).astype(np.float32)
    cfg = PreprocessConfig(window="fixed", clip=(1500, 3300), crop_breast=True, size=None, orientation="none")
    out, g = preprocess_image(img, None, cfg)
    y0, x0, y1, x1 = g.crop
    # Ellipse: x in [0, 0.75*120), y in 80 +- 0.42*160 -> rows ~13..147
    assert x0 == 0 and 85 <= x1 <= 92 and 10 <= y0 <= 16 and 144 <= y1 <= 150
    assert out.shape == (y1 - y0, x1 - x0) and g.out_shape == out.shape
    assert not (out[:12, -12:] > 0.5).any()  # the marker was left out


def test_pad_square_and_aspect_keep_proportions() -> None:
    img = breast_image(chest="left").astype(np.float32)
    base = PreprocessConfig(window="fixed", clip=(1500, 3300), crop_breast=True, orientation="chest_left")
    sq, gs = preprocess_image(img, None, replace(base, pad="square", size=(64, 64)))
    asp, ga = preprocess_image(img, None, replace(base, pad="aspect", size=(64, 32)))
    stretch, gn = preprocess_image(img, None, replace(base, pad="none", size=(64, 64)))
    assert sq.shape == (64, 64) and asp.shape == (64, 32) and stretch.shape == (64, 64)
    for g in (gs, ga):
        assert g.scale[0] == pytest.approx(g.scale[1], rel=0.05)  # no distortion
    assert gn.scale[0] != pytest.approx(gn.scale[1], rel=0.05)  # pad="none" stretches
    # The crop is ~134 x 90: square padding adds columns on the right, away from the chest wall.
    ch, cw = round(gs.crop_shape[0] * gs.scale[0]), round(gs.crop_shape[1] * gs.scale[1])
    assert ch == 64 and cw < 64 and np.all(sq[:, cw:] == 0)


@pytest.mark.parametrize("chest", ["left", "right"])
def test_orientation_puts_chest_wall_left(tmp_path: Path, chest: str) -> None:
    rec = make_record(tmp_path, chest, breast_image(chest=chest))
    cfg = PreprocessConfig(window="dicom", crop_breast=True, pad="aspect", size=(64, 32), orientation="chest_left")
    out, g = preprocess_image(read_pixels(rec.path), rec, cfg)
    assert g.flipped == (chest == "right")
    cols = out.mean(axis=0)
    assert cols[:8].mean() > 2 * cols[-8:].mean()  # tissue mass at the left edge
    none, g0 = preprocess_image(read_pixels(rec.path), rec, replace(cfg, orientation="none"))
    assert not g0.flipped


def test_des_reuses_le_crop_and_flip() -> None:
    le = breast_image(chest="right").astype(np.float32)
    des = np.full_like(le, 2000.0)  # a DES with no visible edge still gets the LE's crop
    cfg = PreprocessConfig(window="percentile", crop_breast=True, pad="aspect", size=(64, 32), orientation="chest_left")
    _, g_le = preprocess_image(le, None, cfg)
    _, g_des = preprocess_image(des, None, cfg, reference=g_le)
    assert g_des == g_le and g_le.flipped


# --- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chest", ["left", "right"])
@pytest.mark.parametrize("pad, size", [("aspect", (96, 48)), ("square", (64, 64)), ("none", (50, 70)), ("none", None)])
def test_mapped_mask_lands_on_the_lesion(chest: str, pad: str, size: tuple[int, int]) -> None:
    rows, cols = 160, 120
    img = breast_image(rows, cols, chest=chest, blob=None).astype(np.float32)
    # A rotated ellipse and a polygon drawn into the raw image at 3500 (well above the tissue).
    ell = Lesion(
        kind=ShapeKind.ELLIPSE, points=((40.0 if chest == "left" else 79.0, 60.0), (18.0, 9.0)), angle_deg=30.0
    )
    poly = Lesion(kind=ShapeKind.POLYGON, points=((30.0, 100.0), (50.0, 95.0), (45.0, 125.0), (25.0, 120.0)))
    if chest == "right":
        poly = Lesion(kind=ShapeKind.POLYGON, points=tuple((cols - 1 - x, y) for x, y in poly.points))
    ident = Geometry((rows, cols), (0, 0, rows, cols), False, (1.0, 1.0), (0, 0), (rows, cols))
    raw_mask = lesion_mask([ell, poly], ident)
    img[raw_mask] = 3500
    cfg = PreprocessConfig(
        window="fixed", clip=(1500, 3500), crop_breast=True, pad=pad, size=size, orientation="chest_left"
    )
    out, g = preprocess_image(img, None, cfg)
    mapped = lesion_mask([ell, poly], g)
    seen = out > 0.6  # lesion pixels after preprocessing (tissue ~0.25, lesion 1.0)
    iou = (mapped & seen).sum() / (mapped | seen).sum()
    assert iou > (0.98 if size is None else 0.85), iou  # resizing blurs the edge by ~1 px
    # Round trip of the mapping.
    pts = np.array([[10.0, 20.0], [55.5, 70.25], [90.0, 140.0]])
    np.testing.assert_allclose(g.unmap_points(g.map_points(pts)), pts, atol=1e-9)
    assert Geometry.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_lesion_mask_shapes() -> None:
    g = Geometry((100, 100), (0, 0, 100, 100), False, (1.0, 1.0), (0, 0), (100, 100))
    box = lesion_mask([Lesion(ShapeKind.BOX, ((10.0, 20.0), (29.0, 29.0)))], g)
    assert box.sum() == 20 * 10 and box[20, 10] and box[29, 29] and not box[30, 29]
    circ = lesion_mask([Lesion(ShapeKind.CIRCLE, ((50.0, 50.0), (10.0, 10.0)))], g)
    dist = np.hypot(*(np.mgrid[0:100, 0:100] - 50.0))
    assert circ[dist <= 10].all() and not circ[dist > 10.75].any()  # exact up to half a pixel, no bias
    pt = lesion_mask([Lesion(ShapeKind.POINT, ((70.0, 30.0),))], g, point_radius=2)
    assert pt[30, 70] and 5 <= pt.sum() <= 25
    flipped = Geometry((100, 100), (0, 0, 100, 100), True, (0.5, 0.5), (0, 0), (50, 50))
    m = lesion_mask([Lesion(ShapeKind.BOX, ((0.0, 0.0), (19.0, 19.0)))], flipped)
    assert m.shape == (50, 50) and m[0, 49] and not m[0, 0]


# --- cache ---------------------------------------------------------------------------------------

SMALL = PreprocessConfig(window="dicom", crop_breast=True, pad="aspect", size=(48, 24), orientation="chest_left")


def _site(tmp_path: Path, n_exams: int = 2) -> list[ImageRecord]:
    recs = []
    for i in range(n_exams):
        for lat, chest in (("L", "left"), ("R", "right")):
            for energy in ("LE", "DES"):
                recs.append(
                    make_record(
                        tmp_path / "dicom",
                        f"e{i}{lat}{energy}",
                        breast_image(chest=chest, seed=i),
                        patient=f"P{i}",
                        exam=f"E{i}",
                        laterality=lat,
                        energy=energy,
                    )
                )
    return recs


def test_cache_hit_miss_and_values(tmp_path: Path) -> None:
    recs = _site(tmp_path)
    s1 = build_cache(tmp_path, recs, SMALL)
    assert (s1.total, s1.built, s1.hits, s1.failed) == (8, 8, 0, 0)
    s2 = build_cache(tmp_path, recs, SMALL)
    assert (s2.built, s2.hits, s2.shards_written) == (0, 8, 0)
    cache = open_cache(tmp_path, SMALL)
    r = recs[2]  # right LE: flipped
    arr = cache.get(r.sha256)
    expected, g = preprocess_image(read_pixels(r.path), r, SMALL)
    assert arr.dtype == np.float16 and arr.shape == (48, 24) and not arr.flags.writeable
    assert isinstance(arr.base, np.memmap) or isinstance(arr, np.memmap)  # zero-copy view
    np.testing.assert_allclose(arr.astype(np.float32), expected, atol=1e-3)
    assert cache.geometry(r.sha256) == g and g.flipped
    # The DES borrowed its LE's geometry, and says so.
    des = recs[3]
    assert cache.ref(des.sha256) == r.sha256 and cache.geometry(des.sha256) == g
    shard, row = cache.locate([recs[0].sha256, "", r.sha256])
    batch = cache.gather(shard, row)
    assert batch.shape == (3, 48, 24) and not batch[1].any() and np.array_equal(batch[2], arr)
    assert b"_maps" in pickle.dumps(cache) and len(pickle.dumps(cache)) < 20000  # no array data pickled


def test_cache_invalidation_on_config_and_content_change(tmp_path: Path) -> None:
    recs = _site(tmp_path)
    build_cache(tmp_path, recs, SMALL)
    index_path = cache_dir_for(tmp_path, SMALL) / "index.json"
    before = index_path.read_bytes()
    other = replace(SMALL, size=(32, 16))
    s = build_cache(tmp_path, recs, other)
    assert s.built == 8 and index_path.read_bytes() == before  # the first config was not touched
    # Rewrite one DES file: only it is rebuilt.
    des = recs[1]
    new_des = make_record(
        tmp_path / "dicom", "e0LDES", breast_image(chest="left", seed=7), patient="P0", exam="E0", energy="DES"
    )
    assert new_des.sha256 != des.sha256
    recs2 = [new_des if r is des else r for r in recs]
    s = build_cache(tmp_path, recs2, SMALL)
    assert (s.built, s.hits) == (1, 7)
    # Rewrite an LE file: the LE and the DES that borrows its crop are rebuilt.
    le = recs2[0]
    new_le = make_record(
        tmp_path / "dicom", "e0LLE", breast_image(chest="left", seed=8), patient="P0", exam="E0", energy="LE"
    )
    recs3 = [new_le if r is le else r for r in recs2]
    s = build_cache(tmp_path, recs3, SMALL)
    assert (s.built, s.hits) == (2, 6)
    assert open_cache(tmp_path, SMALL).ref(new_des.sha256) == new_le.sha256


def test_cache_records_decode_failures_and_goes_on(tmp_path: Path) -> None:
    recs = _site(tmp_path, n_exams=1)
    bad = tmp_path / "dicom" / "broken.dcm"
    bad.write_bytes(b"DICM" + b"\0" * 300)
    bad_rec = replace(recs[0], path=str(bad), sha256=sha_of(bad), energy=Energy.FFDM, exam="E9")
    stats = build_cache(tmp_path, recs + [bad_rec], SMALL)
    assert stats.built == 4 and stats.failed == 1
    f = stats.failures[0]
    assert f.path == str(bad) and f.sha256 == bad_rec.sha256 and "DICOM" in f.reason
    cache = open_cache(tmp_path, SMALL)
    assert not cache.has(bad_rec.sha256) and str(bad) in cache.failure(bad_rec.sha256)
    with pytest.raises(KeyError, match="build failed"):
        cache.get(bad_rec.sha256)


def test_interrupted_build_leaves_a_usable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = _site(tmp_path)
    real = cache_mod.preprocess_image
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # not an Exception: aborts the build like Ctrl-C
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "preprocess_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path, recs, SMALL, chunk_bytes=1)  # a shard per image group
    monkeypatch.setattr(cache_mod, "preprocess_image", real)
    cache = open_cache(tmp_path, SMALL)
    assert 1 <= len(cache) < 8
    for sha in cache.shas():
        assert cache.get(sha).shape == (48, 24)
    # A stray temp file from a crash mid-write is cleaned up by the next build.
    (cache.cache_dir / ".shard-dead.npy.tmp").write_bytes(b"junk")
    s = build_cache(tmp_path, recs, SMALL)
    assert s.hits == len(cache) and s.built == 8 - len(cache) and s.failed == 0
    assert not list(cache.cache_dir.glob("*.tmp"))
    assert len(open_cache(tmp_path, SMALL)) == 8


def test_parallel_build_matches_serial(tmp_path: Path) -> None:
    recs = _site(tmp_path)
    seen: list[tuple[int, int]] = []
    build_cache(tmp_path / "a", recs, SMALL, workers=2, progress=lambda d, t: seen.append((d, t)))
    build_cache(tmp_path / "b", recs, SMALL, workers=1)
    a, b = open_cache(tmp_path / "a", SMALL), open_cache(tmp_path / "b", SMALL)
    assert seen[-1] == (8, 8)
    for r in recs:
        assert np.array_equal(a.get(r.sha256), b.get(r.sha256)) and a.geometry(r.sha256) == b.geometry(r.sha256)


def test_open_cache_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no cache for this preprocessing config"):
        open_cache(tmp_path, SMALL)
    build_cache(tmp_path, [], SMALL)
    assert len(open_cache(tmp_path, SMALL)) == 0
    (cache_dir_for(tmp_path, SMALL) / "index.json").write_text("{oops")
    with pytest.raises(CacheError, match="index.json: not valid JSON"):
        open_cache(tmp_path, SMALL)
