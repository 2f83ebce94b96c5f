"""`migrator diff` and `replicate --only-missing` between real Orthancs."""

from __future__ import annotations

import json

from conftest import ledger_rows, run_cli

from migrator.testkit.dicomgen import upload_all
from migrator.testkit.fastgen import fast_dataset


def _diff(*args: str):
    result = run_cli("diff", *args)
    assert "Traceback" not in result.stderr
    return result


def _study(uid: str, source: int, target: int, missing: int) -> dict[str, object]:
    return {
        "study_uid": uid,
        "study_date": "20240101",
        "source_instances": source,
        "target_instances": target,
        "missing": missing,
        "extra": 0,
    }


def test_diff_finds_what_changed_after_a_replicate_and_only_missing_sends_it(
    source_target, ledger_path, ledger_url
):
    source, target = source_target
    first = fast_dataset(40, seed=11)  # 2 studies of 20 instances
    upload_all(source, first)
    assert run_cli("replicate", source.url, target.url, "--ledger", ledger_url).code == 0
    same = _diff(source.url, target.url, "--json")
    assert same.code == 0, same.stderr
    assert json.loads(same.stdout)["missing"] == 0

    # Deleted from the target: three instances of the first study, one of the second.
    deleted = [first[0], first[1], first[2], first[25]]
    for inst in deleted:
        target.delete_instance(inst.orthanc_id)
    # Added to the source after the replicate: a new study; and one only the target has.
    added = fast_dataset(20, seed=12)[:5]
    upload_all(source, added)
    only_target = fast_dataset(3, seed=13)
    upload_all(target, only_target)

    result = _diff(source.url, target.url, "--json")
    assert result.code == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source"]["studies"] == 3 and doc["source"]["instances"] == 45
    assert doc["target"]["studies"] == 3 and doc["target"]["instances"] == 39
    assert doc["missing"] == 9 and doc["extra"] == 3
    missing = {inst.orthanc_id: inst for inst in (*deleted, *added)}
    assert {m["orthanc_id"] for m in doc["missing_instances"]} == set(missing)
    for m in doc["missing_instances"]:
        assert m["study_uid"] == missing[m["orthanc_id"]].study_uid
        assert m["sop_uid"] == missing[m["orthanc_id"]].sop_uid
    assert {e["orthanc_id"] for e in doc["extra_instances"]} == {i.orthanc_id for i in only_target}
    studies = {s["study_uid"]: s for s in doc["missing_studies"]}
    assert studies == {
        first[0].study_uid: _study(first[0].study_uid, 20, 17, 3),
        first[25].study_uid: _study(first[25].study_uid, 20, 19, 1),
        added[0].study_uid: _study(added[0].study_uid, 5, 0, 5),
    }
    assert [s["study_uid"] for s in doc["extra_studies"]] == [only_target[0].study_uid]

    # The lists are bounded; the counts are not.
    bounded = json.loads(_diff(source.url, target.url, "--json", "--max-list", "2").stdout)
    assert len(bounded["missing_instances"]) == 2 and len(bounded["missing_studies"]) == 2
    assert bounded["missing"] == 9 and bounded["truncated"] is True
    # A StudyDate bound: these studies are all of 2024-01-01.
    later = _diff(source.url, target.url, "--json", "--since", "20250101")
    assert later.code == 0 and json.loads(later.stdout)["source"]["instances"] == 0
    others = _diff(source.url, target.url, "--json", "--modality", "MR")
    assert others.code == 0 and json.loads(others.stdout)["source"]["instances"] == 0
    text = _diff(source.url, target.url, "--until", "2024-01-01", "--modality", "ot")
    assert text.code == 1 and "missing on the target: 9 instances in 3 studies" in text.stdout

    # Only the delta is listed and sent, in a job of its own.
    delta = run_cli("replicate", source.url, target.url, "--ledger", ledger_url, "--only-missing")
    assert delta.code == 0, delta.stderr
    rows = ledger_rows(
        ledger_path,
        "SELECT i.orthanc_id, i.state, i.study_uid FROM instances i JOIN jobs j "
        "ON j.id = i.job_id WHERE j.name LIKE 'missing:%'",
    )
    assert {r[0] for r in rows} == set(missing) and {r[1] for r in rows} == {"sent"}
    assert all(r[2] == missing[r[0]].study_uid for r in rows)
    assert len(rows) == 9
    after = _diff(source.url, target.url, "--json")
    assert after.code == 0 and json.loads(after.stdout)["extra"] == 3


def test_diff_and_only_missing_refuse_what_they_cannot_compare(source_target, ledger_url, tmp_path):
    source, target = source_target
    folder = _diff(str(tmp_path), target.url)
    assert folder.code == 2 and "two http(s):// URLs" in folder.stderr
    folder.assert_one_line_error()
    bad_date = _diff(source.url, target.url, "--since", "last year")
    assert bad_date.code == 2 and "--since 'last year'" in bad_date.stderr
    bad_date.assert_one_line_error()
    # A job's rows are all or the delta, never both.
    name = ("--job", "j", "--ledger", ledger_url)
    assert run_cli("replicate", source.url, target.url, *name).code == 0
    mixed = run_cli("replicate", source.url, target.url, *name, "--only-missing")
    assert mixed.code == 2 and "created without --only-missing" in mixed.stderr
    mixed.assert_one_line_error()
