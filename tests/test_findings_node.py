"""The chest-findings engine in the node: a multi-label classifier's manifest checked at load,
its answer (each finding's probability and operating points, seed 002's two-class rule),
conditions and the priority policy on any finding, `cadnode engines verify` and the Triton
export with both outputs, the SR with one coded finding per reported label, and a film
pushed to `cadnode serve` coming back so.

The engine is tests/findings_cases.py's hand-made graph: its thresholds fix what it reports.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cadnode.core.config import EngineSettings, LimitsSettings
from cadnode.core.db import Priority
from cadnode.core.yamlfile import ConfigError
from cadnode.encode.provenance import Algorithm, CodedLabel
from cadnode.encode.sr import Classification, ReportIdentity, classification_report
from cadnode.infer import catalogue
from cadnode.infer.answers import ClassifyAnswer, dump_answer, parse_answer, summary
from cadnode.infer.bundle import MANIFEST, Bundle
from cadnode.infer.conditions import AnswerCondition
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.infer.postprocess import classify_answer
from cadnode.infer.runtime import Engine
from cadnode.infer.triton_repository import ExportOptions, config_text, model_tensors
from cadnode.prioritize.policy import EngineResult, StudyOutcome, load_policy
from tests.dicom_validation import dciodvfy_errors, saved
from tests.findings_cases import FINDINGS_OUTPUT, LABELS, NAME, NO_FINDING, write_findings_bundle
from tests.peers import REPO, Cadnode, Orthanc, run_cadnode, run_orthanc, storescu, wait_for
from tests.viewers.node import run_script

LIMIT = LimitsSettings().max_decoded_image_bytes
CODES = {name: value for name, value, _ in LABELS}
WHEN = dt.datetime(2026, 12, 6, 9, 30)


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return write_findings_bundle(tmp_path / "engines" / NAME)


def answer_of(bundle: Bundle, row: list[float]) -> ClassifyAnswer:
    """The answer for one image whose findings output is `row` (labels order)."""
    return classify_answer(bundle.manifest, row[0], row)


# --- the manifest ------------------------------------------------------------------------------


def rewritten(bundle: Bundle, change: dict[str, object]) -> Path:
    """The bundle's manifest with `change` merged into its `findings` block."""
    path = bundle.folder / MANIFEST
    document = json.loads(path.read_text())
    document["findings"] = {**document["findings"], **change}
    path.write_text(json.dumps(document, indent=2))
    return bundle.folder


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"operating_points": {"Consolidation": {}, "Pneumothorax": {}}}, "no 'report' point"),
        ({"healthy": "Pleural Effusion"}, "findings.healthy 'Pleural Effusion' is not one of"),
        ({"output": "probability"}, "is the declared model.output"),
        ({"prefilter": {"alpha": 0.3, "beta": 0.9}}, "beta 0.9 is above alpha 0.3"),
        ({"healthy": None}, "findings.prefilter needs findings.healthy"),
        ({"not_reported": ["Nodule"]}, "findings.operating_points.Nodule: not_reported, yet"),
        ({"not_reported": ["Edema"]}, "findings.not_reported: 'Edema' is not a finding label"),
    ],
    ids=[
        "no-report-point",
        "unknown-healthy",
        "same-output",
        "beta-above-alpha",
        "no-healthy",
        "not-reported-with-point",
        "not-reported-unknown",
    ],
)
def test_a_findings_block_that_does_not_fit_is_refused_at_load(
    bundle: Bundle, change: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        Bundle(rewritten(bundle, change))
    text = "\n".join(refused.value.problems)
    assert problem in text and str(bundle.folder / MANIFEST) in text


def test_a_findings_output_the_model_lacks_is_a_verify_fault(bundle: Bundle) -> None:
    rewritten(bundle, {"output": "logits"})
    said: list[str] = []
    settings = EngineSettings(dir=bundle.folder.parent, backend="onnxruntime")
    assert catalogue.verify(settings, limits=LimitsSettings(), say=said.append) == 1
    assert "findings.output is 'logits'" in said[0] and "FAULT" in said[0], said


# --- the answer and seed 002's rule --------------------------------------------------------------


def test_each_finding_its_probability_and_points_and_the_two_class_rule(tmp_path: Path) -> None:
    bundle = write_findings_bundle(tmp_path / NAME, alpha=0.9, beta=0.3)
    # abnormal, No Finding, Consolidation, Pneumothorax, Nodule
    sick = answer_of(bundle, [0.8, 0.2, 0.6, 0.7, 0.4])
    assert [(f.label.name, f.probability) for f in sick.findings] == [
        ("Consolidation", 0.6), ("Pneumothorax", 0.7), ("Nodule", 0.4)]  # fmt: skip
    pneumothorax = sick.findings[1]
    assert {k: p.reached for k, p in pneumothorax.operating_points.items()} == {
        "report": True, "urgent": True}  # fmt: skip
    assert [f.label.name for f in sick.reported] == ["Consolidation", "Pneumothorax"]
    assert sick.healthy is not None and not sick.healthy.reported  # 0.2 <= beta
    assert summary(sick) == "Consolidation, Pneumothorax"
    unsure = answer_of(bundle, [0.5, 0.5, 0.6, 0.7, 0.4])  # beta < P(healthy) <= alpha
    assert [f.label.name for f in unsure.reported] == ["Consolidation", "Pneumothorax"]
    assert summary(unsure) == f"Consolidation, Pneumothorax, {NO_FINDING}"
    healthy = answer_of(bundle, [0.05, 0.95, 0.6, 0.7, 0.4])  # above alpha: no finding
    assert healthy.reported == [] and summary(healthy) == NO_FINDING
    assert not any(p.reached for f in healthy.findings for p in f.operating_points.values())


def test_a_not_reported_finding_keeps_its_probability_and_is_never_reported(
    bundle: Bundle,
) -> None:
    """A label the build could not set a report point for (too few validation films) is in
    `not_reported`, without points: the answer carries its probability, reports it never."""
    points = json.loads((bundle.folder / MANIFEST).read_text())["findings"]["operating_points"]
    points.pop("Pneumothorax")  # its report point is ALWAYS: it would be reported
    quiet = Bundle(
        rewritten(bundle, {"operating_points": points, "not_reported": ["Pneumothorax"]})
    )
    answer = answer_of(quiet, [0.8, 0.2, 0.6, 0.99, 0.4])
    pneumothorax = answer.findings[1]
    assert pneumothorax.label.name == "Pneumothorax" and pneumothorax.probability == 0.99
    assert pneumothorax.operating_points == {} and not pneumothorax.reported
    assert [f.label.name for f in answer.reported] == ["Consolidation"]
    assert summary(answer) == "Consolidation"


def test_the_answer_is_stored_and_read_back_whole(bundle: Bundle) -> None:
    answer = answer_of(bundle, [0.8, 0.2, 0.6, 0.7, 0.4])
    assert parse_answer(json.loads(json.dumps(dump_answer(answer)))) == answer
    # An answer stored before multi-label engines existed still reads.
    old = {"label": answer.label.model_dump(), "probability": 0.3, "operating_points": {}}
    assert parse_answer(old).findings == [] and parse_answer(old).healthy is None


def test_a_wrong_number_of_label_probabilities_is_refused(bundle: Bundle) -> None:
    with pytest.raises(ValueError, match="expected one per label"):
        answer_of(bundle, [0.8, 0.2, 0.6])


# --- conditions and the priority policy ----------------------------------------------------------


def test_a_condition_tests_any_finding(tmp_path: Path) -> None:
    bundle = write_findings_bundle(tmp_path / NAME, alpha=0.9, beta=0.3)
    sick = answer_of(bundle, [0.8, 0.2, 0.6, 0.7, 0.4])
    healthy = answer_of(bundle, [0.05, 0.95, 0.6, 0.7, 0.4])

    def holds(when: dict[str, object], answer: ClassifyAnswer) -> bool:
        return AnswerCondition.model_validate(when).holds(answer)

    urgent = {"step": NAME, "label": "Pneumothorax", "operating_point": "urgent"}
    assert holds(urgent, sick) and not holds(urgent, healthy)  # suppressed by seed 002's rule
    assert not holds({**urgent, "label": "Nodule", "operating_point": "report"}, sick)
    assert holds({"label": "Consolidation", "probability": {"at_least": 0.5}}, sick)
    assert not holds({"label": "Consolidation", "probability": {"at_least": 0.65}}, sick)
    assert holds({"ruled_out": False}, sick)  # the rule-out point, on P(abnormal)


def test_the_shipped_policy_raises_a_study_on_a_finding(bundle: Bundle) -> None:
    policy = load_policy(REPO / "config" / "priority.yaml")
    sick = answer_of(bundle, [0.8, 0.2, 0.6, 0.7, 0.4])
    decision = policy.decide(StudyOutcome(results=[EngineResult(NAME, sick)]))
    assert (decision.level, decision.rule) == (Priority.HIGH, "chest-finding-pneumothorax")


# --- verify, and Triton's export -----------------------------------------------------------------


def test_verify_checks_the_findings_output_on_the_sample(bundle: Bundle) -> None:
    said: list[str] = []
    settings = EngineSettings(dir=bundle.folder.parent, backend="onnxruntime")
    assert catalogue.verify(settings, limits=LimitsSettings(), say=said.append) == 0, said
    assert f"{FINDINGS_OUTPUT} (1, {len(LABELS)})" in said[0]
    assert "reported: Consolidation, Pneumothorax | Consolidation, Pneumothorax" in said[0]
    info = catalogue.manifest_lines(bundle, settings)
    assert f"  findings: output {FINDINGS_OUTPUT!r}, one probability per label" in info


def test_the_triton_model_declares_both_outputs(bundle: Bundle) -> None:
    text = config_text(bundle, model_tensors(bundle), 8, ExportOptions())
    [outputs] = [line for line in text.splitlines() if line.startswith("output [")]
    assert (
        '{ name: "probability" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }'
        in outputs
    )
    assert (
        f'{{ name: "{FINDINGS_OUTPUT}" data_type: TYPE_FP32 dims: [ {len(LABELS)} ] }}' in outputs
    )


# --- the SR ----------------------------------------------------------------------------------


def findings_report(bundle: Bundle, folder: Path, *, beta: float = 1.0) -> tuple[Path, Path]:
    """The SR the encode stage writes for the engine's answer on a phantom film, and the film."""
    film_path = folder / "film.dcm"
    film = write_chest_radiograph(film_path, seed=31, pneumothorax=True)
    engine = Engine(bundle, max_decoded_bytes=LIMIT)
    [answer] = engine.answer([film])
    assert isinstance(answer, ClassifyAnswer) and answer.rule_out_point is not None
    assert answer.healthy is not None
    if beta < 1.0:  # seed 002's rule reports the healthy label beside the findings
        healthy = answer.healthy.model_copy(update={"beta": beta})
        answer = answer.model_copy(update={"healthy": healthy})
    item = Classification(
        source=film,
        label=CodedLabel(**answer.label.code.model_dump()),
        probability=answer.probability,
        operating_point="rule_out",
        threshold=answer.rule_out_point.threshold,
        ruled_out=bool(answer.ruled_out),
        findings=answer.findings,
        healthy=answer.healthy,
    )
    algorithm = Algorithm(name=NAME, version="0.0.1-test", sha256=bundle.sha256)
    series, instance = (generate_uid(entropy_srcs=[str(folder), part]) for part in "si")
    sr = classification_report(
        [item], algorithm, ReportIdentity(series, instance, content_datetime=WHEN)
    )
    return saved(sr, folder / "sr.dcm"), film_path


def test_each_reported_finding_is_its_own_coded_finding(bundle: Bundle, tmp_path: Path) -> None:
    path, _ = findings_report(bundle, tmp_path, beta=0.3)
    assert dciodvfy_errors(path) == []
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    findings = [(g.finding_type.value, g.finding_type.meaning) for g in groups]
    assert findings == [
        (CODES["abnormal"], "Abnormal"),
        (CODES["Consolidation"], "Lung consolidation"),
        (CODES["Pneumothorax"], "Pneumothorax"),
        (CODES[NO_FINDING], "Normal"),  # seed 002: P(healthy) above beta
    ]
    for group in groups[1:]:
        [probability] = group.get_measurements(name=codes.DCM.Probability)
        assert 0 <= probability.value <= 1
        [decision] = group.get_qualitative_evaluations()
        assert (decision.name, decision.value) == (group.finding_type, codes.SCT.Present)


def test_dcmjs_reads_the_findings_report_as_written(bundle: Bundle, tmp_path: Path) -> None:
    path, film = findings_report(bundle, tmp_path)
    ran = run_script("sr_read.mjs", path, film)
    assert (ran.status, ran.printed["problems"]) == (0, []), ran.stderr
    groups = ran.printed["report"]["groups"]
    assert [g["finding"]["meaning"] for g in groups] == [
        "Abnormal", "Lung consolidation", "Pneumothorax"]  # fmt: skip
    assert len({g["trackingUID"] for g in groups}) == 3
    for group in groups[1:]:
        [probability] = group["nums"]
        assert (probability["concept"]["value"], probability["unit"]) == ("122157", "1")
        [presence] = group["qualitative"]
        assert presence["value"]["meaning"] == "Present"


# --- in the node -------------------------------------------------------------------------------


@pytest.fixture
def engines(tmp_path: Path) -> Path:
    """The shipped engines but cxr-findings, which is the test's own."""
    folder = tmp_path / "engines"
    write_findings_bundle(folder / NAME)
    for shipped in (REPO / "engines").iterdir():
        if shipped.name != NAME and (shipped / MANIFEST).is_file():
            os.symlink(shipped, folder / shipped.name)
    return folder


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path / "orthanc") as orthanc:
        yield orthanc


