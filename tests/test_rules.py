"""The rule language: VR-aware values, operators, combinators, scope, order, actions, errors;
the route stage and a conditional pipeline against a real engine; live reload in-process;
and `cadnode rules check | explain | test` as commands."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    ComputedRadiographyImageStorage as CR_IMAGE,
)
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlmodel import select

from cadnode.core.config import EMBEDDED_CONFIG, Destination
from cadnode.core.db import Database, Delivery, JobState, PriorityClass, Result
from cadnode.core.yamlfile import ConfigError
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom, write_chest_radiograph
from cadnode.infer.runtime import Engine
from cadnode.infer.stage import Inference
from cadnode.route import LiveRules, Router, RuleSet, Subject, load_rules
from cadnode.route.explain import run_cases
from cadnode.route.steps import Step
from tests.answer_cases import ruleout_answer
from tests.peers import REPO, wait_for
from tests.rows import instance_row, job_of, new_job
from tests.test_cli import cadnode

SHIPPED_RULES = EMBEDDED_CONFIG.parent / "rules.yaml"
ENGINES = ["cxr-ruleout", "cxr-segmenter", "cxr-findings", "dbt-detector"]  # the shipped ones
STUDY, SERIES = generate_uid(), generate_uid()


def header(series: str = SERIES, **attributes: Any) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def subject(*, calling_ae: str | None = None, called_ae: str | None = None,
            source_address: str | None = None, **attributes: Any) -> Subject:  # fmt: skip
    return Subject(header(**attributes), calling_ae, called_ae, source_address)


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, engines: list[str] = ENGINES, **kw: Any) -> RuleSet:
    return load_rules(write(tmp_path, text), engines, **kw)


def one_rule(match: str, scope: str = "instance") -> str:
    return f"rules:\n  - name: r\n    scope: {scope}\n    match: {match}\n    action: ignore\n"


def fires(tmp_path: Path, match: str, *subjects: Subject, scope: str = "instance") -> bool:
    return load(tmp_path, one_rule(match, scope)).decide(subjects).rule_names == ["r"]


def problems(tmp_path: Path, text: str, engines: list[str] = ENGINES, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, engines, **kw)
    return caught.value.problems


# --- the shipped rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({}, "chest-radiograph"),
        ({"Modality": "CR", "ViewPosition": "AP", "SOPClassUID": CR_IMAGE}, "chest-radiograph"),
        ({"ViewPosition": "LL"}, "everything-else"),
        ({"BodyPartExamined": "HAND"}, "everything-else"),
        ({"Modality": "CT"}, "everything-else"),
        # A PDF or a screenshot labelled as a chest film is not a film.
        ({"SOPClassUID": EncapsulatedPDFStorage}, "everything-else"),
        ({"SOPClassUID": SecondaryCaptureImageStorage}, "everything-else"),
    ],
)
def test_shipped_rules_send_frontal_chest_films_to_the_rule_out_cascade(
    changes: dict[str, str], rule: str
) -> None:
    rules = load_rules(SHIPPED_RULES, ENGINES)
    attributes = {
        "SOPClassUID": DigitalXRayImageStorageForPresentation,
        "Modality": "DX",
        "BodyPartExamined": "CHEST",
        "ViewPosition": "PA",
        **changes,
    }
    decision = rules.decide([subject(**attributes)])
    assert decision.rule_names == [rule]
    if rule == "chest-radiograph":
        ruleout, *cascade = decision.steps()
        assert (ruleout.engine, ruleout.when) == ("cxr-ruleout", None)
        # The segmenter and the findings engine only on the films not ruled out.
        assert [step.engine for step in cascade] == ["cxr-segmenter", "cxr-findings"]
        for step in cascade:
            assert step.when is not None
            assert (step.when.step, step.when.ruled_out) == ("cxr-ruleout", False)
        assert decision.priority is PriorityClass.urgent
    else:
        assert not decision.acts


def test_the_version_is_the_content_hash(tmp_path: Path) -> None:
    copy = write(tmp_path, SHIPPED_RULES.read_text())
    first = load_rules(copy, ENGINES).version
    copy.write_text(SHIPPED_RULES.read_text() + "\n# changed\n")
    assert load_rules(copy, ENGINES).version != first


# --- values read as their VR says, and every operator ----------------------------------

CODE = Dataset()
CODE.CodeValue, CODE.CodingSchemeDesignator, CODE.CodeMeaning = "399348003", "SCT", "lateral"


@pytest.mark.parametrize(
    ("match", "attributes", "expected"),
    [
        # numbers: DS/IS/US/FL/FD compare as numbers ("1.6000" is 1.6; "10" > "9")
        ("{SliceThickness: 1.6}", {"SliceThickness": "1.6000"}, True),
        ("{SliceThickness: {less_than: 2}}", {"SliceThickness": "1.25"}, True),
        ("{SliceThickness: {less_than: 2}}", {"SliceThickness": "10"}, False),
        ("{SeriesNumber: {greater_than: 9}}", {"SeriesNumber": "10"}, True),
        ("{Rows: {at_least: 512}}", {"Rows": 512}, True),
        ("{Rows: {at_least: 512}}", {"Rows": 511}, False),
        ("{SensitivityValue: {between: [100, 200]}}", {"SensitivityValue": 150.0}, True),
        ("{ExposureTimeInms: {at_most: 2.5}}", {"ExposureTimeInms": 2.5}, True),
        ("{KVP: {in: [120, 125]}}", {"KVP": "120.0"}, True),
        # dates, times and date-times as such (offsets ignored)
        ("{StudyDate: {at_least: 2024-01-31}}", {"StudyDate": "20240201"}, True),
        ("{StudyDate: {less_than: '20240131'}}", {"StudyDate": "20240201"}, False),
        ("{StudyDate: 2024-02-01}", {"StudyDate": "20240201"}, True),
        ("{StudyTime: {at_least: '08:00'}}", {"StudyTime": "083000.5"}, True),
        ("{StudyTime: {less_than: '0800'}}", {"StudyTime": "0930"}, False),
        (
            "{AcquisitionDateTime: {greater_than: 2024-01-31T08:00:00}}",
            {"AcquisitionDateTime": "20240131083000+0100"},
            True,
        ),
        # Age Strings in years
        ("{PatientAge: {at_least: 18}}", {"PatientAge": "045Y"}, True),
        ("{PatientAge: {less_than: 1}}", {"PatientAge": "006M"}, True),
        ("{PatientAge: {between: [40, 74]}}", {"PatientAge": "075Y"}, False),
        ("{PatientAge: {greater_than: 002W}}", {"PatientAge": "010D"}, False),
        ("{PatientAge: 045Y}", {"PatientAge": "045Y"}, True),
        # several values: contains, a whole list in order, or any one value
        ("{ImageType: {contains: DERIVED}}", {"ImageType": ["DERIVED", "SECONDARY"]}, True),
        ("{ImageType: {contains: [ORIGINAL, LOCALIZER]}}", {"ImageType": ["ORIGINAL"]}, False),
        (
            "{ImageType: {equals: [ORIGINAL, PRIMARY]}}",
            {"ImageType": ["ORIGINAL", "PRIMARY"]},
            True,
        ),
        (
            "{ImageType: {equals: [PRIMARY, ORIGINAL]}}",
            {"ImageType": ["ORIGINAL", "PRIMARY"]},
            False,
        ),
        ("{ImageType: PRIMARY}", {"ImageType": ["ORIGINAL", "PRIMARY"]}, True),
        (
            "{ImagerPixelSpacing: {equals: [0.139, 0.139]}}",
            {"ImagerPixelSpacing": ["0.139", "0.139"]},
            True,
        ),
        (
            "{ImagerPixelSpacing: {less_than: 0.2}}",
            {"ImagerPixelSpacing": ["0.139", "0.139"]},
            True,
        ),
        # person names by component
        ("{ReferringPhysicianName.family: Smith}", {"ReferringPhysicianName": "Smith^Anna"}, True),
        ("{ReferringPhysicianName.given: Smith}", {"ReferringPhysicianName": "Smith^Anna"}, False),
        (
            "{ReferringPhysicianName: {regex: '^Smith\\^'}}",
            {"ReferringPhysicianName": "Smith^A"},
            True,
        ),
        # text, by keyword or tag, regex anywhere in the value
        ("{SeriesDescription: {regex: '(?i)tomo'}}", {"SeriesDescription": "L CC TOMO"}, True),
        ("{Modality: [CR, DX]}", {"Modality": "MR"}, False),
        ("{'(0018,5101)': PA}", {"ViewPosition": "PA"}, True),
        ("{'00185101': AP}", {"ViewPosition": "PA"}, False),
        (
            "{SOPClassUID: 1.2.840.10008.5.1.4.1.1.1.1}",
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1"},
            True,
        ),
        # exists / missing (an empty value is missing)
        ("{ViewPosition: {exists: true}}", {}, False),
        ("{ViewPosition: {missing: true}}", {}, True),
        ("{ViewPosition: {missing: true}}", {"ViewPosition": ""}, True),
        ("{ViewPosition: {exists: false}}", {"ViewPosition": "PA"}, False),
        # inside a sequence
        ("{ViewCodeSequence.CodeMeaning: lateral}", {"ViewCodeSequence": [CODE]}, True),
        (
            "{ViewCodeSequence.CodeValue: {in: ['399348003', '399067008']}}",
            {"ViewCodeSequence": [CODE]},
            True,
        ),
        ("{ViewCodeSequence: {exists: true}}", {"ViewCodeSequence": [CODE]}, True),
        # combinators; several tests in one mapping must all hold
        ("{Modality: DX, ViewPosition: PA}", {"Modality": "DX", "ViewPosition": "LL"}, False),
        ("{any: [{Modality: MG}, {SeriesDescription: {regex: tomo}}]}", {"Modality": "MG"}, True),
        (
            "{any: [{Modality: MG}, {SeriesDescription: {regex: tomo}}]}",
            {"SeriesDescription": "tomo"},
            True,
        ),
        ("{any: [{Modality: MG}, {SeriesDescription: {regex: tomo}}]}", {"Modality": "DX"}, False),
        (
            "{all: [{Modality: DX}, {not: {ViewPosition: LL}}]}",
            {"Modality": "DX", "ViewPosition": "PA"},
            True,
        ),
        ("{not: {any: [{Modality: CT}, {Modality: MR}]}}", {"Modality": "MR"}, False),
    ],
)
def test_values_compare_as_their_vr_says(
    tmp_path: Path, match: str, attributes: dict[str, Any], expected: bool
) -> None:
    assert fires(tmp_path, match, subject(**attributes)) is expected


@pytest.mark.parametrize(
    ("match", "connection", "expected"),
    [
        ("{calling_ae: MODALITY1}", {"calling_ae": "MODALITY1"}, True),
        ("{not: {calling_ae: TESTER}}", {"calling_ae": "TESTER"}, False),
        ("{called_ae: {in: [CADNODE_RES, RESEARCH]}}", {"called_ae": "CADNODE_RES"}, True),
        ("{called_ae: CADNODE}", {}, False),
        ("{source_address: {within: 10.1.0.0/16}}", {"source_address": "10.1.2.3"}, True),
        (
            "{source_address: {within: [10.1.0.0/16, ::1/128]}}",
            {"source_address": "10.2.0.1"},
            False,
        ),
        ("{source_address: 127.0.0.1}", {"source_address": "127.0.0.1"}, True),
    ],
)
def test_rules_match_on_who_sent_the_images(
    tmp_path: Path, match: str, connection: dict[str, str], expected: bool
) -> None:
    assert fires(tmp_path, match, subject(Modality="DX", **connection)) is expected


def test_a_value_that_is_not_what_its_vr_says_never_matches_and_is_shown(tmp_path: Path) -> None:
    broken = subject()
    tag = Tag("SliceThickness")
    broken.header[tag] = RawDataElement(tag, "DS", 3, b"abc", 0, True, True)
    rules = load(tmp_path, one_rule("{SliceThickness: {less_than: 2}}"))
    [outcome] = rules.evaluate([broken])
    assert not outcome.fired
    assert "(actual: 'abc' (not a number))" in outcome.misses[broken].reason()


# --- scope, order, fan-out, and what a decision asks for ------------------------------


def test_instance_scope_takes_only_the_matching_images(tmp_path: Path) -> None:
    lateral, frontal = subject(ViewPosition="LL"), subject(ViewPosition="PA")
    [outcome] = load(tmp_path, one_rule("{ViewPosition: PA}")).evaluate([lateral, frontal])
    assert outcome.inputs == (frontal,)
    assert outcome.misses[lateral].actual == "'LL'"


def test_series_scope_takes_every_image_of_a_matching_series(tmp_path: Path) -> None:
    other = generate_uid()
    pa, ll, elsewhere = (
        subject(ViewPosition="PA"),
        subject(ViewPosition="LL"),
        subject(series=other, ViewPosition="LL"),
    )
    rules = load(tmp_path, one_rule("{ViewPosition: PA}", scope="series"))
    [outcome] = rules.evaluate([pa, ll, elsewhere])
    assert outcome.inputs == (pa, ll)
    assert elsewhere in outcome.misses


def test_study_scope_sees_the_values_of_all_its_images(tmp_path: Path) -> None:
    cc, mlo = subject(ViewPosition="CC"), subject(ViewPosition="MLO")
    both = "{ViewPosition: {contains: [CC, MLO]}}"
    assert fires(tmp_path, both, cc, mlo, scope="study")
    assert not fires(tmp_path, both, cc, scope="study")
    [problem] = problems(tmp_path, one_rule(both))  # one image holds one view
    assert "holds one value; contains is for" in problem


def fan_out_rules(tmp_path: Path) -> RuleSet:
    return load(
        tmp_path,
        """rules:
  - name: research-copy
    match: {calling_ae: RESEARCH}
    action: forward
    destinations: [research]
    priority: background
    continue: true
  - name: chest
    match: {ViewPosition: PA}
    action: infer
    pipeline: [cxr-ruleout]
    priority: urgent
    quiet_period_s: 5
  - name: rest
    action: ignore
