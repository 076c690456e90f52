"""Encode: write each inferred job's results as DICOM objects and queue their deliveries.

One SR per (job version, engine). Its UIDs derive from the study, the job version and the
engine version, so re-encoding the same job makes the same object, never a duplicate.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from cadnode.config import Destination
from cadnode.db import (
    Database,
    Delivery,
    Instance,
    Job,
    JobState,
    Result,
    ResultObject,
    Study,
)
from cadnode.encode.sr import Algorithm, Classification, CodedLabel, classification_report
from cadnode.files import write_durably


class Encoder:
    name = "encode"

    def __init__(
        self, database: Database, spool: Path, results: Path, destinations: list[Destination]
    ) -> None:
        self.database = database
        self.spool = spool
        self.results = results
        self.destinations = destinations

    def advance(self) -> float | None:
        with self.database.session() as session:
            for job in self.database.jobs_in(session, JobState.inferred):
                try:
                    self._encode(session, job)
                except Exception as error:  # a result that cannot be encoded fails its job
                    session.rollback()
                    self.database.transition(
                        session,
                        job,
                        JobState.failed,
                        expect=JobState.inferred,
                        reason=f"encoding failed: {type(error).__name__}: {error}",
                    )
        return None

    def _encode(self, session: Session, job: Job) -> None:
        study = session.get(Study, job.study_id)
        assert study is not None and job.id is not None
        by_engine: dict[tuple[str, str, str], list[Result]] = defaultdict(list)
        for result in session.exec(select(Result).where(Result.job_id == job.id)):
            by_engine[(result.engine, result.engine_version, result.model_sha256)].append(result)
        for (engine, version, sha256), results in by_engine.items():
            algorithm = Algorithm(name=engine, version=version, sha256=sha256)
            key = [study.study_uid, str(job.version), engine, version]
            report = classification_report(
                [self._classification(session, r) for r in results],
                algorithm,
                series_instance_uid=generate_uid(entropy_srcs=[*key, "series"]),
                sop_instance_uid=generate_uid(entropy_srcs=[*key, "sr"]),
                # The inference time, not now: re-encoding the same job gives the same bytes.
                content_datetime=min(r.created_at for r in results),
            )
            self._keep(session, job, engine, report)
        self.database.transition(session, job, JobState.encoded, expect=JobState.inferred)

    def _classification(self, session: Session, result: Result) -> Classification:
        instance = session.get(Instance, result.sop_instance_uid)
        assert instance is not None
        answer = result.answer
        point = answer["operating_points"]["rule_out"]
        return Classification(
            source=dcmread(self.spool / instance.path, stop_before_pixels=True),
            label=CodedLabel(**answer["label"]["code"]),
            probability=float(answer["probability"]),
            operating_point="rule_out",
            threshold=float(point["threshold"]),
            ruled_out=bool(answer["ruled_out"]),
        )

    def _keep(self, session: Session, job: Job, engine: str, report: Dataset) -> None:
        """Store the object durably, then record it and its deliveries in one commit."""
        assert job.id is not None
        uid = str(report.SOPInstanceUID)
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        relative = Path(str(report.StudyInstanceUID)) / f"{uid}.dcm"
        write_durably(self.results / relative, [buffer.getvalue()])
        if session.get(ResultObject, uid) is None:
            session.add(
                ResultObject(
                    sop_instance_uid=uid,
                    job_id=job.id,
                    engine=engine,
                    modality="SR",
                    path=str(relative),
                )
            )
            session.flush()  # the deliveries' foreign key needs the object row first
            for destination in self.destinations:
                session.add(Delivery(object_uid=uid, job_id=job.id, destination=str(destination)))
        session.flush()
