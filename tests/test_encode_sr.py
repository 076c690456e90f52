"""The TID 1500 reports: valid DICOM, and they say what the engines answered so that a
radiologist cannot misread them.

Each report is read back twice: by highdicom (structure) and aloud, from DCMTK's `dsrdump`
tree (what a person sees): every probability sits under the finding it is the probability
of, every decision is its own evaluation carrying its operating point, every group has a
tracking identifier, and the Image Library lists every source (and a volume's frames).
"""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cadnode.encode.seg import segmentation
from cadnode.encode.sr import (
    PERCENT_OF_HEMITHORAX,
    PRIVATE_CODES,
    Algorithm,
    Classification,
    CodedLabel,
    Detection,
    ReportIdentity,
    Segmented,
    classification_report,
    detection_report,
    segmentation_report,
)
from cadnode.infer.answers import Box
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom, write_chest_radiograph
from tests.dicom_validation import (
    assert_valid,
    dciodvfy_errors,
    dciodvfy_warnings,
    require_tool,
    saved,
)
from tests.encode_cases import (
    DETECTOR,
    SEGMENTER,
    detect_answer,
    film_with_masks,
    segment_findings,
    volume,
    volume_in_study,
)

ALGORITHM = Algorithm(name="cxr-ruleout", version="0.1.0", sha256="0123456789abcdef" * 4)
ABNORMAL = CodedLabel(value="263654008", scheme="SCT", meaning="Abnormal")
SERIES_UID = generate_uid(entropy_srcs=["test-encode-sr", "series"])
SOP_UID = generate_uid(entropy_srcs=["test-encode-sr", "instance"])
WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)
# The segmenter's SR codes the percent of the hemithorax in cadnode's private scheme.
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99CADNODE>"


def uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["test-encode-sr", *parts])


@pytest.fixture
def film(tmp_path: Path) -> pydicom.Dataset:
    """A chest film as the node receives it: written to disk, read back."""
    path = tmp_path / "film.dcm"
    write_chest_radiograph(
        path, seed=11, opacity=True, patient_id="PID-11", patient_name="Doe^Jane"
    )
    return pydicom.dcmread(path)


@pytest.fixture
def second_film(film: pydicom.Dataset) -> pydicom.Dataset:
    """Another view in the same study, header only (no pixel data)."""
    ds = chest_dataset(
        make_chest_phantom(12),
        patient_id="PID-11",
        patient_name="Doe^Jane",
        study_uid=film.StudyInstanceUID,
        seed=12,
        view="AP",
    )
    del ds.PixelData
    return ds


def answer(source: pydicom.Dataset, probability: float, threshold: float = 0.12) -> Classification:
    return Classification(
        source=source,
        label=ABNORMAL,
        probability=probability,
        operating_point="rule_out",
        threshold=threshold,
        ruled_out=probability < threshold,
    )


def build(*classifications: Classification) -> hd.sr.Comprehensive3DSR:
    return classification_report(
        list(classifications),
        ALGORITHM,
        ReportIdentity(SERIES_UID, SOP_UID, content_datetime=WHEN),
    )


def texts(item: pydicom.Dataset, code: Code) -> list[str]:
    """Values of the TEXT items named `code` directly below a content item."""
    return [
        str(found.TextValue)
        for found in hd.sr.utils.find_content_items(
            item, name=code, value_type=hd.sr.ValueTypeValues.TEXT, recursive=False
        )
    ]


def below(item: pydicom.Dataset, name: Code) -> list[pydicom.Dataset]:
    """The content items named `name` directly below `item`."""
    return list(hd.sr.utils.find_content_items(item, name=name, recursive=False))


def coded(item: pydicom.Dataset) -> Code:
    """A CODE content item's value."""
    value = item.ConceptCodeSequence[0]
    return Code(str(value.CodeValue), str(value.CodingSchemeDesignator), str(value.CodeMeaning))


# --- segmenter and detector reports over phantoms ---------------------------------------


