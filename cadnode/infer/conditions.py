"""Conditions on an engine's answer: one grammar for every `when:`, one evaluator.

Written in two files: on a pipeline step in rules.yaml (the step runs only on the images
whose answer from an earlier step passes) and on a rule in priority.yaml (the rule looks at
the answers that pass).

```yaml
when:
  step: cxr-ruleout                 # rules.yaml only: the earlier step whose answer is tested
  engine: cxr-segmenter             # priority.yaml only: this engine's answers
  ruled_out: false                  # the rule-out decision (a classifier's `rule_out` point)
  label: pneumothorax               # the label of the answer, or of one of its findings
  operating_point: present          # ... which reached this operating point of the engine
  probability: {at_least: 0.3}      # less_than, at_most, greater_than, at_least, between
  measurement:                      # a named measurement, with the same operators
    percent_of_hemithorax: {greater_than: 10}
```

Every test given must hold, and a condition tests something besides naming its answer.
`step`, `engine` and `ruled_out` are about the whole answer; `label`, `operating_point`,
`probability` and `measurement` about one thing it says (cadnode.infer.answers.Statement: a
classifier's verdict, a detector's best score, one segment or detected finding), and the
answer passes when one of those passes them all together: the pneumothorax segment whose own
share is above 10 %, not any segment beside another one's measurement. A value the answer
does not have (a measurement it did not take, a segmenter's `ruled_out`) fails its test.
The operators are the rule language's ordered ones (cadnode.core.ordering).

A condition is a pydantic model, so the loaders (cadnode.core.yamlfile) name the file, line
and column of every problem; `StepCondition` and `PolicyCondition` are the two places'
checks on which of `step` / `engine` they take.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from cadnode.core.ordering import COMPARE, Order
from cadnode.infer.answers import Answer, Statement

_OPERATORS = ", ".join(Order)
_RENAMED = {
    "probability_at_least": "probability: {at_least: X}",
    "above": "measurement: {NAME: {greater_than: X}}",
}


def _a_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bounds(_Strict):
    """Ordered tests on one number; every one given must hold."""

    less_than: float | None = None
    at_most: float | None = None
    greater_than: float | None = None
    at_least: float | None = None
    between: tuple[float, float] | None = None  # lowest, highest; both included

    @model_validator(mode="before")
    @classmethod
    def _operators(cls, value: Any) -> Any:
        if isinstance(value, Bounds):
            return value
        if not isinstance(value, dict) or not value:
            raise ValueError(
                f"expected operators and numbers, e.g. {{at_least: 0.5}} ({_OPERATORS})"
            )
        for key, bound in value.items():
            if key not in Order.__members__:
                raise ValueError(f"unknown operator {key!r}: expected one of {_OPERATORS}")
            if key == Order.between:
                shape = "two numbers, [lowest, highest]"
                ok = isinstance(bound, list | tuple) and len(bound) == 2
                ok = ok and all(map(_a_number, bound))
            else:
                shape, ok = "a number", _a_number(bound)
            if not ok:
                raise ValueError(f"{key!r} takes {shape} (got {bound!r})")
        return value

    @model_validator(mode="after")
    def _lowest_first(self) -> Bounds:
        if self.between is not None and self.between[0] > self.between[1]:
            raise ValueError("'between' takes the lower bound first")
        return self

    def items(self) -> list[tuple[Order, Any]]:
        return [(Order(name), bound) for name, bound in self.model_dump(exclude_none=True).items()]

    def holds(self, value: float | None) -> bool:
        return value is not None and all(COMPARE[op](value, bound) for op, bound in self.items())

    def __str__(self) -> str:
        return ", ".join(
            f"between {bound[0]:g} and {bound[1]:g}" if op is Order.between else f"{op} {bound:g}"
            for op, bound in self.items()
        )


class AnswerCondition(_Strict):
    """What an answer must say; see the module's docstring for the grammar."""

    step: str | None = Field(default=None, min_length=1)
    engine: str | None = Field(default=None, min_length=1)
    ruled_out: StrictBool | None = None
    label: str | None = Field(default=None, min_length=1)
    operating_point: str | None = Field(default=None, min_length=1)
    probability: Bounds | None = None
    measurement: dict[str, Bounds] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_tests(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic says a mapping was expected
        for key in value:
            if key in _RENAMED:
                raise ValueError(f"{key!r} is written {_RENAMED[key]}")
            if key not in cls.model_fields:
                raise ValueError(
                    f"unknown test {key!r}: expected {', '.join(cls.model_fields)}"
                )
        return value

    @field_validator("probability")
    @classmethod
    def _a_probability(cls, bounds: Bounds | None) -> Bounds | None:
        for _, bound in bounds.items() if bounds is not None else []:
            if not all(0 <= b <= 1 for b in (bound if isinstance(bound, tuple) else [bound])):
                raise ValueError("a probability is compared with numbers from 0 to 1")
        return bounds

    @field_validator("measurement", mode="before")
    @classmethod
    def _named_measurements(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError(
                "expected a measurement's name and operators, e.g. "
                "{percent_of_hemithorax: {greater_than: 10}}"
            )
        return value

    @model_validator(mode="after")
    def _tests_something(self) -> AnswerCondition:
        if self.ruled_out is None and not self._tests_statements:
            raise ValueError(
                "a condition needs a test: ruled_out, label, operating_point, probability "
                "or measurement"
            )
        return self

    @property
    def _tests_statements(self) -> bool:
        return any(
            test is not None
            for test in (self.label, self.operating_point, self.probability, self.measurement)
        )

    def holds(self, answer: Answer | None, engine: str | None = None) -> bool:
        """Whether `answer` (from `engine`) passes; False without one (an earlier step that
        skipped the image). The caller chose the answer `step` names."""
        if answer is None:
            return False
        if self.engine is not None and engine != self.engine:
            return False
        if self.ruled_out is not None and answer.ruled_out is not self.ruled_out:
            return False
        return not self._tests_statements or any(map(self.says, answer.statements()))

    def says(self, statement: Statement) -> bool:
        """Whether one thing an answer says passes the tests on label, operating point,
        probability and measurements."""
        if self.label is not None and statement.label.name != self.label:
            return False
        if self.operating_point is not None:
            point = statement.operating_points.get(self.operating_point)
            if point is None or not point.reached:
                return False
        if self.probability is not None and not self.probability.holds(statement.probability):
            return False
        return all(
            bounds.holds(statement.measurements.get(name))
            for name, bounds in (self.measurement or {}).items()
        )

    def __str__(self) -> str:
        tests = []
        if self.engine is not None:
            tests.append(f"engine is {self.engine}")
        if self.ruled_out is not None:
            tests.append(f"ruled_out is {str(self.ruled_out).lower()}")
        if self.label is not None:
            tests.append(f"label is {self.label}")
        if self.operating_point is not None:
            tests.append(f"operating point {self.operating_point} reached")
        if self.probability is not None:
            tests.append(f"probability {self.probability}")
        for name, bounds in (self.measurement or {}).items():
            tests.append(f"{name} {bounds}")
        text = " and ".join(tests)
        return f"{self.step}: {text}" if self.step is not None else text


def _on_a_step(condition: AnswerCondition) -> AnswerCondition:
    if condition.engine is not None:
        raise ValueError(
            "a step's condition names the answer it tests with step: (an earlier step's "
            "engine), not engine:"
        )
    if condition.step is None:
        raise ValueError("a step's condition names the earlier step whose answer it tests: step:")
    return condition


def _on_a_policy_rule(condition: AnswerCondition) -> AnswerCondition:
    if condition.step is not None:
        raise ValueError(
            "step: names a pipeline step (rules.yaml); a priority rule names the engine whose "
            "answers it looks at: engine:"
        )
    return condition


# `when:` on a pipeline step (rules.yaml, Job.pipeline): `step` required, no `engine`.
StepCondition = Annotated[AnswerCondition, AfterValidator(_on_a_step)]
# `when:` on a priority rule (priority.yaml): `engine` optional, no `step`.
PolicyCondition = Annotated[AnswerCondition, AfterValidator(_on_a_policy_rule)]
