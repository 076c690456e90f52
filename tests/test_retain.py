"""Housekeeping (cadnode/retain): which studies' data may go, never an unfinished job's, an
unsent result's or a pinned study's; removals that leave rows and files agreeing after a kill
between their commits; the disk mark; the dry run; the counters and the audit trail."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlmodel import col, select
from structlog.testing import capture_logs

from cadnode.admin.context import AdminContext
from cadnode.admin.metrics import render
from cadnode.core.config import RetentionSettings, Settings, StorageSettings, load_settings
from cadnode.core.db import (
    Alert,
    AlertKind,
    AuditEvent,
    AuditKind,
    AuditOutcome,
    Conclusion,
    Database,
    Delivery,
    DeliveryState,
    Feedback,
    FeedbackSource,
    Instance,
    Job,
    JobState,
    Priority,
    Publication,
    PublicationChannel,
    PublicationState,
    QueryRecord,
    Removal,
    Result,
    ResultObject,
    Study,
    StudyPriority,
    UpsState,
    Workitem,
    utcnow,
)
from cadnode.core.yamlfile import ConfigError
from cadnode.ingest.spool import Arrival, Spool
from cadnode.retain import pins
from cadnode.retain.policy import Kind, Reason, deletable
from cadnode.retain.removal import mark, plan
from cadnode.retain.stage import DiskUse, Housekeeper
from cadnode.retain.usage import as_text, report, would_remove
from tests.retain_cases import (
    Made,
    files_under,
    finished_study,
    hour_policy,
    rows_and_files_agree,
    storage_in,
)


@pytest.fixture
def storage(tmp_path: Path) -> StorageSettings:
    return storage_in(tmp_path)  # the `database` fixture's file is this data dir's


def keeper(database: Database, storage: StorageSettings, **policy: object) -> Housekeeper:
    return Housekeeper(database, storage, hour_policy(**policy), disk=lambda _: DiskUse(1, 99))


def goes(database: Database, made: Made, kind: Kind = Kind.images) -> bool:
    """Whether the policy lets `kind` of the study go now (older than an hour)."""
    with database.session() as session:
        found = deletable(session, kind, older_than=utcnow() - dt.timedelta(hours=1), limit=None)
    return made.study_uid in {study.study_uid for study in found}


def set_job(database: Database, made: Made, **values: object) -> None:
    with database.session() as session:
        job = session.get(Job, made.job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)
        session.add(job)
        session.commit()


def set_deliveries(database: Database, made: Made, **values: object) -> None:
    with database.session() as session:
        for delivery in session.exec(select(Delivery).where(Delivery.job_id == made.job_id)):
            for name, value in values.items():
                setattr(delivery, name, value)
            session.add(delivery)
        session.commit()


# --- what may go ----------------------------------------------------------------------------


def test_a_finished_study_goes_once_older_than_its_age(
    database: Database, storage: StorageSettings
) -> None:
    old = finished_study(database, storage)
    recent = finished_study(database, storage, ago=dt.timedelta(0))
    assert goes(database, old) and not goes(database, recent)


@pytest.mark.parametrize(
    "state", [JobState.received, JobState.complete, JobState.routed, JobState.inferred]
)
def test_an_unfinished_job_keeps_its_study(
    database: Database, storage: StorageSettings, state: JobState
) -> None:
    made = finished_study(database, storage, state=state, delivery=None)
    assert not any(goes(database, made, kind) for kind in Kind if kind is not Kind.audit)


@pytest.mark.parametrize(
    ("state", "kept"),
    [
        (DeliveryState.pending, True),
        (DeliveryState.failed, True),  # a dead letter is not sent: an admin may retry it
        (DeliveryState.discarded, False),
        (DeliveryState.sent, False),
    ],
)
def test_a_result_not_yet_sent_keeps_its_study(
    database: Database, storage: StorageSettings, state: DeliveryState, kept: bool
) -> None:
    job_state = JobState.failed if state is DeliveryState.failed else JobState.delivered
    made = finished_study(database, storage, state=job_state, delivery=state)
    assert goes(database, made) is not kept
    assert goes(database, made, Kind.results) is not kept


def test_a_result_waits_for_the_pacs_to_commit_to_keeping_it(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage)
    set_deliveries(database, made, commitment_transaction_uid=generate_uid())
    assert not goes(database, made, Kind.results)
    set_deliveries(database, made, commitment_failure="0110: processing failure")
    assert not goes(database, made, Kind.results)  # the PACS said it did not keep it
    set_deliveries(database, made, committed_at=utcnow())
    assert goes(database, made, Kind.results)


def test_an_encoded_job_goes_only_when_it_has_nothing_to_deliver(
    database: Database, storage: StorageSettings
) -> None:
    local = finished_study(database, storage, state=JobState.encoded, delivery=None)
    sending = finished_study(database, storage, state=JobState.encoded, delivery=None)
    with database.session() as session:  # sent, but the job not yet settled by dispatch
        object_uid = generate_uid()
        delivery = Delivery(
            object_uid=object_uid,
            job_id=sending.job_id,
            destination="pacs",
            state=DeliveryState.sent,
        )
        session.add(delivery)
        session.commit()
    assert goes(database, local) and not goes(database, sending)


def test_a_job_whose_priority_is_not_decided_keeps_its_study(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage, prioritized=False)
    assert not goes(database, made, Kind.answers)  # the prioritize stage still reads them


def test_a_later_version_still_running_keeps_the_whole_study(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage)
    with database.session() as session:
        study = session.exec(select(Study).where(Study.study_uid == made.study_uid)).one()
        assert study.id is not None
        session.add(Job(study_id=study.id, version=2, state=JobState.routed))
        session.commit()
    assert not goes(database, made)


def test_a_pinned_study_is_kept_until_unpinned_and_both_are_audited(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage)
    assert pins.pin(database, made.study_uid, "cli:ada", "second reading").done
    assert not any(goes(database, made, kind) for kind in Kind if kind is not Kind.audit)
    assert pins.unpin(database, made.study_uid, "cli:ada").done
    assert goes(database, made)
    assert not pins.unpin(database, made.study_uid, "cli:ada").done  # not pinned any more
    assert not pins.pin(database, "1.2.x", "cli:ada").done  # not a UID
    with database.session() as session:
        kinds = [e.kind for e in session.exec(select(AuditEvent).order_by(col(AuditEvent.id)))]
    assert kinds == [AuditKind.admin_pin, AuditKind.admin_unpin]


def test_a_study_s_rows_wait_for_its_worklist(database: Database, storage: StorageSettings) -> None:
    made = finished_study(database, storage)
    with database.session() as session:
        study = session.exec(select(Study).where(Study.study_uid == made.study_uid)).one()
        assert study.id is not None
        publication = Publication(
            study_id=study.id, channel=PublicationChannel.webhook, destination="ris"
        )
        workitem = Workitem(
            sop_instance_uid=generate_uid(),
            study_id=study.id,
            priority=Priority.LOW,
            state=UpsState.IN_PROGRESS,
        )
        session.add_all([publication, workitem])
        session.commit()
        ids = publication.id, workitem.sop_instance_uid
    assert goes(database, made, Kind.images) and not goes(database, made, Kind.jobs)
    with database.session() as session:
        publication_row = session.get(Publication, ids[0])
        workitem_row = session.get(Workitem, ids[1])
        assert publication_row is not None and workitem_row is not None
        publication_row.state = PublicationState.sent
        session.add(publication_row)
        session.commit()
        assert not goes(database, made, Kind.jobs)  # a reader still holds the workitem
        workitem_row.state = UpsState.COMPLETED
        session.add(workitem_row)
        session.commit()
    assert goes(database, made, Kind.jobs)


# --- removing -------------------------------------------------------------------------------


def test_a_pass_removes_what_may_go_and_keeps_the_rest(
    database: Database, storage: StorageSettings
) -> None:
    gone = finished_study(database, storage)
    pinned = finished_study(database, storage)
    unsent = finished_study(
        database, storage, state=JobState.encoded, delivery=DeliveryState.pending
    )
    running = finished_study(database, storage, state=JobState.routed, delivery=None)
    pins.pin(database, pinned.study_uid, "cli:ada")
    with capture_logs() as logs:
        counts = keeper(database, storage, jobs="never").run_pass()
    rows_and_files_agree(database, storage)
    spool = files_under(storage.spool)
    assert not set(gone.instances) & spool
    assert {*pinned.instances, *unsent.instances, *running.instances} <= spool
    assert counts["age_images_objects"] == 2 and counts["age_images_bytes"] == 2000
    assert counts["age_results_objects"] == 1 and counts["age_answers_objects"] == 1
    with database.session() as session:  # its rows of other kinds stay: jobs is "never"
        assert session.get(Job, gone.job_id) is not None
    [event] = [e for e in logs if e["event"] == "retention.pass"]
    assert event["age_images_objects"] == 2 and gone.study_uid not in str(event)
    removed = audit_of(database, AuditKind.retention_removed)
    assert {e.details["study_uid"] for e in removed} == {gone.study_uid}
    assert {e.details["kind"] for e in removed} == {"images", "answers", "results"}


def audit_of(database: Database, kind: AuditKind) -> list[AuditEvent]:
    with database.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == kind)))


def test_a_study_s_rows_go_with_everything_hanging_off_them(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage)
    kept = finished_study(database, storage, ago=dt.timedelta(0))
    with database.session() as session:
        study = session.exec(select(Study).where(Study.study_uid == made.study_uid)).one()
        assert study.id is not None
        session.add(
            Workitem(sop_instance_uid=generate_uid(), study_id=study.id, priority=Priority.LOW)
        )
        decision = session.exec(select(StudyPriority).where(StudyPriority.study_id == study.id))
        session.add(
            Publication(
                study_id=study.id,
                decision_id=decision.one().id,
                channel=PublicationChannel.hl7,
                destination="ris",
                state=PublicationState.sent,
            )
        )
        for job in (made, kept):  # a radiologist's conclusion on each (cadnode.feedback)
            session.add(Feedback(job_id=job.job_id, study_uid=job.study_uid, finding="abnormal",
                                 conclusion=Conclusion.absent, source=FeedbackSource.api,
                                 author="RIS"))
        session.commit()
    keeper(database, storage, images="never", results="never", answers="never").run_pass()
    rows_and_files_agree(database, storage)
    with database.session() as session:
        assert session.exec(select(Study.study_uid)).all() == [kept.study_uid]
        assert session.exec(select(Job.id)).all() == [kept.job_id]
        for job_id in (
            Instance.job_id, Result.job_id, ResultObject.job_id, Delivery.job_id, Feedback.job_id
        ):
            assert set(session.exec(select(job_id)).all()) == {kept.job_id}
        assert set(session.exec(select(StudyPriority.job_id)).all()) == {kept.job_id}
        assert session.exec(select(Publication)).all() == []
        assert session.exec(select(Workitem)).all() == []
    [event] = audit_of(database, AuditKind.retention_removed)
    assert event.details["kind"] == "jobs"
    assert event.details["removed"]["images"] == {"objects": 2, "bytes": 2000}


def marked(database: Database, storage: StorageSettings, kind: Kind = Kind.images) -> None:
    """A removal's first commit alone: what a kill right after it leaves."""
    with database.session() as session:
        chosen = deletable(session, kind, older_than=utcnow(), limit=None)
        mark(session, plan(session, storage, kind, Reason.age, chosen), utcnow())
        session.commit()


