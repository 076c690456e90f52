"""QIDO-RS query parameters as C-FIND identifiers, answered by C-FIND's own query code.

A search's path names its level and the entities above it (/studies/{study}/series); its
query parameters are matching keys (by keyword or tag: PatientName=..., 00100020=...), and
`includefield`, `limit`, `offset` and `fuzzymatching` (PS3.18 8.3.4). They become one C-FIND
identifier of the Study Root model, checked and matched by cadnode.serve.query exactly as a
C-FIND is (wildcards, date ranges, UID lists, in SQL first), so the two never disagree.

Where the path leaves a level above the searched one open (/series, /instances,
/studies/{study}/instances), C-FIND's hierarchical model would refuse; the search walks down
instead: the matching studies, page by page, then in each the matching series, then their
instances, each step a C-FIND of its own. Memory holds one study's records at a time, and the
walk stops once `offset + limit` matches are found.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag, Tag

from cadnode.serve.index import QueryIndex
from cadnode.serve.query import (
    IMAGE,
    LEVEL_OF,
    RANK,
    SERIES,
    STUDY,
    STUDY_ROOT,
    UNIQUE_KEY,
    checked,
    find,
    matchable,
)

SEARCH_PARAMETERS = ("includefield", "limit", "offset", "fuzzymatching")
# The attributes each level answers with unasked (PS3.18 Tables 10.6.3-3, -4 and -5); a
# search below the study level whose path names no study also gives the study's.
STUDY_DEFAULTS = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULTS = (
    "SpecificCharacterSet",
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_DEFAULTS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
DEFAULTS = {STUDY: STUDY_DEFAULTS, SERIES: SERIES_DEFAULTS, IMAGE: INSTANCE_DEFAULTS}
# Every attribute the index can answer at each level, for `includefield=all`.
ALL_AT = {
    level: tuple(k for k, owner in LEVEL_OF.items() if RANK[owner] <= RANK[level])
    for level in (STUDY, SERIES, IMAGE)
}
DATE_OR_RANGE = {
    "DA": re.compile(r"^(\d{8})?(-(\d{8})?)?$"),
    "TM": re.compile(r"^([\d.:]*)(-[\d.:]*)?$"),
    "DT": re.compile(r"^([\d.+-]*)$"),
}
LISTED_VRS = {"UI", "CS"}  # a comma-separated value is a list (of UIDs, of codes)


class BadSearch(ValueError):
    """A query parameter cadnode cannot act on: answered 400 with this message."""


@dataclass
class Search:
    """A QIDO-RS request, checked: the level, the matching keys, what to return, the page."""

    level: str
    named: dict[str, str]  # level -> the UID the path names
    keys: list[DataElement]
    returned: list[BaseTag]
    limit: int
    offset: int
    warnings: list[str] = field(default_factory=list)

    def identifier(self, level: str, named: dict[str, str]) -> Dataset:
        """The C-FIND identifier at `level`: its keys (those of `level` and above) and the
        return keys, with the entities above it named."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for tag in self.returned:
            keyword = keyword_for_tag(tag)
            owner = LEVEL_OF.get(keyword)
            if owner is None or RANK[owner] <= RANK[level]:
                identifier.add(DataElement(tag, dictionary_VR(tag), None))
        for key in self.keys:
            owner = LEVEL_OF.get(key.keyword, level)
            if RANK.get(owner, 0) <= RANK[level]:
                identifier.add(key)
        for above, uid in named.items():
            if RANK[above] <= RANK[level]:
                identifier[UNIQUE_KEY[above]] = DataElement(Tag(UNIQUE_KEY[above]), "UI", uid)
        return identifier


def parse(
    parameters: Sequence[tuple[str, str]],
    level: str,
    named: dict[str, str],
    *,
    default_limit: int,
    max_limit: int,
) -> Search:
    """The query string of a search at `level` as a Search, or BadSearch saying why not."""
    values: dict[BaseTag, list[str]] = {}
    returned: list[BaseTag] = [Tag(keyword) for keyword in _defaults(level, named)]
    limit, offset, warnings = default_limit, 0, []
    for name, value in parameters:
        if name == "includefield":
            returned += _included(value, level)
        elif name == "limit":
            limit = _count(name, value, minimum=1)
            if limit > max_limit:
                warnings.append(f"limit {limit} is over this node's maximum; {max_limit} used")
                limit = max_limit
        elif name == "offset":
            offset = _count(name, value, minimum=0)
        elif name == "fuzzymatching":
            if value.strip().lower() == "true":
                warnings.append(
                    "The fuzzymatching parameter is not supported. "
                    "Only literal matching has been performed."
                )
        else:
            values.setdefault(attribute_tag(name), []).extend(_split(attribute_tag(name), value))
    keys = [_key(tag, found) for tag, found in values.items()]
    unsupported = [k.keyword for k in keys if not matchable(k, level)]
    if unsupported:
        warnings.append(
            "The following attributes were not supported for matching: " + ", ".join(unsupported)
        )
    return Search(
        level=level,
        named=dict(named),
        keys=[k for k in keys if matchable(k, level)],
        returned=list(dict.fromkeys(returned)),
        limit=limit,
        offset=offset,
        warnings=warnings,
    )


