"""Nothing patient-level leaves a site, in every model family (issue 5, item 5).

For each family in the registry (shared/families), the real ClientApp answers a roll call, a train
and an evaluate message at a generated site that family can use (dualmode needs CEM, mgus
ultrasound). Every reply must hold only the family's own model arrays (names and shapes of
its state_dict, so no image or patch rides along), aggregate metrics, and no string naming a
patient, exam, file or DICOM UID of that site; lists only of a fixed size that does not
depend on how many exams or lesions the site has.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from clientapp_messages import as_task, request, site_context
from test_site_privacy import assert_clean, content_text, identifiers

from fedbreast.client.audit import audit_path, read_audit
from fedbreast.shared.config import RunConfig
from fedbreast.shared.families import FAMILIES
from fedbreast.shared.models.factory import build_model
from fedbreast.simulation.simulate import PRESETS, prepare_federation

torch.set_num_threads(1)

SITES, PATIENTS, DATA_SEED = 3, 6, 5  # site-1 CEM, site-2 FFDM, site-3 FFDM + ultrasound
BASE = dict(backbone="smallcnn", bootstrap=20, hist_bins=32, rounds=1, workers=0, local_epochs=1, local_steps=2)
FAMILY = {
    "multiview": ("site-2", dict(image_h=64, image_w=32, batch_size=4)),
    "birads": ("site-1", dict(patch_size=32, n_patches=4, batch_size=16)),
    "dualmode": ("site-1", dict(box_size=32, batch_size=4)),
    "mgus": ("site-3", dict(crop_size=32, batch_size=4)),
    "latefusion": ("site-1", dict(image_h=32, image_w=32, batch_size=4)),
    "cyclegan": ("site-1", dict(image_h=32, image_w=32, batch_size=4, cyclegan_filters=4, cyclegan_blocks=1)),
}
# Lists a reply may carry: key -> its fixed length (from the config, never from the site's data).
FIXED_LISTS = {
    **{f"{split}_hist_{c}": BASE["hist_bins"] for split in ("test", "val") for c in ("pos", "neg")},
    "val_confusion": 24,
}


@pytest.fixture(autouse=True)
def task_identity():
    as_task()


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("privacy-families")
    prepare_federation(data_dir, SITES, PATIENTS, DATA_SEED, echo=lambda *_: None)
    return data_dir / "sites"


def test_every_family_is_covered() -> None:
    assert set(FAMILY) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_replies_of_every_family_hold_only_model_arrays_and_aggregates(family, sites, caplog) -> None:
    from fedbreast.client.app import app

    site_name, tiny = FAMILY[family]
    site = sites / site_name
    cfg = RunConfig(**{**PRESETS[family], **BASE, **tiny})
    torch.manual_seed(0)
    state = {k: v.detach().cpu().numpy().copy() for k, v in build_model(cfg).state_dict().items()}
    needles = identifiers(site)
    assert len(needles) > 20, len(needles)  # patients, exams, paths and UIDs of this site

    caplog.set_level(logging.DEBUG)
    ctx = site_context(site, cfg.to_flower(), site_name=site_name)
    replies = [
        app(request("query", 0), ctx),
        app(request("train", 1, state), ctx),
        app(request("evaluate", 1, state), ctx),
    ]
    statuses = [(r.metadata.message_type, r.content["site"]["status"], r.content["site"]["reason"]) for r in replies]
    assert [s[1] for s in statuses] == ["ok", "ok", "ok"], statuses

    query, train, evaluate = replies
    # Train: exactly the family's model arrays, each with its state_dict shape; nothing else.
    assert list(train.content.array_records) == ["arrays"]
    sent = {k: v.numpy() for k, v in train.content["arrays"].items()}
    assert set(sent) == set(state), set(sent) ^ set(state)
    for k, v in sent.items():
        assert v.shape == state[k].shape and v.dtype == state[k].dtype, k
    assert any(not np.array_equal(sent[k], state[k]) for k in state)  # it really trained
    assert train.content["metrics"]["num-examples"] > 0
    # Query and evaluate: no arrays at all.
    assert not query.content.array_records and not evaluate.content.array_records

    for r in replies:
        kind = r.metadata.message_type
        assert_clean(content_text(r), needles | {str(site), str(site.resolve())}, f"{family} {kind} reply")
        for rec in r.content.metric_records.values():
            for key, value in rec.items():
                if isinstance(value, list):  # aggregates of fixed size only, never one entry per unit
                    assert key in FIXED_LISTS and len(value) == FIXED_LISTS[key], (family, kind, key, len(value))
                else:
                    assert isinstance(value, (int, float)), (family, kind, key, type(value))
        for rec in r.content.config_records.values():  # strings: the site's name, status, reason
            assert set(rec) <= {"name", "status", "reason"}, (family, kind, set(rec))
    # Evaluate carried the score histograms (fixed size; a translator's are empty) and, for late
    # fusion, the confusion counts; the translator's quality is sums and counts (numbers, above).
    ev = evaluate.content["metrics"]
    assert len(ev["test_hist_pos"]) == BASE["hist_bins"]
    if family == "latefusion":
        assert len(ev["val_confusion"]) == 24

    # What the site logged about these messages: its audit log and any logger.
    lines = read_audit(site)[-3:]
    assert [ln["type"] for ln in lines] == ["query", "train", "evaluate"]
    assert {a["name"] for a in lines[1]["arrays"]} == set(state)
    assert_clean(audit_path(site).read_text(), needles | {str(site), str(site.resolve())}, f"{family} audit log")
    log_text = "\n".join(f"{rec.name} {rec.getMessage()} {rec.exc_text or ''}" for rec in caplog.records)
    assert_clean(log_text, needles, f"{family}: the site's logs")
