"""The priority policy: the shipped file's rules on synthetic engine answers, and its checks.

The answers are the typed ones (cadnode.infer.answers) shaped as each shipped engine gives
them (tests/answer_cases.py); the conditions themselves are tested in test_conditions.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cadnode.core.config import load_settings
from cadnode.core.db import Priority
from cadnode.core.yamlfile import ConfigError
from cadnode.prioritize.policy import EngineResult, Policy, StudyOutcome, load_policy
from tests.answer_cases import detector_answer, ruleout_answer, segmenter_answer
from tests.peers import REPO

SHIPPED = load_policy(REPO / "config" / "priority.yaml")


def ruleout(probability: float) -> EngineResult:
    return EngineResult("cxr-ruleout", ruleout_answer(probability))


def segmenter(percent: float | None) -> EngineResult:
    return EngineResult("cxr-segmenter", segmenter_answer(percent))


def dbt(probability: float) -> EngineResult:
    return EngineResult("dbt-detector", detector_answer(probability))


@pytest.mark.parametrize(
    ("results", "level", "rule"),
    [
        ([segmenter(25.0)], Priority.HIGH, "pneumothorax-large"),
        ([ruleout(0.6), segmenter(4.0)], Priority.HIGH, "pneumothorax-present"),
        ([dbt(0.8)], Priority.HIGH, "dbt-finding"),
        ([dbt(0.3)], Priority.MEDIUM, "default"),
        ([ruleout(0.95)], Priority.HIGH, "chest-urgent"),
        ([ruleout(0.1)], Priority.LOW, "chest-ruled-out"),
        ([ruleout(0.1), ruleout(0.2)], Priority.LOW, "chest-ruled-out"),
        ([ruleout(0.6), segmenter(None)], Priority.MEDIUM, "default"),
        # One film of two not ruled out: the study is not confidently normal.
        ([ruleout(0.1), ruleout(0.6)], Priority.MEDIUM, "default"),
    ],
)
def test_the_shipped_policy_on_engine_answers(
    results: list[EngineResult], level: Priority, rule: str
) -> None:
    decision = SHIPPED.decide(StudyOutcome(results=results))
    assert (decision.level, decision.rule) == (level, rule)
    assert decision.reason


def test_no_result_and_failure_stay_medium_and_say_why() -> None:
    waiting = SHIPPED.decide(StudyOutcome(unanswered=["no rule matched"]))
    assert (waiting.level, waiting.rule) == (Priority.MEDIUM, "no_result")
    assert "no rule matched" in waiting.reason
    failed = SHIPPED.decide(StudyOutcome(unanswered=["inference failed: boom"], failed=True))
    assert (failed.level, failed.rule) == (Priority.MEDIUM, "failed")
    assert SHIPPED.arrival().level is Priority.MEDIUM


def test_a_study_with_an_unread_image_is_never_lowered() -> None:
    outcome = StudyOutcome(results=[ruleout(0.1)], unanswered=["inference failed"], failed=True)
    assert SHIPPED.decide(outcome).level is Priority.MEDIUM


def test_policy_errors_name_file_line_and_key(tmp_path: Path) -> None:
    policy = tmp_path / "priority.yaml"
    policy.write_text(
        "no_result: LOW\n"
        "rules:\n"
        "  - name: a\n"
        "    when: {engine: cxr-ruleout}\n"
        "    priority: HIGH\n"
        "    reason: x\n"
        "  - name: b\n"
        "    when: {measurement: percent_of_hemithorax}\n"
        "    priority: URGENT\n"
        "    reason: y\n"
    )
    with pytest.raises(ConfigError) as error:
        load_policy(policy)
    problems = error.value.problems
    assert len(problems) == 4
    assert any(p.startswith(f"{policy}:1:1: no_result:") and "never LOW" in p for p in problems)
    assert any(
        p.startswith(f"{policy}:4:5: rules.0.when:") and "needs a test" in p for p in problems
    )
    assert any(
        p.startswith(f"{policy}:8:12: rules.1.when.measurement:")
        and "{percent_of_hemithorax: {greater_than: 10}}" in p
        for p in problems
    ), problems
    assert any(p.startswith(f"{policy}:9:5: rules.1.priority:") for p in problems)


def test_an_empty_policy_keeps_everything_medium() -> None:
    assert Policy().decide(StudyOutcome(results=[ruleout(0.1)])).level is Priority.MEDIUM


def test_publishers_are_checked_when_the_configuration_loads(tmp_path: Path) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text(
        "priority:\n"
        "  ups: {push: [nowhere]}\n"
        "  hl7:\n"
        "    ris: {host: ris, port: 2575, message: ADT^A08}\n"
        "  webhooks:\n"
        "    hook: {url: 'ftp://x'}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_settings({"CADNODE_CONFIG": str(config)})
    problems = error.value.problems
    assert any(p.startswith(f"{config}:4:") and "priority.hl7.ris.message" in p for p in problems)
    assert any(p.startswith(f"{config}:6:") and "priority.webhooks.hook.url" in p for p in problems)
    config.write_text("priority:\n  ups: {push: [nowhere]}\n")
    with pytest.raises(ConfigError) as error:
        load_settings({"CADNODE_CONFIG": str(config)})
    assert "priority.ups.push names unknown destinations: ['nowhere']" in str(error.value)


def test_the_shipped_configuration_uses_the_shipped_policy() -> None:
    settings = load_settings({})
    assert settings.priority.policy_file == REPO / "config" / "priority.yaml"
    assert settings.priority.ups.enabled and not settings.priority.publish_arrival
