"""Several receiver processes on one port (`dicom.receivers`, cadnode/port.py).

`cadnode serve` with two receiver processes, DCMTK's storescu sending: concurrent pushes are
each stored once (on the default, `auto`: four receivers on this 2-CPU machine), the same
instance sent on two associations at once is stored once, a receiver's writes wake the stages
in the node's process at once, SIGTERM drains every receiver, and a node killed with SIGKILL
leaves no receiver behind and loses nothing it acknowledged. Also the cross-process guard
itself: two processes storing one instance.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from sqlmodel import select

from cadnode.core.config import automatic_receivers
from cadnode.core.db import CompletionSignal, Database, Instance, Job, JobState
from cadnode.core.files import is_temporary
from cadnode.core.locks import KeyedLocks
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.ingest.spool import Spool, examine
from tests.ingest import named
from tests.peers import REPO, Cadnode, run_cadnode, storescu, wait_for
from tests.synthetic import write_ct_series
from tests.test_ingest_durability import MID_PUSH_SIZE, log_events, push

RECEIVERS = {"CADNODE_DICOM_RECEIVERS": "2"}


def pushed_at_once(node: Cadnode, batches: list[list[Path]]) -> list[int]:
    """storescu exit codes, one storescu per batch, all started together."""
    codes = [-1] * len(batches)

    def send(index: int) -> None:
        codes[index] = storescu(node.dicom_port, *batches[index]).returncode

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def indexed(node: Cadnode) -> tuple[list[Instance], set[str]]:
    """The index's rows and the spool's files (relative paths)."""
    database = Database(node.data_dir / "cadnode.db")
    with database.session() as session:
        rows = list(session.exec(select(Instance)).all())
    spool = node.data_dir / "spool"
    return rows, {str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()}


def uids_of(files: list[Path]) -> list[str]:
    return sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)


def assert_stored_once(node: Cadnode, files: list[Path]) -> None:
    rows, on_disk = indexed(node)
    assert sorted(r.sop_instance_uid for r in rows) == uids_of(files)
    assert on_disk == {r.path for r in rows}, "index and spool disagree"
    assert not any(is_temporary(Path(p)) for p in on_disk)


def children_of(pid: int) -> list[int]:
    """The node's child processes (its receivers, and multiprocessing's resource tracker)."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            children.append(int(status.parent.name))
    return children


def receivers_of(pid: int) -> list[int]:
    return [c for c in children_of(pid) if b"spawn_main" in _command_line(c)]


