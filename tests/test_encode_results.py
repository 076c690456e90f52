"""Segmenter and detector reports, Secondary Captures, and the encode stage that makes them.

Every object is checked by dciodvfy and read back by highdicom; the stage test sends all
the kinds it made to a real Orthanc, which must store each one.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlmodel import Session, select

from cadnode.core.config import Destination
from cadnode.core.db import (
    Database,
    Delivery,
    Job,
    JobState,
    Result,
    ResultObject,
)
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.encode.provenance import Algorithm
from cadnode.encode.sc import secondary_capture
from cadnode.encode.sr import (
    PERCENT_OF_HEMITHORAX,
    Detection,
    ReportIdentity,
    detection_report,
)
from cadnode.encode.stage import Encoder
from cadnode.infer.answers import Answer, dump_answer, save_masks
from tests.answer_cases import ruleout_answer
from tests.dicom_validation import assert_valid, assert_valid_labelmap, saved
from tests.encode_cases import (
    DETECTOR,
    SEGMENTER,
    detect_answer,
    film_with_masks,
    segment_answer,
    segment_findings,
    segmented_film,
    volume,
)
from tests.peers import run_orthanc, wait_for
from tests.rows import instance_row, job_of, new_job

WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)


def uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["test-encode-results", *parts])


# The percent of the hemithorax is coded in cadnode's private scheme (declared in the
# report); dciodvfy does not know the designator and says so.
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99CADNODE>"


# --- segmenter SR -------------------------------------------------------------------------


def segmentation_sr(tmp_path: Path, *, pneumothorax: bool) -> tuple[Path, Path, pydicom.Dataset]:
    film, seg, sr = segmented_film(tmp_path, pneumothorax=pneumothorax, uid=uid, when=WHEN)
    return saved(sr, tmp_path / "sr.dcm"), saved(seg, tmp_path / "seg.dcm"), film


@pytest.mark.parametrize("pneumothorax", [True, False], ids=["pneumothorax", "none"])
def test_segmentation_report_references_its_segments(tmp_path: Path, pneumothorax: bool) -> None:
    sr_path, seg_path, film = segmentation_sr(tmp_path, pneumothorax=pneumothorax)
    assert_valid(sr_path, PRIVATE_SCHEME_WARNING)
    seg = pydicom.dcmread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)

    groups = sr.content.get_planar_roi_measurement_groups()
    assert [g.finding_type.meaning for g in groups] == ["Right lung", "Left lung", "Pneumothorax"]
    for number, group in enumerate(groups, start=1):
        reference = group.referenced_segmentation_frame
        assert reference is not None
        [image] = reference[0].ReferencedSOPSequence
        assert image.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        frame = int(image.ReferencedFrameNumber)  # the SEG frame holding this segment
        identification = seg.PerFrameFunctionalGroupsSequence[frame - 1]
        assert identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number
        assert reference[1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
        [area] = group.get_measurements(name=codes.SCT.Area)
        assert area.unit == codes.UCUM.SquareMillimeter
    ptx = groups[2]
    [presence] = ptx.get_qualitative_evaluations()
    assert presence.value == (codes.SCT.Present if pneumothorax else codes.SCT.Absent)
    [percent] = ptx.get_measurements(name=PERCENT_OF_HEMITHORAX)
    assert percent.unit == codes.UCUM.Percent
    assert (percent.value > 5) is pneumothorax
    expected = segment_findings(film, film_with_masks(tmp_path, pneumothorax=pneumothorax)[1])
    assert ptx.get_measurements(name=codes.SCT.Area)[0].value == pytest.approx(
        expected[2].measurements["area_mm2"]
    )
    # The SEG is evidence of the report, next to the film.
    evidence = {item[2] for item in sr.get_evidence()}
    assert evidence == {film.SOPInstanceUID, seg.SOPInstanceUID}
    assert (
        pydicom.dcmread(sr_path).CodingSchemeIdentificationSequence[0].CodingSchemeDesignator
        == "99CADNODE"
    )


# --- detector SR --------------------------------------------------------------------------


def test_detection_report_puts_each_finding_on_its_frame(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=2, seed=6)
    assert len(boxes) == 2
    answer = detect_answer(source, boxes)
    sr = detection_report(
        [Detection(source, answer)],
        DETECTOR,
        ReportIdentity(uid("det-series"), uid("det"), content_datetime=WHEN),
    )
    path = assert_valid(saved(sr, tmp_path / "det.dcm"))
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    for group, finding in zip(groups, answer.findings, strict=True):
        box = finding.box
        assert group.finding_type.value == "129788004"
        region = group.roi
        assert region is not None
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        corners = region.value
        assert corners[0].tolist() == corners[-1].tolist()  # closed
        assert corners.min(axis=0).tolist() == [box.x, box.y]
        assert corners.max(axis=0).tolist() == [box.x + box.width, box.y + box.height]
        image = region.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert int(image.ReferencedFrameNumber) == box.frame
        [probability] = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding.probability)
        [span] = probability.referenced_images
        frames = span.ReferencedSOPSequence[0].ReferencedFrameNumber
        assert [int(f) for f in frames] == list(range(box.first_frame, box.first_frame + box.depth))
        [presence] = group.get_qualitative_evaluations()
        assert presence.value == codes.SCT.Present


def test_a_volume_without_findings_says_absent(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=0)
    sr = detection_report(
        [Detection(source, detect_answer(source, boxes))],
        DETECTOR,
        ReportIdentity(uid("det-series"), uid("det0"), content_datetime=WHEN),
    )
    path = assert_valid(saved(sr, tmp_path / "det0.dcm"))
    content = hd.sr.srread(path).content
    assert content.get_planar_roi_measurement_groups() == []
    [group] = content.get_image_measurement_groups()
    [presence] = group.get_qualitative_evaluations()
    assert (presence.name.value, presence.value) == ("129788004", codes.SCT.Absent)
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID


def test_detection_report_refuses_a_box_outside_the_volume(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=1)
    outside = boxes[0].model_copy(update={"x": 120.0})
    with pytest.raises(ValueError, match="outside"):
        detection_report(
            [Detection(source, detect_answer(source, [outside]))],
            DETECTOR,
            ReportIdentity(uid("s"), uid("i")),
        )


# --- Secondary Capture --------------------------------------------------------------------


def test_secondary_capture_is_marked_derived(tmp_path: Path) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=True)

    def build() -> pydicom.Dataset:
        return secondary_capture(
            film,
            SEGMENTER,
            series_instance_uid=uid("sc-series"),
            sop_instance_uid=uid("sc"),
            masks=masks[0],
            summary="pneumothorax present",
            content_datetime=WHEN,
            limit=DEFAULT_LIMIT,
        )

    path = assert_valid(saved(build(), tmp_path / "sc.dcm"))
    assert saved(build(), tmp_path / "again.dcm").read_bytes() == path.read_bytes()
    sc = pydicom.dcmread(path)
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
    assert "not for primary diagnosis" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    assert (sc.StudyInstanceUID, sc.PatientID) == (film.StudyInstanceUID, film.PatientID)
    rgb = sc.pixel_array
    grey = rgb[..., 0] == rgb[..., 1]
    assert not grey[masks[0, 2]].all()  # the pneumothorax is coloured
    assert rgb[:4].max() > 200  # the caption band carries white text


def test_secondary_capture_of_a_volume_frame(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=1)
    box = boxes[0]
    sc = secondary_capture(
        source,
        DETECTOR,
        series_instance_uid=uid("sc-series"),
        sop_instance_uid=uid("scv"),
        frame=box.frame,
        boxes=[(box.x, box.y, box.width, box.height, "mass 0.90")],
        content_datetime=WHEN,
        limit=DEFAULT_LIMIT,
    )
    path = assert_valid(saved(sc, tmp_path / "scv.dcm"))
    read = pydicom.dcmread(path)
    assert int(read.SourceImageSequence[0].ReferencedFrameNumber) == box.frame
    assert read.PatientOrientation == ["L", "P"]


# --- the encode stage ---------------------------------------------------------------------


def prepare_job(database: Database, spool: Path, answers: Path) -> int:
    """An inferred job of one study: a film segmented (with pneumothorax) and a second film
    without; a DBT volume of the same patient goes through the detector in its own study."""
    film, masks = film_with_masks(spool, pneumothorax=True)
    second, second_masks = film_with_masks(
        spool, pneumothorax=False, seed=4, study_uid=film.StudyInstanceUID
    )
    with database.session() as session:
        job = new_job(session, film.StudyInstanceUID, state=JobState.inferred)
        for index, (source, source_masks) in enumerate(((film, masks), (second, second_masks))):
            mask_file = f"{job.id}/{index}.npz"
            save_masks(answers / mask_file, source_masks)
            answer = segment_answer(source, source_masks, mask_file)
            add_answered(session, spool, job, source, SEGMENTER, answer)
        session.commit()
        assert job.id is not None
        return job.id


def prepare_detection_job(database: Database, spool: Path) -> int:
    source, boxes = volume(spool, masses=1)
    with database.session() as session:
        job = new_job(session, source.StudyInstanceUID, state=JobState.inferred)
        add_answered(session, spool, job, source, DETECTOR, detect_answer(source, boxes))
        session.commit()
        assert job.id is not None
        return job.id


def add_answered(
    session: Session,
    spool: Path,
    job: Job,
    source: pydicom.Dataset,
    engine: Algorithm,
    answer: Answer,
) -> None:
    """`source` (a file in `spool`) in `job`, with `engine`'s answer about it."""
    path = next(
        p
        for p in spool.glob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == source.SOPInstanceUID
    )
    session.add(instance_row(source, path.name, job, size=path.stat().st_size))
    add_result(session, job, source, engine, answer)


