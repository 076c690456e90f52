"""Conditions on an engine's answer (cadnode.infer.conditions): one grammar for a pipeline
step's `when:` in rules.yaml and a priority rule's `when:` in priority.yaml, its errors with
file and line in both, and the one evaluator on each kind of typed answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cadnode.core.ordering import Order
from cadnode.core.yamlfile import ConfigError
from cadnode.infer.answers import Answer
from cadnode.infer.conditions import AnswerCondition
from cadnode.prioritize.policy import load_policy
from cadnode.route.language import Op
from cadnode.route.rules import load_rules
from cadnode.route.steps import Step
from tests.answer_cases import detector_answer, ruleout_answer, segmenter_answer
from tests.peers import REPO

ENGINES = ["cxr-ruleout", "cxr-segmenter", "cxr-findings", "dbt-detector"]
SHARE = "percent_of_hemithorax"
BETWEEN_60_70 = {"between": [0.6, 0.7]}


def condition(**tests: Any) -> AnswerCondition:
    return AnswerCondition.model_validate(tests)


# --- the grammar, in both files ----------------------------------------------------------

# A policy rule whose `when:` starts on line 5, its tests from line 6.
POLICY = "rules:\n  - name: r\n    priority: HIGH\n    reason: x\n    when:\n"
# A pipeline whose second step's `when:` is on line 7, `step:` on line 8, the tests from 9.
PIPELINE = (
    "rules:\n  - name: r\n    action: infer\n    pipeline:\n      - cxr-ruleout\n"
    "      - engine: cxr-segmenter\n        when:\n          step: cxr-ruleout\n"
)


def policy_problems(tmp_path: Path, lines: list[str]) -> list[str]:
    path = tmp_path / "priority.yaml"
    path.write_text(POLICY + "".join(f"      {line}\n" for line in lines))
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    return caught.value.problems


def pipeline_problems(tmp_path: Path, lines: list[str]) -> list[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(PIPELINE + "".join(f"          {line}\n" for line in lines))
    with pytest.raises(ConfigError) as caught:
        load_rules(path, ENGINES)
    return caught.value.problems


# (the tests, the key the error names below `when`, the index of the line it names (None:
# the `when:` line itself), what the error says)
MISTAKES = [
    (
        ["probability_at_least: 0.9"],
        "",
        None,
        "'probability_at_least' is written probability: {at_least: X}",
    ),
    (
        ["label: pneumothorax", "measurement: percent_of_hemithorax", "above: 10"],
        "",
        None,
        "'above' is written measurement: {NAME: {greater_than: X}}",
    ),
    (
        ["lable: pneumothorax"],
        "",
        None,
        "unknown test 'lable': expected step, engine, ruled_out, label, operating_point, "
        "probability, measurement",
    ),
    (
        ["label: pneumothorax", "probability: {atleast: 0.5}"],
        ".probability",
        1,
        "unknown operator 'atleast': expected one of less_than, at_most, greater_than, "
        "at_least, between",
    ),
    (["probability: 0.5"], ".probability", 0, "expected operators and numbers, e.g. {at_least"),
    (["probability: {at_least: high}"], ".probability", 0, "'at_least' takes a number (got"),
    (["probability: {greater_than: true}"], ".probability", 0, "'greater_than' takes a number"),
    (
        ["probability: {at_most: 1.5}"],
        ".probability",
        0,
        "a probability is compared with numbers from 0 to 1",
    ),
    (
        ["probability: {between: [0.6, 0.3]}"],
        ".probability",
        0,
        "'between' takes the lower bound first",
    ),
    (
        ["probability: {between: 0.3}"],
        ".probability",
        0,
        "'between' takes two numbers, [lowest, highest]",
    ),
    (
        ["label: pneumothorax", "measurement: percent_of_hemithorax"],
        ".measurement",
        1,
        "expected a measurement's name and operators, e.g. "
        "{percent_of_hemithorax: {greater_than: 10}}",
    ),
    (
        ["label: pneumothorax", "measurement: {percent_of_hemithorax: 10}"],
        ".measurement.percent_of_hemithorax",
        1,
        "expected operators and numbers",
    ),
    (["ruled_out: maybe"], ".ruled_out", 0, "Input should be a valid boolean (got 'maybe')"),
    (["label: ''"], ".label", 0, "String should have at least 1 character"),
]


@pytest.mark.parametrize(("lines", "key", "index", "message"), MISTAKES)
def test_a_mistake_in_a_priority_condition_names_its_file_line_and_key(
    tmp_path: Path, lines: list[str], key: str, index: int | None, message: str
) -> None:
    [problem] = policy_problems(tmp_path, lines)
    line = 5 if index is None else 6 + index
    assert problem.startswith(f"{tmp_path / 'priority.yaml'}:{line}:"), problem
    assert f": rules.0.when{key}: " in problem and message in problem, problem


@pytest.mark.parametrize(("lines", "key", "index", "message"), MISTAKES)
def test_the_same_mistake_in_a_pipeline_condition_is_reported_the_same_way(
    tmp_path: Path, lines: list[str], key: str, index: int | None, message: str
) -> None:
    [problem] = pipeline_problems(tmp_path, lines)
    line = 7 if index is None else 9 + index
    assert problem.startswith(f"{tmp_path / 'rules.yaml'}:{line}:"), problem
    assert f": rules.0.pipeline.1.when{key}: " in problem and message in problem, problem


def test_a_condition_needs_a_test_besides_naming_its_answer(tmp_path: Path) -> None:
    needs = "a condition needs a test: ruled_out, label, operating_point, probability"
    [problem] = policy_problems(tmp_path, ["engine: cxr-ruleout"])
    assert problem.startswith(f"{tmp_path / 'priority.yaml'}:5:5: rules.0.when: ")
    assert needs in problem
    [problem] = pipeline_problems(tmp_path, [])  # only `step:`
    assert problem.startswith(f"{tmp_path / 'rules.yaml'}:7:9: rules.0.pipeline.1.when: ")
    assert needs in problem


def test_a_step_names_its_answer_with_step_and_a_policy_rule_with_engine(
    tmp_path: Path,
) -> None:
    [problem] = policy_problems(tmp_path, ["step: cxr-ruleout", "ruled_out: true"])
    assert problem.startswith(f"{tmp_path / 'priority.yaml'}:5:5: rules.0.when: ")
    assert "step: names a pipeline step (rules.yaml)" in problem and "engine:" in problem
    [problem] = pipeline_problems(tmp_path, ["engine: cxr-ruleout", "ruled_out: false"])
    assert problem.startswith(f"{tmp_path / 'rules.yaml'}:7:9: rules.0.pipeline.1.when: ")
    assert "names the answer it tests with step:" in problem
    rules = tmp_path / "rules.yaml"
    without_step = PIPELINE.replace("          step: cxr-ruleout\n", "")
    rules.write_text(without_step + "          ruled_out: false\n")
    with pytest.raises(ConfigError) as caught:
        load_rules(rules, ENGINES)
    [problem] = caught.value.problems
    assert problem.startswith(f"{rules}:7:9: rules.0.pipeline.1.when: ")
    assert "names the earlier step whose answer it tests: step:" in problem


def test_every_test_of_the_grammar_loads_in_both_files(tmp_path: Path) -> None:
    tests = [
        "ruled_out: false",
        "label: pneumothorax",
        "operating_point: present",
        "probability: {greater_than: 0.1, at_most: 1, between: [0, 1]}",
        "measurement: {percent_of_hemithorax: {at_least: 10, less_than: 100},",
        "              area_mm2: {at_least: 1}}",
    ]
    policy = tmp_path / "priority.yaml"
    policy.write_text(POLICY + "".join(f"      {t}\n" for t in ["engine: cxr-segmenter", *tests]))
    when = load_policy(policy).rules[0].when
    rules = tmp_path / "rules.yaml"
    rules.write_text(PIPELINE + "".join(f"          {t}\n" for t in tests))
    step = load_rules(rules, ENGINES).rules[0].steps[1].when
    assert step is not None
    names = {"engine", "step"}
    assert when.model_dump(exclude=names) == step.model_dump(exclude=names)
    assert str(step) == (
        "cxr-ruleout: ruled_out is false and label is pneumothorax and operating point "
        "present reached and probability at_most 1, greater_than 0.1, between 0 and 1 and "
        "percent_of_hemithorax less_than 100, at_least 10 and area_mm2 at_least 1"
    )


def test_the_shipped_files_load_in_the_one_grammar() -> None:
    policy = load_policy(REPO / "config" / "priority.yaml")
    large = next(rule for rule in policy.rules if rule.name == "pneumothorax-large")
    assert str(large.when) == (
        "engine is cxr-segmenter and label is pneumothorax and "
        "percent_of_hemithorax greater_than 10"
    )
    rules = load_rules(REPO / "config" / "rules.yaml", ENGINES)
    chest = next(rule for rule in rules.rules if rule.name == "chest-radiograph")
    assert str(chest.steps[1].when) == "cxr-ruleout: ruled_out is false"


def test_the_operators_are_the_rule_languages_ordered_ones() -> None:
    assert {order.value for order in Order} <= {op.value for op in Op}
    assert list(Order) == ["less_than", "at_most", "greater_than", "at_least", "between"]


# --- the evaluator, on each kind of answer -------------------------------------------------


@pytest.mark.parametrize(
    ("bounds", "holds"),
    [
        ({"less_than": 0.5}, False),
        ({"less_than": 0.51}, True),
        ({"at_most": 0.5}, True),
        ({"at_most": 0.49}, False),
        ({"greater_than": 0.5}, False),
        ({"greater_than": 0.49}, True),
        ({"at_least": 0.5}, True),
        ({"at_least": 0.51}, False),
        ({"between": [0.5, 0.6]}, True),
        ({"between": [0.4, 0.5]}, True),
        ({"between": [0.3, 0.49]}, False),
        ({"greater_than": 0.3, "less_than": 0.6}, True),  # every bound must hold
        ({"greater_than": 0.3, "less_than": 0.5}, False),
    ],
)
def test_each_operator_on_a_probability(bounds: dict[str, Any], holds: bool) -> None:
    assert condition(probability=bounds).holds(ruleout_answer(0.5)) is holds


@pytest.mark.parametrize(
    ("tests", "holds"),
    [
        ({"ruled_out": True}, True),
        ({"ruled_out": False}, False),
        ({"label": "abnormal"}, True),
        ({"label": "pneumothorax"}, False),
        ({"operating_point": "rule_out"}, False),  # 0.3 is below the rule-out threshold
        ({"operating_point": "urgent"}, False),
        ({"operating_point": "nonexistent"}, False),
        ({"probability": {"less_than": 0.47}}, True),
        ({"measurement": {"area_mm2": {"at_least": 0}}}, False),  # a classifier measures nothing
        ({"ruled_out": True, "probability": {"greater_than": 0.4}}, False),
    ],
)
def test_a_classifier_answer(tests: dict[str, Any], holds: bool) -> None:
    assert condition(**tests).holds(ruleout_answer(0.3)) is holds


def test_a_classifier_answer_above_its_operating_points() -> None:
    urgent = ruleout_answer(0.95)
    assert condition(operating_point="urgent").holds(urgent)
    assert condition(operating_point="rule_out", ruled_out=False).holds(urgent)
    assert not condition(ruled_out=True).holds(urgent)


@pytest.mark.parametrize(
    ("tests", "holds"),
    [
        ({"label": "pneumothorax", "operating_point": "present"}, True),
        ({"label": "pneumothorax", "measurement": {SHARE: {"greater_than": 10}}}, True),
        ({"label": "pneumothorax", "measurement": {SHARE: {"greater_than": 20}}}, False),
        # Every test holds on one finding: the right lung has no share of the hemithorax.
        ({"label": "right_lung", "measurement": {SHARE: {"at_least": 0}}}, False),
        ({"label": "right_lung", "measurement": {"area_mm2": {"at_least": 10000}}}, True),
        ({"measurement": {"area_mm2": {"at_most": 900}}}, True),  # the pneumothorax's
        ({"probability": {"at_least": 0.95}}, True),  # the lungs'
        ({"label": "pneumothorax", "probability": {"at_least": 0.95}}, False),
        ({"ruled_out": False}, False),  # a segmenter does not rule out
        ({"ruled_out": True}, False),
    ],
)
def test_a_segmenter_answer(tests: dict[str, Any], holds: bool) -> None:
    assert condition(**tests).holds(segmenter_answer(18.0)) is holds


def test_an_empty_segment_is_not_present_and_has_no_share() -> None:
    empty = segmenter_answer(None)
    assert not condition(label="pneumothorax", operating_point="present").holds(empty)
    share = {"percent_of_hemithorax": {"at_least": 0}}
    assert not condition(label="pneumothorax", measurement=share).holds(empty)
    assert condition(label="left_lung", operating_point="present").holds(empty)


@pytest.mark.parametrize(
    ("answer", "tests", "holds"),
    [
        (detector_answer(0.8, 0.65, 0.3), {"operating_point": "report"}, True),
        (detector_answer(0.3), {"operating_point": "report"}, False),
        (detector_answer(0.3), {"label": "mass"}, True),  # the volume's own label
        (detector_answer(0.8, 0.65), {"probability": {"at_least": 0.8}}, True),
        (detector_answer(0.8, 0.65), {"label": "mass", "probability": BETWEEN_60_70}, True),
        (detector_answer(0.8), {"probability": BETWEEN_60_70}, False),
        (detector_answer(0.8), {"measurement": {"width_mm": {"at_least": 3}}}, True),
        (detector_answer(0.3), {"measurement": {"width_mm": {"at_least": 3}}}, False),
        (detector_answer(0.8), {"ruled_out": False}, False),
    ],
)
def test_a_detector_answer(answer: Answer, tests: dict[str, Any], holds: bool) -> None:
    assert condition(**tests).holds(answer) is holds


def test_engine_names_whose_answers_and_no_answer_never_passes() -> None:
    urgent = condition(engine="cxr-ruleout", operating_point="urgent")
    assert urgent.holds(ruleout_answer(0.95), "cxr-ruleout")
    assert not urgent.holds(ruleout_answer(0.95), "another-classifier")
    assert not urgent.holds(None, "cxr-ruleout")
    assert condition(operating_point="urgent").holds(ruleout_answer(0.95), "any-engine")


def test_a_condition_is_immutable_and_strict() -> None:
    when = condition(ruled_out=False)
    with pytest.raises(ValidationError):
        when.ruled_out = True
    with pytest.raises(ValidationError):
        condition(ruled_out="false")  # a string is not a decision


# --- in a pipeline: what infer runs a step on --------------------------------------------


CASCADE = """rules:
  - name: chest
    action: infer
    pipeline:
      - cxr-ruleout
      - engine: cxr-segmenter
        when: {step: cxr-ruleout, ruled_out: false}
      - engine: dbt-detector
        when:
          step: cxr-segmenter
          label: pneumothorax
          measurement: {percent_of_hemithorax: {greater_than: 10}}
