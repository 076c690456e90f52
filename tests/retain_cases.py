"""Studies as the stages leave them, with their files, for the housekeeping tests: a finished
study (images in the spool, an engine answer with its mask, a result object, its delivery
and its priority decision) that each test then bends (an unsent delivery, a pin, ...)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import generate_uid
from sqlmodel import Session, select

from cadnode.core.config import RetentionSettings, StorageSettings
from cadnode.core.db import (
    Database,
    Delivery,
    DeliveryState,
    HeldAs,
    Instance,
    Job,
    JobState,
    Priority,
    QueryRecord,
    Removal,
    Result,
    ResultObject,
    Study,
    StudyPriority,
    utcnow,
)
from tests.rows import new_job

LONG_AGO = dt.timedelta(days=400)


@dataclass
class Made:
    """One study made by `finished_study`, and where its files are."""

    study_uid: str
    job_id: int
    instances: list[str] = field(default_factory=list)  # spool paths, relative
    results: list[str] = field(default_factory=list)  # results paths, relative
    masks: list[str] = field(default_factory=list)  # answers paths, relative


def storage_in(folder: Path) -> StorageSettings:
    return StorageSettings(data_dir=folder)


def hour_policy(**overrides: object) -> RetentionSettings:
    """Every kind kept an hour (anything `LONG_AGO` goes, a study just made stays however
    slow the machine), the disk mark off."""
    ages: dict[str, object] = {k: "1h" for k in ("images", "results", "answers", "jobs", "audit")}
    return RetentionSettings.model_validate(
        {**ages, "high_water_percent": 100, "low_water_percent": 90, **overrides}
    )


def finished_study(
    database: Database,
    storage: StorageSettings,
    *,
    ago: dt.timedelta = LONG_AGO,
    state: JobState = JobState.delivered,
    delivery: DeliveryState | None = DeliveryState.sent,
    images: int = 2,
    image_bytes: int = 1000,
    prioritized: bool = True,
) -> Made:
    """A study whose one job version ended `ago`, with every file its rows name."""
    study_uid, series_uid = generate_uid(), generate_uid()
    with database.session() as session:
        job = new_job(session, study_uid, state=state, updated_at=utcnow() - ago)
        assert job.id is not None
        made = Made(study_uid, job.id)
        for _ in range(images):
            made.instances.append(_image(session, storage, job, series_uid, image_bytes))
        made.masks.append(_answer(session, storage, job))
        made.results.append(_result(session, storage, job, delivery))
        if prioritized:
            session.add(
                StudyPriority(
                    study_id=job.study_id, job_id=job.id, level=Priority.LOW, reason="test"
                )
            )
        session.commit()
    return made


def _image(session: Session, storage: StorageSettings, job: Job, series_uid: str, size: int) -> str:
    uid = generate_uid()
    study_uid = _study_uid(session, job)
    relative = f"{study_uid}/{series_uid}/{uid}.dcm"
    _write(storage.spool / relative, size)
    session.add(
        Instance(
            sop_instance_uid=uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            series_uid=series_uid,
            transfer_syntax="1.2.840.10008.1.2.1",
            path=relative,
            size=size,
            calling_ae="MODALITY",
            peer="127.0.0.1:1",
            job_id=_id(job),
        )
    )
    session.flush()
    session.add(_record(HeldAs.instance, uid, relative, study_uid, series_uid))
    return relative


def _answer(session: Session, storage: StorageSettings, job: Job) -> str:
    relative = f"{_study_uid(session, job)}/{job.id}/segmenter/{generate_uid()}.npz"
    _write(storage.answers / relative, 300)
    answer = {"task": "segment", "mask_file": relative}
    session.add(
        Result(
            job_id=_id(job),
            engine="segmenter",
            engine_version="1",
            model_sha256="0" * 64,
            sop_instance_uid=generate_uid(),
            answer=answer,
        )
    )
    return relative


def _result(
    session: Session, storage: StorageSettings, job: Job, delivery: DeliveryState | None
) -> str:
    assert job.id is not None
    uid, study_uid = generate_uid(), _study_uid(session, job)
    relative = f"{study_uid}/{uid}.dcm"
    _write(storage.results / relative, 200)
    session.add(
        ResultObject(
            sop_instance_uid=uid, job_id=job.id, engine="segmenter", modality="SR", path=relative
        )
    )
    session.flush()
    session.add(_record(HeldAs.result, uid, relative, study_uid, generate_uid()))
    if delivery is not None:
        session.add(Delivery(object_uid=uid, job_id=job.id, destination="pacs", state=delivery))
    return relative


def _record(held_as: HeldAs, uid: str, path: str, study_uid: str, series: str) -> QueryRecord:
    return QueryRecord(
        sop_instance_uid=uid,
        held_as=held_as,
        path=path,
        patient_id="PID",
        study_uid=study_uid,
        series_uid=series,
        modality="CT",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax="1.2.840.10008.1.2.1",
    )


def _id(job: Job) -> int:
    assert job.id is not None
    return job.id


def _study_uid(session: Session, job: Job) -> str:
    study = session.get(Study, job.study_id)
    assert study is not None
    return study.study_uid


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def rows_and_files_agree(database: Database, storage: StorageSettings) -> None:
    """Every row's file is there, every file has its row, nothing is left in the journal."""
    with database.session() as session:
        spool_rows = set(session.exec(select(Instance.path)).all())
        result_rows = set(session.exec(select(ResultObject.path)).all())
        masks = {str(r.answer["mask_file"]) for r in session.exec(select(Result)).all()}
        journal = session.exec(select(Removal)).all()
        records = set(session.exec(select(QueryRecord.sop_instance_uid)).all())
        held = set(session.exec(select(Instance.sop_instance_uid)).all()) | set(
            session.exec(select(ResultObject.sop_instance_uid)).all()
        )
    assert journal == []
    assert files_under(storage.spool) == spool_rows
    assert files_under(storage.results) == result_rows
    assert files_under(storage.answers) == masks
    assert records <= held  # nothing gone is still indexed for C-FIND
