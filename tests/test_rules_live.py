"""Rules changed under a running node while DCMTK's storescu keeps pushing studies.

A saved change is picked up by itself, SIGHUP reloads on request, an invalid file is
refused with its errors logged while the rules in force keep routing, no association
fails, and each study records the version of the rules that routed it. The new rule also
forwards the originals, which must reach Orthanc as they were sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from ruamel.yaml import YAML

from cadnode.cli import study_rows
from cadnode.core.config import EMBEDDED_CONFIG, Destination, DispatchSettings
from cadnode.core.db import Database, Job, JobState
from cadnode.deliver.dispatch import Dispatcher
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom, write_chest_radiograph
from cadnode.route import LiveRules, Router
from tests.peers import REPO, Cadnode, Orthanc, run_cadnode, run_orthanc, storescu, wait_for
from tests.test_rules import store

RULES = """rules:
  - name: {name}
    match: {{Modality: [CR, DX], ViewPosition: [PA, AP]}}
    action: {action}
    pipeline: [{engine}]
    destinations: [pacs]
    priority: urgent
  - name: everything-else
    action: ignore
"""
FIRST = RULES.format(name="chest-v1", action="infer", engine="cxr-ruleout").replace(
    "    destinations: [pacs]\n", ""
)
SECOND = RULES.format(name="chest-v2", action="[infer, forward]", engine="cxr-ruleout")
THIRD = SECOND.replace("chest-v2", "chest-v3")  # the same size: only SIGHUP will see it
BROKEN = SECOND.replace("[cxr-ruleout]", "[cxr-nope]")


def version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def configuration(folder: Path, pacs: Orthanc) -> Path:
    """A copy of the shipped configuration folder, its PACS the test's Orthanc."""
    copy = Path(shutil.copytree(EMBEDDED_CONFIG.parent, folder / "config"))
    yaml = YAML(typ="rt")
    document = yaml.load(copy / EMBEDDED_CONFIG.name)
    document["destinations"]["pacs"]["port"] = pacs.dicom_port
    with (copy / EMBEDDED_CONFIG.name).open("w") as handle:
        yaml.dump(document, handle)
    return copy / EMBEDDED_CONFIG.name


class Pusher(threading.Thread):
    """Pushes one new chest film after another, each a study of its own, until stopped."""

    def __init__(self, node: Cadnode, folder: Path) -> None:
        super().__init__(daemon=True)
        self.node, self.folder = node, folder
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.studies: list[str] = []

    def run(self) -> None:
        seed = 1000
        while not self.stopping.is_set():
            seed += 1
            path = self.folder / f"{seed}.dcm"
            film = write_chest_radiograph(path, seed=seed, size=64)
            done = storescu(self.node.dicom_port, path)
            if done.returncode != 0:
                self.failures.append(done.stderr)
            self.studies.append(str(film.StudyInstanceUID))


def events(node: Cadnode, name: str) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in node.log_text().splitlines() if line.startswith("{"))
    return [event for event in lines if event.get("event") == name]


def routed_row(node: Cadnode, study_uid: str) -> dict[str, Any]:
    """The study's row once routed, read from the node's database as the CLI does."""
    database = Database(node.data_dir / "cadnode.db")

    def row() -> dict[str, Any] | None:
        rows = [r for r in study_rows(database) if r["study_uid"] == study_uid]
        return rows[0] if rows and rows[0]["rules_version"] else None

    return dict(wait_for(row, 30, f"study {study_uid} to be routed", interval_s=0.1))


def push_marker(node: Cadnode, folder: Path, seed: int) -> str:
    film = write_chest_radiograph(folder / f"marker-{seed}.dcm", seed=seed, size=64)
    done = storescu(node.dicom_port, folder / f"marker-{seed}.dcm")
    assert done.returncode == 0, done.stderr
    return str(film.StudyInstanceUID)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


