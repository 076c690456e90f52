"""The query index: written in the commit that completes a study (assemble) and in the one that
records a result (encode), never by a request; matched in SQL page by page, then by the
matcher; its rows go with the rows of what they index."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import delete, func, insert, update
from sqlmodel import col, select

from cadnode.core.config import AssembleSettings
from cadnode.core.db import (
    Database,
    HeldAs,
    Instance,
    Job,
    JobState,
    QueryRecord,
    QueryStudy,
    Result,
    ResultObject,
    utcnow,
)
from cadnode.dicom.indexing import Indexer, record_row, study_row
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.encode.stage import Encoder
from cadnode.infer.answers import DetectAnswer, dump_answer
from cadnode.ingest.assemble import Assembler
from cadnode.serve import index
from cadnode.serve.index import Narrowing, QueryIndex
from cadnode.serve.query import PATIENT_ROOT, STUDY_ROOT, Model, checked, find
from tests.encode_cases import DETECTOR, detect_answer, volume
from tests.rows import instance_row, job_of, new_job
from tests.synthetic import write_ct_series


class Node:
    """A database, a spool and a results folder, with the stages that fill the index."""

    def __init__(self, folder: Path) -> None:
        self.spool, self.results = folder / "spool", folder / "results"
        self.spool.mkdir()
        self.database = Database(folder / "cadnode.db")
        self.indexer = Indexer(self.spool, self.results)
        self.index = QueryIndex(self.database, self.spool, self.results)

    def receive(self, paths: list[Path], *, state: JobState = JobState.received) -> int:
        """The files as receive leaves them: in the spool, rows in a job of their study."""
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
        with self.database.session() as session:
            job = new_job(
                session, str(headers[0].StudyInstanceUID), state=state, instance_count=len(paths)
            )
            for path, header in zip(paths, headers, strict=True):
                shutil.copy(path, self.spool / path.name)
                session.add(instance_row(header, path.name, job))
            session.commit()
            assert job.id is not None
            return job.id

    def assemble(self) -> None:
        settings = AssembleSettings(quiet_period_s=0)
        Assembler(self.database, settings, indexer=self.indexer).advance()

    def find(self, model: Model = STUDY_ROOT, **keys: str) -> list[Dataset]:
        identifier = Dataset()
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
        request = checked(identifier, model)
        return [answer for answer, _ in find(request, self.index, "CADNODE")]

    def count(self, model: type[QueryRecord] | type[QueryStudy]) -> int:
        with self.database.session() as session:
            return int(session.exec(select(func.count()).select_from(model)).one())


def ct_study(folder: Path, count: int = 3, seed: int = 1) -> list[Path]:
    return write_ct_series(folder / f"in-{seed}", count, size=16, seed=seed)


def test_a_study_is_found_once_its_job_completes_never_before(tmp_path: Path) -> None:
    node = Node(tmp_path)
    job_id = node.receive(ct_study(tmp_path))
    asked = {
        "QueryRetrieveLevel": "STUDY",
        "PatientID": "SYNTH-INGEST",
        "StudyInstanceUID": "",
        "NumberOfStudyRelatedInstances": "",
    }
    assert node.find(**asked) == []  # a request indexes nothing itself
    assert node.count(QueryRecord) == 0

    node.assemble()

    job = job_of(node.database, job_id)
    assert job.state is JobState.complete and job.indexed_at is not None
    [study] = node.find(**asked)
    assert study.NumberOfStudyRelatedInstances == 3
    assert (node.count(QueryRecord), node.count(QueryStudy)) == (3, 1)


def test_a_completion_refused_writes_no_index_rows(tmp_path: Path) -> None:
    """The rows are in the transition's commit: another worker moving the job first leaves
    none behind."""
    node = Node(tmp_path)
    job_id = node.receive(ct_study(tmp_path))
    assembler = Assembler(node.database, AssembleSettings(quiet_period_s=0), indexer=node.indexer)
    with node.database.session() as session:
        stale = session.get(Job, job_id)
        assert stale is not None
        with node.database.session() as other:
            other.execute(update(Job).where(col(Job.id) == job_id).values(state=JobState.failed))
            other.commit()
        assert assembler._complete(session, stale) is False
    assert (node.count(QueryRecord), node.count(QueryStudy)) == (0, 0)


def test_jobs_released_before_indexing_are_indexed_by_assemble(tmp_path: Path) -> None:
    node = Node(tmp_path)
    job_id = node.receive(ct_study(tmp_path), state=JobState.delivered)
    assert job_of(node.database, job_id).indexed_at is None
    node.assemble()
    assert job_of(node.database, job_id).indexed_at is not None
    [study] = node.find(QueryRetrieveLevel="STUDY", PatientName="synth*", StudyInstanceUID="")
    assert study.PatientName == "Synthetic^Ingest" and node.count(QueryRecord) == 3


def test_a_result_is_found_once_encode_records_it(tmp_path: Path) -> None:
    node = Node(tmp_path)
    source, boxes = volume(node.spool, masses=1)
    with node.database.session() as session:
        job = new_job(session, str(source.StudyInstanceUID), state=JobState.inferred)
        path = next(node.spool.glob("volume-*.dcm"))
        session.add(instance_row(source, path.name, job))
        session.add(_answered(job, source, detect_answer(source, boxes)))
        session.commit()
    Encoder(
        node.database,
        node.spool,
        node.results,
        {},
        answers=tmp_path,
        max_decoded_bytes=DEFAULT_LIMIT,
    ).advance()

    with node.database.session() as session:
        made = session.exec(select(ResultObject)).all()
        records = session.exec(select(QueryRecord)).all()
    assert made and {r.sop_instance_uid for r in records} == {o.sop_instance_uid for o in made}
    assert all(r.held_as is HeldAs.result for r in records)
    study_uid = str(source.StudyInstanceUID)
    [sr] = node.find(
        QueryRetrieveLevel="SERIES", StudyInstanceUID=study_uid, Modality="SR", SeriesInstanceUID=""
    )
    [study] = node.find(QueryRetrieveLevel="STUDY", PatientID="PID-8", ModalitiesInStudy="SR")
    assert study.StudyInstanceUID == study_uid and sr.Modality == "SR"


def _answered(job: Job, source: Dataset, answer: DetectAnswer) -> Result:
    assert job.id is not None
    return Result(
        job_id=job.id,
        engine=DETECTOR.name,
        engine_version=DETECTOR.version,
        model_sha256=DETECTOR.sha256,
        sop_instance_uid=str(source.SOPInstanceUID),
        answer=dump_answer(answer),
    )


def test_index_rows_go_with_their_objects(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.receive(ct_study(tmp_path))
    node.assemble()
    with node.database.session() as session:
        first = session.exec(select(Instance).order_by(col(Instance.sop_instance_uid))).first()
        assert first is not None
        session.execute(
            update(Instance)
            .where(col(Instance.sop_instance_uid) == first.sop_instance_uid)
            .values(missing_since=utcnow())
        )
        session.commit()
    # A file gone is neither listed nor counted.
    [study] = node.find(
        QueryRetrieveLevel="STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances=""
    )
    assert study.NumberOfStudyRelatedInstances == 2
    assert len(node.index.held(Narrowing(study_uids=[study.StudyInstanceUID]))) == 2
    with node.database.session() as session:
        session.execute(
            delete(Instance).where(col(Instance.sop_instance_uid) == first.sop_instance_uid)
        )
        session.commit()
        assert (node.count(QueryRecord), node.count(QueryStudy)) == (2, 1)
        session.execute(delete(Instance))
        session.commit()
    assert (node.count(QueryRecord), node.count(QueryStudy)) == (0, 0)


def test_study_and_patient_queries_page_through_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More studies than two SQL pages: every match, in order; keys with a column matched in
    SQL, the others (and the computed ones) by the matcher."""
    monkeypatch.setattr(index, "PAGE", 40)
    node = Node(tmp_path)
    studies = 97
    with node.database.session() as session:
        records, rows = [], []
        for number in range(studies):
            ds = Dataset()
            ds.PatientID = f"P{number % 30:04d}"
            ds.PatientName = "Smith^Ann" if number % 3 == 0 else "Jones^Bo"
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.99.{number + 1000}"
            ds.SeriesInstanceUID = f"{ds.StudyInstanceUID}.1"
            ds.Modality = "CT" if number % 2 else "MR"
            ds.StudyDescription = f"study {number}"
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
            uid = f"{ds.SeriesInstanceUID}.1"
            record = record_row(HeldAs.result, uid, f"{uid}.dcm", ds)
            records.append(record)
            rows.append(study_row(str(ds.StudyInstanceUID), record["attributes"]))
        session.execute(insert(QueryRecord), records)
        session.execute(insert(QueryStudy), rows)
        session.commit()

    every = node.find(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="*")
    assert len(every) == studies
    assert [s.StudyInstanceUID for s in every] == sorted(s.StudyInstanceUID for s in every)
    smiths = node.find(QueryRetrieveLevel="STUDY", PatientName="SMITH*", ModalitiesInStudy="CT")
    assert len(smiths) == sum(1 for n in range(studies) if n % 3 == 0 and n % 2)
    either = node.find(QueryRetrieveLevel="STUDY", ModalitiesInStudy="CT\\MR", StudyID="")
    assert len(either) == studies
    described = node.find(QueryRetrieveLevel="STUDY", StudyDescription="study 1?")
    assert len(described) == 10
    patients = node.find(
        PATIENT_ROOT,
        QueryRetrieveLevel="PATIENT",
        PatientID="P000*",
        NumberOfPatientRelatedStudies="",
    )
    assert [p.PatientID for p in patients] == [f"P{n:04d}" for n in range(10)]
    assert [p.NumberOfPatientRelatedStudies for p in patients] == [4] * 7 + [3] * 3
