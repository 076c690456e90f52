"""Two nodes on one PostgreSQL database and one data dir, one killed mid-run.

Two `cadnode serve` share a real PostgreSQL server and a data dir, each with its own DICOM and
HTTP ports; chest films are pushed to both at once with storescu. Node B is SIGKILLed while
it holds claims on work and before any result has gone out. Every study's every result
arrives exactly once at DCMTK's storescp `+uf` (a new file per C-STORE, so a second copy
would show), and node A finishes B's jobs after B's lease runs out.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import psycopg
from pydicom import dcmread

from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.ingest import storescp
from tests.peers import Cadnode, run_cadnode, storescu, wait_for

FILMS_PER_NODE = 6
LEASE_S = 3
PATIENCE_S = 240  # bounds the waits below, each on its condition, for a loaded machine
FINISHED = ("delivered", "ignored", "failed")  # states a job ends in


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        return list(connection.execute(sql).fetchall())


def _utc(moment: object) -> dt.datetime:
    assert isinstance(moment, dt.datetime)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def push(node: Cadnode, films: list[Path], failures: list[str]) -> None:
    done = storescu(node.dicom_port, *films, options=("-R",))  # the films' own SOP class
    if done.returncode != 0:
        failures.append(f"{done.returncode}: {done.stdout}{done.stderr}")


def test_a_killed_nodes_work_is_finished_by_the_other_and_each_result_arrives_once(
    tmp_path: Path, postgres_url: str
) -> None:
    films = tmp_path / "films"
    for n in range(2 * FILMS_PER_NODE):
        write_chest_radiograph(films / f"{n}.dcm", seed=300 + n)
    paths = sorted(films.glob("*.dcm"))
    shared = {
        "CADNODE_DATABASE_URL": postgres_url,
        "CADNODE_DATA_DIR": str(tmp_path / "shared" / "var"),  # one data dir for both
        "CADNODE_LEASE_S": str(LEASE_S),
    }
    received = tmp_path / "pacs"
    with storescp(received, "+uf") as pacs_port:  # a new file per C-STORE: copies show
        pacs = f"STORESCP@127.0.0.1:{pacs_port}"
        with (
            run_cadnode(tmp_path / "a", pacs, CADNODE_NODE_NAME="a", **shared) as node_a,
            run_cadnode(tmp_path / "b", pacs, CADNODE_NODE_NAME="b", **shared) as node_b,
        ):
            failures: list[str] = []
            pushes = [
                threading.Thread(target=push, args=(node_a, paths[:FILMS_PER_NODE], failures)),
                threading.Thread(target=push, args=(node_b, paths[FILMS_PER_NODE:], failures)),
            ]
            for thread in pushes:
                thread.start()
            for thread in pushes:
                thread.join(PATIENCE_S)
            assert failures == []

            def b_mid_run() -> list[tuple[object, ...]]:
                """B's jobs while B works on some and sends nothing (no delivery claimed):
                a kill now cannot land between a C-STORE and its record."""
                held = query(postgres_url, "SELECT id FROM job WHERE claimed_by LIKE 'b/%'")
                sending = query(postgres_url, "SELECT id FROM delivery WHERE claimed_by LIKE 'b/%'")
                return held if held and not sending else []

            taken = wait_for(b_mid_run, PATIENCE_S, "node B to be working", interval_s=0.01)
            killed_at = dt.datetime.now(dt.UTC)
            os.kill(node_b.process.pid, signal.SIGKILL)  # no drain, no release: a power cut
            node_b.process.wait(30)

            def all_finished() -> bool:
                states = query(postgres_url, "SELECT state FROM job")
                return len(states) == 2 * FILMS_PER_NODE and all(
                    state in FINISHED for (state,) in states
                )

            wait_for(all_finished, PATIENCE_S, "node A to finish every job, B's too")
        jobs = query(postgres_url, "SELECT id, state, claimed_by FROM job")
        assert {state for _, state, _ in jobs} == {"delivered"}, jobs
        assert all(holder is None for _, _, holder in jobs), "every claim ended"
        held_by_b = ", ".join(str(job_id) for (job_id,) in taken)
        moved = query(postgres_url, f"SELECT updated_at FROM job WHERE id IN ({held_by_b})")
        assert all(_utc(at) > killed_at for (at,) in moved), "A moved on what B held"
        sent = query(postgres_url, "SELECT object_uid, state FROM delivery")
    assert sent and {state for _, state in sent} == {"sent"}
    arrived = Counter(str(dcmread(path).SOPInstanceUID) for path in received.iterdir())
    assert arrived == Counter(uid for uid, _ in sent), "each result once, none missing"
