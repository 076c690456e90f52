"""Studies as the node holds them, and engine answers on them, for the feedback tests; and an
ORU^R01 final report as an HL7 peer (hl7apy) builds it."""

from __future__ import annotations

import datetime as dt

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Field, Message
from hl7apy.factories import datatype_factory

from cadnode.core.db import Database, JobState, QueryStudy, Result, utcnow
from cadnode.infer.answers import ClassifyAnswer, PointReached, SegmentAnswer, SegmentFinding
from cadnode.infer.answers import dump_answer as dumped
from cadnode.infer.bundle import Bundle
from tests.peers import REPO
from tests.rows import new_job

ENGINES = REPO / "engines"
RULEOUT = Bundle(ENGINES / "cxr-ruleout").manifest
SEGMENTER = Bundle(ENGINES / "cxr-segmenter").manifest
VERSION = "2.5.1"


def held_study(database: Database, study_uid: str, accession: str = "") -> int:
    """A study the node holds (its job, its query index row with the accession number)."""
    with database.session() as session:
        job = new_job(session, study_uid, state=JobState.delivered, instance_count=1)
        session.add(QueryStudy(study_uid=study_uid, accession_number=accession))
        session.commit()
        assert job.id is not None
        return job.id


def ruleout_result(
    job_id: int,
    *,
    abnormal: bool,
    urgent: bool | None = None,
    version: str = "0.1.0",
    image: str = "1.2.3.1",
    at: dt.datetime | None = None,
) -> Result:
    """The rule-out engine's answer: `rule_out` reached when not ruled out (abnormal)."""
    points = {
        "rule_out": PointReached(threshold=0.2, reached=abnormal),
        "urgent": PointReached(threshold=0.8, reached=abnormal if urgent is None else urgent),
    }
    answer = ClassifyAnswer(
        label=RULEOUT.labels[0],
        probability=0.9 if abnormal else 0.1,
        operating_points=points,
        ruled_out=not abnormal,
    )
    return Result(
        job_id=job_id,
        engine="cxr-ruleout",
        engine_version=version,
        model_sha256="0" * 64,
        sop_instance_uid=image,
        answer=dumped(answer),
        created_at=at or utcnow(),
    )


def segmenter_result(job_id: int, *, pneumothorax: bool, version: str = "0.1.0") -> Result:
    finding = SegmentFinding(
        label=SEGMENTER.labels[2],
        segment_number=1,
        probability=0.99 if pneumothorax else 0.0,
        operating_points={"present": PointReached(threshold=0.97, reached=pneumothorax)},
    )
    answer = SegmentAnswer(mask_file="m.npz", frames=1, rows=8, columns=8, findings=[finding])
    return Result(
        job_id=job_id,
        engine="cxr-segmenter",
        engine_version=version,
        model_sha256="1" * 64,
        sop_instance_uid="1.2.3.1",
        answer=dumped(answer),
    )


def oru(
    lines: list[str],
    *,
    accession: str = "",
    study_uid: str = "",
    control_id: str = "RPT1",
    kind: str = "ORU^R01^ORU_R01",
    status: str = "F",
    facility: str = "HOSP",
) -> str:
    """A final report as a RIS sends it: OBR-3 the accession number, the Study Instance UID
    in an OBX coded DCM 113014, the impression as TX observations (escaped by hl7apy)."""
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = message.msh
    msh.msh_3, msh.msh_4, msh.msh_5, msh.msh_6 = "RIS", facility, "CADNODE", "SITE"
    msh.msh_9, msh.msh_10, msh.msh_11 = kind, control_id, "P"
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    result.add_group("ORU_R01_PATIENT").pid.pid_3 = "PID-FEEDBACK-1"
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    if accession:
        order.obr.obr_3 = accession
    order.obr.obr_4 = "71045^XR CHEST 1 VIEW"
    order.obr.obr_25 = status
    values = [("113014^Study Instance UID^DCM", "ST", study_uid)] if study_uid else []
    values += [("&IMP^Impression^DCM", "TX", line) for line in lines]
    for index, (code, kind_of_value, value) in enumerate(values, 1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1, obx.obx_2, obx.obx_3, obx.obx_11 = str(index), kind_of_value, code, "F"
        field = Field(
            "OBX_5",
            datatype=kind_of_value,
            version=VERSION,
            validation_level=VALIDATION_LEVEL.TOLERANT,
        )
        field.value = datatype_factory(kind_of_value, value, version=VERSION)
        obx.add(field)
    return str(message.to_er7())
