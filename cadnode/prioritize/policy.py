"""The priority policy: which results move a study up or down the reading worklist.

Rules live in `config/priority.yaml` and are tried in order; the first that fires sets the
priority and the reason shown to readers. A rule looks at what the engines answered. An
engine's answer (a Result row) is read through this contract:

    label: {name: ...}                    the label the probability is about
    probability: 0.93
    operating_points: {NAME: {threshold: 0.4, reached: true}, ...}
    ruled_out: false                      the rule-out filter's decision, if it is one
    measurements: {NAME: 12.5, ...}       optional, e.g. percent_of_hemithorax
    findings: [{label, probability, operating_points, measurements}, ...]
                                          optional: one per segment / detected lesion

A condition is checked against the answer itself and against each of its findings.
Fallbacks (no result yet, processing failed, results but no rule fired) may be HIGH or
MEDIUM, never LOW: only a rule that positively matched may sink a study.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from cadnode.core.db import Priority
from cadnode.core.yamlfile import load_model, position, read_yaml


class Quantifier(StrEnum):
    any = "any"  # some result of the study satisfies the condition
    all = "all"  # the study has results, every one satisfies it, and no image went unread


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str | None = None
    label: str | None = None
    ruled_out: bool | None = None
    operating_point: str | None = None  # ... was reached
    probability_at_least: float | None = Field(default=None, ge=0, le=1)
    measurement: str | None = None
    above: float | None = None  # the measurement exceeds this

    @model_validator(mode="after")
    def _says_something(self) -> Condition:
        if (self.measurement is None) != (self.above is None):
            raise ValueError("'measurement' and 'above' go together")
        criteria = (
            self.label,
            self.ruled_out,
            self.operating_point,
            self.probability_at_least,
            self.measurement,
        )
        if all(c is None for c in criteria):
            raise ValueError(
                "a condition needs a criterion: label, ruled_out, operating_point, "
                "probability_at_least or measurement/above"
            )
        return self

    def holds(self, finding: Finding) -> bool:
        if self.engine is not None and finding.engine != self.engine:
            return False
        if self.label is not None and finding.label != self.label:
            return False
        if self.ruled_out is not None and finding.ruled_out is not self.ruled_out:
            return False
        if self.operating_point is not None and not finding.reached.get(self.operating_point):
            return False
        if self.probability_at_least is not None and (
            finding.probability is None or finding.probability < self.probability_at_least
        ):
            return False
        if self.measurement is not None:
            value = finding.measurements.get(self.measurement)
            if value is None or self.above is None or not value > self.above:
                return False
        return True


class PolicyRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    priority: Priority
    reason: str = Field(min_length=1)  # shown on the worklist and in `cadnode studies`
    when: Condition
    results: Quantifier = Quantifier.any

    def fires(self, outcome: StudyOutcome) -> bool:
        results = [r for r in outcome.results if self.when.engine in (None, r.engine)]
        satisfied = [any(self.when.holds(f) for f in r.findings()) for r in results]
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
class Finding:
    """One thing an engine said, as a condition sees it."""

    engine: str
    label: str | None
    probability: float | None
    reached: dict[str, bool]
    measurements: dict[str, float]
    ruled_out: bool | None


@dataclass(frozen=True)
class EngineResult:
    engine: str
    answer: dict[str, Any]

    def findings(self) -> Iterator[Finding]:
        ruled_out = self.answer.get("ruled_out")
        for part in [self.answer, *self.answer.get("findings", [])]:
            yield Finding(
                engine=self.engine,
                label=(part.get("label") or {}).get("name"),
                probability=_number(part.get("probability")),
                reached={
                    name: bool(point.get("reached"))
                    for name, point in (part.get("operating_points") or {}).items()
                },
                measurements={
                    name: float(value)
                    for name, value in (part.get("measurements") or {}).items()
                    if _number(value) is not None
                },
                ruled_out=ruled_out if isinstance(ruled_out, bool) else None,
            )


@dataclass
class StudyOutcome:
    """Everything the policy may use about a study: its results, and what went unread."""

    results: list[EngineResult] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)  # why a job version has no result
    failed: bool = False


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


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