"""


def test_a_step_may_depend_on_any_earlier_answer_through_the_job_pipeline(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(CASCADE)
    steps = load_rules(path, ENGINES).rules[0].steps
    assert str(steps[2].when) == (
        "cxr-segmenter: label is pneumothorax and percent_of_hemithorax greater_than 10"
    )
    # As route stores them in Job.pipeline and infer reads them back.
    stored = [
        Step(engine=s.engine, when=s.when).model_dump(mode="json", exclude_defaults=True)
        for s in steps
    ]
    assert stored[2]["when"] == {
        "step": "cxr-segmenter",
        "label": "pneumothorax",
        "measurement": {"percent_of_hemithorax": {"greater_than": 10.0}},
    }
    segmenter, third = (Step.from_job(entry) for entry in stored[1:])
    answers: dict[tuple[str, str], Answer] = {
        ("cxr-ruleout", "normal"): ruleout_answer(0.1),
        ("cxr-ruleout", "small"): ruleout_answer(0.6),
        ("cxr-ruleout", "large"): ruleout_answer(0.6),
        ("cxr-segmenter", "small"): segmenter_answer(4.0),
        ("cxr-segmenter", "large"): segmenter_answer(25.0),
    }
    films = ["normal", "small", "large"]
    assert segmenter.images(films, answers) == ["small", "large"]
    assert third.images(films, answers) == ["large"]
