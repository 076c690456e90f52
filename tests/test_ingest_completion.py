"""Knowing when a study is complete: the quiet period, the sender's word (MPPS, association
release), late instances, and receiving that never waits on inference."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS  # type: ignore[attr-defined]
from sqlmodel import select

from cadnode.core.config import AssembleSettings, load_settings
from cadnode.core.db import Database, Job, JobState, PerformedProcedureStep
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.ingest.assemble import Assembler
from tests.dicom_validation import require_tool
from tests.ingest import captured_events, json_events, named, receiving
from tests.peers import run_cadnode, storescu, wait_for
from tests.synthetic import write_ct_series

LONG_WAIT = {"quiet_period_s": 600}  # only the sender's word can release within a test


def released(events: list[dict[str, object]], count: int = 1) -> None:
    """Wait until receive has handled `count` association releases (storescu may exit first)."""
    wait_for(lambda: len(named(events, "association.released")) >= count, 5, "the release")


def jobs(database: Database) -> list[Job]:
    with database.session() as session:
        return list(session.exec(select(Job).order_by(Job.id)))  # type: ignore[arg-type]


def test_the_default_quiet_period_is_a_few_seconds_not_a_minute() -> None:
    assert 0 < AssembleSettings().quiet_period_s <= 5
    assert 0 < load_settings({}).assemble.quiet_period_s <= 5  # the embedded configuration


def mpps(study_uid: str) -> Dataset:
    """An MPPS N-CREATE attribute list: IN PROGRESS, for `study_uid`."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedProcedureStepID = "PPS1"
    step = Dataset()
    step.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedSeriesSequence = []
    return ds


def completed(files: list[Path]) -> Dataset:
    """An MPPS N-SET modification list: COMPLETED, listing the images in `files`."""
    series = Dataset()
    series.SeriesInstanceUID = dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    series.ReferencedImageSequence = []
    for file in files:
        header = dcmread(file, stop_before_pixels=True)
        image = Dataset()
        image.ReferencedSOPClassUID = header.SOPClassUID
        image.ReferencedSOPInstanceUID = header.SOPInstanceUID
        series.ReferencedImageSequence.append(image)
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedSeriesSequence = [series]
    return ds


def test_mpps_completed_releases_the_study_once_every_image_it_lists_arrived(
    tmp_path: Path, database: Database
) -> None:
    files = write_ct_series(tmp_path / "ct", 5, size=32)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    assembler = Assembler(database, AssembleSettings(**LONG_WAIT))
    ae = AE(ae_title="CT_ROOM_1")
    ae.add_requested_context(MPPS)
    step_uid = generate_uid()
    with captured_events() as events, receiving(tmp_path, database, assemble=LONG_WAIT) as node:
        mpps_link = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
        created, _ = mpps_link.send_n_create(mpps(study_uid), MPPS, step_uid)
        duplicate, _ = mpps_link.send_n_create(mpps(study_uid), MPPS, step_uid)
        assert storescu(node.port, *files[:3]).returncode == 0
        done, _ = mpps_link.send_n_set(completed(files), MPPS, step_uid)
        assembler.advance()
        waiting = jobs(database)[0].state
        assert storescu(node.port, *files[3:]).returncode == 0
        assembler.advance()
        again, _ = mpps_link.send_n_set(completed(files), MPPS, step_uid)
        unknown, _ = mpps_link.send_n_set(completed(files), MPPS, generate_uid())
        mpps_link.release()
    assert [created.Status, duplicate.Status, done.Status] == [0x0000, 0x0111, 0x0000]
    assert [again.Status, unknown.Status] == [0x0110, 0x0112]
    assert waiting is JobState.received, "released before every listed image had arrived"
    [job] = jobs(database)
    assert job.state is JobState.complete and job.instance_count == 5
    assert [e["by"] for e in named(events, "job.released")] == ["mpps-completed"]
    with database.session() as session:
        step = session.get(PerformedProcedureStep, step_uid)
        assert step is not None and step.status == "COMPLETED" and step.calling_ae == "CT_ROOM_1"