""",
        destinations=["research"],
    )


def test_a_rule_that_continues_lets_later_rules_fire_too(tmp_path: Path) -> None:
    rules = fan_out_rules(tmp_path)
    pa, ll = subject(calling_ae="RESEARCH", ViewPosition="PA"), subject(calling_ae="RESEARCH")
    decision = rules.decide([pa, ll])
    assert decision.rule_names == ["research-copy", "chest"]  # chest stops: rest not reached
    assert [outcome.reached for outcome in rules.evaluate([pa, ll])] == [True, True, False]
    uids = [str(s.header.SOPInstanceUID) for s in (pa, ll)]
    assert decision.forwards() == [(uids[0], "research"), (uids[1], "research")]
    assert decision.inputs == uids[:1]
    assert decision.priority is PriorityClass.urgent  # the most urgent of those that act
    assert decision.quiet_period_s == 5


def test_a_rule_that_stops_keeps_later_rules_from_firing(tmp_path: Path) -> None:
    decision = fan_out_rules(tmp_path).decide([subject(calling_ae="CT1", Modality="CT")])
    assert decision.rule_names == ["rest"] and not decision.acts


def test_fanned_out_pipelines_each_keep_their_own_images(tmp_path: Path) -> None:
    rules = load(
        tmp_path,
        """rules:
  - {name: frontal, match: {ViewPosition: PA}, action: infer, pipeline: [cxr-ruleout],
     continue: true}
  - {name: everything, action: infer, pipeline: [cxr-segmenter], priority: background}
