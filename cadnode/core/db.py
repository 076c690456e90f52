"""Durable state: the only thing the stages share.

Each stage reads the jobs waiting in its input state and moves them on with a
compare-and-set transition, so a job is never worked twice and a restart resumes exactly
where the last commit left off.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import (
    JSON,
    URL,
    BigInteger,
    Column,
    Index,
    Integer,
    UniqueConstraint,
    false,
    update,
)
from sqlmodel import Field, Session, SQLModel, select

from cadnode.core import connection
from cadnode.core.migrations import upgrade as upgrade_schema
from cadnode.core.tallies import install as install_triggers

log = structlog.get_logger("cadnode.db")

# Every constraint named: SQLite alters a table by copying it (Alembic's batch mode), which can
# only drop or change a constraint it can name. "ix" is SQLAlchemy's default, which the tables
# of release ed9fd1e (migration 0001) were made with.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class JobState(StrEnum):
    received = "received"  # instances arriving; the study is not complete yet
    complete = "complete"  # assemble released it
    routed = "routed"  # a rule chose engines
    inferred = "inferred"  # engines answered
    encoded = "encoded"  # results written as DICOM; kept locally
    delivered = "delivered"  # every destination acknowledged every result
    ignored = "ignored"  # no rule wants it: stored, not processed
    failed = "failed"  # see Job.failure (what kind of failure) and Job.reason (in words)


class FailureKind(StrEnum):
    """Why a job failed, for code to act on (an admin's replay reopens dead letters only);
    `Job.reason` says it in words for people."""

    unreadable = "unreadable"  # route: a stored instance no longer reads
    engine_unavailable = "engine_unavailable"  # infer: a step's engine is not loaded here
    engine = "engine"  # infer: the engine raised or timed out, every attempt
    interrupted = "interrupted"  # infer: the node stopped during the last attempt allowed
    image_refused = "image_refused"  # infer: pixels over the decode limits (not retried)
    encoding = "encoding"  # encode: the results could not be written as DICOM
    dead_letter = "dead_letter"  # dispatch: a delivery gave up after its attempts


class DeliveryState(StrEnum):
    pending = "pending"
    sent = "sent"
    failed = "failed"  # dead letter: gave up after the configured attempts
    discarded = "discarded"  # an admin chose never to send it (`cadnode deliveries discard`)


class PriorityClass(StrEnum):
    """How soon a routed job's engines should run; a routing rule sets it."""

    urgent = "urgent"  # before anything else (a chest film that may show a pneumothorax)
    routine = "routine"
    background = "background"  # research and backfill: only when nothing else waits


class Study(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    study_uid: str = Field(index=True, unique=True)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Job(SQLModel, table=True):
    """One version of a study's processing; an instance arriving after release opens the next."""

    __table_args__ = (
        UniqueConstraint("study_id", "version"),
        # A stage's claim: jobs in its state whose lease is free (cadnode/core/claims.py).
        Index("ix_job_state_lease_until", "state", "lease_until"),
    )
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    version: int
    state: JobState = Field(default=JobState.received, index=True)
    reason: str | None = None
    rule: str | None = None
    rules_version: str | None = None
    # Steps as cadnode.route.steps.Step writes them: {"engine": ..., "when": ..., "inputs": ...}.
    pipeline: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    inputs: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    priority: PriorityClass = Field(default=PriorityClass.routine, index=True)
    failure: FailureKind | None = Field(default=None, index=True)  # set when state is failed
    # The routing rules' own quiet period for the study, if they set one: route records it
    # from the study's first instance while it arrives (and again when it routes the whole
    # study); assemble reads it from here. `quiet_period_decided_at`: when route first did
    # (None: not yet, and assemble waits for it before ending the study's quiet period).
    quiet_period_s: float | None = None
    quiet_period_decided_at: dt.datetime | None = None
    instance_count: int = 0
    first_instance_at: dt.datetime = Field(default_factory=utcnow)
    last_instance_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)
    # Engine attempts started for this job, counted before its first image is decoded (so
    # one that kills the node still counts); infer retries a failed one after
    # next_attempt_at, and fails the job once `engines.max_attempts` is reached.
    attempts: int = 0
    next_attempt_at: dt.datetime | None = None
    # When the job first entered each state it has been in ({state: ISO time}), by `transition`:
    # the dashboard's timeline and the per-stage latency metrics are read from it.
    timeline: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # When the job's instances entered the query index (cadnode/dicom/indexing.py): in the
    # commit that completes it. None on a released job: made before the index was kept so
    # (assemble indexes it later).
    indexed_at: dt.datetime | None = Field(default=None, index=True)
    # Which worker is doing the work of the job's state, and until when its lease runs
    # (cadnode/core/claims.py); cleared by the transition that ends that work.
    claimed_by: str | None = None
    lease_until: dt.datetime | None = None


class Instance(SQLModel, table=True):
    sop_instance_uid: str = Field(primary_key=True)
    sop_class_uid: str
    series_uid: str
    transfer_syntax: str
    path: str  # relative to the spool folder
    size: int
    calling_ae: str
    called_ae: str = ""  # the AE title the sender addressed
    peer: str
    job_id: int = Field(foreign_key="job.id", index=True)
    received_at: dt.datetime = Field(default_factory=utcnow)
    # Set when a startup check found the row's file gone from the spool (see receive.reconcile).
    missing_since: dt.datetime | None = None


class MppsStatus(StrEnum):
    """Performed Procedure Step Status (0040,0252): DICOM's defined terms."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class PerformedProcedureStep(SQLModel, table=True):
    """A modality's MPPS (N-CREATE, then N-SET), kept as its DICOM JSON."""

    sop_instance_uid: str = Field(primary_key=True)
    status: MppsStatus = Field(index=True)
    calling_ae: str
    dataset: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


class CompletionSource(StrEnum):
    """Who said a study is whole (CompletionSignal.source)."""

    association = "association"  # the association that sent it was released
    mpps = "mpps"  # the modality's MPPS went COMPLETED


class CompletionSignal(SQLModel, table=True):
    """Word from a sender that a study is whole: assemble may release it before its quiet period.

    `association`: the association that sent it was released. `mpps`: the modality's MPPS
    says COMPLETED; `expected` lists the SOP Instance UIDs it names, all of which must arrive.
    """

    id: int | None = Field(default=None, primary_key=True)
    study_uid: str = Field(index=True)
    source: CompletionSource
    expected: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    at: dt.datetime = Field(default_factory=utcnow)


class Result(SQLModel, table=True):
    """An engine's answer for one source instance."""

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    engine: str = Field(index=True)  # indexed: /metrics reads each engine's latest answers
    engine_version: str
    model_sha256: str
    sop_instance_uid: str
    answer: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # How long the engine call that gave this answer took (one call may answer a batch).
    seconds: float | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    # A shadow version's answer (issue 21): stored for comparison with the live one on the
    # same job and image, never encoded, delivered, published or shown as a result.
    shadow: bool = Field(
        default=False, index=True, sa_column_kwargs={"server_default": false()}
    )


class ReleaseRole(StrEnum):
    """What an installed engine version is for (EngineRelease.role; cadnode/infer/releases.py)."""

    live = "live"  # its answers are the results: encoded, delivered, published, shown
    shadow = "shadow"  # runs on the live version's inputs; answers kept apart (Result.shadow)
    retired = "retired"  # installed, not run


class EngineRelease(SQLModel, table=True):
    """The role an admin (or the node, at first sight of an engine) gave one version of an
    engine; a version with no row is installed and not run, unless it is the default live one."""

    __table_args__ = (UniqueConstraint("name", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: str
    role: ReleaseRole
    changed_at: dt.datetime = Field(default_factory=utcnow)
    changed_by: str
    # When it last stopped being live: `cadnode engines rollback` puts back the latest such.
    live_until: dt.datetime | None = None


class ShadowRunState(StrEnum):
    waiting = "waiting"
    running = "running"  # claimed by `claimed_by` until `lease_until`
    done = "done"
    failed = "failed"  # see `reason`; the live job is never affected


class ShadowRun(SQLModel, table=True):
    """A shadow version's run on the images a live step of a job ran on, queued when the job
    was inferred; the infer stage takes one only when no live job waits. No foreign key on
    `job_id`: housekeeping may remove the job first, and the run is then dropped."""

    __table_args__ = (Index("ix_shadowrun_state_lease_until", "state", "lease_until"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    engine: str
    version: str
    inputs: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    state: ShadowRunState = Field(default=ShadowRunState.waiting, index=True)
    claimed_by: str | None = None
    lease_until: dt.datetime | None = None
    reason: str | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    finished_at: dt.datetime | None = None


class ResultObject(SQLModel, table=True):
    """A DICOM object cadnode made (SR, SEG, GSPS, SC), kept under the results folder."""

    sop_instance_uid: str = Field(primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    engine: str
    modality: str
    path: str  # relative to the results folder
    created_at: dt.datetime = Field(default_factory=utcnow)


class ResultSeries(SQLModel, table=True):
    """The Series Number of each result series of a study: distinct within the study (a
    viewer lists series by number) and kept, so re-encoding a job writes the same number."""

    __table_args__ = (UniqueConstraint("study_uid", "number"),)
    series_uid: str = Field(primary_key=True)
    study_uid: str = Field(index=True)
    number: int


class HeldAs(StrEnum):
    """What kind of object serve holds (QueryRecord.held_as), and so in which folder."""

    instance = "instance"  # a received image, in the spool
    result = "result"  # cadnode's own object, in the results folder


class QueryRecord(SQLModel, table=True):
    """Serve's query index: one held object's query attributes, read from its file's header.

    Written (cadnode/dicom/indexing.py) in the commit that completes its study's job, or that
    records a result object; removed with the object's row (a trigger, cadnode/core/tallies.py).
    """

    sop_instance_uid: str = Field(primary_key=True)
    held_as: HeldAs
    path: str  # relative to the spool or the results folder
    patient_id: str = Field(index=True)
    study_uid: str = Field(index=True)
    series_uid: str = Field(index=True)
    modality: str
    sop_class_uid: str
    transfer_syntax: str
    # The patient, study, series and image attributes a query may match, as DICOM JSON.
    attributes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class QueryStudy(SQLModel, table=True):
    """Serve's query index at the study level: one row per study held, with its patient's
    and its own attributes, so a study or patient query reads studies, not every object.

    Written with the study's first QueryRecord (cadnode/dicom/indexing.py), removed with its
    last (a trigger). The columns are the keys queries narrow on, as C-FIND matching compares
    them (cadnode.dicom.matching.comparable: names in upper case), "" where there is none.
    """

    study_uid: str = Field(primary_key=True)
    patient_id: str = Field(default="", index=True)
    patient_name: str = Field(default="", index=True)
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = Field(default="", index=True)
    study_time: str = ""
    accession_number: str = Field(default="", index=True)
    referring_physician_name: str = ""
    study_description: str = ""
    # Every patient and study attribute a query may match or ask for, as DICOM JSON.
    attributes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


# Appended rows outnumber jobs many times over: 64-bit on PostgreSQL (SQLite's rowid is).
_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")


class MetricTally(SQLModel, table=True):
    """One series of a counter or gauge that /metrics reports, or a histogram's sum: kept up
    to date by triggers in the commit of each change it counts (cadnode/core/tallies.py), so
    a scrape reads a row per series instead of counting rows."""

    metric: str = Field(primary_key=True)
    label: str = Field(default="", primary_key=True)
    second_label: str = Field(default="", primary_key=True)
    value: float = 0.0


class MetricBucket(SQLModel, table=True):
    """A histogram's cumulative bucket (observations <= `le`; +Inf: all of them), kept by
    the same triggers as MetricTally."""

    metric: str = Field(primary_key=True)
    label: str = Field(primary_key=True)
    le: float = Field(primary_key=True)
    count: int = 0


class MetricTallyDelta(SQLModel, table=True):
    """PostgreSQL only: a change to a MetricTally series, appended by the triggers instead of
    updating the series' row, which concurrent writers would wait on and deadlock over; a
    scrape adds these to the row and cadnode.core.tallies.compact folds them in."""

    id: int | None = Field(default=None, sa_type=_BIG_ID, primary_key=True)
    metric: str
    label: str = ""
    second_label: str = ""
    value: float = 0.0


class MetricBucketDelta(SQLModel, table=True):
    """PostgreSQL only: a change to a MetricBucket, as MetricTallyDelta is to MetricTally."""

    id: int | None = Field(default=None, sa_type=_BIG_ID, primary_key=True)
    metric: str
    label: str
    le: float
    count: int = 0


class Delivery(SQLModel, table=True):
    """The outbox: one row per (object, destination)."""

    __table_args__ = (
        UniqueConstraint("object_uid", "destination"),
        # A destination's last success at a glance, for the watchdog (cadnode/watch).
        Index("ix_delivery_destination_sent_at", "destination", "sent_at"),
        # Dispatch's claim: pending deliveries that are due (cadnode/core/claims.py).
        Index("ix_delivery_state_next_attempt_at", "state", "next_attempt_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    # A ResultObject's SOP Instance UID, or an Instance's where a rule forwards the original.
    object_uid: str = Field(index=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    # The configured destination's name (`destinations.NAME`, or CADNODE_DESTINATION for the
    # one that variable gives): its address and options are read from the configuration.
    destination: str
    state: DeliveryState = Field(default=DeliveryState.pending, index=True)
    attempts: int = 0
    next_attempt_at: dt.datetime = Field(default_factory=utcnow)
    last_error: str | None = None
    sent_at: dt.datetime | None = None
    discarded_by: str | None = None
    discarded_at: dt.datetime | None = None
    # Storage Commitment (destinations with `storage_commitment`): the N-ACTION's Transaction
    # UID, when it was last asked (and how often), and the PACS's answer (N-EVENT-REPORT).
    commitment_transaction_uid: str | None = Field(default=None, index=True)
    commitment_requested_at: dt.datetime | None = None
    commitment_requests: int = 0
    committed_at: dt.datetime | None = None
    commitment_failure: str | None = None
    # The dispatcher sending it now, and until when (cadnode/core/claims.py).
    claimed_by: str | None = None
    lease_until: dt.datetime | None = None


class Priority(StrEnum):
    """A study's place on the reading worklist; the values are DICOM's (0074,1200)."""

    HIGH = "HIGH"
    MEDIUM = "MEDIUM"
    LOW = "LOW"


class StudyPriority(SQLModel, table=True):
    """One priority decision for a study: at arrival, after each job version, or by a client.

    Every decision is kept, changed or not; the latest is the study's current priority.
    """

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    job_id: int | None = Field(default=None, foreign_key="job.id", index=True)
    level: Priority
    reason: str
    rule: str | None = None  # the policy rule, "arrival", a fallback, or the client that set it
    changed: bool = True
    decided_at: dt.datetime = Field(default_factory=utcnow)


class UpsState(StrEnum):
    """A workitem's Procedure Step State (0074,1000): DICOM's defined terms (PS3.4 CC.1.1)."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"

    @property
    def final(self) -> bool:
        """Read (or canceled): the workitem no longer changes."""
        return self in (UpsState.COMPLETED, UpsState.CANCELED)


class Workitem(SQLModel, table=True):
    """A study's reading workitem: a UPS instance, kept as its DICOM JSON."""

    sop_instance_uid: str = Field(primary_key=True)
    study_id: int = Field(foreign_key="study.id", unique=True)
    priority: Priority
    state: UpsState = Field(default=UpsState.SCHEDULED, index=True)
    transaction_uid: str | None = None  # the performer's lock while IN PROGRESS
    dataset: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: dt.datetime = Field(default_factory=utcnow)


class UpsSubscription(SQLModel, table=True):
    """An AE that asked for UPS event reports: on one workitem, or on all (global UIDs)."""

    __table_args__ = (UniqueConstraint("ae_title", "workitem_uid"),)
    id: int | None = Field(default=None, primary_key=True)
    ae_title: str = Field(index=True)
    workitem_uid: str = Field(index=True)
    deletion_lock: bool = False
    # Matching keys of a filtered global subscription (DICOM JSON); empty for the others.
    filter: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)


class PublicationState(StrEnum):
    pending = "pending"
    sent = "sent"
    failed = "failed"  # dead letter
    superseded = "superseded"  # a newer priority for the same study and recipient replaced it


class PublicationChannel(StrEnum):
    """How a publication goes out (Publication.channel); publish has one sender per channel."""

    ups_event = "ups-event"  # an N-EVENT-REPORT to a UPS subscriber (destination: its AE title)
    ups_push = "ups-push"  # the workitem, to an external UPS SCP (a configured destination)
    hl7 = "hl7"  # an HL7 v2 order update over MLLP (a configured `priority.hl7` name)
    webhook = "webhook"  # a JSON POST (a configured `priority.webhooks` name)


class Publication(SQLModel, table=True):
    """The worklist outbox: one row per (priority change or UPS event, recipient)."""

    __table_args__ = (
        # Publish's claim: pending publications that are due (cadnode/core/claims.py).
        Index("ix_publication_state_next_attempt_at", "state", "next_attempt_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    # Indexed: the first publication sent for a job is looked up by it (cadnode/core/tallies.py).
    decision_id: int | None = Field(default=None, foreign_key="studypriority.id", index=True)
    channel: PublicationChannel
    destination: str  # a configured publisher's name, or a subscriber's AE title
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: PublicationState = Field(default=PublicationState.pending, index=True)
    attempts: int = 0
    next_attempt_at: dt.datetime = Field(default_factory=utcnow)
    last_error: str | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    sent_at: dt.datetime | None = None
    # The publisher sending it now, and until when (cadnode/core/claims.py).
    claimed_by: str | None = None
    lease_until: dt.datetime | None = None


class AuditKind(StrEnum):
    """What an audit event records (AuditEvent.kind). Dotted: a prefix ("admin") selects the
    kinds under it (`cadnode audit --kind admin`, the dashboard's audit page)."""

    association = "association"  # an association request, accepted or rejected
    study_received = "study.received"  # a study's first instance stored: who sent whose study
    instance_refused = "instance.refused"  # a C-STORE answered with a failure status
    result_delivered = "result.delivered"
    retrieved = "retrieved"  # a C-MOVE or C-GET of held images or results
    rules = "rules"  # the routing rules loaded, or a changed file refused
    engine = "engine"  # an engine loaded at start
    admin_login = "admin.login"
    admin_logout = "admin.logout"
    admin_token = "admin.token"  # a bearer token refused
    admin_lockout = "admin.lockout"  # an address locked out after failed checks
    admin_delivery_retry = "admin.delivery.retry"
    admin_delivery_discard = "admin.delivery.discard"
    admin_backup = "admin.backup"  # `cadnode backup`: the database and files copied
    admin_pin = "admin.pin"  # a study kept from housekeeping (`cadnode pin`)
    admin_unpin = "admin.unpin"
    # An engine version promoted, rolled back, put in shadow or retired (`cadnode engines`).
    admin_engine_release = "admin.engine.release"
    admin_feedback = "admin.feedback"  # an admin agreed or disagreed with a result (dashboard)
    feedback_received = "feedback.received"  # a report (HL7 ORU) or a RIS (REST) concluded
    retention_removed = "retention.removed"  # housekeeping removed a study's files or rows


class AuditOutcome(StrEnum):
    """How the audited act ended (AuditEvent.outcome)."""

    accepted = "accepted"
    rejected = "rejected"
    refused = "refused"
    stored = "stored"
    sent = "sent"
    partly_failed = "partly failed"
    loaded = "loaded"
    ok = "ok"
    removed = "removed"


class AuditEvent(SQLModel, table=True):
    """Who did what, for the audit trail (cadnode.core.audit). Unlike the logs, `details` may carry
    patient identifiers: it is read by those allowed to, through `cadnode audit`."""

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(default_factory=utcnow, index=True)
    kind: AuditKind = Field(index=True)
    actor: str  # a calling AE title, "admin", "cli", "node"
    address: str | None = None  # where the actor was: host:port, or a destination AE@host:port
    outcome: AuditOutcome
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class FeedbackSource(StrEnum):
    """Where a radiologist's conclusion came from (Feedback.source; cadnode.feedback)."""

    report = "report"  # the final report, HL7 v2 ORU^R01 over MLLP, labelled by rules
    dashboard = "dashboard"  # an admin's agree / disagree on the study's page
    api = "api"  # a RIS's POST /api/feedback


class Conclusion(StrEnum):
    """What the radiologist concluded about one finding (Feedback.conclusion)."""

    present = "present"
    absent = "absent"
    # The report hedged ("cannot exclude", "possible"): kept, but left out of the figures.
    uncertain = "uncertain"


class Feedback(SQLModel, table=True):
    """A radiologist's conclusion about one finding of a job's study: the ground truth the
    engines' answers are measured against (cadnode.watch.performance). Every conclusion is
    kept; the latest per (job, finding) is the one that counts (a dashboard correction after
    the report, an amended report)."""

    # A job's conclusions, the latest per finding (the dashboard, the figures' reads).
    __table_args__ = (Index("ix_feedback_job_id_finding", "job_id", "finding"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id")
    study_uid: str = Field(index=True)
    # An engine label's name as the manifests spell it (abnormal, pneumothorax, mass, ...).
    finding: str
    conclusion: Conclusion
    source: FeedbackSource
    # Who said it: the sending application and facility (report), the dashboard's user, the
    # API client's name. Never a patient's.
    author: str
    report_id: str = ""  # the report's accession number or message control ID, or the RIS's id
    # The words that decided a report's label (a sentence, at most 300 characters): why the
    # rules concluded so. Patient text: read in the dashboard, never logged.
    evidence: str = ""
    received_at: dt.datetime = Field(default_factory=utcnow, index=True)


class AlertKind(StrEnum):
    """What a watchdog alert is about (Alert.kind; cadnode.watch)."""

    job_stalled = "job.stalled"  # jobs in one unfinished state too long (subject: the state)
    destination_failing = "destination.failing"  # subject: the destination's name
    sender_silent = "sender.silent"  # subject: the calling AE title
    disk_filling = "disk.filling"  # subject: "data dir"
    engine_drift = "engine.drift"  # subject: "SENDER/engine" (cadnode.watch.drift)


class Alert(SQLModel, table=True):
    """A condition a watchdog found (cadnode.watch), from when it began to when it ended.

    It is an alert once it has lasted past its threshold (`raised_at`); before that it is
    only watched, and forgotten if it ends first. `detail` names jobs, destinations and AE
    titles, never a patient. `notified`: which notifications went out, "raised webhook" ->
    when (the watchdog retries the others)."""

    id: int | None = Field(default=None, primary_key=True)
    kind: AlertKind = Field(index=True)
    subject: str
    since: dt.datetime  # when the condition began, as far as the node can tell
    raised_at: dt.datetime | None = Field(default=None, index=True)
    cleared_at: dt.datetime | None = Field(default=None, index=True)
    detail: str = ""
    notified: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class InputProfile(SQLModel, table=True):
    """One engine answer's input as drift sees it (cadnode.infer.profile, cadnode.watch.drift):
    who sent the image, which engine version answered, the image's acquisition attributes
    and the answer's score. Written by infer in the commit that moves the job to `inferred`.
    It names no patient, study or image: it outlives its job's retention (a drift reference
    window is older than the jobs retention keeps), so `job_id` is not a foreign key."""

    __table_args__ = (Index("ix_inputprofile_sender_engine_id", "sender", "engine", "id"),)
    id: int | None = Field(default=None, sa_type=_BIG_ID, primary_key=True)
    job_id: int = Field(index=True)
    sender: str  # the calling AE title the image came from
    engine: str
    engine_version: str
    shadow: bool = False  # a shadow version's answer (Result.shadow)
    manufacturer: str = ""
    model: str = ""  # ManufacturerModelName
    pixel_spacing: float | None = None  # mm between rows: PixelSpacing, else ImagerPixelSpacing
    kvp: float | None = None
    body_part: str = ""
    photometric: str = ""
    rows: int | None = None
    columns: int | None = None
    probability: float | None = None  # the answer's highest probability or score
    positive: bool | None = None  # the answer reached an operating point
    created_at: dt.datetime = Field(default_factory=utcnow, index=True)


class DriftStat(SQLModel, table=True):
    """The last drift check's figures (cadnode.watch.drift), one row per sender, engine,
    attribute, statistic and baseline, replaced at each check: /metrics and the dashboard
    read them at the cost of a row per series."""

    sender: str = Field(primary_key=True)
    engine: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)  # an input attribute, "positive", "probability"
    statistic: str = Field(primary_key=True)  # "psi" or "ks"
    against: str = Field(primary_key=True)  # "reference" or "training"
    engine_version: str
    value: float  # the PSI, or the KS statistic D
    p_value: float | None = None  # KS only
    level: str  # "ok", "watch" or "alert"
    images: int  # in the current window
    baseline_images: int  # in the reference window, or the training population
    checked_at: dt.datetime = Field(default_factory=utcnow)


class Pin(SQLModel, table=True):
    """A study an admin keeps from housekeeping (`cadnode pin`): none of its files or rows,
    nor the audit events naming it, are removed while the pin stands."""

    study_uid: str = Field(primary_key=True)
    pinned_by: str
    pinned_at: dt.datetime = Field(default_factory=utcnow)
    reason: str | None = None


class Removal(SQLModel, table=True):
    """Housekeeping's journal (cadnode.retain): a file whose rows are already gone, to be
    deleted. Written in the commit that deletes the rows, dropped once the file is gone, so a
    kill at any moment leaves the journal to finish, never a row without its file."""

    id: int | None = Field(default=None, primary_key=True)
    folder: str  # "spool", "results" or "answers" (cadnode.retain.removal.Folder)
    path: str  # relative to that folder
    marked_at: dt.datetime = Field(default_factory=utcnow)


class RemovedTally(SQLModel, table=True):
    """What housekeeping removed since the database was made, per kind and reason: the
    `cadnode_retention_removed_*` counters, kept as two numbers rather than counted anew."""

    kind: str = Field(primary_key=True)  # images, results, answers, jobs, audit
    reason: str = Field(primary_key=True)  # age, disk
    objects: int = 0
    bytes: int = 0


class NodeHeartbeat(SQLModel, table=True):
    """One process of a node (its main process or a worker), as it last said it was: written
    every few seconds by the process itself (cadnode/core/claims.py), so `cadnode status`
    and the dashboard show every node sharing the database, and which have gone quiet."""

    worker: str = Field(primary_key=True)  # "<node name>/<pid>", as claims name it
    node: str = Field(index=True)
    pid: int
    role: str  # "node" (the main process), or what else the process does
    started_at: dt.datetime = Field(default_factory=utcnow)
    last_seen: dt.datetime = Field(default_factory=utcnow)
    dicom_port: int | None = None
    associations: int = 0  # open on this process now
    leases: int = 0  # rows this process holds a lease on now


class Database:
    """The database at a URL (`Settings.database_url`: SQLite or PostgreSQL, see
    cadnode/core/connection.py), or an SQLite file given by its path."""

    def __init__(self, where: Path | str | URL) -> None:
        # Called after every committed job transition; the conveyor wakes the stages with it.
        self.on_change: Callable[[], None] = lambda: None
        self.url = connection.of(where)
        self.kind = connection.kind(self.url)
        self.engine = connection.engine(self.url, check_same_thread=False)
        if self.kind == connection.SQLITE:
            connection.on_connect(self.engine, _sqlite_durability)
        upgrade_schema(self.url)  # to this code's schema, from any released one (or none)
        install_triggers(self.engine)  # metrics' tallies and the query index's clean-up

    @property
    def file(self) -> Path | None:
        """The SQLite database's file (None on PostgreSQL): what backups and health read."""
        return connection.sqlite_file(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def transition(
        self,
        session: Session,
        job: Job,
        to: JobState,
        *,
        expect: JobState,
        holder: str | None = None,
        **changes: Any,
    ) -> bool:
        """Move `job` from `expect` to `to` unless another worker moved it first, and end any
        claim on it. `holder`: only while this worker still holds the job's claim (a worker
        whose lease was taken over must not commit the work it did)."""
        now = utcnow()
        timeline = {to.value: now.isoformat(), **job.timeline}  # the first entry into each
        held = [] if holder is None else [Job.claimed_by == holder]
        moved = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == expect, *held)  # type: ignore[arg-type]
            .values(
                state=to,
                updated_at=now,
                timeline=timeline,
                claimed_by=None,
                lease_until=None,
                **changes,
            )
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return False
        session.commit()
        session.refresh(job)
        log.info(
            "job." + to.value,
            job=job.id,
            study=job.study_id,
            version=job.version,
            previous=expect.value,
            **_loggable(changes),
        )
        self.on_change()
        return True

    def jobs_in(self, session: Session, state: JobState) -> list[Job]:
        return list(session.exec(select(Job).where(Job.state == state).order_by(Job.id)))  # type: ignore[arg-type]


def _loggable(changes: dict[str, Any]) -> dict[str, Any]:
    logged = ("reason", "failure", "rule", "rules_version", "pipeline", "priority")
    return {k: v for k, v in changes.items() if k in logged}


def _sqlite_durability(connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the writer; synchronous=FULL makes every commit reach the
    # disk before it returns, which is what lets receive answer Success after it.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