def test_after_a_kill_between_the_commits_the_start_finishes_the_removal(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage)
    marked(database, storage)
    with database.session() as session:  # rows gone, query records with them: not served
        assert session.exec(select(Instance)).all() == []
        assert session.exec(select(QueryRecord.held_as)).all() == ["result"]
        assert len(session.exec(select(Removal)).all()) == 2
    assert set(made.instances) <= files_under(storage.spool)
    # What the node does at start: finish the journal, then reconcile the spool.
    assert keeper(database, storage).recover() == 2
    spool = Spool(storage.spool, database, 0)
    try:
        counts = spool.reconcile(storage.quarantine)
    finally:
        spool.close()
    assert counts["indexed"] == 0 and counts["quarantined"] == 0  # nothing came back
    rows_and_files_agree(database, storage)


def test_after_a_kill_among_the_deletions_the_start_finishes_the_rest(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage, images=3)
    marked(database, storage)
    (storage.spool / made.instances[0]).unlink()  # the kill came after the first file
    assert keeper(database, storage).recover() == 3
    rows_and_files_agree(database, storage)


def test_the_stage_waits_its_interval_between_passes(
    database: Database, storage: StorageSettings
) -> None:
    finished_study(database, storage)
    stage = keeper(database, storage, check_every_s=600)
    assert stage.advance() == 600  # a whole pass, then the interval
    finished_study(database, storage)
    assert 590 < (stage.advance() or 0) <= 600  # woken early: nothing done
    with database.session() as session:
        assert len(session.exec(select(Instance)).all()) == 2


