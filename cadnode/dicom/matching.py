"""C-FIND attribute matching (PS3.4 C.2.2.2), shared by the UPS worklist and Query/Retrieve.

Supported: universal matching (empty key), single value, wildcards (* and ?), a list of UIDs,
date/time ranges (A-B, -B, A-), and sequence matching (an item of the query sequence matches
some item of the candidate's; a coded item by its code value and scheme). Matching is
case-sensitive except for PN. Leading and trailing spaces are not significant.

A non-sequence key is first read as a `Wanted` (what it asks of one value), and a value
made `comparable` (its padding dropped, a name in upper case) is tested against it: the
query index stores values already comparable, and cadnode.dicom.matching_sql asks the same
of them in SQL, so the two never disagree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

IGNORED = {"SpecificCharacterSet", "QueryRetrieveLevel", "TimezoneOffsetFromUTC"}
# Returned when asked for, never matched: a code's meaning is text for people, worded as each
# system likes; the code value and scheme identify the concept (PS3.4 Table CC.2.5-2a: Code
# Meaning shall not be a matching key). An SCP may treat an optional key as a return key.
RETURN_ONLY = {"CodeMeaning"}
RANGE_VRS = {"DA", "TM", "DT"}
WILDCARDS = ("*", "?")  # the only ones DICOM has: any other character stands for itself


class How(Enum):
    """How a key's value is matched (PS3.4 C.2.2.2.2-C.2.2.2.5)."""

    single = "single"  # the same value
    uid_list = "uid_list"  # any of a list of UIDs
    range = "range"  # within a date/time range, either end open
    wildcard = "wildcard"  # * any run of characters, ? any one


@dataclass(frozen=True)
class Wanted:
    """What one key asks of a value, the value already `comparable`."""

    how: How
    # single: (the value,); uid_list: the UIDs; range: (low, high), "" for an open end;
    # wildcard: (the pattern,). Names are in upper case, as their comparable values.
    values: tuple[str, ...]

    def satisfied_by(self, value: str) -> bool:
        if self.how is How.uid_list:
            return value in self.values
        if self.how is How.range:
            low, high = self.values
            return (not low or value >= low) and (not high or value[: len(high)] <= high)
        if self.how is How.wildcard:
            return _pattern(self.values[0]).fullmatch(value) is not None
        return value == self.values[0]


def wanted(key: DataElement) -> Wanted:
    """What a non-empty, non-sequence key asks (a multi-valued UI key: any of its UIDs)."""
    if key.VR == "UI" and key.VM > 1:
        return Wanted(How.uid_list, tuple(str(uid).strip() for uid in key.value))
    text = str(key.value).strip()
    if key.VR in RANGE_VRS and "-" in text:
        low, high = text.split("-", 1)
        return Wanted(How.range, (low, high))
    text = comparable(key.VR, text)
    if key.VR != "UI" and any(wildcard in text for wildcard in WILDCARDS):
        return Wanted(How.wildcard, (text,))
    return Wanted(How.single, (text,))


def comparable(vr: str, value: str) -> str:
    """A value as matching compares it: without its padding; a person's name in upper case
    (names match in any case)."""
    value = value.strip()
    return value.upper() if vr == "PN" else value


def values_of(element: DataElement | None) -> list[str]:
    """An element's values as matching sees them (none when it is absent or empty)."""
    if element is None or element.is_empty or element.VR == "SQ":
        return []
    values = element.value if element.VM > 1 else [element.value]
    return [comparable(element.VR, str(value)) for value in values]


def holds(candidate: Dataset, tag: BaseTag, alternatives: Iterable[Wanted]) -> bool:
    """Whether a value of the candidate's element satisfies one of the alternatives (an
    absent or empty element satisfies none)."""
    values = values_of(candidate.get(tag))
    return any(w.satisfied_by(value) for w in alternatives for value in values)


def matches(candidate: Dataset, query: Dataset) -> bool:
    return all(
        _element_matches(candidate, key)
        for key in query
        if key.keyword not in IGNORED and key.keyword not in RETURN_ONLY
    )


def _element_matches(candidate: Dataset, key: DataElement) -> bool:
    if key.VR == "SQ":
        if not key.value or _is_universal(key.value[0]):
            return True
        have = candidate.get(key.tag)
        items = have.value if have is not None and have.VR == "SQ" else []
        return any(matches(item, key.value[0]) for item in items)
    if key.is_empty:
        return True
    return holds(candidate, key.tag, [wanted(key)])


def _is_universal(item: Dataset) -> bool:
    """An item whose keys are all empty: it asks for values, it does not constrain."""
    return all(
        (not element.value or _is_universal(element.value[0]))
        if element.VR == "SQ"
        else element.is_empty or element.keyword in RETURN_ONLY
        for element in item
    )


@functools.lru_cache(maxsize=256)
def _pattern(wildcarded: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wildcarded)
    return re.compile("".join(parts), re.DOTALL)


def response(candidate: Dataset, query: Dataset) -> Dataset:
    """The query's keys, valued from the candidate (empty where it has none)."""
    answer = Dataset()
    for key in query:
        if key.keyword == "SpecificCharacterSet":
            continue
        have = candidate.get(key.tag)
        if key.VR == "SQ":
            answer.add(DataElement(key.tag, "SQ", _items(have, key)))
        elif have is not None:
            answer.add(DataElement(key.tag, have.VR, have.value))
        else:
            answer.add(DataElement(key.tag, key.VR, None))
    if "SpecificCharacterSet" in candidate:
        answer.SpecificCharacterSet = candidate.SpecificCharacterSet
    return answer


def _items(have: DataElement | None, key: DataElement) -> Sequence:
    items: list[Any] = list(have.value) if have is not None and have.VR == "SQ" else []
    if not key.value or not len(key.value[0]):
        return Sequence(items)  # an empty sequence key asks for the whole sequence
    return Sequence([response(item, key.value[0]) for item in items])
