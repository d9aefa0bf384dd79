"""The command line's error contract (issue 14, item 7): an expected error (a bad config,
bad data, a refusal, a missing file) prints one line that names the key or file and exits
2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import pytest

from fedbreast import cli
from fedbreast.client.audit import AuditUnavailable
from fedbreast.client.secure_aggregation import SecureAggregationRefused
from fedbreast.server.checkpoints import CheckpointError
from fedbreast.server.federation import FederationStopped
from fedbreast.server.launcher import RunFailed
from fedbreast.server.superlink import DeployError
from fedbreast.shared.data.cache import CacheError
from fedbreast.shared.data.cdd_cesm import CddCesmError
from fedbreast.shared.data.headers import HeaderRejection
from fedbreast.shared.data.ingest import IngestError
from fedbreast.shared.data.manifest import ManifestError
from fedbreast.shared.data.pixels import PixelDecodeError
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.models.backbones import WeightsFileError
from fedbreast.shared.training.dp import DPRefused
from fedbreast.simulation.flower_runner import SimulationFailed

EXPECTED = (
    AuditUnavailable,
    CacheError,
    CddCesmError,
    CheckpointError,
    ConfigError,
    DeployError,
    DPRefused,
    FederationStopped,
    HeaderRejection,
    IngestError,
    ManifestError,
    PixelDecodeError,
    RunFailed,
    SecureAggregationRefused,
    SimulationFailed,
    SiteUnavailable,
    WeightsFileError,
)


@pytest.mark.parametrize("error", EXPECTED, ids=lambda e: e.__name__)
def test_every_expected_error_is_a_fedbreast_error_and_keeps_its_builtin_base(error):
    assert issubclass(error, FedbreastError)
    assert issubclass(error, (ValueError, RuntimeError))  # callers that catch those still do


def test_a_bad_run_config_key_is_one_line_naming_the_key(capsys):
    assert cli.main(["simulate", "--set", "no-such-key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbreast: error: ") and "no-such-key" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_bad_generator_setting_is_one_line(tmp_path, capsys):
    assert cli.main(["site", "generate", "--out", str(tmp_path / "g"), "--patients", "0"]) == 2
    err = capsys.readouterr().err
    assert "patients per site must be >= 1, got 0" in err and err.count("\n") == 1


def test_a_missing_site_directory_names_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["site", "audit", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not the operator's input")

    # A plain ValueError from inside a command is a bug: it is not turned into exit 2.
    monkeypatch.setattr("fedbreast.shared.data.generate.generate_federation", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["site", "generate", "--out", str(tmp_path / "g")])


def test_a_damaged_run_id_record_names_the_file_and_how_to_go_on(tmp_path):
    from fedbreast.server.launcher import RUN_IDS, stop_unfinished_runs

    (tmp_path / RUN_IDS).parent.mkdir(parents=True)
    (tmp_path / RUN_IDS).write_text("123\nnot-a-run\n")
    with pytest.raises(RunFailed, match=r"flower/run-ids: not a list of Flower run ids; remove it to launch"):
        stop_unfinished_runs("any-federation", tmp_path, {}, print)
    assert stop_unfinished_runs("any-federation", tmp_path / "fresh", {}, print) == []  # a new run directory
