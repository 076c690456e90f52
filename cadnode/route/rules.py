"""Rules: what an admin writes in `rules.yaml`, checked whole at load, evaluated in order.

A rule has a `match` (see language.py), a `scope` (what the match looks at: each image,
each series, or the whole study), actions (`infer` a pipeline of engines, `forward` the
original images to destinations, `ignore`), a priority class and optionally its own quiet
period. Rules are tried top to bottom; the first that fires stops the evaluation unless it
says `continue: true`, in which case later rules may fire too (fan-out).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cadnode.core.db import PriorityClass
from cadnode.core.yamlfile import ConfigError, load_model, read_yaml
from cadnode.infer.conditions import StepCondition
from cadnode.route.language import Condition, Parser, Verdict
from cadnode.route.steps import Step
from cadnode.route.values import Subject


class Action(StrEnum):
    infer = "infer"  # run the rule's pipeline of engines on the matching images
    forward = "forward"  # send the original images to the rule's destinations
    ignore = "ignore"  # keep the study stored and do nothing else


class Scope(StrEnum):
    instance = "instance"  # each image on its own; the matching images are the inputs
    series = "series"  # each series as a whole; all images of a matching series
    study = "study"  # the whole study; all its images


_URGENCY = list(PriorityClass)  # most urgent first
# Installed engines: the versions of each by name, or None where a caller names only engines.
Versions = Mapping[str, Collection[str] | None]
T = TypeVar("T")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StepSpec(_Strict):
    engine: str = Field(min_length=1)
    when: StepCondition | None = None
    # Pinned here rather than by the release table (cadnode/infer/releases.py): the live
    # version, and the versions that run in shadow on the same images.
    version: str | None = Field(default=None, min_length=1)
    shadow: list[str] | None = None


class RuleSpec(_Strict):
    """One rule as the file says it; `match` is parsed separately, with its positions."""

    name: str = Field(min_length=1)
    description: str = ""
    scope: Scope = Scope.instance
    match: Any = None
    action: list[Action]
    pipeline: list[StepSpec] = Field(default_factory=list)
    destinations: list[str] = Field(default_factory=list)
    priority: PriorityClass = PriorityClass.routine
    quiet_period_s: float | None = Field(default=None, ge=0, le=3600)
    continue_: bool = Field(default=False, alias="continue")

    @field_validator("action", mode="before")
    @classmethod
    def _actions(cls, value: Any) -> list[str]:
        actions = value if isinstance(value, list) else [value]
        for action in actions:
            if action not in set(Action):
                raise ValueError(
                    f"{action!r} is not an action: expected infer, forward or ignore "
                    "(or a list of infer and forward)"
                )
        return actions

    @field_validator("pipeline", mode="before")
    @classmethod
    def _engine_names_are_steps(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"engine": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _actions_have_what_they_need(self) -> RuleSpec:
        actions = set(self.action)
        if Action.ignore in actions and len(actions) > 1:
            raise ValueError("'ignore' cannot be combined with other actions")
        if (Action.infer in actions) != bool(self.pipeline):
            raise ValueError(
                "action 'infer' needs a pipeline of engines"
                if Action.infer in actions
                else "a pipeline takes action 'infer'; action 'ignore' takes no pipeline"
            )
        if (Action.forward in actions) != bool(self.destinations):
            raise ValueError(
                "action 'forward' needs destinations"
                if Action.forward in actions
                else "destinations take action 'forward'"
            )
        return self


class RulesFile(_Strict):
    rules: list[RuleSpec]


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    scope: Scope
    condition: Condition
    actions: frozenset[Action]
    steps: tuple[StepSpec, ...]
    destinations: tuple[str, ...]
    priority: PriorityClass
    quiet_period_s: float | None
    continues: bool
    line: int

    @property
    def acts(self) -> bool:
        return bool(self.actions - {Action.ignore})

    def evaluate(self, subjects: Sequence[Subject]) -> Outcome:
        inputs: list[Subject] = []
        misses: dict[Subject, Verdict] = {}
        for unit in self.units(subjects):
            verdict = self.condition.check(unit)
            if verdict.ok:
                inputs.extend(unit)
            else:
                misses.update(dict.fromkeys(unit, verdict))
        return Outcome(self, reached=True, inputs=tuple(inputs), misses=misses)

    def units(self, subjects: Sequence[Subject]) -> list[list[Subject]]:
        """What the match looks at: each image, each series, or the whole study."""
        if self.scope is Scope.instance:
            return [[subject] for subject in subjects]
        if self.scope is Scope.study:
            return [list(subjects)] if subjects else []
        series: dict[str, list[Subject]] = {}
        for subject in subjects:
            series.setdefault(str(subject.header.get("SeriesInstanceUID", "")), []).append(subject)
        return list(series.values())

    def describe_actions(self) -> str:
        parts = []
        if Action.infer in self.actions:
            parts.append("infer " + ", then ".join(_describe_step(s) for s in self.steps))
        if Action.forward in self.actions:
            parts.append("forward the originals to " + ", ".join(self.destinations))
        if Action.ignore in self.actions:
            parts.append("ignore (stored, not processed)")
        if self.acts:
            parts.append(f"priority {self.priority.value}")
        if self.quiet_period_s is not None:
            parts.append(f"quiet period {self.quiet_period_s:g} s")
        parts.append("later rules may fire too" if self.continues else "stops here")
        return "; ".join(parts)


@dataclass(frozen=True)
class Outcome:
    """One rule against one study's images."""

    rule: Rule
    reached: bool  # False when an earlier rule fired and stopped the evaluation
    inputs: tuple[Subject, ...] = ()  # the images the rule takes; it fired if there are any
    misses: Mapping[Subject, Verdict] = field(default_factory=dict)  # why not the others

    @property
    def fired(self) -> bool:
        return bool(self.inputs)


