"""A job's pipeline: the engine steps a rule chose, as route writes them and infer runs them.

`Job.pipeline` holds these steps as JSON. A step may carry a condition on an earlier step's
answer for the same image (`when: {step: cxr-ruleout, ruled_out: false}`): the step then
runs only on the images whose earlier answer passes it, which is how a rule-out filter in
front of a segmenter spares the segmenter the films it ruled out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(_Strict):
    """Bounds on a number; every bound given must hold."""

    less_than: float | None = None
    at_most: float | None = None
    greater_than: float | None = None
    at_least: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Threshold:
        if self.model_dump(exclude_none=True) == {}:
            raise ValueError("give at least one of less_than, at_most, greater_than, at_least")
        return self

    def holds(self, value: float) -> bool:
        return (
            (self.less_than is None or value < self.less_than)
            and (self.at_most is None or value <= self.at_most)
            and (self.greater_than is None or value > self.greater_than)
            and (self.at_least is None or value >= self.at_least)
        )

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in self.model_dump(exclude_none=True).items())


class StepCondition(_Strict):
    """What an earlier step must have answered for an image before this step looks at it."""

    step: str = Field(min_length=1, description="the engine of an earlier step")
    ruled_out: StrictBool | None = None
    probability: Threshold | None = None

    @model_validator(mode="after")
    def _tests_something(self) -> StepCondition:
        if self.ruled_out is None and self.probability is None:
            raise ValueError("a step condition tests ruled_out or probability (or both)")
        return self

    def holds(self, answer: Mapping[str, Any] | None) -> bool:
        """False when the earlier step did not answer for this image (it was skipped)."""
        if answer is None:
            return False
        if self.ruled_out is not None and answer.get("ruled_out") is not self.ruled_out:
            return False
        probability = answer.get("probability")
        return self.probability is None or (
            isinstance(probability, int | float) and self.probability.holds(float(probability))
        )

    def __str__(self) -> str:
        tests = []
        if self.ruled_out is not None:
            tests.append(f"ruled_out is {str(self.ruled_out).lower()}")
        if self.probability is not None:
            tests.append(f"probability {self.probability}")
        return f"{self.step}: {' and '.join(tests)}"


class Step(_Strict):
    engine: str = Field(min_length=1)
    when: StepCondition | None = None
    # The SOP Instance UIDs this step looks at; empty means all of the job's inputs.
    inputs: list[str] = Field(default_factory=list)

    @classmethod
    def from_job(cls, entry: str | Mapping[str, Any]) -> Step:
        """One entry of `Job.pipeline`; a bare engine name is the earlier format."""
        return cls(engine=entry) if isinstance(entry, str) else cls.model_validate(entry)

    def images(self, job_inputs: list[str], answers: Mapping[tuple[str, str], Any]) -> list[str]:
        """The UIDs this step runs on, given the answers of the steps before it."""
        candidates = self.inputs or job_inputs
        if self.when is None:
            return list(candidates)
        earlier = self.when.step
        return [uid for uid in candidates if self.when.holds(answers.get((earlier, uid)))]
