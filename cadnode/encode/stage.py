"""Encode: write each inferred job's results as DICOM objects and queue their deliveries.

Per (job version, engine), by the engine's task kind:

- classify: one TID 1500 SR;
- segment: one SEG per source image, then one SR whose measurements reference the SEGs;
- detect: one SR with the findings as image regions.

Destinations that ask for them also get: a Secondary Capture per source image with the
findings drawn over it (`secondary_capture: true`), a Grayscale Softcopy Presentation State
drawing them as graphic annotations over the untouched source (`presentation_state: true`),
and a LABELMAP SEG beside each binary SEG (`labelmap_segmentation: true`); the others never
see those objects.

Each result series has its own Series Number within the study (900 upward, past the source
series' numbers), kept in `ResultSeries` so re-encoding writes the same number; overlays
(Secondary Captures) get one series per source series.

UIDs derive from the study (its UID and when its row was made), the job version, the
engine and its version (and, per object kind, the source image), and each object's time is
when the engine answered, so re-encoding the same job makes the same bytes under the same
UIDs, never a duplicate. Any object that cannot be built fails the whole job, with the reason.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlmodel import Session, col, select

from cadnode.core.claims import worker_for
from cadnode.core.config import AnyDestination, ResultOptions
from cadnode.core.db import (
    Database,
    FailureKind,
    Instance,
    Job,
    JobState,
    Result,
    ResultObject,
    ResultSeries,
    Study,
)
from cadnode.core.files import write_durably
from cadnode.deliver.outbox import queue_delivery
from cadnode.dicom.indexing import index_result
from cadnode.encode.overlay import BoxSpec
from cadnode.encode.pr import (
    Annotated,
    classification_marks,
    detection_marks,
    presentation_groups,
    presentation_state,
    segmentation_marks,
)
from cadnode.encode.provenance import Algorithm, CodedLabel
from cadnode.encode.sc import secondary_capture
from cadnode.encode.seg import segmentation
from cadnode.encode.sr import (
    Classification,
    Detection,
    ReportIdentity,
    Segmented,
    classification_report,
    detection_report,
    segmentation_report,
    warm_up,
)
from cadnode.infer.answers import (
    RULE_OUT,
    Answer,
    ClassifyAnswer,
    DetectAnswer,
    SegmentAnswer,
    load_masks,
    parse_answer,
    summary,
)


def _every(destination: ResultOptions) -> bool:
    return True


def _wants_captures(destination: ResultOptions) -> bool:
    return destination.secondary_capture


def _wants_labelmaps(destination: ResultOptions) -> bool:
    return destination.labelmap_segmentation


def _wants_presentation_states(destination: ResultOptions) -> bool:
    return destination.presentation_state


# Part of every result UID: raised whenever what the builders write for the same answer
# changes, so an object re-encoded by a newer release is a new object, never a different
# one under an old UID.
RESULTS_FORMAT = "results-format-3"  # 3: a film SEG carries shared Pixel Measures


@dataclass(frozen=True)
class _Made:
    """An object built for a job, and which destinations get it."""

    dataset: Dataset
    wanted_by: Callable[[ResultOptions], bool] = _every


@dataclass(frozen=True)
class _Answered:
    """One source image's answer, with its header (pixels read when an object needs them)."""

    source: Dataset
    answer: Answer