@dataclass(frozen=True)
class Decision:
    """What the rules that fired ask for, together."""

    fired: tuple[Outcome, ...]

    @property
    def rule_names(self) -> list[str]:
        return [outcome.rule.name for outcome in self.fired]

    @property
    def acts(self) -> bool:
        return any(outcome.rule.acts for outcome in self.fired)

    @property
    def inputs(self) -> list[str]:
        """The images engines look at, in the order received."""
        return _unique(uid for outcome in self._inferring() for uid in _uids(outcome.inputs))

    def steps(self) -> list[Step]:
        """Every inferring rule's steps; a step names its images only where they differ."""
        everything = self.inputs
        steps = []
        for outcome in self._inferring():
            own = _uids(outcome.inputs)
            for spec in outcome.rule.steps:
                inputs = [] if own == everything else own
                steps.append(
                    Step(
                        engine=spec.engine,
                        when=spec.when,
                        inputs=inputs,
                        version=spec.version,
                        shadow=spec.shadow,
                    )
                )
        return steps

    def forwards(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, destination name) for each original to forward."""
        return _unique(
            (uid, destination)
            for outcome in self.fired
            if Action.forward in outcome.rule.actions
            for destination in outcome.rule.destinations
            for uid in _uids(outcome.inputs)
        )

    @property
    def priority(self) -> PriorityClass:
        classes = [outcome.rule.priority for outcome in self.fired if outcome.rule.acts]
        return min(classes, key=_URGENCY.index) if classes else PriorityClass.routine

    @property
    def quiet_period_s(self) -> float | None:
        periods = [o.rule.quiet_period_s for o in self.fired if o.rule.quiet_period_s is not None]
        return periods[0] if periods else None

    def _inferring(self) -> list[Outcome]:
        return [outcome for outcome in self.fired if Action.infer in outcome.rule.actions]


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    version: str  # content hash of the file, recorded with every routing decision
    path: Path | None = None

    def evaluate(self, subjects: Sequence[Subject]) -> list[Outcome]:
        """Every rule's outcome, in order; those after a stopping rule are not reached."""
        outcomes = []
        stopped = False
        for rule in self.rules:
            if stopped:
                outcomes.append(Outcome(rule, reached=False))
                continue
            outcome = rule.evaluate(subjects)
            outcomes.append(outcome)
            stopped = outcome.fired and not rule.continues
        return outcomes

    def decide(self, subjects: Sequence[Subject]) -> Decision:
        return Decision(tuple(outcome for outcome in self.evaluate(subjects) if outcome.fired))

    def quiet_period_for(self, subjects: Sequence[Subject]) -> float | None:
        """The quiet period the rules ask for, for a study still arriving (for assemble)."""
        return self.decide(subjects).quiet_period_s


