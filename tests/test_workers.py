"""Worker processes (`node.workers`, cadnode/workers.py): infer and encode in N processes.

`cadnode serve` with two workers, DCMTK's storescu sending chest films and storescp
(`+uf`: a new file per C-STORE, so a result sent twice shows as two files) as the PACS: the
workers exist (their heartbeats name them, and they are the node's children), a worker
killed with SIGKILL while it holds a job is restarted and its claims freed at once (the
supervisor saw it die), so its job is taken over without waiting for its lease,
every result arrives exactly once, and SIGTERM drains the workers (exit status 0).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom import dcmread

from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.ingest import named, storescp
from tests.peers import REPO, Cadnode, run_cadnode, storescu, wait_for
from tests.test_ingest_durability import log_events
from tests.test_ingest_processes import children_of, running

FILMS = 24
NODE = "workers-test"
LEASE_S = 3.0


def workers_config(folder: Path, pacs_port: int) -> Path:
    """The shipped rules and engines, two workers, a short lease, results to storescp."""
    config = {
        "node": {"name": NODE, "workers": 2, "lease_s": LEASE_S, "heartbeat_s": 0.5},
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "destinations": {"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
        "results": {"destinations": ["pacs"]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def query(node: Cadnode, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the node's database as it runs (read-only: the node is the one writer)."""
    with sqlite3.connect(f"file:{node.data_dir / 'cadnode.db'}?mode=ro", uri=True) as db:
        return list(db.execute(sql, args))


def worker_pids(node: Cadnode) -> set[int]:
    """The worker processes as their own heartbeats name them."""
    rows = query(node, "SELECT pid FROM nodeheartbeat WHERE node = ? AND role = 'worker'", NODE)
    return {int(pid) for (pid,) in rows}


def job_held_by(node: Cadnode, pid: int) -> tuple[int, str] | None:
    """A job the worker holds a claim on, and the state it holds it in."""
    rows = query(node, "SELECT id, state FROM job WHERE claimed_by = ?", f"{NODE}/{pid}")
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


NEXT = {"routed": "inferred", "inferred": "encoded"}


def received(folder: Path) -> Counter[str]:
    """SOP Instance UIDs of what storescp was sent, each counted once per C-STORE."""
    return Counter(
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for path in folder.iterdir()
        if path.is_file()
    )


def test_a_worker_killed_mid_run_is_replaced_and_every_result_arrives_once(
    tmp_path: Path,
) -> None:
    films = [tmp_path / "films" / f"{seed}.dcm" for seed in range(FILMS)]
    for seed, film in enumerate(films):
        write_chest_radiograph(film, seed=seed, size=256)
    pacs = tmp_path / "pacs"
    with storescp(pacs, "+uf") as pacs_port:
        config = workers_config(tmp_path, pacs_port)
        with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
            workers = wait_for(
                lambda: len(worker_pids(node)) == 2 and worker_pids(node), 60, "two heartbeats"
            )
            assert workers <= set(children_of(node.process.pid)), "the node's own processes"

            pushed: list[int] = []
            sender = threading.Thread(
                target=lambda: pushed.append(storescu(node.dicom_port, *films).returncode)
            )
            sender.start()
            victim, job = wait_for(
                lambda: next(
                    ((pid, held) for pid in workers if (held := job_held_by(node, pid))), None
                ),
                60,
                "a worker holding a job",
                0.005,
            )
            os.kill(victim, signal.SIGKILL)  # as the kernel's OOM killer would
            killed_at = dt.datetime.now(dt.UTC)
            sender.join()
            assert pushed == [0]

            wait_for(
                lambda: len(worker_pids(node) - {victim}) == 2,
                60,
                "a worker in the dead one's place",
            )
            assert not running(victim)
            wait_for(
                lambda: [row["state"] for row in node.studies()] == ["delivered"] * FILMS,
                120,
                "every study delivered",
                0.5,
            )
            sent = {uid for (uid,) in query(node, "SELECT object_uid FROM delivery")}
            [(timeline,)] = query(node, "SELECT timeline FROM job WHERE id = ?", job[0])
            node.process.send_signal(signal.SIGTERM)
            assert node.process.wait(90) == 0, "a drained node exits 0"
            events = log_events(node)

    arrived = received(pacs)
    assert set(arrived) == sent and len(sent) >= FILMS, "every result, and only results"
    assert [uid for uid, times in arrived.items() if times > 1] == [], "a result sent twice"
    # The killed worker was restarted in its place; its job was finished by another worker.
    [died] = named(events, "worker.process_died")
    assert died["exit_code"] == -signal.SIGKILL and died["pid"] == victim
    started = named(events, "worker.process_started")
    assert len(started) == 3 and started[-1]["worker"] == died["worker"]
    # The supervisor saw it die and freed its claims at once (not after the lease). Its job
    # moved on before the kill (the kill came a moment late), or only after that: no other
    # worker took it while the dead one's claim still stood.
    [freed] = named(events, "worker.claims_freed")
    assert freed["pid"] == victim
    freed_at = dt.datetime.fromisoformat(freed["timestamp"])
    moved_at = dt.datetime.fromisoformat(json.loads(timeline)[NEXT[job[1]]])
    assert moved_at < killed_at or moved_at >= freed_at, "taken over while its claim stood"
    [stopped] = named(events, "worker.processes_stopped")
    assert stopped["exit_codes"] == [0, 0]
