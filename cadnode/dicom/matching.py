"""C-FIND attribute matching (PS3.4 C.2.2.2), shared by the UPS worklist and Query/Retrieve.

Supported: universal matching (empty key), single value, wildcards (* and ?), a list of UIDs,
date/time ranges (A-B, -B, A-), and sequence matching (an item of the query sequence matches
some item of the candidate's; a coded item by its code value and scheme). Matching is
case-sensitive except for PN.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence

IGNORED = {"SpecificCharacterSet", "QueryRetrieveLevel", "TimezoneOffsetFromUTC"}
# Returned when asked for, never matched: a code's meaning is text for people, worded as each
# system likes; the code value and scheme identify the concept (PS3.4 Table CC.2.5-2a: Code
# Meaning shall not be a matching key). An SCP may treat an optional key as a return key.
RETURN_ONLY = {"CodeMeaning"}
RANGE_VRS = {"DA", "TM", "DT"}


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
    have = candidate.get(key.tag)
    if have is None or have.is_empty:
        return False
    values = [str(v) for v in (have.value if have.VM > 1 else [have.value])]
    return any(_value_matches(key, value) for value in values)


def _is_universal(item: Dataset) -> bool:
    """An item whose keys are all empty: it asks for values, it does not constrain."""
    return all(
        (not element.value or _is_universal(element.value[0]))
        if element.VR == "SQ"
        else element.is_empty or element.keyword in RETURN_ONLY
        for element in item
    )


def _value_matches(key: DataElement, value: str) -> bool:
    wanted = key.value
    if key.VR == "UI" and key.VM > 1:
        return value in {str(uid) for uid in wanted}
    text = str(wanted)
    if key.VR in RANGE_VRS and "-" in text:
        low, high = text.split("-", 1)
        return (not low or value >= low) and (not high or value[: len(high)] <= high)
    if key.VR == "PN":
        text, value = text.upper(), value.upper()
    if ("*" in text or "?" in text) and key.VR not in ("UI",):
        return re.fullmatch(fnmatch.translate(text), value) is not None
    return value.strip() == text.strip()


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
