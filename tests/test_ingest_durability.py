"""Never losing anything: `cadnode serve` killed with SIGKILL mid-push, again and again, and
drained with SIGTERM, while DCMTK's storescu sends.

The sender resends whatever it did not get Success for (as a modality does). Afterwards
every instance is indexed exactly once with its file, index and spool agree, and every job
reached its final state exactly once. A study split by a kill is not lost: instances resent
within the quiet period join its job; ones resent after it was released open a new job
version, processed once like any other (the shipped rules ignore CT: final state `ignored`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlmodel import select

from cadnode.core.db import Database, Instance, Job, JobState, Study
from cadnode.core.files import is_temporary
from tests.dicom_validation import require_tool
from tests.ingest import json_events
from tests.peers import Cadnode, run_cadnode, wait_for
from tests.synthetic import write_ct_series

FINAL = {JobState.ignored.value, JobState.delivered.value, JobState.failed.value}


# Slices for a push that a signal must interrupt: full-size ones. storescu runs ahead of our
# reading its log, and a hundred small ones could all be acknowledged (the association even
# released) before a signal sent at the 20th acknowledgement lands.
MID_PUSH_SIZE = 512


def push(
    node: Cadnode,
    files: list[Path],
    *,
    signal_after: int | None,
    signum: int,
    delay_s: float = 0.0,
) -> set[Path]:
    """storescu sends `files`; `delay_s` after the `signal_after`th acknowledgement the node
    gets `signum` (the delay puts the blow anywhere in the next instance's store).

    Returns the files storescu got Success for (its verbose log names each file it sends,
    then the response)."""
    process = subprocess.Popen(
        [
            require_tool("storescu"),
            "-v",
            "-aet",
            "MODALITY",
            "-aec",
            "CADNODE",
            "127.0.0.1",
            str(node.dicom_port),
            *map(str, files),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert process.stderr is not None
    acknowledged: set[Path] = set()
    sending: Path | None = None
    for line in process.stderr:
        if line.startswith("I: Sending file: "):
            sending = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and sending is not None:
            acknowledged.add(sending)
            if len(acknowledged) == signal_after:
                threading.Timer(delay_s, node.process.send_signal, (signum,)).start()
    process.wait(120)
    return acknowledged


def log_events(node: Cadnode) -> list[dict[str, Any]]:
    return json_events(node.log_text())


def wait_until_processed(node: Cadnode) -> None:
    wait_for(
        lambda: all(row["state"] in FINAL for row in node.studies()) and node.studies(),
        60,
        "every job to reach a final state",
        interval_s=0.5,
    )


def test_killed_again_and_again_mid_push_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    studies = [
        write_ct_series(tmp_path / f"s{i}", 150, size=MID_PUSH_SIZE, seed=i) for i in range(3)
    ]
    files = [file for study in studies for file in study]
    chance = random.Random(20251122)
    pending, kills = list(files), 0
    while True:
        with run_cadnode(tmp_path / "node", None) as node:
            kill_after = chance.randint(5, 60) if kills < 5 else None
            acknowledged = push(
                node,
                pending,
                signal_after=kill_after,
                signum=signal.SIGKILL,
                delay_s=chance.uniform(0, 0.02),
            )
            pending = [file for file in pending if file not in acknowledged]
            if kill_after is not None:
                # storescu may see the connection drop before the killed node can be reaped.
                assert node.process.wait(30) == -signal.SIGKILL, "the node died some other way"
                kills += 1
                continue
            assert not pending, "a run without a kill must take everything"
            wait_until_processed(node)
            events = log_events(node)
            break
    database = Database(node.data_dir / "cadnode.db")
    with database.session() as session:
        rows = session.exec(select(Instance)).all()
        jobs = session.exec(select(Job)).all()
        study_of = {s.id: s.study_uid for s in session.exec(select(Study))}
    spool = node.data_dir / "spool"
    files_on_disk = {str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()}

    # Every instance present exactly once (one row each, by primary key), with its file.
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent)
    assert files_on_disk == {r.path for r in rows}, "index and spool disagree"
    assert not any(is_temporary(Path(p)) for p in files_on_disk)
    assert all(r.missing_since is None for r in rows)
    # Each job counts exactly the instances indexed under it, and covers its own study only.
    per_job = Counter(r.job_id for r in rows)
    assert all(job.instance_count == per_job[job.id] for job in jobs)
    per_study = Counter(study_of[job.study_id] for job in jobs for _ in range(per_job[job.id]))
    assert sorted(per_study.values()) == [150, 150, 150]
    # Every job processed exactly once: one final event each, and now in a final state.
    finals = Counter(e["job"] for e in events if e["event"] in {f"job.{s}" for s in FINAL})
    assert set(finals) == {job.id for job in jobs} and set(finals.values()) == {1}
    assert all(job.state.value in FINAL for job in jobs)


def test_sigterm_drains_the_association_then_exits_cleanly(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "study", 150, size=MID_PUSH_SIZE)
    with run_cadnode(tmp_path / "node", None) as node:
        acknowledged = push(node, files, signal_after=20, signum=signal.SIGTERM)
        assert node.process.wait(60) == 0, "a drained node exits 0"
        events = log_events(node)
    assert acknowledged == set(files), "the running association was allowed to finish"
    names = [e["event"] for e in events]
    assert names.index("association.released") < names.index("receive.stopped")
    [stopped] = [e for e in events if e["event"] == "receive.stopped"]
    assert stopped["drained"] == 1 and stopped["aborted"] == 0

    with run_cadnode(tmp_path / "node", None) as node:  # whatever was in flight resumes
        wait_until_processed(node)
        [row] = node.studies()
    assert row["instances"] == 150 and row["state"] == "ignored"