def test_an_image_sent_again_while_its_old_copy_is_removed_is_kept(
    database: Database, storage: StorageSettings
) -> None:
    made = finished_study(database, storage, images=1)
    marked(database, storage)
    relative = Path(made.instances[0])
    study_uid, series_uid = relative.parts[0], relative.parts[1]
    arrival = Arrival(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        sop_instance_uid=relative.stem,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        called_ae="CADNODE",
        peer="127.0.0.1:1",
    )
    spool = Spool(storage.spool, database, 0)
    try:
        indexed = spool.store(arrival, [b"\0" * 1000])  # the file there is taken as its copy
    finally:
        spool.close()
    assert indexed is not None and indexed.version == 2
    keeper(database, storage).recover()
    assert (storage.spool / relative).exists()
    with database.session() as session:
        assert session.get(Instance, relative.stem) is not None


def test_above_the_high_water_mark_the_oldest_images_go_first(
    database: Database, storage: StorageSettings
) -> None:
    studies = [
        finished_study(database, storage, ago=dt.timedelta(hours=hours), image_bytes=10_000)
        for hours in (3, 2, 1)
    ]

    def disk(_: Path) -> DiskUse:  # a 100 kB disk holding only the node's files
        folders = (storage.spool, storage.results, storage.answers)
        used = sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file())
        return DiskUse(used=used, available=100_000 - used)

    never = dict.fromkeys(("images", "results", "answers", "jobs", "audit"), "never")
    policy = hour_policy(**never, high_water_percent=50, low_water_percent=30)
    assert disk(storage.data_dir).percent > 50
    dry = would_remove(database, storage, policy, disk=disk)
    counts = Housekeeper(database, storage, policy, disk=disk).run_pass()
    assert disk(storage.data_dir).percent < 30
    spool = files_under(storage.spool)
    assert not set(studies[0].instances) & spool and set(studies[2].instances) <= spool
    assert counts["disk_images_objects"] == 4 and "disk_results_objects" not in counts
    assert [(r.kind, r.reason, r.objects) for r in dry] == [("images", "disk", 4)]
    rows_and_files_agree(database, storage)


