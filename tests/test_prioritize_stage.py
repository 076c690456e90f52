"""The prioritize stage on the database: decisions at arrival and per job version, the
workitem kept in step, and what it queues for the publishers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlmodel import col, select

from cadnode.core.config import Hl7Publisher, PrioritySettings, WebhookPublisher
from cadnode.core.db import (
    Database,
    FailureKind,
    Instance,
    Job,
    JobState,
    Priority,
    Publication,
    PublicationState,
    Result,
    Study,
    StudyPriority,
    UpsSubscription,
    Workitem,
)
from cadnode.infer.answers import Answer, dump_answer
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.prioritize.policy import load_policy
from cadnode.prioritize.stage import Prioritizer
from cadnode.prioritize.worklist import GLOBAL_SUBSCRIPTION, dataset_of
from tests.answer_cases import ruleout_answer, segmenter_answer
from tests.peers import REPO

SETTINGS = PrioritySettings(
    hl7={"ris": Hl7Publisher(host="127.0.0.1", port=1)},
    webhooks={"off": WebhookPublisher(url="http://127.0.0.1:1/", enabled=False)},
)


def prioritizer(database: Database, spool: Path) -> Prioritizer:
    policy = load_policy(REPO / "config" / "priority.yaml")
    return Prioritizer(database, spool, policy, SETTINGS, retrieve_ae="CADNODE")


def arrive(database: Database, spool: Path, seed: int) -> tuple[int, int]:
    """A study whose one film has arrived: (study id, job id), the job still receiving."""
    film = write_chest_radiograph(spool / f"{seed}.dcm", seed=seed)
    with database.session() as session:
        study = Study(study_uid=film.StudyInstanceUID)
        session.add(study)
        session.flush()
        assert study.id is not None
        job = Job(study_id=study.id, version=1, instance_count=1)
        session.add(job)
        session.flush()
        assert job.id is not None
        session.add(
            Instance(
                sop_instance_uid=film.SOPInstanceUID,
                sop_class_uid=film.SOPClassUID,
                series_uid=film.SeriesInstanceUID,
                transfer_syntax="1.2.840.10008.1.2.1",
                path=f"{seed}.dcm",
                size=1,
                calling_ae="MODALITY",
                peer="127.0.0.1:1",
                job_id=job.id,
            )
        )
        if session.exec(select(UpsSubscription)).first() is None:
            session.add(UpsSubscription(ae_title="WATCHER", workitem_uid=GLOBAL_SUBSCRIPTION))
        session.commit()
        return study.id, job.id


def settle(
    database: Database, job_id: int, state: JobState, *answers: tuple[str, Answer]
) -> None:
    """The job reaches `state`, with one result per (engine, answer)."""
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = state
        job.reason = "inference failed: boom" if state is JobState.failed else None
        job.failure = FailureKind.engine if state is JobState.failed else None
        for engine, answer in answers:
            session.add(
                Result(
                    job_id=job_id,
                    engine=engine,
                    engine_version="1",
                    model_sha256="0" * 64,
                    sop_instance_uid="1.2.3",
                    answer=dump_answer(answer),
                )
            )
        session.add(job)
        session.commit()


def ruled_out(value: bool) -> tuple[str, Answer]:
    return "cxr-ruleout", ruleout_answer(0.2 if value else 0.95)


def history(database: Database, study_id: int) -> list[tuple[str, str | None, bool]]:
    with database.session() as session:
        rows = session.exec(
            select(StudyPriority)
            .where(StudyPriority.study_id == study_id)
            .order_by(col(StudyPriority.id))
        )
        return [(r.level.value, r.rule, r.changed) for r in rows]


def publications(database: Database) -> list[tuple[str, str, str, dict[str, Any]]]:
    with database.session() as session:
        rows = session.exec(select(Publication).order_by(col(Publication.id)))
        return [(p.channel, p.destination, p.state.value, p.payload) for p in rows]


def workitem(database: Database, study_id: int) -> Workitem:
    with database.session() as session:
        item = session.exec(select(Workitem).where(Workitem.study_id == study_id)).one()
        return item


def test_arrival_is_medium_then_the_results_decide(database: Database, tmp_path: Path) -> None:
    stage = prioritizer(database, tmp_path)
    study_id, job_id = arrive(database, tmp_path, seed=1)
    stage.advance()
    assert history(database, study_id) == [("MEDIUM", "arrival", True)]
    item = dataset_of(workitem(database, study_id))
    assert item.ScheduledProcedureStepPriority == "MEDIUM"
    assert item.InputReadinessState == "INCOMPLETE"  # the job is still receiving
    assert item.ProcedureStepState == "SCHEDULED"
    # The new workitem is reported to the global subscriber; HL7 waits for a real decision.
    [(channel, ae, _, event)] = publications(database)
    assert (channel, ae, event["event_type"]) == ("ups-event", "WATCHER", 1)

    settle(database, job_id, JobState.inferred, ruled_out(True))
    stage.advance()
    stage.advance()  # a second look changes nothing
    assert history(database, study_id) == [
        ("MEDIUM", "arrival", True),
        ("LOW", "chest-ruled-out", True),
    ]
    item = dataset_of(workitem(database, study_id))
    assert item.ScheduledProcedureStepPriority == "LOW"
    assert item.InputReadinessState == "READY"
    assert "no abnormality" in item.CommentsOnTheScheduledProcedureStep
    queued = publications(database)[1:]
    assert [(c, d, s) for c, d, s, _ in queued] == [
        ("ups-event", "WATCHER", "pending"),
        ("hl7", "ris", "pending"),  # the disabled webhook gets nothing
    ]
    assert queued[0][3]["info"]["00741200"]["Value"] == ["LOW"]


def test_a_newer_priority_supersedes_one_still_waiting(database: Database, tmp_path: Path) -> None:
    stage = prioritizer(database, tmp_path)
    study_id, job_id = arrive(database, tmp_path, seed=2)
    settle(database, job_id, JobState.inferred, ruled_out(True))
    stage.advance()
    second = add_version(database, study_id, 2)  # a late image, abnormal
    settle(database, second, JobState.inferred, ruled_out(False))
    stage.advance()
    assert [level for level, _, _ in history(database, study_id)] == ["MEDIUM", "LOW", "HIGH"]
    hl7 = [state for channel, _, state, _ in publications(database) if channel == "hl7"]
    assert hl7 == ["superseded", "pending"]  # the RIS gets HIGH, not LOW then HIGH
    events = [
        p["info"]["00741200"]["Value"] for c, _, _, p in publications(database) if c == "ups-event"
    ]
    assert events == [["MEDIUM"], ["LOW"], ["HIGH"]]  # subscribers hear every change, in order


def add_version(database: Database, study_id: int, version: int) -> int:
    with database.session() as session:
        job = Job(study_id=study_id, version=version)
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


def test_failure_without_results_is_medium_and_a_failed_image_blocks_low(
    database: Database, tmp_path: Path
) -> None:
    stage = prioritizer(database, tmp_path)
    study_id, job_id = arrive(database, tmp_path, seed=3)
    settle(database, job_id, JobState.failed)
    stage.advance()
    assert history(database, study_id)[-1] == ("MEDIUM", "failed", False)
    second = add_version(database, study_id, 2)  # rules its image out; version 1's is unread
    settle(database, second, JobState.inferred, ruled_out(True))
    stage.advance()
    assert history(database, study_id)[-1] == ("MEDIUM", "default", False)


def test_a_segmenter_finding_above_the_threshold_is_high(
    database: Database, tmp_path: Path
) -> None:
    stage = prioritizer(database, tmp_path)
    study_id, job_id = arrive(database, tmp_path, seed=4)
    not_urgent = ruleout_answer(0.6)  # not ruled out, below its urgent operating point
    settle(
        database,
        job_id,
        JobState.inferred,
        ("cxr-ruleout", not_urgent),
        ("cxr-segmenter", segmenter_answer(18.0)),
    )
    stage.advance()
    decided = history(database, study_id)[-1]
    assert decided == ("HIGH", "pneumothorax-large", True)
    assert workitem(database, study_id).priority is Priority.HIGH
    with database.session() as session:
        states = session.exec(select(Publication.state)).all()
    assert PublicationState.superseded not in states


def test_a_study_that_cannot_be_read_does_not_stall_the_others(
    database: Database, tmp_path: Path
) -> None:
    stage = prioritizer(database, tmp_path)
    broken, _ = arrive(database, tmp_path, seed=5)
    (tmp_path / "5.dcm").unlink()  # its image is gone from the spool
    fine, _ = arrive(database, tmp_path, seed=6)
    stage.advance()
    assert history(database, broken) == []
    assert history(database, fine) == [("MEDIUM", "arrival", True)]


def test_an_answer_the_policy_cannot_read_never_lowers_the_study(
    database: Database, tmp_path: Path
) -> None:
    stage = prioritizer(database, tmp_path)
    study_id, job_id = arrive(database, tmp_path, seed=7)
    settle(database, job_id, JobState.inferred, ruled_out(True))
    with database.session() as session:  # a second film's answer, damaged in the database
        session.add(
            Result(
                job_id=job_id,
                engine="cxr-ruleout",
                engine_version="1",
                model_sha256="0" * 64,
                sop_instance_uid="1.2.4",
                answer={"probability": "low", "ruled_out": True},
            )
        )
        session.commit()
    stage.advance()
    assert history(database, study_id)[-1] == ("MEDIUM", "default", False)