class Encoder:
    name = "encode"

    def __init__(
        self,
        database: Database,
        spool: Path,
        results: Path,
        destinations: Mapping[str, AnyDestination],
        *,
        answers: Path,
        max_decoded_bytes: int,
    ) -> None:
        self.database = database
        self.max_decoded_bytes = max_decoded_bytes
        self.spool = spool
        self.results = results
        self.answers = answers  # mask files (cadnode.infer.answers.save_masks)
        warm_up()  # the first study does not wait for highdicom to read its tables
        self.destinations = dict(destinations)  # by name: each delivery row names its own
        self.worker = worker_for(database)  # claims each job before encoding it

    @property
    def wants_captures(self) -> bool:
        return any(_wants_captures(destination) for destination in self.destinations.values())

    @property
    def wants_presentation_states(self) -> bool:
        return any(map(_wants_presentation_states, self.destinations.values()))

    @property
    def wants_labelmaps(self) -> bool:
        return any(_wants_labelmaps(destination) for destination in self.destinations.values())

    def advance(self) -> float | None:
        with self.database.session() as session:
            # One job claimed at a time: encoding is CPU-bound, and other workers share a burst.
            while claimed := self.worker.claim(
                session, Job, col(Job.state) == JobState.inferred, limit=1
            ):
                job = claimed[0]
                try:
                    self._encode(session, job)
                except Exception as error:  # a result that cannot be encoded fails its job
                    session.rollback()
                    self.worker.transition(
                        session,
                        job,
                        JobState.failed,
                        expect=JobState.inferred,
                        reason=f"encoding failed: {type(error).__name__}: {error}",
                        failure=FailureKind.encoding,
                    )
        return None

    def _encode(self, session: Session, job: Job) -> None:
        study = session.get(Study, job.study_id)
        assert study is not None and job.id is not None
        by_engine: dict[tuple[str, str, str], list[Result]] = defaultdict(list)
        # A shadow version's answers are never encoded (cadnode/infer/releases.py).
        live = select(Result).where(Result.job_id == job.id, col(Result.shadow).is_(False))
        for result in session.exec(live):
            by_engine[(result.engine, result.engine_version, result.model_sha256)].append(result)
        answered = {result.id: self._answered(session, result) for result in results_of(by_engine)}
        numbers = _SeriesNumbers(session, study.study_uid, answered.values())
        for (engine, version, sha256), results in by_engine.items():
            objects = _Objects(
                Algorithm(name=engine, version=version, sha256=sha256),
                key=(study.study_uid, _made_at(study), str(job.version), engine, version),
                # The inference time, not now: re-encoding the same job gives the same bytes.
                when=min(r.created_at for r in results),
                answers_dir=self.answers,
                captures=self.wants_captures,
                labelmaps=self.wants_labelmaps,
                presentations=self.wants_presentation_states,
                max_decoded_bytes=self.max_decoded_bytes,
                series_number=numbers,
            )
            for made in objects.build([answered[result.id] for result in results]):
                self._keep(session, job, engine, made)
        self.worker.transition(session, job, JobState.encoded, expect=JobState.inferred)

    def _answered(self, session: Session, result: Result) -> _Answered:
        instance = session.get(Instance, result.sop_instance_uid)
        assert instance is not None
        answer = parse_answer(result.answer)
        # SEG and SR need the header only; drawing a Secondary Capture needs the pixels.
        header_only = not self.wants_captures
        source = dcmread(self.spool / instance.path, stop_before_pixels=header_only)
        return _Answered(source, answer)

    def _keep(self, session: Session, job: Job, engine: str, made: _Made) -> None:
        """Store the object durably, then record it and its deliveries in one commit."""
        assert job.id is not None
        dataset = made.dataset
        uid = str(dataset.SOPInstanceUID)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        relative = Path(str(dataset.StudyInstanceUID)) / f"{uid}.dcm"
        write_durably(self.results / relative, [buffer.getvalue()])
        if session.get(ResultObject, uid) is None:
            session.add(
                ResultObject(
                    sop_instance_uid=uid,
                    job_id=job.id,
                    engine=engine,
                    modality=str(dataset.Modality),
                    path=str(relative),
                )
            )
            session.flush()  # the deliveries' foreign key needs the object row first
            for name, destination in self.destinations.items():
                if made.wanted_by(destination):
                    queue_delivery(session, job.id, uid, name)
            index_result(session, uid, str(relative), buffer.getvalue())  # queryable at once
        session.flush()


