"""NegEx-style reading of report sentences: is a finding affirmed, negated or hedged?

The rule set of NegEx (Chapman WW, Bridewell W, Hanbury P, Cooper GF, Buchanan BG. A simple
algorithm for identifying negated findings and diseases in discharge summaries. J Biomed
Inform 2001;34(5):301-10), extended, as pyConText and medspaCy's ConText do, with
uncertainty and hypothetical triggers. No model, nothing downloaded: lists of phrases.

- The text is cut into sentences (. ; ! ? and line ends) and each into lower-case words.
- Trigger phrases are found left to right, the longest first at each word (so "cannot
  exclude" is one uncertainty trigger, not "exclude"; "no change" is a pseudo-trigger and
  negates nothing).
- A pre-trigger ("no", "without evidence of") reaches forward, a post-trigger ("is not
  seen", "cannot be excluded") backward, each over at most SCOPE_WORDS words, and never
  past a termination term ("but", "however") or another trigger: "no pneumothorax but a
  small effusion" negates the pneumothorax only.
- A finding's mention inside a negation scope is negated, inside an uncertainty scope
  uncertain, inside a hypothetical one ("evaluate for") not counted; else affirmed.

`cadnode.feedback.labels` turns the mentions of a whole report into one conclusion per
finding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

# How far a trigger reaches, in words (NegEx's window is five; lists such as "no
# pneumothorax, effusion or focal consolidation" need a little more).
SCOPE_WORDS = 6


class Polarity(StrEnum):
    affirmed = "affirmed"
    negated = "negated"
    uncertain = "uncertain"
    hypothetical = "hypothetical"  # asked about, not found: "evaluate for pneumothorax"


class Role(StrEnum):
    pre_negation = "pre_negation"
    post_negation = "post_negation"
    pre_uncertain = "pre_uncertain"
    post_uncertain = "post_uncertain"
    pre_hypothetical = "pre_hypothetical"
    pseudo = "pseudo"  # looks like a trigger, is not: consumed so its words trigger nothing
    termination = "termination"


# The trigger phrases, by role. Chapman et al.'s lists, cut to what radiology reports use,
# with the uncertainty phrases of pyConText.
TRIGGERS: dict[Role, tuple[str, ...]] = {
    Role.pre_negation: (
        "no",
        "not",
        "without",
        "denies",
        "absence of",
        "absent",
        "negative for",
        "no evidence of",
        "no signs of",
        "no sign of",
        "no radiographic evidence of",
        "without evidence of",
        "without any evidence of",
        "free of",
        "rules out",
        "resolution of",
        "resolved",
        "there is no",
        "there are no",
        "no definite",
        "no visible",
        "no appreciable",
        "no residual",
        "nor",
    ),
    Role.post_negation: (
        "is not seen",
        "are not seen",
        "not seen",
        "is not identified",
        "are not identified",
        "not identified",
        "is not present",
        "are not present",
        "not present",
        "is not visualized",
        "not visualized",
        "is absent",
        "are absent",
        "has resolved",
        "have resolved",
        "is excluded",
        "ruled out",
        "is not evident",
        "not evident",
        "unlikely",
    ),
    Role.pre_uncertain: (
        "possible",
        "possibly",
        "probable",
        "probably",
        "may represent",
        "may be",
        "cannot exclude",
        "can not exclude",
        "cannot rule out",
        "can not rule out",
        "cannot be excluded",
        "questionable",
        "question of",
        "suspicious for",
        "suspected",
        "suggestive of",
        "concerning for",
        "equivocal",
        "likely",
        "differential diagnosis includes",
        "versus",
        "vs",
    ),
    Role.post_uncertain: (
        "cannot be excluded",
        "can not be excluded",
        "not excluded",
        "cannot be ruled out",
        "can not be ruled out",
        "not ruled out",
        "is possible",
        "is suspected",
        "is questioned",
        "is not excluded",
    ),
    Role.pre_hypothetical: (
        "evaluate for",
        "evaluation for",
        "assess for",
        "rule out",
        "r/o",
        "to exclude",
        "query",
    ),
    Role.pseudo: (
        "no change",
        "no interval change",
        "no significant change",
        "not only",
        "no increase",
        "no decrease",
        "not necessarily",
        "no further",
        "not changed",
        "without change",
        "no longer",
        "gram negative",
    ),
    Role.termination: (
        "but",
        "however",
        "although",
        "though",
        "except",
        "aside from",
        "apart from",
        "which",
        "yet",
        "still",
        "otherwise",
        "whereas",
        "with the exception of",
    ),
}
PRE = {
    Role.pre_negation: Polarity.negated,
    Role.pre_uncertain: Polarity.uncertain,
    Role.pre_hypothetical: Polarity.hypothetical,
}
POST = {Role.post_negation: Polarity.negated, Role.post_uncertain: Polarity.uncertain}
# At the same length, which role a phrase found in two lists plays.
_PRECEDENCE = (
    Role.pseudo,
    Role.post_uncertain,
    Role.pre_uncertain,
    Role.post_negation,
    Role.pre_negation,
    Role.pre_hypothetical,
    Role.termination,
)

_SENTENCE = re.compile(r"[.;!?\n\r]+")
_WORD = re.compile(r"[a-z0-9]+(?:[/'][a-z0-9]+)*")


@dataclass(frozen=True)
class Mention:
    """One mention of a finding in a sentence."""

    finding: str
    polarity: Polarity
    sentence: str


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE.split(text) if part.strip()]


@dataclass(frozen=True)
class _Span:
    start: int
    end: int  # exclusive
    role: Role | None  # None: a finding's term
    finding: str = ""


class _Phrases:
    """Phrases (tuples of words) and what each is, found longest first."""

    def __init__(self, entries: Iterable[tuple[tuple[str, ...], Role | None, str]]) -> None:
        self.table: dict[tuple[str, ...], tuple[Role | None, str]] = {}
        for phrase, role, finding in entries:
            if phrase and phrase not in self.table:
                self.table[phrase] = (role, finding)
        self.longest = max((len(p) for p in self.table), default=0)

    def match(self, tokens: Sequence[str], at: int) -> _Span | None:
        for length in range(min(self.longest, len(tokens) - at), 0, -1):
            found = self.table.get(tuple(tokens[at : at + length]))
            if found is not None:
                role, finding = found
                return _Span(at, at + length, role, finding)
        return None


class NegEx:
    """The trigger rules over a set of findings, each with the terms that name it."""

    def __init__(self, terms: dict[str, Sequence[str]]) -> None:
        entries: list[tuple[tuple[str, ...], Role | None, str]] = []
        for role in _PRECEDENCE:
            entries += [(tuple(words(phrase)), role, "") for phrase in TRIGGERS[role]]
        findings = [
            (tuple(words(term)), None, finding)
            for finding, names in terms.items()
            for term in names
        ]
        # A finding's own term wins over a trigger of the same words ("absent" is a trigger).
        self.phrases = _Phrases(sorted(findings + entries, key=lambda e: -len(e[0])))

    def mentions(self, text: str) -> list[Mention]:
        """Every finding mentioned in `text`, with its polarity, sentence by sentence."""
        found: list[Mention] = []
        for sentence in sentences(text):
            found += self._sentence(sentence)
        return found

    def _sentence(self, sentence: str) -> list[Mention]:
        tokens = words(sentence)
        spans: list[_Span] = []
        at = 0
        while at < len(tokens):
            span = self.phrases.match(tokens, at)
            if span is None:
                at += 1
                continue
            spans.append(span)
            at = span.end
        return [
            Mention(span.finding, _polarity(spans, index), sentence)
            for index, span in enumerate(spans)
            if span.role is None
        ]


def _polarity(spans: Sequence[_Span], index: int) -> Polarity:
    """The polarity of the finding at spans[index]: the nearest trigger that reaches it."""
    mention = spans[index]
    for earlier in reversed(spans[:index]):  # pre-triggers, nearest first
        if earlier.role is None:
            continue  # a list of findings shares its trigger: "no pneumothorax or effusion"
        if earlier.role in PRE and mention.start - earlier.end < SCOPE_WORDS:
            return PRE[earlier.role]
        break  # a termination term, a post-trigger or a pseudo-trigger ends the scope
    for later in spans[index + 1 :]:  # post-triggers
        if later.role is None:
            continue
        if later.role in POST and later.start - mention.end < SCOPE_WORDS:
            return POST[later.role]
        break
    return Polarity.affirmed
