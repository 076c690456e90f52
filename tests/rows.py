"""Database rows as the stages leave them, for the tests: a study's next job, an image's
Instance row, and a job or its results read back."""

from __future__ import annotations

from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlmodel import Session, select

from cadnode.core.db import Database, Instance, Job, Result, Study


def new_job(session: Session, study_uid: str, **fields: Any) -> Job:
    """The study's next job version (the study is added if new), with `fields` (state,
    pipeline, ...); flushed, so its id is set."""
    study = session.exec(select(Study).where(Study.study_uid == study_uid)).first()
    if study is None:
        study = Study(study_uid=study_uid)
        session.add(study)
        session.flush()
    assert study.id is not None
    versions = session.exec(select(Job).where(Job.study_id == study.id)).all()
    job = Job(study_id=study.id, version=len(versions) + 1, **fields)
    session.add(job)
    session.flush()
    return job


def instance_row(ds: Dataset, path: str, job: Job, **arrival: Any) -> Instance:
    """The row receive writes for `ds` stored at `path` (relative to the spool) in `job`;
    `arrival` overrides its size, calling_ae, called_ae, peer or transfer_syntax."""
    assert job.id is not None
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) or ExplicitVRLittleEndian
    return Instance(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_uid=str(ds.SeriesInstanceUID),
        path=path,
        job_id=job.id,
        **{
            "transfer_syntax": str(syntax),
            "size": 1,
            "calling_ae": "MODALITY",
            "peer": "127.0.0.1:1",
            **arrival,
        },
    )


def job_of(database: Database, job_id: int) -> Job:
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def results_of(database: Database, job_id: int) -> list[Result]:
    with database.session() as session:
        return list(session.exec(select(Result).where(Result.job_id == job_id)).all())