def test_encoder_makes_every_kind_and_orthanc_stores_them(tmp_path: Path) -> None:
    spool, results, answers = tmp_path / "spool", tmp_path / "results", tmp_path / "answers"
    spool.mkdir()
    database = Database(tmp_path / "cadnode.db")
    pacs = Destination(ae_title="PACS", host="127.0.0.1", port=11112)
    old_pacs = Destination(ae_title="OLDPACS", host="127.0.0.1", port=11113, secondary_capture=True)
    viewer = Destination(
        ae_title="VIEWER",
        host="127.0.0.1",
        port=11114,
        presentation_state=True,
        labelmap_segmentation=True,
    )
    segmented_job = prepare_job(database, spool, answers)
    detected_job = prepare_detection_job(database, spool)
    encoder = Encoder(
        database,
        spool,
        results,
        {"pacs": pacs, "old": old_pacs, "viewer": viewer},
        answers=answers,
        max_decoded_bytes=DEFAULT_LIMIT,
    )
    encoder.advance()

    for job_id in (segmented_job, detected_job):
        job = job_of(database, job_id)
        assert (job.state, job.reason) == (JobState.encoded, None)
    with database.session() as session:
        objects = session.exec(select(ResultObject)).all()
        deliveries = session.exec(select(Delivery)).all()
    kinds = sorted((o.job_id, o.modality) for o in objects)
    assert kinds == sorted(
        [(segmented_job, "SEG")] * 4  # binary and labelmap, per film
        + [(segmented_job, "SR")]
        + [(segmented_job, "PR")] * 2  # the films are of two series: a GSPS each
        + [(segmented_job, "OT")] * 2
        + [(detected_job, "SR"), (detected_job, "OT"), (detected_job, "PR")]
    )
    by_uid = {o.sop_instance_uid: o for o in objects}
    labelmaps = {
        u
        for u, o in by_uid.items()
        if o.modality == "SEG" and pydicom.dcmread(results / o.path).SegmentationType == "LABELMAP"
    }
    assert len(labelmaps) == 2
    sent = {
        name: {d.object_uid for d in deliveries if d.destination == name}
        for name in ("pacs", "old", "viewer")
    }
    everyone = {u for u, o in by_uid.items() if o.modality in ("SR", "SEG")} - labelmaps
    # Each destination gets what every destination gets and what it asked for, no more.
    assert sent["pacs"] == everyone
    assert sent["old"] == everyone | {u for u, o in by_uid.items() if o.modality == "OT"}
    assert sent["viewer"] == everyone | labelmaps | {
        u for u, o in by_uid.items() if o.modality == "PR"
    }

    paths = {u: results / o.path for u, o in by_uid.items()}
    for u, path in paths.items():
        if u in labelmaps:
            assert_valid_labelmap(path)
        else:
            assert_valid(path, PRIVATE_SCHEME_WARNING)
    # The report references both SEGs, each derived from its film.
    [sr_object] = [o for o in objects if o.job_id == segmented_job and o.modality == "SR"]
    report = hd.sr.srread(results / sr_object.path)
    seg_uids = {u for u, o in by_uid.items() if o.modality == "SEG"} - labelmaps
    assert seg_uids <= {item[2] for item in report.get_evidence()}
    assert len(report.content.get_planar_roi_measurement_groups()) == 6

    # Same job again (a crash before the transition): the same objects, byte for byte.
    before = {u: p.read_bytes() for u, p in paths.items()}
    with database.session() as session:
        for job_id in (segmented_job, detected_job):
            job = session.get(Job, job_id)
            assert job is not None
            job.state = JobState.inferred
            session.add(job)
        session.commit()
    encoder.advance()
    with database.session() as session:
        assert len(session.exec(select(ResultObject)).all()) == len(objects)
        assert len(session.exec(select(Delivery)).all()) == len(deliveries)
    assert {u: p.read_bytes() for u, p in paths.items()} == before

    # Orthanc 1.10's DICOM stack predates Label Map Segmentation Storage (Sup 243, 2024): it
    # stores the labelmaps only as an unknown SOP class (why they go only to who asks).
    with run_orthanc(tmp_path / "orthanc", extra={"UnknownSopClassAccepted": True}) as orthanc:
        statuses = c_store(orthanc.dicom_port, orthanc.ae_title, list(paths.values()))
        assert statuses == [0x0000] * len(paths)
        wait_for(lambda: len(orthanc.instances()) == len(paths), 60, "Orthanc to store all")
        tags = {i: orthanc.instance_tags(i) for i in orthanc.instances()}
        # What Orthanc's viewer shows of the pictures among them: each previews as a PNG.
        previews = [
            orthanc.get(f"/instances/{i}/preview") for i, t in tags.items() if t["Modality"] == "OT"
        ]
    assert {t["SOPInstanceUID"] for t in tags.values()} == set(paths)
    assert len(previews) == 3 and all(p.startswith(b"\x89PNG") for p in previews)


