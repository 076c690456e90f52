"""Retention in a running node, killed in the middle of a removal.

`cadnode serve` receives three chest films and a CT series (no rule wants it: ignored) and
delivers the films' results to DCMTK's storescp; one film is pinned. The PACS then stops and
a fourth film comes: its results wait in the outbox. With the policy at seconds, `cadnode
storage --dry-run` says what would go and deletes nothing. The node is started again with a
test hook that stops housekeeping right after a removal's first commit (rows deleted, files
journalled), and SIGKILLed there. At the next start every row has its file and every file
its row, the journal is finished, nothing pinned or unsent is gone, the spool's
reconciliation brought nothing back, and C-FIND no longer finds the removed studies.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread

from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.retain.stage import HALT_AFTER_MARK
from tests.ingest import json_events, storescp
from tests.peers import REPO, Cadnode, findscu, run_cadnode, storescu, wait_for
from tests.synthetic import write_ct_series

CT_SLICES = 40


def write_config(folder: Path, pacs_port: int, age: str) -> Path:
    """The node's configuration, every retention age `age`, job rows and audit kept 1 h."""
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "priority": {"policy": str(REPO / "config" / "priority.yaml")},
        "destinations": {"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
        "results": {"destinations": ["pacs"]},
        "dispatch": {"backoff_initial_s": 1, "backoff_max_s": 2, "max_attempts": 1000},
        "retention": {
            "images": age,
            "results": age,
            "answers": age,
            "jobs": "1h",
            "audit": "1h",
            "check_every_s": 0.5,
            "high_water_percent": 100,
            "low_water_percent": 99,
        },
    }
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@contextmanager
def database(node: Cadnode) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(node.data_dir / "cadnode.db", timeout=30)
    try:
        yield connection
    finally:
        connection.close()


def scalar(node: Cadnode, sql: str, *args: Any) -> Any:
    with database(node) as connection:
        return connection.execute(sql, args).fetchone()[0]


def states(node: Cadnode) -> dict[str, str]:
    """Each study's latest job state, read from the database (a CLI round trip per poll
    costs seconds on a loaded machine)."""
    with database(node) as connection:
        rows = connection.execute(
            "SELECT study.study_uid, job.state FROM job JOIN study ON study.id = job.study_id "
            "ORDER BY job.version"
        ).fetchall()
    return {uid: state for uid, state in rows}


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_rows_and_files_agree(node: Cadnode) -> None:
    with database(node) as connection:
        spool = {row[0] for row in connection.execute("SELECT path FROM instance")}
        results = {row[0] for row in connection.execute("SELECT path FROM resultobject")}
        masks = {
            row[0]
            for row in connection.execute("SELECT json_extract(answer, '$.mask_file') FROM result")
        } - {None, ""}
        journal = connection.execute("SELECT count(*) FROM removal").fetchone()[0]
    assert journal == 0
    assert files(node.data_dir / "spool") == spool
    assert files(node.data_dir / "results") == results
    assert files(node.data_dir / "answers") == masks


def found_by_cfind(node: Cadnode, study_uid: str, folder: Path) -> int:
    """Study-level C-FIND matches for one Study Instance UID (DCMTK's findscu)."""
    answers = findscu(
        node.dicom_port, folder, QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid
    )
    return len(answers)


