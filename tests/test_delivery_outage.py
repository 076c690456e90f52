"""The outbox against a PACS that is down: every result arrives exactly once.

Orthanc is stopped while chest films are pushed to a running cadnode; the deliveries wait with
back-off, cadnode is restarted in between, then Orthanc comes up on the port the destination
names and every SR arrives once (counted through Orthanc's REST API). Then the admin's side:
dead letters, one replayed with `cadnode deliveries retry`, one dropped with `discard`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom import Dataset

from cadnode.cli import study_rows
from cadnode.core.db import Database
from cadnode.deliver.outbox_admin import delivery_rows
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import (
    REPO,
    Cadnode,
    Orthanc,
    free_port,
    run_cadnode,
    run_orthanc,
    storescu,
    wait_for,
)

FILMS = 4


def outbox_config(folder: Path, pacs_port: int, *, max_attempts: int) -> Path:
    """The shipped rules and engines, results to ORTHANC@pacs_port, with a short back-off."""
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "dispatch": {
            "max_attempts": max_attempts,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            "timeout_s": 5,
        },
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}},
        "results": {"destinations": ["pacs"]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cadnode-{max_attempts}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def push_films(node: Cadnode, folder: Path, seeds: range) -> list[Dataset]:
    films = [write_chest_radiograph(folder / f"{seed}.dcm", seed=seed, size=256) for seed in seeds]
    done = storescu(node.dicom_port, *(folder / f"{seed}.dcm" for seed in seeds))
    assert done.returncode == 0, done.stderr
    return films


def deliveries(node: Cadnode, *state: str) -> list[dict[str, Any]]:
    """`cadnode deliveries list --json`, as an admin sees it."""
    done = node.cli("deliveries", "list", "--json", *(("--state", *state) if state else ()))
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def studies(node: Cadnode) -> list[dict[str, Any]]:
    """`cadnode studies --json`'s rows, read here."""
    return study_rows(Database(node.data_dir / "cadnode.db"))


def outbox(node: Cadnode) -> list[dict[str, Any]]:
    """The same rows read here: polling through the CLI would cost a process start each time."""
    return delivery_rows(Database(node.data_dir / "cadnode.db"))


def srs_in(pacs: Orthanc, film: Dataset) -> list[dict[str, Any]]:
    tags = [pacs.instance_tags(i) for i in pacs.instances_of_study(film.StudyInstanceUID)]
    return [t for t in tags if t.get("Modality") == "SR"]


def test_every_result_arrives_exactly_once_after_an_outage_and_a_restart(
    tmp_path: Path,
) -> None:
    pacs_port = free_port()  # nothing listens here until Orthanc comes up
    config = outbox_config(tmp_path, pacs_port, max_attempts=1000)
    env = {"CADNODE_CONFIG": str(config)}

    with run_cadnode(tmp_path / "node", None, **env) as node:
        # Normal films the shipped rule-out engine rules out: one SR each (P 0.012-0.032).
        films = push_films(node, tmp_path, range(619, 619 + FILMS))
        waiting = wait_for(
            lambda: (
                (rows := outbox(node))
                and len(rows) == FILMS
                and all(r["attempts"] >= 1 for r in rows)
                and rows
            ),
            60,
            "every result to be queued and tried at least once",
            interval_s=0.3,
        )
        assert {r["state"] for r in waiting} == {"pending"}
        assert all("association not established" in r["last_error"] for r in waiting)

    tried_before_restart = {r["id"]: r["attempts"] for r in outbox(node)}
    with run_cadnode(tmp_path / "node", None, **env) as node:
        # The back-off schedule resumes from the database: more attempts, still pending.
        wait_for(
            lambda: all(r["attempts"] > tried_before_restart[r["id"]] for r in outbox(node)),
            30,
            "attempts to resume after the restart",
            interval_s=0.3,
        )
        with run_orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
            wait_for(
                lambda: {r["state"] for r in outbox(node)} == {"sent"},
                60,
                "every delivery to be sent",
                interval_s=0.2,
            )
            sent = deliveries(node, "sent")
            in_pacs = [srs_in(pacs, film) for film in films]
            total = len(pacs.instances())
        log = node.log_text()

    counts = [len(srs) for srs in in_pacs]
    print(
        f"outage test: {FILMS} films, {len(sent)} deliveries sent, SRs per study {counts}, "
        f"{total} instance(s) in Orthanc, attempts {[r['attempts'] for r in sent]}"
    )
    assert counts == [1] * FILMS  # every result, once
    assert total == FILMS  # and nothing else
    assert {r["object_uid"] for r in sent} == {s["SOPInstanceUID"] for srs in in_pacs for s in srs}
    assert log.count('"event": "delivery.sent"') == FILMS
    assert log.count('"event": "job.delivered"') == FILMS


def test_a_dead_letter_is_replayed_by_retry_and_a_discarded_one_never_sent(
    tmp_path: Path,
) -> None:
    pacs_port = free_port()
    config = outbox_config(tmp_path, pacs_port, max_attempts=2)
    with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
        replayed, dropped = push_films(node, tmp_path, range(701, 703))
        failed = wait_for(
            lambda: (rows := outbox(node)) and {r["state"] for r in rows} == {"failed"} and rows,
            60,
            "both results to be dead-lettered",
            interval_s=0.2,
        )
        assert len(failed) == 2 and all(r["attempts"] == 2 for r in failed)
        assert [r["id"] for r in deliveries(node, "failed")] == [r["id"] for r in failed]
        assert {row["state"] for row in studies(node)} == {"failed"}
        replay_id, drop_id = (id_of(node, failed, film) for film in (replayed, dropped))

        with run_orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
            discarded = node.cli("deliveries", "discard", str(drop_id))
            assert discarded.returncode == 0, discarded.stderr
            retried = node.cli("deliveries", "retry", str(replay_id))
            assert retried.returncode == 0, retried.stderr
            assert "pending again" in retried.stdout
            # The running node sees the change through the database (its poll, within seconds).
            wait_for(lambda: len(srs_in(pacs, replayed)) == 1, 30, "the retried result")
            assert srs_in(pacs, dropped) == []
            assert len(pacs.instances()) == 1

        by_id = {r["id"]: r for r in deliveries(node)}
        assert by_id[replay_id]["state"] == "sent" and by_id[replay_id]["attempts"] == 1
        assert by_id[drop_id]["state"] == "discarded"
        assert by_id[drop_id]["discarded_by"].startswith("cli:")
        states = {row["study_uid"]: row for row in studies(node)}
        assert states[replayed.StudyInstanceUID]["state"] == "delivered"
        assert "discarded" in states[dropped.StudyInstanceUID]["reason"]
        assert '"event": "delivery.dead_lettered"' in node.log_text()
    # The admin's actions are logged where they are taken: by the command.
    assert '"event": "delivery.retry"' in retried.stdout + retried.stderr
    assert '"event": "delivery.discard"' in discarded.stdout + discarded.stderr


def id_of(node: Cadnode, rows: list[dict[str, Any]], film: Dataset) -> int:
    """The delivery of the result made for `film` (by its job)."""
    [job] = [row["job"] for row in studies(node) if row["study_uid"] == film.StudyInstanceUID]
    [delivery] = [r["id"] for r in rows if r["job"] == job]
    return int(delivery)
