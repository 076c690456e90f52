"""A job's pipeline: the engine steps a rule chose, as route writes them and infer runs them.

`Job.pipeline` holds these steps as JSON. A step may carry a condition on an earlier step's
answer for the same image (`when: {step: cxr-ruleout, ruled_out: false}`, the grammar of
cadnode.infer.conditions): the step then runs only on the images whose earlier answer
passes it, which is how a rule-out filter in front of a segmenter spares the segmenter the
films it ruled out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cadnode.infer.answers import Answer
from cadnode.infer.conditions import StepCondition


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Strict):
    engine: str = Field(min_length=1)
    when: StepCondition | None = None
    # The SOP Instance UIDs this step looks at; empty means all of the job's inputs.
    inputs: list[str] = Field(default_factory=list)
    # The engine's version that answers (live) and those that run in shadow on the same
    # images: a rule may pin them; route writes them from the release table otherwise
    # (cadnode/infer/releases.py), so a job keeps the versions it was routed with. None: not
    # decided (a job routed before versions were): infer takes the live version then.
    version: str | None = None
    shadow: list[str] | None = None

    @classmethod
    def from_job(cls, entry: str | Mapping[str, Any]) -> Step:
        """One entry of `Job.pipeline`; a bare engine name is the earlier format."""
        return cls(engine=entry) if isinstance(entry, str) else cls.model_validate(entry)

    def images(
        self, job_inputs: list[str], answers: Mapping[tuple[str, str], Answer]
    ) -> list[str]:
        """The UIDs this step runs on, given the answers of the steps before it, by (engine,
        SOP Instance UID)."""
        candidates = self.inputs or job_inputs
        if self.when is None:
            return list(candidates)
        earlier = self.when.step
        assert earlier is not None  # a StepCondition names its step
        return [
            uid for uid in candidates if self.when.holds(answers.get((earlier, uid)), earlier)
        ]