def test_the_dry_run_counts_what_a_pass_removes_and_deletes_nothing(
    database: Database, storage: StorageSettings
) -> None:
    for _ in range(2):
        finished_study(database, storage)
    finished_study(database, storage, ago=dt.timedelta(0))
    policy = hour_policy()
    before = files_under(storage.data_dir)
    document = report(database, storage, policy, dry_run=True, disk=lambda _: DiskUse(1, 99))
    assert files_under(storage.data_dir) == before
    dry = {(r["kind"], r["reason"]): r for r in document["would_remove"]}
    assert {key: (r["studies"], r["objects"]) for key, r in dry.items()} == {
        ("images", "age"): (2, 4),
        ("answers", "age"): (2, 2),
        ("results", "age"): (2, 2),
        ("jobs", "age"): (2, 2),
    }
    assert dry[("images", "age")]["bytes"] == 4000
    held = {row["kind"]: row for row in document["held"]}
    assert (held["images"]["objects"], held["images"]["bytes"]) == (6, 6000)
    text = as_text(document)
    assert "dry run: the policy would remove now (nothing was deleted)" in text
    assert "images     age           2          4      3.9 KiB" in text
    counts = keeper(database, storage).run_pass()
    assert counts["age_images_objects"] == 4 and counts["age_jobs_objects"] == 2


