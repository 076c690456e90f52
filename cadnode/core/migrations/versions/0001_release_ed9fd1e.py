"""The schema of release ed9fd1e, the last made by create_all without a revision.

Every table exactly as that release's cadnode/core/db.py made it (`git show
ed9fd1e:cadnode/core/db.py`), its constraints named by the naming convention: an unversioned
database holding these tables and columns is stamped 0001 (cadnode/core/migrations/__init__.py).

Revision ID: 0001
Revises:
Create Date: 2026-12-06 12:19:43
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auditevent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "association",
                "study_received",
                "instance_refused",
                "result_delivered",
                "retrieved",
                "rules",
                "engine",
                "admin_login",
                "admin_logout",
                "admin_token",
                "admin_lockout",
                "admin_delivery_retry",
                "admin_delivery_discard",
                name="auditkind",
            ),
            nullable=False,
        ),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("address", sa.String(), nullable=True),
        sa.Column(
            "outcome",
            sa.Enum(
                "accepted",
                "rejected",
                "refused",
                "stored",
                "sent",
                "partly_failed",
                "loaded",
                "ok",
                name="auditoutcome",
            ),
            nullable=False,
        ),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auditevent")),
    )
    with op.batch_alter_table("auditevent", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_auditevent_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_auditevent_kind"), ["kind"], unique=False)

    op.create_table(
        "completionsignal",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(), nullable=False),
        sa.Column(
            "source", sa.Enum("association", "mpps", name="completionsource"), nullable=False
        ),
        sa.Column("expected", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_completionsignal")),
    )
    with op.batch_alter_table("completionsignal", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_completionsignal_study_uid"), ["study_uid"], unique=False
        )

    op.create_table(
        "performedprocedurestep",
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("IN_PROGRESS", "COMPLETED", "DISCONTINUED", name="mppsstatus"),
            nullable=False,
        ),
        sa.Column("calling_ae", sa.String(), nullable=False),
        sa.Column("dataset", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_performedprocedurestep")),
    )
    with op.batch_alter_table("performedprocedurestep", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_performedprocedurestep_status"), ["status"], unique=False
        )

    op.create_table(
        "queryrecord",
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("held_as", sa.Enum("instance", "result", name="heldas"), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("study_uid", sa.String(), nullable=False),
        sa.Column("series_uid", sa.String(), nullable=False),
        sa.Column("modality", sa.String(), nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=False),
        sa.Column("transfer_syntax", sa.String(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_queryrecord")),
    )
    with op.batch_alter_table("queryrecord", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_queryrecord_patient_id"), ["patient_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_queryrecord_series_uid"), ["series_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_queryrecord_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study")),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_study_uid"), ["study_uid"], unique=True)

    op.create_table(
        "upssubscription",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(), nullable=False),
        sa.Column("workitem_uid", sa.String(), nullable=False),
        sa.Column("deletion_lock", sa.Boolean(), nullable=False),
        sa.Column("filter", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upssubscription")),
        sa.UniqueConstraint(
            "ae_title", "workitem_uid", name=op.f("uq_upssubscription_ae_title_workitem_uid")
        ),
    )
    with op.batch_alter_table("upssubscription", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_upssubscription_ae_title"), ["ae_title"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_upssubscription_workitem_uid"), ["workitem_uid"], unique=False
        )

    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "received",
                "complete",
                "routed",
                "inferred",
                "encoded",
                "delivered",
                "ignored",
                "failed",
                name="jobstate",
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("rule", sa.String(), nullable=True),
        sa.Column("rules_version", sa.String(), nullable=True),
        sa.Column("pipeline", sa.JSON(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column(
            "priority",
            sa.Enum("urgent", "routine", "background", name="priorityclass"),
            nullable=False,
        ),
        sa.Column(
            "failure",
            sa.Enum(
                "unreadable",
                "engine_unavailable",
                "engine",
                "interrupted",
                "image_refused",
                "encoding",
                "dead_letter",
                name="failurekind",
            ),
            nullable=True,
        ),
        sa.Column("quiet_period_s", sa.Float(), nullable=True),
        sa.Column("quiet_period_decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_instance_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_instance_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timeline", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], name=op.f("fk_job_study_id_study")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job")),
        sa.UniqueConstraint("study_id", "version", name=op.f("uq_job_study_id_version")),
    )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_failure"), ["failure"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_priority"), ["priority"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_study_id"), ["study_id"], unique=False)

    op.create_table(
        "workitem",
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Enum("HIGH", "MEDIUM", "LOW", name="priority"), nullable=False),
        sa.Column(
            "state",
            sa.Enum("SCHEDULED", "IN_PROGRESS", "COMPLETED", "CANCELED", name="upsstate"),
            nullable=False,
        ),
        sa.Column("transaction_uid", sa.String(), nullable=True),
        sa.Column("dataset", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["study.id"], name=op.f("fk_workitem_study_id_study")
        ),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_workitem")),
        sa.UniqueConstraint("study_id", name=op.f("uq_workitem_study_id")),
    )
    with op.batch_alter_table("workitem", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workitem_state"), ["state"], unique=False)

    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("object_uid", sa.String(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(), nullable=False),
        sa.Column(
            "state",
            sa.Enum("pending", "sent", "failed", "discarded", name="deliverystate"),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("discarded_by", sa.String(), nullable=True),
        sa.Column("discarded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("commitment_transaction_uid", sa.String(), nullable=True),
        sa.Column("commitment_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("commitment_requests", sa.Integer(), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("commitment_failure", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_delivery_job_id_job")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery")),
        sa.UniqueConstraint(
            "object_uid", "destination", name=op.f("uq_delivery_object_uid_destination")
        ),
    )
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_delivery_commitment_transaction_uid"),
            ["commitment_transaction_uid"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_delivery_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_delivery_object_uid"), ["object_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_delivery_state"), ["state"], unique=False)

    op.create_table(
        "instance",
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=False),
        sa.Column("series_uid", sa.String(), nullable=False),
        sa.Column("transfer_syntax", sa.String(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("calling_ae", sa.String(), nullable=False),
        sa.Column("called_ae", sa.String(), nullable=False),
        sa.Column("peer", sa.String(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("missing_since", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_instance_job_id_job")),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_instance")),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instance_job_id"), ["job_id"], unique=False)

    op.create_table(
        "result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("engine", sa.String(), nullable=False),
        sa.Column("engine_version", sa.String(), nullable=False),
        sa.Column("model_sha256", sa.String(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("answer", sa.JSON(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_result_job_id_job")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result")),
    )
    with op.batch_alter_table("result", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_job_id"), ["job_id"], unique=False)

    op.create_table(
        "resultobject",
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("engine", sa.String(), nullable=False),
        sa.Column("modality", sa.String(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_resultobject_job_id_job")),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_resultobject")),
    )
    with op.batch_alter_table("resultobject", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_resultobject_job_id"), ["job_id"], unique=False)

    op.create_table(
        "studypriority",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("level", sa.Enum("HIGH", "MEDIUM", "LOW", name="priority"), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("rule", sa.String(), nullable=True),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_studypriority_job_id_job")),
        sa.ForeignKeyConstraint(
            ["study_id"], ["study.id"], name=op.f("fk_studypriority_study_id_study")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studypriority")),
    )
    with op.batch_alter_table("studypriority", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_studypriority_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_studypriority_study_id"), ["study_id"], unique=False)

    op.create_table(
        "publication",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("decision_id", sa.Integer(), nullable=True),
        sa.Column(
            "channel",
            sa.Enum("ups_event", "ups_push", "hl7", "webhook", name="publicationchannel"),
            nullable=False,
        ),
        sa.Column("destination", sa.String(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column(
            "state",
            sa.Enum("pending", "sent", "failed", "superseded", name="publicationstate"),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["decision_id"],
            ["studypriority.id"],
            name=op.f("fk_publication_decision_id_studypriority"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["study.id"], name=op.f("fk_publication_study_id_study")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_publication")),
    )
    with op.batch_alter_table("publication", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_publication_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_publication_study_id"), ["study_id"], unique=False)

    # ### end Alembic commands ###


def downgrade() -> None:
    with op.batch_alter_table("publication", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_publication_study_id"))
        batch_op.drop_index(batch_op.f("ix_publication_state"))

    op.drop_table("publication")
    with op.batch_alter_table("studypriority", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studypriority_study_id"))
        batch_op.drop_index(batch_op.f("ix_studypriority_job_id"))

    op.drop_table("studypriority")
    with op.batch_alter_table("resultobject", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resultobject_job_id"))

    op.drop_table("resultobject")
    with op.batch_alter_table("result", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_job_id"))

    op.drop_table("result")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_job_id"))

    op.drop_table("instance")
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_state"))
        batch_op.drop_index(batch_op.f("ix_delivery_object_uid"))
        batch_op.drop_index(batch_op.f("ix_delivery_job_id"))
        batch_op.drop_index(batch_op.f("ix_delivery_commitment_transaction_uid"))

    op.drop_table("delivery")
    with op.batch_alter_table("workitem", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workitem_state"))

    op.drop_table("workitem")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_study_id"))
        batch_op.drop_index(batch_op.f("ix_job_state"))
        batch_op.drop_index(batch_op.f("ix_job_priority"))
        batch_op.drop_index(batch_op.f("ix_job_failure"))

    op.drop_table("job")
    with op.batch_alter_table("upssubscription", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_upssubscription_workitem_uid"))
        batch_op.drop_index(batch_op.f("ix_upssubscription_ae_title"))

    op.drop_table("upssubscription")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_study_uid"))

    op.drop_table("study")
    with op.batch_alter_table("queryrecord", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_queryrecord_study_uid"))
        batch_op.drop_index(batch_op.f("ix_queryrecord_series_uid"))
        batch_op.drop_index(batch_op.f("ix_queryrecord_patient_id"))

    op.drop_table("queryrecord")
    with op.batch_alter_table("performedprocedurestep", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_performedprocedurestep_status"))

    op.drop_table("performedprocedurestep")
    with op.batch_alter_table("completionsignal", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completionsignal_study_uid"))

    op.drop_table("completionsignal")
    with op.batch_alter_table("auditevent", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auditevent_kind"))
        batch_op.drop_index(batch_op.f("ix_auditevent_at"))

    op.drop_table("auditevent")
    # ### end Alembic commands ###