def c_store(port: int, ae_title: str, paths: list[Path]) -> list[int]:
    """C-STORE each file as pynetdicom (like dispatch) does: DCMTK's storescu proposes no
    Segmentation Storage context. Returns each status."""
    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title="CADNODE")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_a_mask_file_gone_fails_the_job_with_its_reason(tmp_path: Path) -> None:
    spool, answers = tmp_path / "spool", tmp_path / "answers"
    spool.mkdir()
    database = Database(tmp_path / "cadnode.db")
    job_id = prepare_job(database, spool, answers)
    for mask_file in answers.rglob("*.npz"):
        mask_file.unlink()
    Encoder(
        database, spool, tmp_path / "results", {}, answers=answers, max_decoded_bytes=DEFAULT_LIMIT
    ).advance()
    job = job_of(database, job_id)
    assert job.state is JobState.failed
    assert job.reason is not None and "encoding failed" in job.reason
    assert "npz" in job.reason
    with database.session() as session:
        assert session.exec(select(ResultObject)).all() == []


def test_masks_fit_the_film(tmp_path: Path) -> None:
    """The hand-built masks are the phantom's own (a check of the test data itself)."""
    film, masks = film_with_masks(tmp_path, pneumothorax=True)
    assert masks.shape == (1, 3, int(film.Rows), int(film.Columns))
    assert not np.any(masks[0, 0] & masks[0, 2])