def segmented(tmp_path: Path, *, films: int = 1) -> tuple[hd.sr.Comprehensive3DSR, list[Segmented]]:
    """The segmenter's report on `films` films of one study (the first with pneumothorax)."""
    items, study = [], None
    for index in range(films):
        film, masks = film_with_masks(
            tmp_path, pneumothorax=index == 0, seed=3 + index, study_uid=study
        )
        study = str(film.StudyInstanceUID)
        findings = segment_findings(film, masks)
        seg = segmentation(
            film,
            masks,
            findings,
            SEGMENTER,
            series_instance_uid=uid("seg-series"),
            sop_instance_uid=uid("seg", str(index)),
            content_datetime=WHEN,
        )
        items.append(Segmented(film, findings, seg))
    identity = ReportIdentity(uid("seg-sr-series"), uid("seg-sr"), content_datetime=WHEN)
    return segmentation_report(items, SEGMENTER, identity), items


def on_frames(boxes: list[Box], frames: list[tuple[int, int]]) -> list[Box]:
    """The boxes moved onto given (region frame, first frame of span) pairs, span 3."""
    return [
        box.model_copy(update={"frame": frame, "first_frame": first, "depth": 3})
        for box, (frame, first) in zip(boxes, frames, strict=True)
    ]


def detected(detections: list[Detection]) -> hd.sr.Comprehensive3DSR:
    identity = ReportIdentity(uid("det-series"), uid("det"), content_datetime=WHEN)
    return detection_report(detections, DETECTOR, identity)


# --- dsrdump: the report as a person reads it -------------------------------------------


@dataclass
class Line:
    """One line of dsrdump's tree, with the lines nested under it."""

    text: str
    children: list[Line] = field(default_factory=list)

    def walk(self) -> Iterator[Line]:
        yield self
        for child in self.children:
            yield from child.walk()

    def child(self, fragment: str) -> Line:
        """The one line directly below holding `fragment`."""
        [found] = [line for line in self.children if fragment in line.text]
        return found

    def lines(self) -> list[str]:
        return [child.text for child in self.children]