def test_a_pushed_film_comes_back_with_its_findings_and_raised(
    engines: Path, pacs: Orthanc, tmp_path: Path
) -> None:
    """A film with an opacity and no pneumothorax, through the shipped rules: cxr-ruleout
    does not rule it out, so the segmenter (which finds no pneumothorax) and the findings
    engine read it; the findings engine reports a pneumothorax at its urgent point. Its SR
    codes each reported finding, and the shipped policy's finding rule raises the study."""
    film = write_chest_radiograph(tmp_path / "film.dcm", seed=105, opacity=True)
    with run_cadnode(tmp_path / "node", pacs.destination, CADNODE_ENGINES_DIR=str(engines)) as node:
        assert storescu(node.dicom_port, tmp_path / "film.dcm").returncode == 0
        row = wait_for_row(node, film.StudyInstanceUID)
    assert row["state"] == "delivered", row["reason"]
    by_engine = {r["engine"]: r for r in row["results"]}
    assert set(by_engine) == {"cxr-ruleout", "cxr-segmenter", NAME}
    assert by_engine["cxr-ruleout"]["ruled_out"] is False
    assert row["priority"] == "HIGH"
    assert row["priority_history"][-1]["rule"] == "chest-finding-pneumothorax"
    ids = pacs.instances_of_study(film.StudyInstanceUID)
    paths = [pacs.download(i, tmp_path / f"result-{n}.dcm") for n, i in enumerate(ids)]
    reports = [hd.sr.srread(p) for p in paths if dcmread(p).Modality == "SR"]
    [ours] = [r for r in reports if r.ManufacturerModelName == f"cadnode {NAME}"]
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    groups = ours.content.get_image_measurement_groups()
    assert [g.finding_type.value for g in groups] == [
        CODES["abnormal"], CODES["Consolidation"], CODES["Pneumothorax"]]  # fmt: skip


def wait_for_row(node: Cadnode, study_uid: str) -> dict[str, Any]:
    """The study's row once it is delivered (or failed) and its priority decided on results."""

    def done() -> dict[str, Any] | None:
        rows = [row for row in node.studies() if row["study_uid"] == study_uid]
        if not rows or rows[-1]["state"] not in ("delivered", "failed"):
            return None
        row: dict[str, Any] = rows[-1]
        failed = row["state"] == "failed"
        decided = row["priority_history"] and row["priority_history"][-1]["rule"] != "arrival"
        return row if failed or decided else None

    return dict(wait_for(done, 120, "the study delivered and prioritised", interval_s=0.2))