""",
        engines=["cxr-ruleout", "cxr-segmenter"],
    )
    pa, ll = subject(ViewPosition="PA"), subject(ViewPosition="LL")
    decision = rules.decide([pa, ll])
    steps = decision.steps()
    assert [(s.engine, s.inputs) for s in steps] == [
        ("cxr-ruleout", [str(pa.header.SOPInstanceUID)]),
        ("cxr-segmenter", []),  # all of the job's inputs
    ]
    assert decision.priority is PriorityClass.routine


CASCADE = """rules:
  - name: chest
    action: infer
    pipeline:
      - cxr-ruleout
      - engine: cxr-segmenter
        when: {step: cxr-ruleout, ruled_out: false}
"""


def test_a_step_runs_only_where_the_earlier_step_allows(tmp_path: Path) -> None:
    rules = load(tmp_path, CASCADE, engines=["cxr-ruleout", "cxr-segmenter"])
    [first, second] = rules.decide([subject()]).steps()
    assert first.when is None and second.when is not None
    answers = {
        ("cxr-ruleout", "a"): ruleout_answer(0.1),  # ruled out
        ("cxr-ruleout", "b"): ruleout_answer(0.6),
    }
    assert second.images(["a", "b", "c"], answers) == ["b"]  # c: no earlier answer, skipped
    assert "cxr-segmenter (only where cxr-ruleout: ruled_out is false)" in (
        rules.rules[0].describe_actions()
    )
    thresholded = Step.model_validate(
        {"engine": "x", "when": {"step": "cxr-ruleout", "probability": {"at_least": 0.3}}}
    )
    assert thresholded.images(["a"], {("cxr-ruleout", "a"): ruleout_answer(0.29)}) == []
    assert thresholded.images(["a"], {("cxr-ruleout", "a"): ruleout_answer(0.3)}) == ["a"]
    # The answer of the step it names, not another engine's for the same image.
    assert thresholded.images(["a"], {("cxr-segmenter", "a"): ruleout_answer(0.3)}) == []


# --- errors: file:line:column, key, bad value, what was expected -----------------------


@pytest.mark.parametrize(
    ("match", "where", "message"),
    [
        ("{Modalty: DX}", "rules.0.match.Modalty", "'Modalty' is not a DICOM keyword or tag"),
        (
            "{SliceThickness: {gt: 2}}",
            "rules.0.match.SliceThickness.gt",
            "unknown operator: expected one of equals, in, regex",
        ),
        (
            "{SliceThickness: {regex: '^1'}}",
            "rules.0.match.SliceThickness.regex",
            "regex applies to text, but SliceThickness is a number",
        ),
        (
            "{Modality: {greater_than: CR}}",
            "rules.0.match.Modality.greater_than",
            "'greater_than' compares numbers, dates, times and ages, but Modality is text",
        ),
        (
            "{ViewPosition: {contains: PA}}",
            "rules.0.match.ViewPosition.contains",
            "ViewPosition holds one value",
        ),
        (
            "{ViewPosition: {equals: [PA, AP]}}",
            "rules.0.match.ViewPosition.equals",
            "use in for any one of several values",
        ),
        (
            "{Modality: {in: CR}}",
            "rules.0.match.Modality.in",
            "'in' takes a list of values; for one value use equals",
        ),
        (
            "{SliceThickness: thin}",
            "rules.0.match.SliceThickness",
            "expected a number: 'thin' is not one (got 'thin')",
        ),
        (
            "{StudyDate: {at_least: yesterday}}",
            "rules.0.match.StudyDate.at_least",
            "expected a date like 2024-01-31",
        ),
        (
            "{StudyTime: {at_least: 0800}}",
            "rules.0.match.StudyTime.at_least",
            "expected a time in quotes like '08:30'",
        ),
        (
            "{PatientAge: {at_least: old}}",
            "rules.0.match.PatientAge.at_least",
            "expected an age in years (45) or an Age String",
        ),
        (
            "{PatientAge: {between: [70, 40]}}",
            "rules.0.match.PatientAge.between",
            "lower bound first",
        ),
        (
            "{SeriesDescription: {regex: '('}}",
            "rules.0.match.SeriesDescription.regex",
            "not a valid regular expression",
        ),
        (
            "{ViewPosition: {exists: yes}}",
            "rules.0.match.ViewPosition.exists",
            "'exists' takes true or false (got 'yes')",
        ),
        (
            "{PixelData: {equals: x}}",
            "rules.0.match.PixelData.equals",
            "only exists / missing apply",
        ),
        (
            "{Modality.CodeValue: x}",
            "rules.0.match.Modality.CodeValue",
            "Modality is not a sequence",
        ),
        ("{Modality.family: x}", "rules.0.match.Modality.family", "Modality is not a person name"),
        (
            "{Modality: {within: 10.0.0.0/8}}",
            "rules.0.match.Modality.within",
            "applies to source_address only",
        ),
        (
            "{source_address: {within: nowhere}}",
            "rules.0.match.source_address.within",
            "expected a network like 10.0.0.0/8",
        ),
        (
            "{StationName: 1234}",
            "rules.0.match.StationName",
            "expected text (quote values that look like numbers",
        ),
        ("{any: {Modality: CR}}", "rules.0.match.any", "'any' takes a list of conditions"),
        ("CR", "rules.0.match", "expected a mapping of tests"),
        ("{all: []}", "rules.0.match.all", "'all' takes a list of conditions"),
        ("{ViewPosition: {}}", "rules.0.match.ViewPosition", "a mapping of operators, got {}"),
        ("{PatientAge: {between: [40]}}", "rules.0.match.PatientAge.between", "two bounds"),
        ("{SeriesDescription: {regex: 12}}", "rules.0.match.SeriesDescription.regex", "quotes"),
        ("{source_address: 10.0.0.300}", "rules.0.match.source_address", "an IP address"),
        (
            "{AcquisitionDateTime: {at_least: soon}}",
            "rules.0.match.AcquisitionDateTime.at_least",
            "date-time",
        ),
        ("{PatientName.nickname: x}", "rules.0.match.PatientName.nickname", "not a DICOM keyword"),
    ],
)
def test_a_condition_error_names_its_position_key_value_and_what_was_expected(
    tmp_path: Path, match: str, where: str, message: str
) -> None:
    [problem] = problems(tmp_path, one_rule(match))
    path = tmp_path / "rules.yaml"
    assert problem.startswith(f"{path}:4:"), problem  # the match is on line 4
    assert f": {where}: " in problem and message in problem, problem


SEGMENTER_IF_NOT_RULED_OUT = "{engine: cxr-segmenter, when: {step: cxr-ruleout, ruled_out: false}}"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "action: infer\n    pipeline: [cxr-ruleout, nope]",
            ":6:29: rules.0.pipeline.1: unknown engine 'nope' "
            "(installed: cxr-ruleout, cxr-segmenter)",
        ),
        (
            "action: forward\n    destinations: [pacs, nowhere]",
            ":6:26: rules.0.destinations.1: unknown destination 'nowhere' (configured: pacs)",
        ),
        (
            f"action: infer\n    pipeline: [{SEGMENTER_IF_NOT_RULED_OUT}, cxr-ruleout]",
            "rules.0.pipeline.0.when.step: a step condition names an earlier step of this "
            "pipeline: there is none (got 'cxr-ruleout')",
        ),
        (
            "action: infer\n    pipeline: [cxr-ruleout, "
            "{engine: cxr-segmenter, when: {step: cxr-ruleout, ruled_out: maybe}}]",
            "rules.0.pipeline.1.when.ruled_out: Input should be a valid boolean (got 'maybe')",
        ),
        (
            "action: infer\n    pipeline: "
            "[cxr-ruleout, {engine: cxr-segmenter, when: {step: cxr-ruleout}}]",
            ":6:53: rules.0.pipeline.1.when: Value error, a condition needs a test: ruled_out, "
            "label, operating_point, probability or measurement",
        ),
        (
            "action: infer\n    pipeline: "
            "[cxr-ruleout, {engine: cxr-segmenter, when: {ruled_out: false}}]",
            ":6:53: rules.0.pipeline.1.when: Value error, a step's condition names the earlier "
            "step whose answer it tests: step:",
        ),
        (
            "action: infer\n    pipeline: [cxr-ruleout, {engine: cxr-segmenter, "
            "when: {step: cxr-ruleout, engine: cxr-ruleout, ruled_out: false}}]",
            "rules.0.pipeline.1.when: Value error, a step's condition names the answer it tests "
            "with step:",
        ),
        (
            "action: infer\n    pipeline: [cxr-ruleout, {engine: cxr-segmenter, "
            "when: {step: cxr-ruleout, probability: {atleast: 0.3}}}]",
            "rules.0.pipeline.1.when.probability: Value error, unknown operator 'atleast': "
            "expected one of less_than, at_most, greater_than, at_least, between",
        ),
        (
            "action: infer\n    pipeline: [cxr-ruleout, cxr-ruleout]",
            "rules.0.pipeline.1: engine 'cxr-ruleout' is already a step of this pipeline",
        ),
        ("action: infer", ":2:5: rules.0: Value error, action 'infer' needs a pipeline of engines"),
        ("action: ignore\n    pipeline: [cxr-ruleout]", "action 'ignore' takes no pipeline"),
        ("action: forward", "action 'forward' needs destinations"),
        (
            "action: [ignore, forward]\n    destinations: [pacs]",
            "'ignore' cannot be combined with other actions",
        ),
        (
            "action: sing",
            ":5:5: rules.0.action: Value error, 'sing' is not an action: "
            "expected infer, forward or ignore",
        ),
        (
            "action: ignore\n    priority: asap",
            ":6:5: rules.0.priority: "
            "Input should be 'urgent', 'routine' or 'background' (got 'asap')",
        ),
        (
            "action: ignore\n    scope: patient",
            ":6:5: rules.0.scope: Input should be 'instance', 'series' or 'study' (got 'patient')",
        ),
        (
            "action: ignore\n    quiet_period_s: -1",
            "rules.0.quiet_period_s: Input should be greater than or equal to 0 (got -1)",
        ),
        ("action: ignore\n    stop: true", ":6:5: rules.0.stop: Extra inputs are not permitted"),
        ("action: ignore\n    destinations: [pacs]", "destinations take action 'forward'"),
        ("action: ignore\n  - [not, a, rule]", ":6:5: rules.1: Input should be a valid dictionary"),
    ],
)
def test_a_rule_error_names_its_position_key_value_and_what_was_expected(
    tmp_path: Path, rule: str, message: str
) -> None:
    text = f"rules:\n  - name: a\n    match: {{Modality: DX}}\n    description: d\n    {rule}\n"
    found = problems(tmp_path, text, ["cxr-ruleout", "cxr-segmenter"], destinations=["pacs"])
    assert any(message in p for p in found), found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules:\n  - name: a\n    action: [ignore\n", ":4:1: not valid YAML"),
        ("version: 2\nrules: []\n", ":1:1: version: Extra inputs are not permitted"),
        ("- name: a\n", ":1:1: (top level): Input should be a valid dictionary"),
    ],
)
def test_a_file_error_names_its_position(tmp_path: Path, text: str, message: str) -> None:
    [problem] = problems(tmp_path, text)
    assert problem.startswith(str(tmp_path / "rules.yaml")) and message in problem, problem


def test_every_error_is_listed_top_down_and_a_name_is_used_once(tmp_path: Path) -> None:
    text = (
        "rules:\n  - name: a\n    match: {Modality: {regex: 1}}\n    action: ignore\n"
        "  - name: a\n    match: {Rows: {regex: x}}\n    action: ignore\n"
        "  - name: b\n    action: sing\n"
    )
    found = problems(tmp_path, text)
    assert [p.split(": ")[1] for p in found] == [
        "rules.0.match.Modality.regex",
        "rules.1.name",
        "rules.1.match.Rows.regex",
        "rules.2.action",
    ]
    assert "used by an earlier rule" in found[1] and "(got 'a')" in found[1]


# --- the route stage and the conditional pipeline, on a database ----------------------


def store(database: Database, spool: Path, films: list[Dataset], **arrival: str) -> int:
    """The films as receive leaves them: written to the spool, indexed, the job complete."""
    with database.session() as session:
        job = new_job(session, str(films[0].StudyInstanceUID), state=JobState.complete)
        for film in films:
            relative = f"{film.SOPInstanceUID}.dcm"
            film.save_as(spool / relative, enforce_file_format=True)
            arrived = {"called_ae": "CADNODE", "peer": "127.0.0.1:40000", **arrival}
            session.add(instance_row(film, relative, job, **arrived))
        session.commit()
        assert job.id is not None
        return job.id


def film(seed: int, study: str | None = None, size: int = 32, **options: Any) -> Dataset:
    phantom = make_chest_phantom(seed, size=size, opacity=options.pop("opacity", False))
    return chest_dataset(
        phantom, patient_id="P", patient_name="N^N", study_uid=study, seed=seed, **options
    )


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


def test_the_router_records_the_decision_on_the_job(
    tmp_path: Path, database: Database, spool: Path
) -> None:
    rules_path = write(
        tmp_path, CASCADE.replace("name: chest", "name: chest\n    quiet_period_s: 2")
    )
    live = LiveRules(rules_path, ["cxr-ruleout", "cxr-segmenter"])
    lateral = film(1, view="LL")
    frontal = film(2, study=str(lateral.StudyInstanceUID))
    job_id = store(database, spool, [lateral, frontal])
    Router(database, spool, live).advance()
    job = job_of(database, job_id)
    assert job.state is JobState.routed and job.rule == "chest"
    assert job.rules_version == live.current.version
    assert job.pipeline == [
        {"engine": "cxr-ruleout"},
        {"engine": "cxr-segmenter", "when": {"step": "cxr-ruleout", "ruled_out": False}},
    ]
    assert job.inputs == [str(lateral.SOPInstanceUID), str(frontal.SOPInstanceUID)]
    assert job.priority is PriorityClass.routine and job.quiet_period_s == 2


def test_the_router_matches_on_the_called_ae_and_forwards_originals(
    tmp_path: Path, database: Database, spool: Path
) -> None:
    text = (
        "rules:\n  - name: research\n    match: {called_ae: CADNODE_RES}\n"
        "    action: forward\n    destinations: [research]\n  - name: rest\n    action: ignore\n"
    )
    destinations = {"research": Destination(ae_title="RES", host="127.0.0.1", port=104)}
    live = LiveRules(write(tmp_path, text), ENGINES, destinations)
    router = Router(database, spool, live, destinations)
    forwarded = store(database, spool, [film(3)], called_ae="CADNODE_RES")
    ignored = store(database, spool, [film(4)], called_ae="CADNODE")
    router.advance()
    job = job_of(database, forwarded)
    assert job.state is JobState.encoded and "forwarded to research" in str(job.reason)
    with database.session() as session:
        [delivery] = session.exec(select(Delivery)).all()
    assert delivery.destination == "research" and delivery.job_id == forwarded
    assert job_of(database, ignored).state is JobState.ignored
    assert job_of(database, ignored).reason == "rule 'rest' ignores it"


@pytest.fixture(scope="module")
def ruleout() -> Engine:
    return Engine(Bundle(REPO / "engines" / "cxr-ruleout"), max_decoded_bytes=DEFAULT_LIMIT)


def test_inference_skips_a_step_whose_condition_fails(
    tmp_path: Path, database: Database, spool: Path, ruleout: Engine
) -> None:
    """The real rule-out engine, installed a second time under the segmenter's name."""
    live = LiveRules(write(tmp_path, CASCADE), ["cxr-ruleout", "cxr-segmenter"])
    normal, abnormal = film(11, size=256), film(12, size=256, opacity=True)
    jobs = [store(database, spool, [normal]), store(database, spool, [abnormal])]
    Router(database, spool, live).advance()
    engines = {"cxr-ruleout": ruleout, "cxr-segmenter": ruleout}
    Inference(database, spool, engines).advance()
    ruled_out = []
    with database.session() as session:
        for job_id in jobs:
            results = session.exec(select(Result).where(Result.job_id == job_id)).all()
            assert job_of(database, job_id).state is JobState.inferred
            first = results[0].answer["ruled_out"]
            assert len(results) == (1 if first else 2)  # the second step only if not ruled out
            ruled_out.append(first)
    assert ruled_out == [True, False]  # both branches were taken


