"""Replaying images through the rules before they go live: `cadnode rules explain | test`.

`explain` prints, for each file, the rule that fires and its actions, and for each rule
that does not, the first condition that failed with what the file actually holds. `test`
runs an admin's own cases (a DICOM file or a set of attribute values, and the rules
expected to fire) and reports each mismatch. Both evaluate exactly as the router does:
files of one study are evaluated together, as one job would be.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom import dcmread
from pydicom.config import strict_reading
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from cadnode.core.db import PriorityClass
from cadnode.core.yamlfile import ConfigError, load_model, read_yaml
from cadnode.route.language import Location, Problems
from cadnode.route.rules import Outcome, RuleSet
from cadnode.route.values import Subject


@dataclass(frozen=True)
class Connection:
    """How the images are taken to have arrived, for rules on calling_ae and the like."""

    calling_ae: str | None = None
    called_ae: str | None = None
    source_address: str | None = None


def read_subjects(files: Iterable[Path], connection: Connection) -> list[Subject]:
    subjects = []
    for file in files:
        try:
            header = dcmread(file, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as error:
            raise ConfigError([f"{file}: cannot read as DICOM: {error}"]) from error
        subjects.append(
            Subject(
                header,
                calling_ae=connection.calling_ae,
                called_ae=connection.called_ae,
                source_address=connection.source_address,
                label=str(file),
            )
        )
    return subjects


def explain(rules: RuleSet, subjects: Sequence[Subject]) -> str:
    lines = [f"rules {rules.path} (version {rules.version})"]
    for study in _by_study(subjects):
        outcomes = rules.evaluate(study)
        for subject in study:
            lines.append(subject.label)
            lines.extend(_explain_one(subject, outcomes))
    return "\n".join(lines)


def _explain_one(subject: Subject, outcomes: list[Outcome]) -> list[str]:
    width = max((len(o.rule.name) for o in outcomes), default=0)
    lines = []
    fired = []
    stopper = ""
    for outcome in outcomes:
        rule = outcome.rule
        if not outcome.reached:
            status, detail = "skipped", f"not reached: {stopper!r} stopped the evaluation"
        elif subject in outcome.inputs:
            status, detail = "FIRES", rule.describe_actions()
            fired.append(rule.name)
        elif outcome.fired:  # took other images of the study, not this one
            status, detail = "no", f"{_miss(outcome, subject)} (fires for other images)"
        else:
            status, detail = "no", _miss(outcome, subject)
        if outcome.fired and not rule.continues and not stopper:
            stopper = rule.name
        lines.append(f"  {rule.name:<{width}}  {status:<7}  {detail}")
    verdict = ", ".join(fired) if fired else "no rule fires: stored and ignored"
    lines.append(f"  => {verdict}")
    return lines


def _miss(outcome: Outcome, subject: Subject) -> str:
    verdict = outcome.misses.get(subject)
    scope = "" if outcome.rule.scope.value == "instance" else f"[{outcome.rule.scope.value}] "
    return scope + (verdict.reason() if verdict else "did not match")


def _by_study(subjects: Sequence[Subject]) -> list[list[Subject]]:
    studies: dict[str, list[Subject]] = {}
    for subject in subjects:
        key = str(subject.header.get("StudyInstanceUID", "")) or subject.label
        studies.setdefault(key, []).append(subject)
    return list(studies.values())


# --- cases: `cadnode rules test` ------------------------------------------------------

CASES = "rules-tests.yaml"  # the cases file's default name, beside the rules file


class Case(BaseModel):
    """One regression case: images (files or attribute values) and the rules expected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    file: list[Path] = Field(default_factory=list)
    attributes: list[dict[str, Any]] = Field(default_factory=list)
    calling_ae: str | None = None
    called_ae: str | None = None
    source_address: str | None = None
    expect: list[str]  # the rules expected to fire, in order; [] when none should
    priority: PriorityClass | None = None  # the priority class expected, if given

    @field_validator("file", "attributes", "expect", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return value if isinstance(value, list) else [value]


class Cases(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: list[Case]


@dataclass(frozen=True)
class CaseResult:
    case: Case
    fired: list[str]
    priority: PriorityClass | None
    problem: str | None  # None when the case passes

    def line(self) -> str:
        if self.problem is None:
            return f"PASS  {self.case.name}"
        return f"FAIL  {self.case.name}: {self.problem}"


def run_cases(rules: RuleSet, path: Path) -> list[CaseResult]:
    document = read_yaml(path)
    cases = load_model(path, Cases, document)
    problems = Problems(path, document)
    units = [_case_subjects(problems, i, case) for i, case in enumerate(cases.cases)]
    if problems.problems:
        raise ConfigError(problems.problems)
    return [_run_case(rules, case, unit) for case, unit in zip(cases.cases, units, strict=True)]


def _run_case(rules: RuleSet, case: Case, subjects: list[Subject]) -> CaseResult:
    decision = rules.decide(subjects)
    fired = decision.rule_names
    priority = decision.priority if decision.acts else None
    problem = None
    if fired != case.expect:
        expected = ", ".join(case.expect) or "no rule"
        problem = f"expected {expected}, fired {', '.join(fired) or 'no rule'}"
        problem += _why_not(rules, subjects, case.expect)
    elif case.priority is not None and priority != case.priority:
        shown = priority.value if priority else "none (nothing to run)"
        problem = f"expected priority {case.priority.value}, got {shown}"
    return CaseResult(case, fired, priority, problem)


def _why_not(rules: RuleSet, subjects: list[Subject], expected: list[str]) -> str:
    """For an expected rule that did not fire: its first failing condition."""
    for outcome in rules.evaluate(subjects):
        if outcome.rule.name in expected and not outcome.fired:
            if not outcome.reached:
                return f" ({outcome.rule.name!r} was not reached)"
            verdict = next(iter(outcome.misses.values()), None)
            if verdict is not None:
                return f" ({outcome.rule.name!r}: {verdict.reason()})"
    return ""


def _case_subjects(problems: Problems, i: int, case: Case) -> list[Subject]:
    """The case's images: its files, then one header per set of attribute values."""
    where: Location = ("cases", i)
    if bool(case.file) == bool(case.attributes):
        problems.problem(where, "give either file or attributes")
        return []
    connection = Connection(case.calling_ae, case.called_ae, case.source_address)
    base = problems.path.parent
    files = [file if file.is_absolute() else base / file for file in case.file]
    try:
        subjects = read_subjects(files, connection)
    except ConfigError as error:
        for message in error.problems:
            problems.problem((*where, "file"), message)
        return []
    study_uid = generate_uid()
    listed = isinstance(problems.document["cases"][i].get("attributes"), list)
    for j, attributes in enumerate(case.attributes):
        at = (*where, "attributes", j) if listed else (*where, "attributes")
        header = _dataset(problems, at, attributes, study_uid)
        subjects.append(
            Subject(
                header,
                calling_ae=connection.calling_ae,
                called_ae=connection.called_ae,
                source_address=connection.source_address,
                label=case.name,
            )
        )
    return subjects


def _dataset(
    problems: Problems, where: Location, attributes: dict[str, Any], study_uid: str
) -> Dataset:
    """A header with these values, each checked against its keyword's VR."""
    dataset = Dataset()
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        if tag_for_keyword(keyword) is None:
            problems.problem((*where, keyword), "not a DICOM keyword", keyword)
            continue
        try:
            with strict_reading():  # an Age String "45" is an error here, not a warning
                setattr(dataset, keyword, _dicom_value(value))
        except (TypeError, ValueError, OverflowError) as error:
            problems.problem((*where, keyword), f"not a valid value: {error}")
    return dataset


def _dicom_value(value: Any) -> Any:
    """YAML's dates become DICOM's text; lists stay lists (several values)."""
    if isinstance(value, list):
        return [_dicom_value(item) for item in value]
    if isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d%H%M%S")
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    return value
