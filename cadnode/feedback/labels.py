"""A report's text -> one conclusion per finding, by the rules of config/feedback.yaml.

The file (`feedback.findings`, default the shipped config/feedback.yaml) is typed and
validated once at load, errors naming file:line. Each finding's mentions are read by the
NegEx-style rules of cadnode.feedback.negation; a report's conclusion about a finding is:

- present if any mention of it is affirmed (or, for a finding with `any_of`, if any of
  those findings is present: the rule-out engine's `abnormal` is "some finding");
- else uncertain if any mention is hedged ("possible", "cannot be excluded");
- else absent if a mention is negated ("no pneumothorax", "pneumothorax is not seen");
- else, when the report calls the study normal ("no acute cardiopulmonary abnormality",
  "lungs are clear"), absent; otherwise the report says nothing about it (no conclusion).

Which engine labels a finding is the truth of: the label's code (SNOMED CT, as the
manifests code them) or its name (`labels`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cadnode.core.db import Conclusion
from cadnode.core.yamlfile import load_model
from cadnode.feedback.negation import Mention, NegEx, Polarity, words
from cadnode.infer.bundle import Label

FindingName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}$")]
Term = Annotated[str, StringConstraints(min_length=1, max_length=80)]
EVIDENCE_CHARS = 300  # the most of a report's sentence kept as a conclusion's evidence
# A section heading: at a line's start in any case ("Findings:"), or in capitals anywhere
# ("... chest pain. FINDINGS: ...").
_HEADING = re.compile(r"(?:^|\n)\s*([A-Za-z][A-Za-z /]{1,40}):|\b([A-Z][A-Z /]{2,40}):")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeRef(_Strict):
    value: str = Field(min_length=1)
    scheme: str = Field(min_length=1)


class FindingRule(_Strict):
    terms: list[Term] = Field(min_length=1)
    code: CodeRef | None = None
    labels: list[str] = Field(default_factory=list)
    any_of: list[FindingName] = Field(default_factory=list)
    # Absent when the report calls the study normal without naming it (false for findings
    # of other kinds of study: a chest report says nothing of a breast mass).
    absent_when_normal: bool = True


class FeedbackRules(_Strict):
    findings: dict[FindingName, FindingRule] = Field(min_length=1)
    normal: list[Term] = Field(default_factory=list)
    skip_sections: list[Term] = Field(default_factory=list)

    @model_validator(mode="after")
    def _any_of_known(self) -> FeedbackRules:
        for name, rule in self.findings.items():
            unknown = sorted(set(rule.any_of) - set(self.findings))
            if unknown:
                raise ValueError(f"findings.{name}.any_of names unknown findings: {unknown}")
            if name in rule.any_of:
                raise ValueError(f"findings.{name}.any_of names the finding itself")
        return self

    def finding_of(self, label: Label) -> str | None:
        """The finding an engine's label is about (by code, then by name), or None."""
        for name, rule in self.findings.items():
            code = rule.code
            if code is not None and (code.value, code.scheme) == (
                label.code.value,
                label.code.scheme,
            ):
                return name
        for name, rule in self.findings.items():
            if label.name in rule.labels or label.name == name:
                return name
        return None


def load_rules(path: Path) -> FeedbackRules:
    """config/feedback.yaml, validated (ConfigError with file:line)."""
    return load_model(path, FeedbackRules, None)


@functools.cache
def rules_at(path: Path) -> FeedbackRules:
    """The rules of `path`, read once per process (the daemon checks them at start)."""
    return load_rules(path)


@dataclass(frozen=True)
class Labelled:
    """What a report concluded about one finding, and the words that decided it."""

    finding: str
    conclusion: Conclusion
    evidence: str


class ReportReader:
    """Reads report text by one set of rules."""

    def __init__(self, rules: FeedbackRules) -> None:
        self.rules = rules
        self.negex = NegEx({name: rule.terms for name, rule in rules.findings.items()})
        self.normal = [tuple(words(phrase)) for phrase in rules.normal]
        self.skipped = {" ".join(words(name)) for name in rules.skip_sections}

    def label(self, text: str) -> list[Labelled]:
        """One conclusion per finding the report decides, in the file's order."""
        read = self.read_sections(text)
        mentions = self.negex.mentions(read)
        normal = self._normal_sentence(read)
        decided: dict[str, Labelled] = {}
        for name in self.rules.findings:
            found = _conclude(name, [m for m in mentions if m.finding == name])
            if found is not None:
                decided[name] = found
        for name, rule in self.rules.findings.items():  # "some finding" after the findings
            implied = _implied(name, [decided[n] for n in rule.any_of if n in decided])
            if implied is not None and _outranks(implied, decided.get(name)):
                decided[name] = implied
        if normal is not None:  # a normal study: what it does not mention is absent
            for name, rule in self.rules.findings.items():
                if rule.absent_when_normal:
                    decided.setdefault(name, Labelled(name, Conclusion.absent, _bounded(normal)))
        return [decided[name] for name in self.rules.findings if name in decided]

    def read_sections(self, text: str) -> str:
        """The text without the sections that say why the study was asked for."""
        kept, skipping, at = [], False, 0
        for heading in _HEADING.finditer(text):
            if not skipping:
                kept.append(text[at : heading.start()])
            title = " ".join(words(heading.group(1) or heading.group(2)))
            skipping = title in self.skipped
            at = heading.end()
            kept.append(".\n")  # a heading ends the sentence before it
        if not skipping:
            kept.append(text[at:])
        return "".join(kept)

    def _normal_sentence(self, text: str) -> str | None:
        """The sentence that calls the study normal, if one does (and is not negated)."""
        for mention_sentence in re.split(r"[.;!?\n\r]+", text):
            tokens = words(mention_sentence)
            joined = " " + " ".join(tokens) + " "
            for phrase in self.normal:
                spot = joined.find(" " + " ".join(phrase) + " ")
                if spot >= 0 and not joined[:spot].endswith((" not", " no")):
                    return mention_sentence.strip()
        return None


def _conclude(name: str, mentions: Iterable[Mention]) -> Labelled | None:
    by_polarity: dict[Polarity, Mention] = {}
    for mention in mentions:
        by_polarity.setdefault(mention.polarity, mention)
    for polarity, conclusion in (
        (Polarity.affirmed, Conclusion.present),
        (Polarity.uncertain, Conclusion.uncertain),
        (Polarity.negated, Conclusion.absent),
    ):
        if polarity in by_polarity:
            return Labelled(name, conclusion, _bounded(by_polarity[polarity].sentence))
    return None


def _implied(name: str, parts: list[Labelled]) -> Labelled | None:
    """`any_of`: present if a part is, uncertain if one is and none is present."""
    for conclusion in (Conclusion.present, Conclusion.uncertain):
        found = [part for part in parts if part.conclusion is conclusion]
        if found:
            return Labelled(name, conclusion, found[0].evidence)
    return None


def _outranks(implied: Labelled, own: Labelled | None) -> bool:
    """A present part overrides the finding's own words ("no other abnormality"); an
    uncertain part only fills in where the report said nothing of the finding itself."""
    return implied.conclusion is Conclusion.present or own is None


def _bounded(sentence: str) -> str:
    return sentence[:EVIDENCE_CHARS]