def test_rules_change_under_a_running_node_while_images_arrive(
    tmp_path: Path, pacs: Orthanc
) -> None:
    config = configuration(tmp_path, pacs)
    rules = config.parent / "rules.yaml"  # what the copied configuration names
    rules.write_text(FIRST)
    films = tmp_path / "films"
    films.mkdir()
    environment = {"CADNODE_CONFIG": str(config), "CADNODE_ENGINES_DIR": str(REPO / "engines")}
    with run_cadnode(tmp_path / "node", None, **environment) as node:
        pusher = Pusher(node, films)
        pusher.start()
        wait_for(lambda: pusher.studies, 30, "the first push")
        assert routed_row(node, pusher.studies[0])["rules_version"] == version(FIRST)

        # A saved change, no signal: the file watch loads it.
        rules.write_text(SECOND)
        wait_for(lambda: events(node, "rules.loaded"), 30, "the changed rules to load")
        [loaded] = events(node, "rules.loaded")
        assert loaded["trigger"] == "file-changed" and loaded["version"] == version(SECOND)
        marker = routed_row(node, push_marker(node, films, 1))
        assert marker["rule"] == "chest-v2" and marker["rules_version"] == version(SECOND)

        # A change the file watch cannot see (same size and time): SIGHUP loads it.
        stat = rules.stat()
        rules.write_text(THIRD)
        os.utime(rules, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        node.process.send_signal(signal.SIGHUP)
        wait_for(lambda: len(events(node, "rules.loaded")) == 2, 30, "the reload on SIGHUP")
        assert events(node, "rules.loaded")[1]["trigger"] == "sighup"

        # An invalid file is refused with its errors; the rules in force keep routing.
        rules.write_text(BROKEN)
        wait_for(lambda: events(node, "rules.refused"), 30, "the invalid file to be refused")
        [refused] = events(node, "rules.refused")
        assert refused["kept_version"] == version(THIRD)
        assert any(
            p.startswith(f"{rules}:5:16: rules.0.pipeline.0: unknown engine 'cxr-nope'")
            for p in refused["problems"]
        ), refused["problems"]
        marker = routed_row(node, push_marker(node, films, 2))
        assert marker["rule"] == "chest-v3" and marker["rules_version"] == version(THIRD)

        pusher.stopping.set()
        pusher.join(60)
        assert pusher.failures == []  # no association failed while the rules changed
        versions = {routed_row(node, uid)["rules_version"] for uid in pusher.studies}
        assert versions <= {version(FIRST), version(SECOND), version(THIRD)}
        assert version(FIRST) in versions and len(pusher.studies) >= 3
        assert events(node, "association.aborted") == []

        # The forwarded original reaches Orthanc beside its SR; `cadnode studies` shows it.
        uid = marker["study_uid"]
        wait_for(lambda: len(pacs.instances_of_study(uid)) == 2, 30, "film and SR in Orthanc")
        wait_for(lambda: routed_row(node, uid)["state"] == "delivered", 30, "the job delivered")
        [row] = [r for r in node.studies() if r["study_uid"] == uid]
        assert row["rule"] == "chest-v3" and row["rules_version"] == version(THIRD)
        assert [d["state"] for d in row["deliveries"]] == ["sent", "sent"]


def test_forwarded_originals_reach_the_pacs_in_the_syntax_they_came_in(
    tmp_path: Path, database: Database, pacs: Orthanc
) -> None:
    """A JPEG-LS MR and an uncompressed DX film, forwarded together by one rule."""
    spool, results = tmp_path / "spool", tmp_path / "results"
    spool.mkdir()
    compressed = dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    film = chest_dataset(make_chest_phantom(5, size=32), patient_id="P", patient_name="N^N", seed=5)
    job_id = store(database, spool, [compressed, film])
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: copy\n    action: forward\n    destinations: [pacs]\n")
    destinations = {"pacs": Destination.parse(pacs.destination)}
    Router(database, spool, LiveRules(rules, [], destinations), destinations).advance()
    Dispatcher(
        database, results, DispatchSettings(), "CADNODE", spool=spool, destinations=destinations
    ).advance()

    for original in (compressed, film):
        [orthanc_id] = pacs.instances_of_study(str(original.StudyInstanceUID))
        syntax = pacs.get(f"/instances/{orthanc_id}/metadata/TransferSyntax")
        assert syntax.decode() == str(original.file_meta.TransferSyntaxUID)
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.delivered
