"""Route: choose what happens to a complete study, by the rules in `rules.yaml`.

Rules are tried in order and the first that matches any of the study's instances decides:
run a pipeline of engines on the matching instances, or ignore the study (it stays stored).
A study no rule matches is ignored too, visibly: its job says why.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from sqlmodel import Session, select

from cadnode.db import Database, Instance, Job, JobState
from cadnode.yamlfile import ConfigError, load_model, position, read_yaml


class Action(StrEnum):
    infer = "infer"
    ignore = "ignore"


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    # DICOM keyword -> the value, or any of the values, it must have.
    match: dict[str, str | list[str]] = Field(default_factory=dict)
    action: Action
    pipeline: list[str] = Field(default_factory=list)

    @field_validator("match")
    @classmethod
    def _keywords_exist(cls, match: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for keyword in match:
            if tag_for_keyword(keyword) is None:
                raise ValueError(
                    f"{keyword!r} is not a DICOM keyword (e.g. Modality, ViewPosition)"
                )
            if dictionary_VR(keyword) == "SQ":
                raise ValueError(f"{keyword!r} is a sequence; match on an attribute inside it")
        return match

    @model_validator(mode="after")
    def _pipeline_fits_action(self) -> Rule:
        if self.action is Action.infer and not self.pipeline:
            raise ValueError("action 'infer' needs a pipeline of engines")
        if self.action is Action.ignore and self.pipeline:
            raise ValueError("action 'ignore' takes no pipeline")
        return self

    def matches(self, header: Dataset) -> bool:
        return all(
            _value_matches(header, keyword, wanted) for keyword, wanted in self.match.items()
        )


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule]
    version: str = ""  # content hash of the file, recorded with every routing decision

    def first_match(self, headers: Iterable[Dataset]) -> tuple[Rule | None, list[Dataset]]:
        headers = list(headers)
        for rule in self.rules:
            matching = [header for header in headers if rule.matches(header)]
            if matching:
                return rule, matching
        return None, []


def load_rules(path: Path, engines: Iterable[str]) -> RuleSet:
    """Validate the rules file, including that every engine named is installed."""
    document = read_yaml(path)
    rules = load_model(path, RuleSet, document)
    known = set(engines)
    problems = []
    for i, rule in enumerate(rules.rules):
        for j, engine in enumerate(rule.pipeline):
            if engine not in known:
                line, column = position(document, ("rules", i, "pipeline", j)) or (0, 0)
                problems.append(
                    f"{path}:{line}:{column}: rules.{i}.pipeline.{j}: unknown engine "
                    f"{engine!r} (installed: {', '.join(sorted(known)) or 'none'})"
                )
    if problems:
        raise ConfigError(problems)
    version = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return rules.model_copy(update={"version": version})


def _value_matches(header: Dataset, keyword: str, wanted: str | list[str]) -> bool:
    value = header.get(keyword)
    if value is None:
        return False
    allowed = {wanted} if isinstance(wanted, str) else set(wanted)
    values = list(value) if header[keyword].VM > 1 else [value]
    return any(str(v).strip() in allowed for v in values)


class Router:
    name = "route"

    def __init__(self, database: Database, spool: Path, rules: RuleSet) -> None:
        self.database = database
        self.spool = spool
        self.rules = rules

    def advance(self) -> float | None:
        with self.database.session() as session:
            for job in self.database.jobs_in(session, JobState.complete):
                self._route(session, job)
        return None

    def _route(self, session: Session, job: Job) -> None:
        instances = list(session.exec(select(Instance).where(Instance.job_id == job.id)))
        try:
            headers = [dcmread(self.spool / i.path, stop_before_pixels=True) for i in instances]
        except Exception as error:  # a stored file that no longer reads is a failed job
            self.database.transition(
                session,
                job,
                JobState.failed,
                expect=JobState.complete,
                reason=f"cannot read stored instance: {error}",
            )
            return
        rule, matching = self.rules.first_match(headers)
        decided = {"rules_version": self.rules.version}
        if rule is None:
            self.database.transition(
                session,
                job,
                JobState.ignored,
                expect=JobState.complete,
                reason="no rule matched",
                **decided,
            )
        elif rule.action is Action.ignore:
            self.database.transition(
                session,
                job,
                JobState.ignored,
                expect=JobState.complete,
                rule=rule.name,
                reason=f"rule {rule.name!r} ignores it",
                **decided,
            )
        else:
            self.database.transition(
                session,
                job,
                JobState.routed,
                expect=JobState.complete,
                rule=rule.name,
                pipeline=list(rule.pipeline),
                inputs=[str(h.SOPInstanceUID) for h in matching],
                **decided,
            )