def test_association_release_closes_the_wait_where_configured(
    tmp_path: Path, database: Database
) -> None:
    files = write_ct_series(tmp_path / "ct", 3, size=32)
    closing = {**LONG_WAIT, "close_on_association_release": True}
    with captured_events() as events, receiving(tmp_path, database, assemble=closing) as node:
        assert storescu(node.port, *files).returncode == 0
        released(events)
        Assembler(database, AssembleSettings(**LONG_WAIT)).advance()
        assert jobs(database)[0].state is JobState.received, "not configured: it waits"
        Assembler(database, AssembleSettings(**closing)).advance()
    assert jobs(database)[0].state is JobState.complete
    assert [e["by"] for e in named(events, "job.released")] == ["association-released"]


def test_a_study_still_sent_on_another_association_is_not_closed_by_one_release(
    tmp_path: Path, database: Database
) -> None:
    files = write_ct_series(tmp_path / "ct", 3, size=32)
    closing = AssembleSettings(**LONG_WAIT, close_on_association_release=True)
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context(CTImageStorage)
    with captured_events() as events, receiving(tmp_path, database) as node:
        other = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
        assert other.send_c_store(dcmread(files[0])).Status == 0
        assert storescu(node.port, *files[1:]).returncode == 0  # sends two more, releases
        released(events)
        Assembler(database, closing).advance()
        still_sending = jobs(database)[0].state
        other.release()
        released(events, 2)
        Assembler(database, closing).advance()
    assert still_sending is JobState.received
    assert jobs(database)[0].state is JobState.complete


def test_an_instance_after_release_reopens_the_study_as_a_new_version(
    tmp_path: Path, database: Database
) -> None:
    files = write_ct_series(tmp_path / "ct", 4, size=32)
    assembler = Assembler(database, AssembleSettings(quiet_period_s=0))
    with captured_events() as events, receiving(tmp_path, database) as node:
        assert storescu(node.port, *files[:3]).returncode == 0
        assembler.advance()
        assert storescu(node.port, files[3]).returncode == 0
    first, late = jobs(database)
    assert (first.version, first.state, first.instance_count) == (1, JobState.complete, 3)
    assert (late.version, late.state, late.instance_count) == (2, JobState.received, 1)
    assert late.study_id == first.study_id
    [reopened] = named(events, "job.reopened")
    assert reopened["job"] == late.id and reopened["version"] == 2


def test_eight_associations_are_served_while_the_engine_runs(tmp_path: Path) -> None:
    films = [tmp_path / "films" / f"{i}.dcm" for i in range(12)]
    for i, film in enumerate(films):
        film.parent.mkdir(exist_ok=True)
        write_chest_radiograph(film, seed=900 + i)
    series = [write_ct_series(tmp_path / f"ct{i}", 30, size=64, seed=i) for i in range(8)]
    tool = require_tool("storescu")
    with run_cadnode(tmp_path / "node", None) as node:

        def push(ae: str, files: list[Path]) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [tool, "-aet", ae, "-aec", "CADNODE", "127.0.0.1", str(node.dicom_port)]
                + [str(f) for f in files],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        # The films' jobs go through the engine as each film lands (a radiograph is released
        # on arrival); once the first is routed, eight modalities at once. (Started together,
        # the small CT series could all be in before the first film reached the engine.)
        pushes = [push("FILMS", films)]
        wait_for(
            lambda: any(e["event"] == "job.routed" for e in json_events(node.log_text())),
            120,
            "the first film to be routed to the engine",
        )
        pushes += [push(f"CT{i}", files) for i, files in enumerate(series)]
        assert [process.wait(120) for process in pushes] == [0] * 9
        events = json_events(node.log_text())
    at = {(e["event"], e.get("job")): dt.datetime.fromisoformat(e["timestamp"]) for e in events}
    running = [
        (at[("job.routed", job)], at[("job.inferred", job)])
        for event, job in at
        if event == "job.routed" and ("job.inferred", job) in at
    ]
    ct_arrivals = [
        dt.datetime.fromisoformat(e["timestamp"])
        for e in events
        if e["event"] == "instance.received" and str(e["calling_ae"]).startswith("CT")
    ]
    assert len(ct_arrivals) == 8 * 30
    during = [t for t in ct_arrivals if any(start < t < end for start, end in running)]
    assert during, "no instance was received while an engine was running"