def _made_at(study: Study) -> str:
    """When the study's row was made: part of its results' UIDs, so a study received again
    after retention removed its rows (its jobs numbered from 1 again) gets new objects, never
    other bytes under the UIDs its first results had."""
    return study.created_at.replace(tzinfo=None).isoformat()


def results_of(by_engine: dict[tuple[str, str, str], list[Result]]) -> Iterator[Result]:
    return itertools.chain.from_iterable(by_engine.values())


class _SeriesNumbers:
    """Hands out a study's result Series Numbers: from 900 upward, never one that a source
    series of the job or another result series of the study holds; a series numbered once
    keeps its number."""

    FIRST = 900

    def __init__(self, session: Session, study_uid: str, sources: Iterable[_Answered]) -> None:
        self.session = session
        self.study_uid = study_uid
        self.taken = {_number(item.source.get("SeriesNumber")) for item in sources}

    def __call__(self, series_uid: str) -> int:
        known = self.session.get(ResultSeries, series_uid)
        if known is not None:
            return known.number
        held = select(ResultSeries.number).where(ResultSeries.study_uid == self.study_uid)
        used = self.taken | set(self.session.exec(held))
        number = next(n for n in itertools.count(self.FIRST) if n not in used)
        self.session.add(
            ResultSeries(series_uid=series_uid, study_uid=self.study_uid, number=number)
        )
        self.session.flush()
        return number