def attribute_tag(name: str) -> BaseTag:
    """A matching key or includefield by keyword (PatientName) or tag (00100010)."""
    text = name.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{8}", text):
        tag = Tag(int(text, 16))
        if keyword_for_tag(tag):
            return tag
    elif (number := tag_for_keyword(text)) is not None:
        return Tag(number)
    raise BadSearch(f"unknown query parameter or attribute: {name!r}")


def matches(search: Search, index: QueryIndex, retrieve_ae_title: str) -> Iterator[Dataset]:
    """The page of answers `search` asks for (`offset`, then at most `limit`)."""
    found = _walk(search, search.level, search.named, index, retrieve_ae_title)
    return islice(found, search.offset, search.offset + search.limit)


def _walk(
    search: Search, level: str, named: dict[str, str], index: QueryIndex, ae_title: str
) -> Iterator[Dataset]:
    """Matches at `level`; where an entity above it is not named, each match of that level
    in turn names it (a relational search done as hierarchical ones)."""
    open_above = [
        above for above in STUDY_ROOT.levels[: STUDY_ROOT.levels.index(level)] if above not in named
    ]
    if not open_above:
        request = checked(search.identifier(level, named), STUDY_ROOT)
        for answer, _supported in find(request, index, ae_title):
            yield answer
        return
    above = open_above[-1]
    for entity in _walk(search, above, named, index, ae_title):
        uid = str(entity.get(UNIQUE_KEY[above], "") or "")
        if uid:
            for answer in _walk(search, level, {**named, above: uid}, index, ae_title):
                yield _with_entity_above(answer, entity, above)


def _with_entity_above(answer: Dataset, entity: Dataset, above: str) -> Dataset:
    """A study's attributes the answer lacks (a relational search returns them too)."""
    if above != STUDY:
        return answer
    for element in entity:
        if element.tag not in answer and element.keyword != "QueryRetrieveLevel":
            answer.add(element)
    return answer


def _defaults(level: str, named: dict[str, str]) -> tuple[str, ...]:
    own = DEFAULTS[level]
    return own if level == STUDY or STUDY in named else (*STUDY_DEFAULTS, *own)


def _included(value: str, level: str) -> list[BaseTag]:
    tags: list[BaseTag] = []
    for name in filter(None, (part.strip() for part in value.split(","))):
        if name == "all":
            tags += [Tag(keyword) for keyword in ALL_AT[level]]
        else:
            tags.append(attribute_tag(name))
    return tags


def _count(name: str, value: str, *, minimum: int) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) < minimum:
        raise BadSearch(f"{name} must be a whole number, at least {minimum}: {value!r}")
    return int(text)


def _split(tag: BaseTag, value: str) -> list[str]:
    vr = dictionary_VR(tag)
    if vr in LISTED_VRS:
        return [part.strip() for part in re.split(r"[,\\]", value)]
    return [value.strip()]


def _key(tag: BaseTag, values: list[str]) -> DataElement:
    """One matching key: its VR from the dictionary, its value checked where a date or time
    must be one (a value that cannot match anything is a mistake worth saying)."""
    vr = dictionary_VR(tag)
    keyword = keyword_for_tag(tag)
    if vr == "SQ":
        raise BadSearch(f"{keyword}: sequence matching is not supported in QIDO-RS here")
    pattern = DATE_OR_RANGE.get(vr)
    for text in values:
        if pattern is not None and not pattern.match(text):
            raise BadSearch(f"{keyword}: not a {vr} value or range: {text!r}")
    value: str | list[str] = values[0] if len(values) == 1 else values
    # A range (20240101-20240131) or a pattern is a query's value, not one of the VR.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)
