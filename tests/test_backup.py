"""`cadnode backup`: an online copy of the database and a manifest of the held files; verify
and restore.

The unit tests back up a data dir made in-process (a database with a study, files in the
spool, results and answers), and copy a database a thread keeps writing. The integration
test backs up a running node while a study is still arriving, restores the backup into a
fresh data dir, and serves it: the studies are listed and found by C-FIND.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlmodel import select

from cadnode.admin import backup
from cadnode.cli import main
from cadnode.core import migrations
from cadnode.core.db import AuditEvent, AuditKind, Database, Study
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests import postgres
from tests.peers import REPO, Cadnode, findscu, run_cadnode, storescu, wait_for
from tests.synthetic import write_ct_series

# --- unit: a data dir made in-process ----------------------------------------------------


@dataclass
class DataDir:
    path: Path
    files: dict[str, bytes]  # data-dir-relative path -> content


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataDir:
    path = tmp_path / "var"
    database = Database(path / "cadnode.db")
    with database.session() as session:
        session.add(Study(study_uid="1.2.3"))
        session.commit()
    files = {
        "spool/1.2.3/1.2.3.1/1.2.3.1.1.dcm": b"image one" * 100,
        "spool/1.2.3/1.2.3.1/1.2.3.1.2.dcm": b"image two" * 100,
        "results/1.2.3/1.2.3.9.dcm": b"a structured report",
        "answers/7/mask.npz": b"a mask",
    }
    for relative, content in files.items():
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        (path / relative).write_bytes(content)
    # Neither a write under way nor a quarantined file is held.
    (path / "spool/1.2.3/1.2.3.1/.1.2.3.1.3.dcm.0a1b.part").write_bytes(b"half")
    (path / "quarantine/20250101T000000/x.dcm").parent.mkdir(parents=True)
    (path / "quarantine/20250101T000000/x.dcm").write_bytes(b"junk")
    monkeypatch.setenv("CADNODE_DATA_DIR", str(path))
    return DataDir(path, files)


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def manifest_of(folder: Path) -> dict[str, dict[str, object]]:
    lines = (folder / "files.jsonl").read_text().splitlines()
    return {entry["path"]: entry for entry in map(json.loads, lines)}


def test_backup_copies_the_database_lists_the_files_and_keeps_the_config(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "backup"
    assert main(["backup", str(target)]) == 0
    assert "files: 4 (" in capsys.readouterr().out
    assert manifest_of(target) == {
        path: {"path": path, "size": len(content), "sha256": sha256(content)}
        for path, content in data_dir.files.items()
    }
    with sqlite3.connect(target / "cadnode.db") as copy:
        assert copy.execute("SELECT study_uid FROM study").fetchall() == [("1.2.3",)]
        tables = {name for (name,) in copy.execute("SELECT name FROM sqlite_master")}
        revisions = (
            copy.execute("SELECT version_num FROM alembic_version").fetchall()
            if "alembic_version" in tables
            else []
        )
    assert not (target / "cadnode.db-wal").exists()  # one self-contained file
    metadata = json.loads((target / "backup.json").read_text())
    assert metadata["cadnode_version"] == "0.1.0"
    assert metadata["schema_revision"] == ",".join(r[0] for r in revisions) or "unversioned"
    assert metadata["database"]["check"] == "ok"
    assert metadata["files"] == {
        "manifest": "files.jsonl",
        "count": 4,
        "bytes": sum(map(len, data_dir.files.values())),
        "hashes": "sha256",
        "copies": None,
        "vanished": 0,
    }
    shipped = REPO / "config"
    for role, name in (("config", "cadnode.yaml"), ("rules", "rules.yaml")):
        assert metadata["config"][role] == f"config/{name}"
        assert (target / "config" / name).read_bytes() == (shipped / name).read_bytes()
    assert "cadnode backup restore" in (target / "README.txt").read_text()
    with Database(data_dir.path / "cadnode.db").session() as session:
        [event] = session.exec(select(AuditEvent).where(AuditEvent.kind == AuditKind.admin_backup))
    assert event.details["files"] == 4 and event.details["target"] == str(target)


def test_backup_refuses_a_folder_that_is_not_empty(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "backup"
    target.mkdir()
    (target / "something").write_text("kept")
    assert main(["backup", str(target)]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["something"]


def test_verify_finds_a_missing_and_a_changed_file(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "backup"
    assert main(["backup", str(target)]) == 0
    assert main(["backup", "verify", str(target), "--data-dir", str(data_dir.path)]) == 0
    assert "verified: OK" in capsys.readouterr().out

    (data_dir.path / "spool/1.2.3/1.2.3.1/1.2.3.1.1.dcm").unlink()
    (data_dir.path / "results/1.2.3/1.2.3.9.dcm").write_bytes(b"A structured report")  # same size
    (data_dir.path / "spool/1.2.3/1.2.3.1/1.2.3.1.4.dcm").write_bytes(b"arrived later")
    assert main(["backup", "verify", str(target), "--data-dir", str(data_dir.path)]) == 1
    printed = capsys.readouterr()
    assert sorted(printed.err.splitlines()) == [
        "changed: results/1.2.3/1.2.3.9.dcm (its SHA-256 differs from the manifest's)",
        "missing: spool/1.2.3/1.2.3.1/1.2.3.1.1.dcm",
    ]
    assert "1 file(s) under" in printed.out and "verified: 2 problem(s)" in printed.out


def test_sizes_only_still_sees_a_missing_or_truncated_file(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "backup"
    assert main(["backup", str(target), "--sizes-only"]) == 0
    assert {entry["sha256"] for entry in manifest_of(target).values()} == {None}
    (data_dir.path / "answers/7/mask.npz").write_bytes(b"a mas")
    assert main(["backup", "verify", str(target), "--data-dir", str(data_dir.path)]) == 1
    assert "changed: answers/7/mask.npz (5 bytes, the manifest says 6)" in capsys.readouterr().err


def test_restore_from_the_backups_own_copies(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, fresh = tmp_path / "backup", tmp_path / "restored"
    assert main(["backup", str(target), "--copy-files"]) == 0
    assert main(["backup", "verify", str(target)]) == 0  # the copies against the manifest
    assert main(["backup", "restore", str(target), "--data-dir", str(fresh)]) == 0
    assert "restored: OK" in capsys.readouterr().out
    restored = {
        p.relative_to(fresh).as_posix(): p.read_bytes() for p in fresh.rglob("*") if p.is_file()
    }
    assert restored.pop("cadnode.db") == (target / "cadnode.db").read_bytes()
    assert restored == data_dir.files
    # Never over a data dir that holds anything: the restored one now does.
    assert main(["backup", "restore", str(target), "--data-dir", str(fresh)]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_restore_takes_files_from_elsewhere_and_leaves_out_a_changed_one(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, fresh = tmp_path / "backup", tmp_path / "restored"
    assert main(["backup", str(target)]) == 0
    assert main(["backup", "restore", str(target), "--data-dir", str(fresh)]) == 1
    assert "--files-from" in capsys.readouterr().err
    assert not fresh.exists()

    changed = "spool/1.2.3/1.2.3.1/1.2.3.1.2.dcm"
    (data_dir.path / changed).write_bytes(b"image TWO" * 100)
    restore = ["backup", "restore", str(target), "--data-dir", str(fresh)]
    assert main([*restore, "--files-from", str(data_dir.path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"changed: {changed} (its SHA-256 differs from the manifest's)"
    ]
    assert not (fresh / changed).exists()  # a restore never puts a wrong file in place
    assert (fresh / "results/1.2.3/1.2.3.9.dcm").read_bytes() == b"a structured report"


def test_a_postgresql_database_is_dumped_checked_and_restored_into_an_empty_one(
    data_dir: DataDir,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_server: postgres.PostgresServer,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On PostgreSQL the database goes by pg_dump, is checked by pg_restore reading it back,
    and is restored with pg_restore, only into an empty database; the files as on SQLite."""
    with Database(postgres_url).session() as session:
        session.add(Study(study_uid="9.8.7"))
        session.commit()
    monkeypatch.setenv("CADNODE_DATABASE_URL", postgres_url)
    target, fresh = tmp_path / "backup", tmp_path / "restored"
    assert main(["backup", str(target), "--copy-files"]) == 0
    metadata = json.loads((target / "backup.json").read_text())
    assert metadata["database"]["file"] == "cadnode.pgdump"
    assert metadata["database"]["check"] == "ok"
    assert metadata["schema_revision"] == migrations.head()
    assert main(["backup", "verify", str(target)]) == 0
    # Never into a database that holds anything: the node's own does.
    assert main(["backup", "restore", str(target), "--data-dir", str(fresh)]) == 1
    assert "restore into an empty database" in capsys.readouterr().err
    empty = postgres_server.create_database()
    try:
        monkeypatch.setenv("CADNODE_DATABASE_URL", empty)
        assert main(["backup", "restore", str(target), "--data-dir", str(tmp_path / "r2")]) == 0
        with Database(empty).session() as session:
            assert [s.study_uid for s in session.exec(select(Study))] == ["9.8.7"]
        restored = {
            p.relative_to(tmp_path / "r2").as_posix(): p.read_bytes()
            for p in (tmp_path / "r2").rglob("*")
            if p.is_file()
        }
        assert restored == data_dir.files
    finally:
        postgres_server.drop_database(empty)
    # A damaged dump is found by verify.
    dump = target / "cadnode.pgdump"
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    assert main(["backup", "verify", str(target)]) == 1
    assert "the database dump fails its check" in capsys.readouterr().err