def _number(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Objects:
    """Builds one engine's objects for one job version, with their derived UIDs."""

    algorithm: Algorithm
    key: tuple[str, ...]  # study UID and row's creation, job version, engine, its version
    when: dt.datetime
    answers_dir: Path
    captures: bool
    labelmaps: bool
    presentations: bool
    max_decoded_bytes: int  # the source's pixels, decoded for a Secondary Capture
    series_number: Callable[[str], int]  # a result series' number in the study

    def uid(self, *parts: str) -> str:
        return generate_uid(entropy_srcs=[*self.key, RESULTS_FORMAT, *parts])

    @property
    def report_identity(self) -> ReportIdentity:
        series = self.uid("series")
        return ReportIdentity(
            series, self.uid("sr"), self.series_number(series), content_datetime=self.when
        )

    def build(self, answered: list[_Answered]) -> Iterator[_Made]:
        kinds = {type(item.answer) for item in answered}
        if len(kinds) != 1:
            tasks = sorted({item.answer.task for item in answered})
            raise ValueError(f"one engine answered with several task kinds: {tasks}")
        kind = kinds.pop()
        if kind is ClassifyAnswer:
            yield from self._classified(answered)
        elif kind is SegmentAnswer:
            yield from self._segmented(answered)
        else:
            yield from self._detected(answered)

    def _classified(self, answered: list[_Answered]) -> Iterator[_Made]:
        classifications, annotated = [], []
        for item in answered:
            answer = item.answer
            assert isinstance(answer, ClassifyAnswer)
            point = answer.rule_out_point
            if point is None:
                raise ValueError(
                    f"the classifier's answer has no {RULE_OUT!r} operating point: its report "
                    "states the rule-out decision"
                )
            classifications.append(
                Classification(
                    source=item.source,
                    label=CodedLabel(**answer.label.code.model_dump()),
                    probability=answer.probability,
                    operating_point=RULE_OUT,
                    threshold=point.threshold,
                    ruled_out=bool(answer.ruled_out),
                    findings=answer.findings,
                    healthy=answer.healthy,
                )
            )
            if self.captures:
                yield self._capture(item, summary=f"{summary(answer)} ({answer.probability:.2f})")
            annotated.append(Annotated(item.source, classification_marks(answer)))
        report = classification_report(classifications, self.algorithm, self.report_identity)
        yield _Made(report)
        yield from self._presentation_states(annotated)

    def _segmented(self, answered: list[_Answered]) -> Iterator[_Made]:
        segmented, annotated = [], []
        for item in answered:
            answer = item.answer
            assert isinstance(answer, SegmentAnswer)
            masks = load_masks(self.answers_dir / answer.mask_file)
            seg = self._segmentation(item, masks, labelmap=False)
            yield _Made(seg)
            if self.labelmaps:
                yield _Made(self._segmentation(item, masks, labelmap=True), _wants_labelmaps)
            segmented.append(Segmented(item.source, answer.findings, seg))
            if self.captures:
                # The frame with the most segmented pixels (a film has one).
                frame = int(np.argmax(masks.sum(axis=(1, 2, 3)))) + 1
                yield self._capture(
                    item, frame=frame, masks=masks[frame - 1], summary=summary(answer)
                )
            annotated.append(Annotated(item.source, segmentation_marks(answer, masks)))
        report = segmentation_report(segmented, self.algorithm, self.report_identity)
        yield _Made(report)
        yield from self._presentation_states(annotated)

    def _segmentation(self, item: _Answered, masks: np.ndarray, *, labelmap: bool) -> Dataset:
        assert isinstance(item.answer, SegmentAnswer)
        kind = "seg-labelmap" if labelmap else "seg"
        series = self.uid(f"{kind}-series")
        return segmentation(
            item.source,
            masks,
            item.answer.findings,
            self.algorithm,
            series_instance_uid=series,
            sop_instance_uid=self.uid(kind, str(item.source.SOPInstanceUID)),
            series_number=self.series_number(series),
            content_datetime=self.when,
            labelmap=labelmap,
        )

    def _detected(self, answered: list[_Answered]) -> Iterator[_Made]:
        detections, annotated = [], []
        for item in answered:
            answer = item.answer
            assert isinstance(answer, DetectAnswer)
            detections.append(Detection(item.source, answer))
            if self.captures:
                frame, boxes = _boxes_on_best_frame(answer)
                yield self._capture(item, frame=frame, boxes=boxes, summary=summary(answer))
            annotated.append(Annotated(item.source, detection_marks(answer)))
        report = detection_report(detections, self.algorithm, self.report_identity)
        yield _Made(report)
        yield from self._presentation_states(annotated)

    def _presentation_states(self, annotated: list[Annotated]) -> Iterator[_Made]:
        """One GSPS per group of source images that can share one (one series, one size
        and display), in the engine's presentation series."""
        if not self.presentations:
            return
        series = self.uid("pr-series")
        for group in presentation_groups(annotated):
            first = str(group[0].source.SOPInstanceUID)
            state = presentation_state(
                group,
                self.algorithm,
                series_instance_uid=series,
                sop_instance_uid=self.uid("pr", first),
                series_number=self.series_number(series),
                content_datetime=self.when,
            )
            yield _Made(state, _wants_presentation_states)

    def _capture(
        self,
        item: _Answered,
        *,
        summary: str,
        frame: int = 1,
        masks: np.ndarray | None = None,
        boxes: Sequence[BoxSpec] = (),
    ) -> _Made:
        # One overlay series per source series: two volumes of a study are two series.
        series = self.uid("sc-series", str(item.source.SeriesInstanceUID))
        sc = secondary_capture(
            item.source,
            self.algorithm,
            series_instance_uid=series,
            sop_instance_uid=self.uid("sc-image", str(item.source.SOPInstanceUID)),
            series_number=self.series_number(series),
            frame=frame,
            masks=masks,
            boxes=boxes,
            summary=summary,
            content_datetime=self.when,
            limit=self.max_decoded_bytes,
        )
        return _Made(sc, _wants_captures)


def _boxes_on_best_frame(answer: DetectAnswer) -> tuple[int, list[BoxSpec]]:
    """The frame of the best finding (the middle frame without one) and the boxes on it."""
    frame = answer.best_frame()
    boxes: list[BoxSpec] = [
        (f.box.x, f.box.y, f.box.width, f.box.height, f"{f.label.name} {f.probability:.2f}")
        for f in answer.findings_on(frame)
    ]
    return frame, boxes