RULEOUT = Algorithm(name="cxr-ruleout", version="0.1.0", sha256="ef" * 32)


def test_result_series_are_numbered_apart_dated_and_overlaid_per_source_series(
    tmp_path: Path,
) -> None:
    """Both chest engines on one film, and two DBT volumes (two series) of one study: every
    result series of a study has its own number (none a source series' number), a Series
    Date/Time, and each source series its own overlay series."""
    spool, results, answers = tmp_path / "spool", tmp_path / "results", tmp_path / "answers"
    spool.mkdir()
    database = Database(tmp_path / "cadnode.db")
    film, masks = film_with_masks(spool, pneumothorax=True)
    first, first_boxes = volume(spool, masses=1, seed=5)
    second_path = spool / "second-volume.dcm"
    second, second_boxes = volume(spool, masses=1, seed=6)
    second.StudyInstanceUID = first.StudyInstanceUID
    second.SeriesInstanceUID = uid("second volume series")
    second.SeriesNumber = 2
    second.save_as(second_path)
    next(p for p in spool.glob("volume-6-*.dcm")).unlink()
    with database.session() as session:
        chest = new_job(session, film.StudyInstanceUID, state=JobState.inferred)
        mask_file = f"{chest.id}/0.npz"
        save_masks(answers / mask_file, masks)
        add_answered(session, spool, chest, film, SEGMENTER, segment_answer(film, masks, mask_file))
        add_result(session, chest, film, RULEOUT, ruleout_answer(0.9))
        breast = new_job(session, first.StudyInstanceUID, state=JobState.inferred)
        add_answered(session, spool, breast, first, DETECTOR, detect_answer(first, first_boxes))
        add_answered(session, spool, breast, second, DETECTOR, detect_answer(second, second_boxes))
        session.commit()
    captures = Destination(ae_title="OLDPACS", host="127.0.0.1", port=11113, secondary_capture=True)
    Encoder(
        database,
        spool,
        results,
        {"old": captures},
        answers=answers,
        max_decoded_bytes=DEFAULT_LIMIT,
    ).advance()

    with database.session() as session:
        made = [pydicom.dcmread(results / o.path) for o in session.exec(select(ResultObject))]
    for study, sources in (
        (film.StudyInstanceUID, [film]),
        (first.StudyInstanceUID, [first, second]),
    ):
        numbers: dict[str, int] = {}
        for ds in (ds for ds in made if ds.StudyInstanceUID == study):
            assert numbers.setdefault(ds.SeriesInstanceUID, ds.SeriesNumber) == ds.SeriesNumber
            assert ds.SeriesDate == WHEN.strftime("%Y%m%d")
            assert ds.SeriesTime.startswith(WHEN.strftime("%H%M%S"))
        assert len(set(numbers.values())) == len(numbers)
        assert not set(numbers.values()) & {int(s.SeriesNumber) for s in sources}
    chest_series = {
        ds.SeriesInstanceUID for ds in made if ds.StudyInstanceUID == film.StudyInstanceUID
    }
    assert len(chest_series) == 5  # each engine its SR and overlay series, the segmenter a SEG
    overlays = [
        ds for ds in made if ds.Modality == "OT" and ds.StudyInstanceUID == first.StudyInstanceUID
    ]
    assert len({ds.SeriesInstanceUID for ds in overlays}) == 2