def test_a_node_killed_in_the_middle_of_a_removal_finishes_it_and_serves_no_remains(
    tmp_path: Path,
) -> None:
    inputs = tmp_path / "inputs"
    films = [
        write_chest_radiograph(inputs / f"film{i}.dcm", seed=801 + i, size=256) for i in range(4)
    ]
    ct_paths = write_ct_series(inputs / "ct", CT_SLICES, size=64, seed=805)
    ct_study = str(dcmread(ct_paths[0], stop_before_pixels=True).StudyInstanceUID)
    pinned, removed, unsent = films[0], films[1:3], films[3]
    gone = [str(f.StudyInstanceUID) for f in removed] + [ct_study]
    pinned_uid, unsent_uid = str(pinned.StudyInstanceUID), str(unsent.StudyInstanceUID)

    with ExitStack() as pacs:
        pacs_port = pacs.enter_context(storescp(tmp_path / "pacs"))
        config = write_config(tmp_path, pacs_port, age="1h")  # nothing old enough yet
        with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
            pin = node.cli("pin", pinned_uid, "--reason", "teaching file")
            assert pin.returncode == 0, pin.stderr
            sent = storescu(
                node.dicom_port, *(inputs / f"film{i}.dcm" for i in range(3)), *ct_paths
            )
            assert sent.returncode == 0, sent.stderr
            wait_for(
                lambda: (
                    [states(node).get(uid) for uid in (pinned_uid, *gone)]
                    == ["delivered", "delivered", "delivered", "ignored"]
                ),
                120,
                "the films delivered and the CT ignored",
                interval_s=0.3,
            )
            pacs.close()  # the PACS goes down: the next film's results wait in the outbox
            sent = storescu(node.dicom_port, inputs / "film3.dcm")
            assert sent.returncode == 0, sent.stderr
            wait_for(
                lambda: scalar(
                    node,
                    "SELECT count(*) FROM delivery JOIN job ON job.id = delivery.job_id "
                    "JOIN study ON study.id = job.study_id "
                    "WHERE study.study_uid = ? AND delivery.attempts >= 1",
                    unsent_uid,
                ),
                120,
                "the last film's results failing to reach the PACS",
                interval_s=0.3,
            )
    before = {name: files(node.data_dir / name) for name in ("spool", "results", "answers")}
    assert len(before["spool"]) == 4 + CT_SLICES

    # The policy at seconds: the dry run says what would go, and deletes nothing.
    write_config(tmp_path, pacs_port, age="1s")
    dry = node.cli("storage", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    would = {(r["kind"], r["reason"]): r for r in json.loads(dry.stdout)["would_remove"]}
    assert (would[("images", "age")]["studies"], would[("images", "age")]["objects"]) == (
        3,
        2 + CT_SLICES,
    )
    assert would[("results", "age")]["studies"] == 2
    assert {name: files(node.data_dir / name) for name in before} == before
    text = node.cli("storage", "--dry-run")
    assert "dry run: the policy would remove now (nothing was deleted)" in text.stdout

    # Killed between a removal's two commits.
    halted = tmp_path / "halted"
    with run_cadnode(
        tmp_path / "node", None, CADNODE_CONFIG=str(config), **{HALT_AFTER_MARK: str(halted)}
    ) as node:
        wait_for(halted.exists, 60, "housekeeping to make a removal's first commit")
        node.process.kill()
        node.process.wait(20)
    journalled = scalar(node, "SELECT count(*) FROM removal")
    assert journalled == 2 + CT_SLICES  # the images of the three studies, rows already gone
    assert scalar(node, "SELECT count(*) FROM instance") == 2
    assert files(node.data_dir / "spool") == before["spool"]  # their files not yet

    log_length = len(node.log_text())
    with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
        wait_for(
            lambda: (
                scalar(node, "SELECT count(*) FROM resultobject")
                == scalar(
                    node,
                    "SELECT count(*) FROM resultobject JOIN job ON job.id = resultobject.job_id "
                    "JOIN study ON study.id = job.study_id WHERE study.study_uid IN (?, ?)",
                    pinned_uid,
                    unsent_uid,
                )
            ),
            60,
            "the removed studies' results to go too",
            interval_s=0.3,
        )
        wait_for(lambda: "retention.pass" in node.log_text()[log_length:], 30, "a whole pass")
        assert_rows_and_files_agree(node)
        kept = [f for f in before["spool"] if f.split("/")[0] in (pinned_uid, unsent_uid)]
        assert sorted(files(node.data_dir / "spool")) == sorted(kept) and len(kept) == 2
        for uid in (pinned_uid, unsent_uid):
            assert {f for f in before["results"] if f.startswith(uid)} <= files(
                node.data_dir / "results"
            )
        for uid in gone:
            assert found_by_cfind(node, uid, tmp_path / "find" / uid) == 0
        assert found_by_cfind(node, pinned_uid, tmp_path / "find" / "pinned") == 1
        assert found_by_cfind(node, unsent_uid, tmp_path / "find" / "unsent") == 1
        trail = node.cli("audit", "--kind", "retention")
        removals = [json.loads(line)["details"] for line in trail.stdout.splitlines()]
        assert {d["study_uid"] for d in removals} == set(gone)
    events = json_events(node.log_text()[log_length:])
    names = [event["event"] for event in events]
    assert {"spool.indexed", "spool.quarantined", "spool.file_missing"}.isdisjoint(names)
    [recovered] = [e for e in events if e["event"] == "retention.recovered"]
    assert recovered["files"] == journalled
    passes = [e for e in events if e["event"] == "retention.pass"]
    assert passes and not any(uid in json.dumps(passes) for uid in gone)  # counts, no names