def test_verify_refuses_an_incomplete_backup(
    data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "backup"
    assert main(["backup", str(target)]) == 0
    (target / "backup.json").unlink()  # as a backup cut short leaves it
    assert main(["backup", "verify", str(target)]) == 1
    assert "is not a complete backup" in capsys.readouterr().err


def test_the_copy_is_one_snapshot_while_the_node_keeps_writing(tmp_path: Path) -> None:
    """Rows go in pairs, each pair one commit; the copy, taken a few pages per step while the
    writer commits between every step, holds whole pairs only, was never restarted, and the
    writer never waited on it."""
    source = tmp_path / "cadnode.db"
    with sqlite3.connect(source) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE pair (id INTEGER PRIMARY KEY, payload BLOB)")
        setup.executemany("INSERT INTO pair (payload) VALUES (?)", [(os.urandom(400),)] * 2000)
    committed = threading.Semaphore(0)
    stop = threading.Event()

    def write_pairs() -> None:
        with sqlite3.connect(source, timeout=5) as writer:
            while not stop.is_set():
                writer.executemany("INSERT INTO pair (payload) VALUES (?)", [(b"x" * 400,)] * 2)
                writer.commit()
                committed.release()

    left_after_each_step: list[int] = []

    def step_done(left: int, _total: int) -> None:
        left_after_each_step.append(left)
        if len(left_after_each_step) <= 5:  # a commit between each of the first steps
            assert committed.acquire(timeout=10), "the writer was blocked by the copy"

    thread = threading.Thread(target=write_pairs)
    thread.start()
    try:
        copied = backup.copy_database(source, tmp_path / "copy.db", 8, on_step=step_done)
    finally:
        stop.set()
        thread.join()
    assert copied.check == "ok" and copied.schema_revision == "unversioned"
    assert len(left_after_each_step) > 10
    assert left_after_each_step == sorted(left_after_each_step, reverse=True)  # no restart
    with sqlite3.connect(tmp_path / "copy.db") as copy:
        [(in_copy,)] = copy.execute("SELECT count(*) FROM pair")
    with sqlite3.connect(source) as live:
        [(in_source,)] = live.execute("SELECT count(*) FROM pair")
    assert in_copy % 2 == 0 and 2000 <= in_copy < in_source


def test_no_database_no_backup(tmp_path: Path) -> None:
    with pytest.raises(backup.BackupError, match="no database at"):
        backup.copy_database(tmp_path / "absent.db", tmp_path / "copy.db")
    assert not (tmp_path / "absent.db").exists()  # not created on the way


# --- integration: a running node, backed up while a study arrives, restored, served -----


def cadnode_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cadnode.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def states(node: Cadnode) -> dict[str, str]:
    """Each study's latest job state."""
    return {row["study_uid"]: row["state"] for row in node.studies()}


def send(port: int, paths: list[Path], between: Callable[[], None]) -> None:
    """One association: the first half of `paths`, then `between()`, then the rest."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="CADNODE")
    assert association.is_established
    try:
        half = len(paths) // 2
        for index, path in enumerate(paths):
            if index == half:
                between()
            status = association.send_c_store(dcmread(path))
            assert status and status.Status == 0x0000
    finally:
        association.release()


def test_a_node_backed_up_while_a_study_arrives_is_restored_and_served(tmp_path: Path) -> None:
    config = tmp_path / "cadnode.yaml"  # no destination: results stay on the node
    config.write_text(
        json.dumps(
            {
                "engines": {"dir": str(REPO / "engines")},
                "rules": str(REPO / "config" / "rules.yaml"),
                "results": {"destinations": []},
            }
        )
    )
    films = [
        write_chest_radiograph(tmp_path / "films" / f"{seed}.dcm", seed=seed, size=256)
        for seed in (171, 172, 173)
    ]
    film_studies = {film.StudyInstanceUID for film in films}
    slices = write_ct_series(tmp_path / "ct", 6, size=64, seed=174)
    ct = dcmread(slices[0])
    target = tmp_path / "backup"
    with run_cadnode(tmp_path / "old", None, CADNODE_CONFIG=str(config)) as old:
        pushed = storescu(old.dicom_port, *sorted((tmp_path / "films").glob("*.dcm")))
        assert pushed.returncode == 0, pushed.stderr
        wait_for(
            lambda: all(states(old).get(uid) == "encoded" for uid in film_studies),
            120,
            "the films' results",
            interval_s=0.5,
        )

        def back_up() -> None:  # while the CT study's association is open, half sent
            taken = cadnode_cli(old.env, "backup", str(target))
            assert taken.returncode == 0, taken.stderr

        send(old.dicom_port, slices, between=back_up)
        old_data_dir, env = old.data_dir, old.env

    fresh = tmp_path / "new" / "var"
    restored = cadnode_cli(
        env, "backup", "restore", str(target), "--data-dir", str(fresh),
        "--files-from", str(old_data_dir),
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    verified = cadnode_cli(env, "backup", "verify", str(target), "--data-dir", str(fresh))
    assert verified.returncode == 0 and "verified: OK" in verified.stdout, verified.stderr

    with run_cadnode(tmp_path / "new", None, CADNODE_CONFIG=str(config)) as new:
        assert new.data_dir == fresh
        assert {uid: states(new)[uid] for uid in film_studies} == dict.fromkeys(
            film_studies, "encoded"
        )
        found = findscu(
            new.dicom_port, tmp_path / "studies", QueryRetrieveLevel="STUDY", StudyInstanceUID=""
        )
        assert {s.StudyInstanceUID for s in found} == {*film_studies, ct.StudyInstanceUID}
        reports = findscu(
            new.dicom_port,
            tmp_path / "reports",
            QueryRetrieveLevel="SERIES",
            StudyInstanceUID=films[0].StudyInstanceUID,
            Modality="SR",
            SeriesInstanceUID="",
        )
        assert reports, "the film's SR, restored from the results folder"
        images = findscu(
            new.dicom_port,
            tmp_path / "images",
            QueryRetrieveLevel="IMAGE",
            StudyInstanceUID=ct.StudyInstanceUID,
            SeriesInstanceUID=ct.SeriesInstanceUID,
            SOPInstanceUID="",
        )
        # The backup holds the slices that had arrived when it was taken, and only those.
        before = {dcmread(path).SOPInstanceUID for path in slices[:3]}
        assert {image.SOPInstanceUID for image in images} == before
        log = new.log_text()
    assert "spool.file_missing" not in log and "spool.quarantined" not in log

    spool_file = next((fresh / "spool").rglob("*.dcm"))
    spool_file.unlink()
    result_file = next((fresh / "results").rglob("*.dcm"))
    result_file.write_bytes(result_file.read_bytes()[:-1] + b"\x00")
    verified = cadnode_cli(env, "backup", "verify", str(target), "--data-dir", str(fresh))
    assert verified.returncode == 1
    assert sorted(verified.stderr.splitlines()) == sorted(
        [
            f"missing: {spool_file.relative_to(fresh).as_posix()}",
            f"changed: {result_file.relative_to(fresh).as_posix()} "
            "(its SHA-256 differs from the manifest's)",
        ]
    )