def test_old_audit_events_go_except_those_naming_a_pinned_study(
    database: Database, storage: StorageSettings
) -> None:
    old = utcnow() - dt.timedelta(days=3)
    with database.session() as session:
        for study_uid in ("1.2.3", "1.2.4", None):
            details = {"study_uid": study_uid} if study_uid else {}
            session.add(
                AuditEvent(
                    at=old,
                    kind=AuditKind.study_received,
                    actor="CT",
                    outcome=AuditOutcome.stored,
                    details=details,
                )
            )
        session.commit()
    pins.pin(database, "1.2.4", "cli:ada")
    keeper(database, storage, audit="2d").run_pass()
    left = [(e.kind, e.details.get("study_uid")) for e in audit_of_all(database)]
    assert (AuditKind.study_received, "1.2.4") in left
    assert (AuditKind.study_received, "1.2.3") not in left
    assert [e for e in left if e[0] is AuditKind.study_received] == [
        (AuditKind.study_received, "1.2.4")
    ]
    assert (AuditKind.admin_pin, "1.2.4") in left  # recent: kept
    [removal] = audit_of(database, AuditKind.retention_removed)
    assert removal.details["events"] == 2


def audit_of_all(database: Database) -> list[AuditEvent]:
    with database.session() as session:
        return list(session.exec(select(AuditEvent)))


def test_the_counters_say_what_went_per_kind_and_reason(
    database: Database, storage: StorageSettings
) -> None:
    finished_study(database, storage)
    keeper(database, storage, jobs="never").run_pass()
    context = AdminContext(
        settings=Settings(storage=storage),
        database=database,
        configured_engines=[],
        engines=[],
        rules=lambda: pytest.fail("the metrics need no rules"),
    )
    text = render(context).decode()  # what /metrics serves
    for line in (
        'cadnode_retention_removed_objects_total{kind="images",reason="age"} 2.0',
        'cadnode_retention_removed_objects_total{kind="results",reason="age"} 1.0',
        'cadnode_retention_removed_bytes_total{kind="images",reason="age"} 2000.0',
    ):
        assert line in text, line


# --- configuration --------------------------------------------------------------------------


def test_retention_ages_are_read_as_people_write_them(tmp_path: Path) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text("retention:\n  images: 12h\n  results: 90d\n  jobs: never\n")
    settings = load_settings({"CADNODE_CONFIG": str(config)}).retention
    assert settings.images == dt.timedelta(hours=12) and settings.jobs is None
    assert settings.audit == dt.timedelta(days=2192)  # the default: six years


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("retention:\n  images: 30\n", ":2:3: retention.images: Value error, expected a duration"),
        ("retention:\n  audit: 0s\n", ":2:3: retention.audit: Value error, a duration longer"),
        ("retention:\n  low_water_percent: 95\n", ":1:1: retention: Value error, low_water"),
        ("retention:\n  imags: 30d\n", ":2:3: retention.imags: Extra inputs are not permitted"),
    ],
)
def test_a_bad_retention_setting_names_its_line(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings({"CADNODE_CONFIG": str(config)})
    assert f"{config}{expected}" in raised.value.problems[0]


def test_the_shipped_policy_is_a_hospital_s(tmp_path: Path) -> None:
    settings = RetentionSettings()
    assert (settings.images, settings.results, settings.answers) == (
        dt.timedelta(days=30),
        dt.timedelta(days=90),
        dt.timedelta(days=90),
    )
    assert settings.jobs == dt.timedelta(days=365)
    assert settings.high_water_percent > settings.low_water_percent


def test_alerts_that_ended_long_ago_go_with_old_rows(
    database: Database, storage: StorageSettings
) -> None:
    old = utcnow() - dt.timedelta(days=3)
    with database.session() as session:
        for subject, cleared in (("ended", old), ("going on", None)):
            session.add(
                Alert(
                    kind=AlertKind.destination_failing,
                    subject=subject,
                    since=old,
                    raised_at=old,
                    cleared_at=cleared,
                )
            )
        session.commit()
    keeper(database, storage, jobs="2d").run_pass()
    with database.session() as session:
        assert [a.subject for a in session.exec(select(Alert))] == ["going on"]