def load_rules(
    path: Path,
    engines: Iterable[str],
    destinations: Iterable[str] = (),
    *,
    versions: Mapping[str, Collection[str]] | None = None,
) -> RuleSet:
    """Validate the rules file whole: every problem is collected, each with its position.

    Engines and destinations named by rules must be installed and configured; given the
    installed `versions` of each engine, so must the versions a step pins. The
    version is the hash of exactly the bytes that were parsed, so it names what is in force.
    """
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from error
    document = read_yaml(path, content.decode("utf-8", errors="replace"))
    problems: list[str] = []
    try:
        load_model(path, RulesFile, document)
    except ConfigError as error:
        problems.extend(error.problems)
    parser = Parser(path, document)
    installed: Versions = {name: (versions or {}).get(name) for name in engines}
    configured = set(destinations)
    rules: list[Rule] = []
    raw_rules = document.get("rules") if isinstance(document, dict) else None
    for i, raw in enumerate(raw_rules if isinstance(raw_rules, list) else []):
        rule = _compile(parser, i, raw, installed, configured)
        if rule is None:
            continue
        if rule.name in {earlier.name for earlier in rules}:
            parser.problem(
                ("rules", i, "name"),
                "used by an earlier rule: each decision records the rule's name, "
                "so names must be unique",
                rule.name,
            )
        rules.append(rule)
    problems.extend(parser.problems)
    if problems:
        raise ConfigError(sorted(set(problems), key=_reading_order))
    version = hashlib.sha256(content).hexdigest()[:16]
    return RuleSet(tuple(rules), version, path)


def _compile(
    parser: Parser, i: int, raw: Any, engines: Versions, destinations: set[str]
) -> Rule | None:
    """The rule at rules[i], or None when it has problems (already reported)."""
    if not isinstance(raw, dict):
        return None
    where = ("rules", i)
    scope = raw.get("scope", Scope.instance)
    parser.multi_scope = scope in (Scope.series, Scope.study)
    condition = parser.condition(raw.get("match"), (*where, "match"))
    try:
        spec = RuleSpec.model_validate(raw)
    except ValidationError:
        return None  # the whole-file validation has named each problem with its position
    _check_pipeline(parser, where, spec, engines)
    for k, destination in enumerate(spec.destinations):
        if destination not in destinations:
            known = ", ".join(sorted(destinations)) or "none"
            parser.problem(
                (*where, "destinations", k),
                f"unknown destination {destination!r} (configured: {known})",
            )
    return Rule(
        name=spec.name,
        description=spec.description,
        scope=spec.scope,
        condition=condition,
        actions=frozenset(spec.action),
        steps=tuple(spec.pipeline),
        destinations=tuple(spec.destinations),
        priority=spec.priority,
        quiet_period_s=spec.quiet_period_s,
        continues=spec.continue_,
        line=parser.line(where) or 0,
    )


def _check_pipeline(
    parser: Parser, where: tuple[int | str, ...], spec: RuleSpec, engines: Versions
) -> None:
    earlier: list[str] = []
    for j, step in enumerate(spec.pipeline):
        at = (*where, "pipeline", j)
        if step.engine not in engines:
            installed = ", ".join(sorted(engines)) or "none"
            parser.problem(at, f"unknown engine {step.engine!r} (installed: {installed})")
        elif step.engine in earlier:
            parser.problem(at, f"engine {step.engine!r} is already a step of this pipeline")
        else:
            _check_versions(parser, at, step, engines[step.engine])
        if step.when is not None and step.when.step not in earlier:
            parser.problem(
                (*at, "when", "step"),
                f"a step condition names an earlier step of this pipeline: "
                f"{', '.join(earlier) or 'there is none'}",
                step.when.step,
            )
        earlier.append(step.engine)


def _check_versions(
    parser: Parser, at: tuple[int | str, ...], step: StepSpec, installed: Collection[str] | None
) -> None:
    """The versions a step pins are installed (when the caller knows which are)."""
    if installed is None:
        return
    shown = ", ".join(sorted(installed)) or "none"
    if step.version is not None and step.version not in installed:
        parser.problem(
            (*at, "version"), f"{step.engine} {step.version} is not installed ({shown})"
        )
    for k, version in enumerate(step.shadow or []):
        if version not in installed:
            parser.problem(
                (*at, "shadow", k), f"{step.engine} {version} is not installed ({shown})"
            )
        elif version == step.version:
            parser.problem((*at, "shadow", k), f"{version} is this step's live version")


def _reading_order(problem: str) -> tuple[int, int]:
    """Problems listed from the top of the file down, as an admin fixes them."""
    found = re.match(r"^.*?:(\d+):(\d+): ", problem)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def _describe_step(step: StepSpec) -> str:
    return step.engine + (f" (only where {step.when})" if step.when else "")


def _uids(subjects: Iterable[Subject]) -> list[str]:
    return [str(subject.header.SOPInstanceUID) for subject in subjects]


def _unique(items: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(items))