def add_result(
    session: Session, job: Job, source: pydicom.Dataset, engine: Algorithm, answer: Answer
) -> None:
    """`engine`'s answer about `source`, an instance of `job`."""
    session.add(
        Result(
            job_id=job.id,
            engine=engine.name,
            engine_version=engine.version,
            model_sha256=engine.sha256,
            sop_instance_uid=source.SOPInstanceUID,
            answer=dump_answer(answer),
            created_at=WHEN.replace(tzinfo=dt.UTC),
        )
    )


def test_a_study_recorded_again_gets_new_result_uids(tmp_path: Path) -> None:
    """The same study and answers, recorded afresh (as after retention removed its rows, its
    job numbered 1 again): new UIDs, never other bytes under the first results' UIDs."""
    made = []
    for attempt in ("first", "again"):
        spool, answers = tmp_path / attempt / "spool", tmp_path / attempt / "answers"
        spool.mkdir(parents=True)
        database = Database(tmp_path / attempt / "cadnode.db")
        prepare_detection_job(database, spool)
        Encoder(
            database,
            spool,
            tmp_path / attempt / "results",
            {},
            answers=answers,
            max_decoded_bytes=DEFAULT_LIMIT,
        ).advance()
        with database.session() as session:
            made.append({o.sop_instance_uid for o in session.exec(select(ResultObject))})
    first, again = made
    assert len(first) == len(again) == 1 and not first & again
