"""QM9 fingerprints record the chosen split (not the last part the suite looped over), and the
migration rewrites the legacy value of finished runs so that ``--resume`` still skips them."""

import json

import pytest

from experiments import migrate_fingerprints, suites
from experiments.data import qm9 as Q
from experiments.options import Options


@pytest.fixture
def fixture_loader(tmp_path, monkeypatch):
    """``load_qm9`` on a 40-molecule fixture, whatever split is asked (recorded in ``asked``)."""
    csv_dir = Q.write_fixture(tmp_path / "csv", n=40, seed=0)
    real = Q.load_qm9
    asked = []

    def load(**kw):
        asked.append(kw["split"])
        return real(data_dir=csv_dir, cache_dir=tmp_path / "cache", seed=0, n_train=20, n_val=10,
                    max_test=10)

    monkeypatch.setattr(Q, "load_qm9", load)
    return asked


@pytest.mark.parametrize("split", ["protocol", "random"])
def test_qm9_fingerprint_records_the_chosen_split(fixture_loader, split):
    o = Options(benchmark="qm9", extra={"split": split})
    with suites.build("qm9", o) as bench:
        assert fixture_loader == [split]
        assert bench.fingerprint["split"] == split


def test_qm9_default_split_is_protocol(fixture_loader):
    with suites.build("qm9", Options(benchmark="qm9")) as bench:
        assert bench.fingerprint["split"] == "protocol"


def _legacy_result(path, data="qm9", split="test"):
    record = {"record_version": 2, "benchmark": "qm9", "seed": 0, "val": {"mu": 0.5},
              "fingerprint": {"benchmark": "qm9", "run": "equal", "data": data, "n_train": 110831,
                              "split": split, "tiny": False}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def test_migration_rewrites_only_legacy_qm9_fingerprints(tmp_path):
    run = tmp_path / "qm9" / "runs" / "equal" / "seed0" / "result.json"
    record = _legacy_result(run)
    summary = tmp_path / "qm9" / "results.json"
    summary.write_text(json.dumps({"runs": [record]}))
    other = _legacy_result(tmp_path / "mf" / "runs" / "equal" / "seed0" / "result.json", data="fashion")
    done = migrate_fingerprints.migrate([tmp_path], "random")
    assert done == {run: 1, summary: 1}
    want = json.loads(json.dumps(record))
    want["fingerprint"]["split"] = "random"
    # the same record and the same layout as the runs write it (indent 1, no trailing newline)
    assert run.read_text() == json.dumps(want, indent=1)
    assert json.loads(summary.read_text()) == {"runs": [want]}
    assert json.loads((tmp_path / "mf" / "runs" / "equal" / "seed0" / "result.json").read_text()) == other
    assert migrate_fingerprints.migrate([tmp_path], "protocol") == {}   # idempotent


def test_migration_cli_refuses_a_missing_folder(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        migrate_fingerprints.main([str(tmp_path / "absent"), "--split", "protocol"])
