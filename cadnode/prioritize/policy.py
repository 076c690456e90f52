"""The priority policy: which results move a study up or down the reading worklist.

Rules live in `config/priority.yaml` and are tried in order; the first that fires sets the
priority and the reason shown to readers. A rule's `when:` looks at what the engines
answered (the typed answers of cadnode.infer.answers), in the grammar of a pipeline step's
`when:` (cadnode.infer.conditions), naming an engine rather than a step:

    when: {engine: cxr-segmenter, label: pneumothorax,
           measurement: {percent_of_hemithorax: {greater_than: 10}}}

Fallbacks (no result yet, processing failed, results but no rule fired) may be HIGH or
MEDIUM, never LOW: only a rule that positively matched may sink a study.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from cadnode.core.db import Priority
from cadnode.core.yamlfile import load_model, position, read_yaml
from cadnode.infer.answers import Answer
from cadnode.infer.conditions import PolicyCondition


class Quantifier(StrEnum):
    any = "any"  # some result of the study satisfies the condition
    all = "all"  # the study has results, every one satisfies it, and no image went unread


class PolicyRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    priority: Priority
    reason: str = Field(min_length=1)  # shown on the worklist and in `cadnode studies`
    when: PolicyCondition
    results: Quantifier = Quantifier.any

    def fires(self, outcome: StudyOutcome) -> bool:
        results = [r for r in outcome.results if self.when.engine in (None, r.engine)]
        satisfied = [self.when.holds(r.answer, r.engine) for r in results]
        if self.results is Quantifier.any:
            return any(satisfied)
        return bool(satisfied) and all(satisfied) and not outcome.unanswered


def _never_low(level: Priority) -> Priority:
    if level is Priority.LOW:
        raise ValueError(
            "a fallback may be HIGH or MEDIUM, never LOW: only a rule that matched the "
            "results may lower a study"
        )
    return level


Fallback = Annotated[Priority, AfterValidator(_never_low)]


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[PolicyRule] = Field(default_factory=list)
    no_result: Fallback = Priority.MEDIUM  # arrived, or no engine applies
    failed: Fallback = Priority.MEDIUM  # processing failed before any result
    default: Fallback = Priority.MEDIUM  # results, but no rule fired
    version: str = ""  # content hash of the file, recorded with every decision

    @field_validator("rules")
    @classmethod
    def _names_unique(cls, rules: list[PolicyRule]) -> list[PolicyRule]:
        names = [rule.name for rule in rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique; repeated: {duplicates}")
        return rules

    def arrival(self) -> Decision:
        return Decision(self.no_result, "arrived; no result yet", "arrival")

    def decide(self, outcome: StudyOutcome) -> Decision:
        for rule in self.rules:
            if rule.fires(outcome):
                return Decision(rule.priority, rule.reason, rule.name)
        if outcome.results:
            return Decision(self.default, "no policy rule matched the results", "default")
        why = "; ".join(outcome.unanswered) or "no result"
        if outcome.failed:
            return Decision(self.failed, f"processing failed: {why}", "failed")
        return Decision(self.no_result, f"no result: {why}", "no_result")


@dataclass(frozen=True)
class Decision:
    level: Priority
    reason: str
    rule: str


@dataclass(frozen=True)
class EngineResult:
    engine: str
    answer: Answer


@dataclass
class StudyOutcome:
    """Everything the policy may use about a study: its results, and what went unread."""

    results: list[EngineResult] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)  # why a job version has no result
    failed: bool = False


def load_policy(path: Path) -> Policy:
    document = read_yaml(path)
    policy = load_model(path, Policy, document)
    version = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return policy.model_copy(update={"version": version})


def unknown_engines(path: Path, policy: Policy, installed: Iterable[str]) -> list[str]:
    """Notes (not errors) for rules naming engines that are not installed: they never fire.

    A policy may be written ahead of its engines (the segmenter, the DBT detector)."""
    known = set(installed)
    document = read_yaml(path)
    notes = []
    for i, rule in enumerate(policy.rules):
        engine = rule.when.engine
        if engine is not None and engine not in known:
            line, column = position(document, ("rules", i, "when", "engine")) or (0, 0)
            notes.append(
                f"{path}:{line}:{column}: rules.{i}.when.engine: {engine!r} is not installed; "
                f"rule {rule.name!r} cannot fire until it is"
            )
    return notes