def _command_line(pid: int) -> bytes:
    """The process's command line; empty once it has gone (it may exit as we look)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited: it holds no socket, runs nothing


def test_concurrent_pushes_are_each_stored_exactly_once(tmp_path: Path) -> None:
    """On the default, `auto`: as many receivers as `automatic_receivers` says here."""
    studies = [write_ct_series(tmp_path / f"s{i}", 40, size=64, seed=i) for i in range(4)]
    receivers = automatic_receivers()
    assert receivers > 1, "a test machine has two CPUs or more"
    with run_cadnode(tmp_path / "node", None, CADNODE_DICOM_RECEIVERS="auto") as node:
        wait_for(lambda: len(receivers_of(node.process.pid)) == receivers, 60, "the receivers")
        assert pushed_at_once(node, studies) == [0, 0, 0, 0]
        assert_stored_once(node, [f for study in studies for f in study])
        events = log_events(node)
    assert len(named(events, "receive.listening")) == receivers
    accepted = named(events, "association.accepted")
    assert len(accepted) == 4
    # Which receiver takes which association is the kernel's choice (a busy receiver waits a
    # little before it accepts again, so they spread; benchmarks/ingest.py shows the gain):
    # not asserted here, where a loaded machine may hand all four to one.
    assert [e["stored"] for e in named(events, "association.released")] == [40] * 4


def test_one_instance_sent_on_two_associations_at_once_is_stored_once(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "study", 60, size=64)
    with run_cadnode(tmp_path / "node", None, **RECEIVERS) as node:
        assert pushed_at_once(node, [files, list(reversed(files))]) == [0, 0]
        assert_stored_once(node, files)
        events = log_events(node)
    released = named(events, "association.released")
    assert sum(e["stored"] for e in released) == 60
    assert sum(e["duplicates"] for e in released) == 60
    # Whether the two copies raced in one receiver or across two is the kernel's choice; the
    # race across processes is forced in the next test.


def _store_in_another_process(data_dir: Path, files: list[Path], go: Any) -> None:
    """Store every file, in step with a twin process doing the same (`go`: a barrier)."""
    database = Database(data_dir / "cadnode.db")
    spool = Spool(data_dir / "spool", database, 0)
    for file in files:
        arrival, _ = examine(file)
        assert arrival is not None
        chunks = [file.read_bytes()]
        go.wait(60)
        spool.store(arrival, chunks)
    spool.close()


def test_two_processes_storing_one_instance_index_it_once(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "study", 20, size=64)
    context = multiprocessing.get_context("spawn")
    data_dir = tmp_path / "var"
    Database(data_dir / "cadnode.db")  # the tables, before both processes race to make them
    go = context.Barrier(2)
    processes = [
        context.Process(target=_store_in_another_process, args=(data_dir, files, go))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    database = Database(data_dir / "cadnode.db")
    with database.session() as session:
        rows = session.exec(select(Instance)).all()
        [job] = session.exec(select(Job)).all()
    assert sorted(r.sop_instance_uid for r in rows) == uids_of(files)
    assert job.instance_count == 20
    spool = data_dir / "spool"
    on_disk = {str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()}
    assert on_disk == {r.path for r in rows}
    assert all(r.size == (spool / r.path).stat().st_size for r in rows)


def test_a_receivers_write_wakes_the_stages_at_once(tmp_path: Path) -> None:
    write_chest_radiograph(tmp_path / "chest.dcm", seed=103)
    with run_cadnode(tmp_path / "node", None, **RECEIVERS) as node:
        assert storescu(node.dicom_port, tmp_path / "chest.dcm").returncode == 0
        database = Database(node.data_dir / "cadnode.db")

        def job() -> Job | None:
            with database.session() as session:
                return session.exec(select(Job)).first()

        wait_for(
            lambda: (found := job()) is not None and found.state.value in ("encoded", "delivered"),
            120,
            "the film's results",
            interval_s=0.2,
        )
        found = job()
    assert found is not None
    # A single film is complete on arrival: released as soon as assemble looks, which the
    # receiver's wake-up makes at once (the stages' slow poll is 5 s).
    released = dt.datetime.fromisoformat(found.timeline["complete"])
    arrived = found.first_instance_at.replace(tzinfo=dt.UTC)
    assert (released - arrived).total_seconds() < 2.5


def test_sigterm_drains_every_receiver_then_exits_cleanly(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "study", 120, size=MID_PUSH_SIZE)
    with run_cadnode(tmp_path / "node", None, **RECEIVERS) as node:
        acknowledged = push(node, files, signal_after=20, signum=signal.SIGTERM)
        assert node.process.wait(60) == 0, "a drained node exits 0"
        events = log_events(node)
    assert acknowledged == set(files), "the running association was allowed to finish"
    stopped = named(events, "receive.stopped")
    assert len(stopped) == 2
    assert sum(e["drained"] for e in stopped) == 1 and sum(e["aborted"] for e in stopped) == 0
    [processes] = named(events, "receive.processes_stopped")
    assert processes["exit_codes"] == [0, 0]


def test_a_killed_node_leaves_no_receiver_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "study", 120, size=MID_PUSH_SIZE)
    with run_cadnode(tmp_path / "node", None, **RECEIVERS) as node:
        wait_for(lambda: len(receivers_of(node.process.pid)) == 2, 60, "two receivers")
        children = children_of(node.process.pid)
        acknowledged = push(node, files, signal_after=30, signum=signal.SIGKILL, delay_s=0.005)
        assert node.process.wait(30) == -signal.SIGKILL
        wait_for(lambda: not any(running(pid) for pid in children), 10, "receivers to exit")
    assert 30 <= len(acknowledged) < len(files), "the kill landed after the push"
    pending = [f for f in files if f not in acknowledged]
    with run_cadnode(tmp_path / "node", None, **RECEIVERS) as node:
        assert storescu(node.dicom_port, *pending).returncode == 0
        assert_stored_once(node, files)
        rows, _ = indexed(node)
    assert Counter(r.job_id for r in rows).total() == 120


def _mark_until_told(path: Path, key: str, marked: Any, done: Any) -> None:
    locks = KeyedLocks(path)
    locks.mark(key)
    marked.set()
    done.wait(60)


def test_a_study_another_process_is_sending_is_seen_as_such(tmp_path: Path) -> None:
    """What keeps a released association from signalling a study another receiver process
    is still receiving (`close_on_association_release`)."""
    path = tmp_path / "studies-sent.lock"
    mine = KeyedLocks(path)
    mine.mark("1.2.3")
    assert not mine.marked_elsewhere("1.2.3")
    context = multiprocessing.get_context("spawn")
    marked, done = context.Event(), context.Event()
    other = context.Process(target=_mark_until_told, args=(path, "1.2.3", marked, done))
    other.start()
    try:
        assert marked.wait(60)
        assert mine.marked_elsewhere("1.2.3")
    finally:
        done.set()
        other.join(60)
    assert not mine.marked_elsewhere("1.2.3"), "its process gone, its marks go with it"


def test_a_receiver_that_dies_is_replaced_and_the_port_keeps_serving(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "study", 30, size=64)
    with run_cadnode(tmp_path / "node", None, **RECEIVERS) as node:
        [first, second] = sorted(receivers_of(node.process.pid))
        os.kill(first, signal.SIGKILL)  # as the kernel's OOM killer would
        wait_for(
            lambda: (
                len(receivers_of(node.process.pid)) == 2
                and first not in receivers_of(node.process.pid)
            ),
            30,
            "a new receiver in place of the killed one",
        )
        assert running(second)
        # Every association is served by whichever receiver takes it, the new one included.
        assert pushed_at_once(node, [files[:15], files[15:]]) == [0, 0]
        assert_stored_once(node, files)
        events = log_events(node)
    [died] = named(events, "receive.process_died")
    assert died["exit_code"] == -signal.SIGKILL
    started = named(events, "receive.process_started")
    assert len(started) == 3  # two at start, then one in place of the dead one
    assert started[-1]["receiver"] == died["receiver"]


def _events_of(node: Cadnode, port: int, name: str) -> list[dict[str, Any]]:
    """`name` events of the association from local `port` (its events name it as the peer)."""
    return [e for e in named(log_events(node), name) if e["peer"] == f"127.0.0.1:{port}"]


def _port_of(association: Any) -> int:
    return int(association.dul.socket.socket.getsockname()[1])


def _opened_in(node: Cadnode, association: Any) -> int:
    """The receiver process serving `association` (its `association.accepted` event's pid)."""
    port = _port_of(association)
    accepted = wait_for(
        lambda: _events_of(node, port, "association.accepted"),
        30,
        "the association's accepted event",
    )
    return int(accepted[0]["pid"])


def _open_elsewhere(node: Cadnode, ae: AE, busy_pid: int) -> Any:
    """An association served by another receiver process than `busy_pid`.

    Which process accepts is the kernel's choice; with one busy and one idle, the idle one
    (waiting in accept() the longest) takes nearly every new connection, so a few tries do.
    """
    for _ in range(20):
        association = ae.associate("127.0.0.1", node.dicom_port, ae_title="CADNODE")
        assert association.is_established
        if _opened_in(node, association) != busy_pid:
            return association
        association.release()
    raise AssertionError("20 associations in a row went to the busy receiver process")


def test_a_release_in_one_process_does_not_close_a_study_another_process_is_receiving(
    tmp_path: Path,
) -> None:
    """`close_on_association_release` across receiver processes: association A (one
    process) has sent part of a study and stays open; B (the other process) sends the rest
    and is released. The study must wait for A, which may send more, and close when A ends."""
    files = write_ct_series(tmp_path / "ct", 3, size=32)
    config = tmp_path / "cadnode.yaml"
    config.write_text(
        f"rules: {REPO / 'config' / 'rules.yaml'}\n"
        "assemble:\n  quiet_period_s: 600\n  close_on_association_release: true\n"
    )
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config), **RECEIVERS) as node:
        first = ae.associate("127.0.0.1", node.dicom_port, ae_title="CADNODE")
        assert first.send_c_store(dcmread(files[0])).Status == 0
        second = _open_elsewhere(node, ae, busy_pid=_opened_in(node, first))
        for file in files[1:]:
            assert second.send_c_store(dcmread(file)).Status == 0
        port = _port_of(second)
        second.release()
        wait_for(
            lambda: _events_of(node, port, "association.released"),
            30,
            "the second association's release to be handled",
        )
        time.sleep(1.0)  # room for a wrong completion signal to reach assemble
        database = Database(node.data_dir / "cadnode.db")
        with database.session() as session:
            signals = list(session.exec(select(CompletionSignal)).all())
        [study] = node.studies()
        waiting = study["state"]
        first.release()
        wait_for(lambda: named(log_events(node), "job.released"), 30, "the study to be released")
        events = log_events(node)
    assert signals == [], "signalled while another process was still receiving the study"
    assert waiting == JobState.received
    assert [e["by"] for e in named(events, "job.released")] == ["association-released"]
    assert sorted(e["stored"] for e in named(events, "association.released"))[-2:] == [1, 2]