# --- live reload, in process ----------------------------------------------------------

VALID = "rules:\n  - name: {name}\n    action: ignore\n"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveRules]:
    rules = LiveRules(write(tmp_path, VALID.format(name="first")), ENGINES, poll_s=0.05)
    rules.start()
    yield rules
    rules.stop()


def test_a_changed_file_is_swapped_in_and_an_invalid_one_refused(live: LiveRules) -> None:
    first = live.current
    live.path.write_text(VALID.format(name="second"))
    wait_for(lambda: live.current.rules[0].name == "second", 20, "the changed file to load")
    assert live.current.version != first.version
    second = live.current
    with structlog.testing.capture_logs() as events:
        live.path.write_text("rules:\n  - name: x\n    action: infer\n    pipeline: [nope]\n")
        wait_for(lambda: any(e["event"] == "rules.refused" for e in events), 5, "a refusal")
    [refusal] = [e for e in events if e["event"] == "rules.refused"]
    assert refusal["trigger"] == "file-changed" and refusal["kept_version"] == second.version
    assert any(":4:" in p and "unknown engine 'nope'" in p for p in refusal["problems"])
    time.sleep(0.2)
    assert live.current is second  # the old rules stay in force


def test_sighup_reloads_what_the_file_watch_cannot_see(live: LiveRules) -> None:
    """A copy that keeps size and modification time (cp -p) is only seen on request."""
    stat = live.path.stat()
    live.path.write_text(VALID.format(name="third"))  # same length as "first"
    os.utime(live.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    if live.path.stat().st_ino == stat.st_ino:
        time.sleep(0.2)
        assert live.current.rules[0].name == "first"
    live.request_reload()
    wait_for(lambda: live.current.rules[0].name == "third", 20, "the reload on request")


# --- the commands ---------------------------------------------------------------------


def test_rules_check_accepts_the_shipped_rules_and_lists_errors_with_exit_2(
    tmp_path: Path,
) -> None:
    done = cadnode("rules", "check")
    assert done.returncode == 0, done.stderr
    assert "3 rule(s) OK, version" in done.stdout
    bad = write(tmp_path, one_rule("{SliceThickness: {regex: '^1'}, Modality: {less_than: 3}}"))
    done = cadnode("rules", "check", str(bad))
    assert done.returncode == 2
    assert [line.split(": ")[1] for line in done.stderr.splitlines()] == [
        "rules.0.match.SliceThickness.regex",
        "rules.0.match.Modality.less_than",
    ]


def test_rules_explain_says_which_rule_fires_and_why_the_others_do_not(tmp_path: Path) -> None:
    frontal = tmp_path / "frontal.dcm"
    lateral = tmp_path / "lateral.dcm"
    write_chest_radiograph(frontal, seed=21, size=32)
    write_chest_radiograph(lateral, seed=22, size=32, view="LL")
    done = cadnode("rules", "explain", str(frontal), str(lateral))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.index(str(frontal)) < text.index(str(lateral))
    by_file = text.split(str(lateral))
    assert (
        "chest-radiograph      FIRES    infer cxr-ruleout, then cxr-segmenter (only where "
        "cxr-ruleout: ruled_out is false), then cxr-findings (only where cxr-ruleout: "
        "ruled_out is false); priority urgent; stops here"
    ) in by_file[0]
    assert "everything-else       skipped  not reached: 'chest-radiograph' stopped" in by_file[0]
    assert (
        "chest-radiograph      no       line 50: ViewPosition in [PA, AP] (actual: 'LL')"
        in (by_file[1])
    )
    assert "=> everything-else" in by_file[1]


def test_rules_test_runs_the_shipped_cases_and_fails_on_a_mismatch(tmp_path: Path) -> None:
    done = cadnode("rules", "test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", 0 failed" in done.stdout and "FAIL" not in done.stdout
    write_chest_radiograph(tmp_path / "lateral.dcm", seed=23, size=32, view="LL")
    cases = write(
        tmp_path,
        """cases:
  - name: frontal chest
    attributes: {SOPClassUID: 1.2.840.10008.5.1.4.1.1.1.1, Modality: DX, BodyPartExamined: CHEST,
                 ViewPosition: AP, PatientAge: 045Y}
    expect: chest-radiograph
    priority: urgent
  - name: a lateral film expected (wrongly) to run the engine
    file: lateral.dcm
    expect: chest-radiograph
  - name: priority expected wrongly
    attributes: {SOPClassUID: 1.2.840.10008.5.1.4.1.1.1, Modality: CR, BodyPartExamined: CHEST,
                 ViewPosition: PA}
    expect: chest-radiograph
    priority: background
""",
        "cases.yaml",
    )
    done = cadnode("rules", "test", str(cases))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "PASS  frontal chest"
    assert lines[1].startswith(
        "FAIL  a lateral film expected (wrongly) to run the engine: expected chest-radiograph, "
        "fired everything-else ('chest-radiograph': line 50: ViewPosition in [PA, AP] "
        "(actual: 'LL'))"
    )
    assert lines[2] == "FAIL  priority expected wrongly: expected priority background, got urgent"
    assert lines[3].startswith("3 case(s), 2 failed")


def test_rules_test_names_a_bad_case_with_its_position(tmp_path: Path) -> None:
    cases = write(
        tmp_path,
        "cases:\n  - name: x\n    attributes: {PatientAge: '45', Modalty: DX}\n    expect: []\n",
        "cases.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        run_cases(load_rules(SHIPPED_RULES, ENGINES), cases)
    assert [p.split(": ")[:2] for p in caught.value.problems] == [
        [f"{cases}:3:18", "cases.0.attributes.PatientAge"],
        [f"{cases}:3:36", "cases.0.attributes.Modalty"],
    ]