def dsrdump(path: Path) -> Line:
    """`dsrdump` of the file (every code printed, long values whole) as a tree; the tool
    must exit 0 and report no error."""
    tool = require_tool("dsrdump")
    done = subprocess.run(
        [tool, "-Ph", "+Pl", "+Pc", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # W: lines are the VR checker declining UTF-8; E: (error) or F: (fatal) must not appear.
    assert [line for line in done.stderr.splitlines() if line[:2] in ("E:", "F:")] == []
    root = Line("")
    stack = [(-1, root)]
    for raw in done.stdout.splitlines():
        if not raw.strip():
            continue
        depth = (len(raw) - len(raw.lstrip(" "))) // 2
        while stack[-1][0] >= depth:
            stack.pop()
        line = Line(raw.strip())
        stack[-1][1].children.append(line)
        stack.append((depth, line))
    [report] = root.children
    return report


def measurement_groups(report: Line) -> list[Line]:
    imaging = report.child('CONTAINER:(126010,DCM,"Imaging Measurements")')
    return [g for g in imaging.children if '(125007,DCM,"Measurement Group")' in g.text]


def finding_line(label: CodedLabel | Code) -> str:
    value = label.value
    scheme = label.scheme if isinstance(label, CodedLabel) else label.scheme_designator
    return f'<contains CODE:(121071,DCM,"Finding")=({value},{scheme},"{label.meaning}")>'


def of_finding(label: CodedLabel | Code) -> str:
    """The concept modifier that says what a number (a Probability, an Area) is of."""
    return finding_line(label).replace("<contains", "<has concept mod")


def parameters(line: Line) -> list[str]:
    prefix = '<has concept mod TEXT:(111002,DCM,"Algorithm Parameters")="'
    return [text[len(prefix) : -2] for text in line.lines() if text.startswith(prefix)]


# --- dciodvfy -----------------------------------------------------------------------------


@pytest.mark.parametrize("probability", [0.87, 0.03], ids=["abnormal", "ruled-out"])
def test_report_passes_dciodvfy(film: pydicom.Dataset, tmp_path: Path, probability: float) -> None:
    path = saved(build(answer(film, probability)), tmp_path / "sr.dcm")
    assert_valid(path)


def test_two_films_of_one_study_pass_dciodvfy(
    film: pydicom.Dataset, second_film: pydicom.Dataset, tmp_path: Path
) -> None:
    sr = build(answer(film, 0.87), answer(second_film, 0.03))
    path = saved(sr, tmp_path / "sr.dcm")
    assert_valid(path)
    evidence = {uid[2] for uid in hd.sr.srread(path).get_evidence()}
    assert evidence == {film.SOPInstanceUID, second_film.SOPInstanceUID}


def test_dciodvfy_helper_reports_errors(film: pydicom.Dataset, tmp_path: Path) -> None:
    sr = build(answer(film, 0.87))
    del sr.CompletionFlag  # type 1 in the SR Document General module
    path = saved(sr, tmp_path / "broken.dcm")
    assert any("CompletionFlag" in line for line in dciodvfy_errors(path))


# --- classifier: content, read back -------------------------------------------------------


@pytest.mark.parametrize(
    ("probability", "normality"),
    [(0.87, codes.SCT.NormalityUndetermined), (0.03, codes.SCT.Normal)],
    ids=["not-ruled-out", "ruled-out"],
)
def test_report_reads_back(
    film: pydicom.Dataset, tmp_path: Path, probability: float, normality: Code
) -> None:
    path = saved(build(answer(film, probability)), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)

    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    # The finding is the label whatever the decision: the probability is of it.
    assert group.finding_type == codes.SCT.Abnormal
    [source] = group.source_images
    assert source.referenced_sop_instance_uid == film.SOPInstanceUID
    assert source.referenced_sop_class_uid == film.SOPClassUID
    assert group.tracking_uid is not None

    [measurement] = group.get_measurements(name=codes.DCM.Probability)
    assert measurement.value == probability
    assert measurement.unit == codes.UCUM.NoUnits
    [of_label] = below(measurement[0], codes.DCM.Finding)
    assert of_label.RelationshipType == "HAS CONCEPT MOD"
    assert coded(of_label) == codes.SCT.Abnormal

    # The rule-out decision: its own evaluation, with its operating point and threshold.
    [decision] = group.get_qualitative_evaluations()
    assert decision.name == codes.DCM.Normality
    assert decision.value == normality
    [decision_item] = below(group[0], codes.DCM.Normality)
    assert texts(decision_item, codes.DCM.AlgorithmName) == [ALGORITHM.name]
    assert texts(decision_item, codes.DCM.AlgorithmVersion) == [ALGORITHM.version]
    assert texts(decision_item, codes.DCM.AlgorithmParameters) == [
        f"sha256={ALGORITHM.sha256}",
        "operating_point=rule_out",
        "threshold=0.12",
    ]
    # The group's algorithm: the model, not the threshold (the probability is the model's).
    group_item = group[0]
    assert texts(group_item, codes.DCM.AlgorithmName) == [ALGORITHM.name]
    assert texts(group_item, codes.DCM.AlgorithmParameters) == [f"sha256={ALGORITHM.sha256}"]

    observers = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    [device] = observers
    attributes = device.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == "cadnode cxr-ruleout"
    assert attributes.manufacturer_name == "cadnode"


@pytest.mark.parametrize(
    ("probability", "decision"),
    [
        (0.0033, '(121402,DCM,"Normality")=(17621005,SCT,"Normal")'),
        (0.99999, '(121402,DCM,"Normality")=(371934000,SCT,"Normality Undetermined")'),
    ],
    ids=["ruled-out", "not-ruled-out"],
)
def test_classifier_report_read_aloud(
    film: pydicom.Dataset, tmp_path: Path, probability: float, decision: str
) -> None:
    """ "Finding Abnormal; Probability p, of Abnormal; Normality Normal (or Undetermined),
    decided at rule_out, threshold 0.12": never "Normal" beside the probability of
    abnormality."""
    report = dsrdump(saved(build(answer(film, probability)), tmp_path / "sr.dcm"))
    [group] = measurement_groups(report)
    assert finding_line(ABNORMAL) in group.lines()
    [number] = [line for line in group.children if '(122157,DCM,"Probability")' in line.text]
    assert number.text == (
        f'<contains NUM:(122157,DCM,"Probability")="{probability}" (1,UCUM,"no units")>'
    )
    assert number.lines() == [of_finding(ABNORMAL)]
    verdict = group.child(decision)
    assert parameters(verdict) == [
        f"sha256={ALGORITHM.sha256}",
        "operating_point=rule_out",
        "threshold=0.12",
    ]
    assert parameters(group) == [f"sha256={ALGORITHM.sha256}"]
    assert not any('"Finding")=(17621005' in line.text for line in report.walk())


def test_report_joins_the_patient_and_study(film: pydicom.Dataset, tmp_path: Path) -> None:
    sr = pydicom.dcmread(saved(build(answer(film, 0.87)), tmp_path / "sr.dcm"))
    assert sr.PatientID == film.PatientID == "PID-11"
    assert sr.PatientName == film.PatientName
    assert sr.StudyInstanceUID == film.StudyInstanceUID
    assert sr.AccessionNumber == film.AccessionNumber
    assert sr.SeriesInstanceUID == SERIES_UID
    assert sr.SOPInstanceUID == SOP_UID
    assert sr.SeriesInstanceUID != film.SeriesInstanceUID
    assert sr.Modality == "SR"
    assert sr.Manufacturer == "cadnode"
    assert sr.SeriesDescription == "cadnode cxr-ruleout results"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (sr.ContentDate, sr.ContentTime) == ("20260102", "093000")
    [procedure] = hd.sr.utils.find_content_items(
        hd.sr.srread(tmp_path / "sr.dcm").content[0], name=codes.DCM.ProcedureReported
    )
    assert procedure.value == hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")


def test_same_inputs_same_bytes(
    film: pydicom.Dataset, second_film: pydicom.Dataset, tmp_path: Path
) -> None:
    first = saved(build(answer(film, 0.87), answer(second_film, 0.03)), tmp_path / "1.dcm")
    again = saved(build(answer(film, 0.87), answer(second_film, 0.03)), tmp_path / "2.dcm")
    assert first.read_bytes() == again.read_bytes()
    sr = pydicom.dcmread(first)
    assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == ("20260102", "093000")


def test_without_a_time_only_the_clock_differs(film: pydicom.Dataset) -> None:
    def content(sr: hd.sr.Comprehensive3DSR) -> dict[str, object]:
        for keyword in (
            "InstanceCreationDate",
            "InstanceCreationTime",
            "ContentDate",
            "ContentTime",
            "SeriesDate",
            "SeriesTime",
        ):
            delattr(sr, keyword)
        for equipment in sr.ContributingEquipmentSequence:
            if "ContributionDateTime" in equipment:
                del equipment.ContributionDateTime
        return sr.to_json_dict()

    def unstamped() -> hd.sr.Comprehensive3DSR:
        return classification_report(
            [answer(film, 0.87)],
            ALGORITHM,
            ReportIdentity(SERIES_UID, SOP_UID),
        )

    assert content(unstamped()) == content(unstamped())


def test_source_may_lack_pixel_data_and_type2_attributes(
    film: pydicom.Dataset, tmp_path: Path
) -> None:
    header = pydicom.Dataset(film)
    del header.PixelData
    del header.PatientBirthDate, header.ReferringPhysicianName
    sr = build(answer(header, 0.5))
    assert "PatientBirthDate" not in header  # the caller's dataset is left alone
    assert dciodvfy_errors(saved(sr, tmp_path / "sr.dcm")) == []


# --- Image Library (TID 1600) -------------------------------------------------------------


def library_entries(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The IMAGE entries of the report's Image Library, which precedes its measurements."""
    root = sr.ContentSequence
    names = [str(item.ConceptNameCodeSequence[0].CodeValue) for item in root]
    library_at = names.index(codes.DCM.ImageLibrary.value)
    assert library_at < names.index(codes.DCM.ImagingMeasurements.value)
    [group] = below(root[library_at], codes.DCM.ImageLibraryGroup)  # OHIF reads the first
    return [item for item in group.ContentSequence if item.ValueType == "IMAGE"]


def descriptors(entry: pydicom.Dataset) -> dict[str, object]:
    """An entry's descriptors by concept meaning: codes, numbers, texts and UIDs."""
    found: dict[str, object] = {}
    for item in entry.ContentSequence:
        assert item.RelationshipType == "HAS ACQ CONTEXT"
        name = str(item.ConceptNameCodeSequence[0].CodeMeaning)
        if item.ValueType == "CODE":
            found[name] = coded(item)
        elif item.ValueType == "NUM":
            found[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT":
            found[name] = str(item.TextValue)
        else:
            found[name] = str(item.UID)
    return found


def evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def test_image_library_describes_every_film(
    film: pydicom.Dataset, second_film: pydicom.Dataset, tmp_path: Path
) -> None:
    path = saved(build(answer(film, 0.87), answer(second_film, 0.03)), tmp_path / "sr.dcm")
    sr = pydicom.dcmread(path)
    entries = library_entries(sr)
    by_uid = {str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): e for e in entries}
    assert list(by_uid) == [film.SOPInstanceUID, second_film.SOPInstanceUID]
    assert set(by_uid) == evidence_uids(sr)
    for source in (film, second_film):
        entry = by_uid[source.SOPInstanceUID]
        reference = entry.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert "ReferencedFrameNumber" not in reference  # a film: the whole image
        row_mm, column_mm = (float(v) for v in source.ImagerPixelSpacing)
        view = source.ViewCodeSequence[0]
        assert descriptors(entry) == {
            "Modality": codes.cid29.DigitalRadiography,
            "Target Region": Code("51185008", "SCT", "Thorax"),
            "Pixel Data Rows": float(source.Rows),
            "Pixel Data Columns": float(source.Columns),
            "Image View": Code(view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning),
            "Patient Orientation Row": source.PatientOrientation[0],
            "Patient Orientation Column": source.PatientOrientation[1],
            "Horizontal Pixel Spacing": column_mm,
            "Vertical Pixel Spacing": row_mm,
        }
    assert (
        descriptors(by_uid[second_film.SOPInstanceUID])["Image View"]
        != descriptors(by_uid[film.SOPInstanceUID])["Image View"]
    )  # PA and AP, each its own


# --- segmenter ----------------------------------------------------------------------------


def test_segmenter_report_passes_dciodvfy_and_declares_its_private_code(tmp_path: Path) -> None:
    sr, _ = segmented(tmp_path, films=2)
    path = assert_valid(saved(sr, tmp_path / "sr.dcm"), PRIVATE_SCHEME_WARNING)
    assert all(PRIVATE_SCHEME_WARNING in w for w in dciodvfy_warnings(path))
    [scheme] = pydicom.dcmread(path).CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99CADNODE"
    [(code, definition)] = PRIVATE_CODES
    assert code == PERCENT_OF_HEMITHORAX and "hemithorax" in definition


def test_segmenter_groups_say_what_each_number_is_of(tmp_path: Path) -> None:
    sr, items = segmented(tmp_path)
    path = saved(sr, tmp_path / "sr.dcm")
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == 3
    for group, finding in zip(groups, items[0].findings, strict=True):
        label = Code(finding.label.code.value, "SCT", finding.label.code.meaning)
        assert group.finding_type == label
        [probability] = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding.probability)
        [of_label] = below(probability[0], codes.DCM.Finding)
        assert coded(of_label) == label
        [derivation] = below(probability[0], codes.DCM.Derivation)
        assert coded(derivation) == codes.SCT.Maximum  # the highest pixel probability
        [presence] = group.get_qualitative_evaluations()
        assert (presence.name, presence.value) == (label, codes.SCT.Present)
        [presence_item] = below(group[0], label)
        assert texts(presence_item, codes.DCM.AlgorithmParameters)[1:] == [
            "operating_point=present",
            "threshold=0.5",
        ]
        assert texts(group[0], codes.DCM.AlgorithmParameters) == [f"sha256={SEGMENTER.sha256}"]


def test_segmenter_report_read_aloud(tmp_path: Path) -> None:
    sr, items = segmented(tmp_path)
    report = dsrdump(saved(sr, tmp_path / "sr.dcm"))
    ptx_group = measurement_groups(report)[2]
    pneumothorax = Code("36118008", "SCT", "Pneumothorax")
    assert finding_line(pneumothorax) in ptx_group.lines()
    [number] = [line for line in ptx_group.children if '(122157,DCM,"Probability")' in line.text]
    assert number.lines() == [
        of_finding(pneumothorax),
        '<has concept mod CODE:(121401,DCM,"Derivation")=(56851009,SCT,"Maximum")>',
    ]
    percent = items[0].findings[2].measurements["percent_of_hemithorax"]
    share = ptx_group.child('NUM:(CN-PTX-HEMI,99CADNODE,"Percent of hemithorax")=')
    assert share.text.endswith('(%,UCUM,"Percent")>')
    assert float(share.text.split('="')[1].split('"')[0]) == pytest.approx(percent)
    assert share.lines() == [of_finding(pneumothorax)]  # the pneumothorax's share
    area = ptx_group.child('NUM:(42798000,SCT,"Area")=')
    assert area.lines() == [of_finding(pneumothorax)]
    verdict = ptx_group.child('(36118008,SCT,"Pneumothorax")=(52101004,SCT,"Present")')
    assert parameters(verdict)[1:] == ["operating_point=present", "threshold=0.5"]


def test_segmenter_library_lists_the_films_and_evidence_the_segs(tmp_path: Path) -> None:
    sr, items = segmented(tmp_path, films=2)
    ds = pydicom.dcmread(saved(sr, tmp_path / "sr.dcm"))
    films = [str(item.source.SOPInstanceUID) for item in items]
    segs = {str(item.segmentation.SOPInstanceUID) for item in items}
    entries = library_entries(ds)
    assert [str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for e in entries] == films
    assert evidence_uids(ds) == set(films) | segs
    for entry, item in zip(entries, items, strict=True):
        spacing = [float(v) for v in item.source.ImagerPixelSpacing]
        found = descriptors(entry)
        assert [found["Vertical Pixel Spacing"], found["Horizontal Pixel Spacing"]] == spacing


# --- detector -----------------------------------------------------------------------------


def test_each_region_is_on_its_findings_frame(tmp_path: Path) -> None:
    """Two masses moved to frames 4 and 11 (spans 3..5 and 10..12): each SCOORD is selected
    from its finding's frame of the volume, each probability inferred from its span."""
    source, boxes = volume(tmp_path, masses=2, seed=6)
    moved = on_frames(boxes, [(4, 3), (11, 10)])
    answer = detect_answer(source, moved)
    path = assert_valid(saved(detected([Detection(source, answer)]), tmp_path / "det.dcm"))
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    for group, finding in zip(groups, answer.findings, strict=True):
        region = group.roi
        assert region is not None
        [selected_from] = region.ContentSequence
        assert selected_from.RelationshipType == "SELECTED FROM"
        image = selected_from.ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert image.ReferencedSOPClassUID == source.SOPClassUID
        assert int(image.ReferencedFrameNumber) == finding.box.frame
        [probability] = group.get_measurements(name=codes.DCM.Probability)
        [span] = probability.referenced_images
        frames = span.ReferencedSOPSequence[0].ReferencedFrameNumber
        first = finding.box.first_frame
        assert [int(f) for f in frames] == [first, first + 1, first + 2]
        [of_label] = below(probability[0], codes.DCM.Finding)
        assert coded(of_label).value == "129788004"
    [entry] = library_entries(pydicom.dcmread(path))
    frames = entry.ReferencedSOPSequence[0].ReferencedFrameNumber
    assert [int(f) for f in frames] == [3, 4, 5, 10, 11, 12]


def test_detector_report_read_aloud(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=1, seed=6)
    [box] = on_frames(boxes, [(7, 6)])
    report = dsrdump(
        saved(detected([Detection(source, detect_answer(source, [box]))]), tmp_path / "d.dcm")
    )
    [group] = measurement_groups(report)
    mass = Code("129788004", "SCT", "Mammographic breast mass")
    assert finding_line(mass) in group.lines()
    [number] = [line for line in group.children if '(122157,DCM,"Probability")' in line.text]
    assert number.lines()[0] == of_finding(mass)
    region = group.child('SCOORD:(111030,DCM,"Image Region")=(POLYLINE,')
    assert region.lines() == ['<selected from IMAGE:(260753009,SCT,"Source")=(BT image,,7)>']
    verdict = group.child('(129788004,SCT,"Mammographic breast mass")=(52101004,SCT,"Present")')
    assert parameters(verdict)[1:] == ["operating_point=report", "threshold=0.47"]


def test_volumes_of_a_study_in_the_library_with_their_frames(tmp_path: Path) -> None:
    """An LCC volume with a mass and an RMLO one without: each in the library with its
    laterality, view and spacing; the first with the frames the report points at."""
    lcc, lcc_boxes = volume(tmp_path, masses=1, seed=6)
    rmlo, _ = volume_in_study(tmp_path, str(lcc.StudyInstanceUID), view="RMLO", masses=0, seed=7)
    [box] = on_frames(lcc_boxes, [(9, 8)])
    sr = detected(
        [Detection(lcc, detect_answer(lcc, [box])), Detection(rmlo, detect_answer(rmlo, []))]
    )
    path = assert_valid(saved(sr, tmp_path / "det.dcm"))
    ds = pydicom.dcmread(path)
    entries = library_entries(ds)
    assert evidence_uids(ds) == {lcc.SOPInstanceUID, rmlo.SOPInstanceUID}
    first, second = (entry.ReferencedSOPSequence[0] for entry in entries)
    assert (first.ReferencedSOPInstanceUID, second.ReferencedSOPInstanceUID) == (
        lcc.SOPInstanceUID,
        rmlo.SOPInstanceUID,
    )
    assert [int(f) for f in first.ReferencedFrameNumber] == [8, 9, 10]
    assert "ReferencedFrameNumber" not in second  # nothing found: the whole volume
    lcc_found, rmlo_found = (descriptors(entry) for entry in entries)
    assert lcc_found["Modality"] == codes.cid29.Mammography
    assert lcc_found["Target Region"] == Code("76752008", "SCT", "Breast")
    assert (lcc_found["Image Laterality"], rmlo_found["Image Laterality"]) == (
        codes.SCT.Left,
        codes.SCT.Right,
    )
    assert (lcc_found["Image View"], rmlo_found["Image View"]) == (
        Code("399162004", "SCT", "cranio-caudal"),
        Code("399368009", "SCT", "medio-lateral oblique"),
    )
    assert lcc_found["Horizontal Pixel Spacing"] == lcc_found["Vertical Pixel Spacing"] == 0.5
    assert lcc_found["Spacing between slices"] == 1.0
    assert lcc_found["Frame of Reference UID"] == lcc.FrameOfReferenceUID
    # The volume without a finding says its label is Absent, at the operating point.
    content = hd.sr.srread(path).content
    [absent] = content.get_image_measurement_groups()
    assert absent.source_images[0].referenced_sop_instance_uid == rmlo.SOPInstanceUID
    [presence] = absent.get_qualitative_evaluations()
    assert presence.value == codes.SCT.Absent
    assert absent.get_measurements() == []  # no volume probability: none was measured
    [presence_item] = below(absent[0], presence.name)
    assert texts(presence_item, codes.DCM.AlgorithmParameters)[1:] == [
        "operating_point=report",
        "threshold=0.47",
    ]


# --- every report: tracking identifiers, provenance, determinism -------------------------


def every_report(tmp_path: Path, film: pydicom.Dataset) -> dict[str, hd.sr.Comprehensive3DSR]:
    lcc, lcc_boxes = volume(tmp_path, masses=2, seed=6)
    rmlo, _ = volume_in_study(tmp_path, str(lcc.StudyInstanceUID), view="RMLO", masses=0, seed=7)
    second = copy.deepcopy(film)
    second.SOPInstanceUID = uid("second film")
    return {
        "classifier": build(answer(film, 0.87), answer(second, 0.03)),
        "segmenter": segmented(tmp_path, films=2)[0],
        "detector": detected(
            [
                Detection(lcc, detect_answer(lcc, lcc_boxes)),
                Detection(rmlo, detect_answer(rmlo, [])),
            ]
        ),
    }


def test_every_group_has_its_own_tracking_identifier_and_ohif_can_read_it(
    film: pydicom.Dataset, tmp_path: Path
) -> None:
    expected = {"classifier": 2, "segmenter": 6, "detector": 3}
    for kind, sr in every_report(tmp_path, film).items():
        path = saved(sr, tmp_path / f"{kind}.dcm")
        [imaging] = below(pydicom.dcmread(path), codes.DCM.ImagingMeasurements)
        groups = below(imaging, codes.DCM.MeasurementGroup)
        assert len(groups) == expected[kind], kind
        identifiers, uids = [], []
        for group in groups:
            without_region = not below(group, codes.DCM.ImageRegion)
            for number in (item for item in group.ContentSequence if item.ValueType == "NUM"):
                # OHIF reads every NUM's children in a group without a SCOORD, unguarded.
                assert not without_region or number.get("ContentSequence"), kind
            [identifier] = below(group, codes.DCM.TrackingIdentifier)
            [unique] = below(group, codes.DCM.TrackingUniqueIdentifier)
            assert identifier.RelationshipType == unique.RelationshipType == "HAS OBS CONTEXT"
            identifiers.append(str(identifier.TextValue))
            uids.append(str(unique.UID))
        assert len(set(identifiers)) == len(identifiers), identifiers
        assert len(set(uids)) == len(uids), uids


def test_every_report_names_the_engine_as_contributing_equipment(
    film: pydicom.Dataset, tmp_path: Path
) -> None:
    engines = {"classifier": ALGORITHM, "segmenter": SEGMENTER, "detector": DETECTOR}
    for kind, sr in every_report(tmp_path, film).items():
        ds = pydicom.dcmread(saved(sr, tmp_path / f"{kind}.dcm"))
        engine = engines[kind]
        [entry] = [
            e
            for e in ds.ContributingEquipmentSequence
            if e.get("ManufacturerModelName") == engine.name
        ]
        assert (entry.Manufacturer, entry.SoftwareVersions) == ("cadnode", engine.version)
        assert entry.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert (ds.SeriesDate, ds.SeriesTime) == ("20260102", "093000")


def test_segmenter_and_detector_reports_are_deterministic(
    film: pydicom.Dataset, tmp_path: Path
) -> None:
    (tmp_path / "inputs").mkdir()
    first = every_report(tmp_path / "inputs", film)
    again = every_report(tmp_path / "inputs", film)
    for kind in first:
        one = saved(first[kind], tmp_path / f"{kind}-1.dcm").read_bytes()
        two = saved(again[kind], tmp_path / f"{kind}-2.dcm").read_bytes()
        assert one == two, kind


# --- refusals -----------------------------------------------------------------------------


def test_refuses_a_contradictory_decision(film: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="contradicts"):
        build(replace(answer(film, 0.87), ruled_out=True))


@pytest.mark.parametrize("probability", [-0.1, 1.5, float("nan")])
def test_refuses_a_probability_outside_0_1(film: pydicom.Dataset, probability: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        build(replace(answer(film, 0.5), probability=probability))


def test_refuses_films_of_two_studies(film: pydicom.Dataset) -> None:
    other = chest_dataset(
        make_chest_phantom(13), patient_id="PID-11", patient_name="Doe^Jane", seed=13
    )
    with pytest.raises(ValueError, match="studies"):
        build(answer(film, 0.87), answer(other, 0.03))


def test_refuses_nothing_and_duplicates(film: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="at least one"):
        build()
    with pytest.raises(ValueError, match="more than once"):
        build(answer(film, 0.87), answer(film, 0.03))
