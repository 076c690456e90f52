"""Query identifiers: their level and keys checked, matched against the index (PS3.4 C.2.2.2).

Hierarchical queries only (no relational extended negotiation), in the Study Root and the
Patient Root information models. A query names its level; every level above it must be
named by one value of its unique key, else the identifier does not fit the model (0xA900,
as DCMTK's dcmqrscp answers). Keys are matched when they are attributes of the queried
level or a level above; other keys (a lower level's, private ones) are returned empty and
the matches come with 0xFF01 (an optional key was not supported), as the standard allows.

Matching is cadnode.dicom.matching's, the one the UPS worklist uses: single value
(case-sensitive, PN case-insensitive), wildcards * and ?, a list of UIDs, date/time ranges,
sequence matching, universal (empty) keys. Here it also takes a multi-valued key as "any
of" (ModalitiesInStudy CT\\SR) and a lone * as universal.

Matching runs in SQL first (cadnode/serve/index.py): a study or patient query over QueryStudy,
page by page, a series or image query over the records of the one study it names; each key
the index has a column for becomes a condition there (cadnode.dicom.matching_sql), and every
key is then checked here, by the matcher, on the rows SQL returned.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement

from cadnode.core.db import QueryRecord
from cadnode.dicom.indexing import IMAGE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS
from cadnode.dicom.matching import Wanted, holds, matches, response, wanted
from cadnode.dicom.matching_sql import condition
from cadnode.dicom.status import DOES_NOT_MATCH_SOP_CLASS
from cadnode.serve.index import (
    INSTANCE,
    RECORD_TABLE,
    STUDY_TABLE,
    Condition,
    Held,
    Narrowing,
    QueryIndex,
    Tally,
    holding,
)

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
RANK = {PATIENT: 0, STUDY: 1, SERIES: 2, IMAGE: 3}
UNIQUE_KEY = {
    PATIENT: "PatientID",
    STUDY: "StudyInstanceUID",
    SERIES: "SeriesInstanceUID",
    IMAGE: "SOPInstanceUID",
}
# Attributes computed from what is held, by the level whose entities have them.
COUNTED = {
    PATIENT: (
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ),
    STUDY: (
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    SERIES: ("NumberOfSeriesRelatedInstances",),
    IMAGE: ("AvailableTransferSyntaxUID",),
}
LEVEL_OF = {
    keyword: level
    for level, keywords in (
        (PATIENT, PATIENT_KEYS),
        (STUDY, STUDY_KEYS),
        (SERIES, SERIES_KEYS),
        (IMAGE, IMAGE_KEYS),
        *COUNTED.items(),
    )
    for keyword in keywords
}
# Said of every entity, at any level.
ANY_LEVEL = ("RetrieveAETitle", "InstanceAvailability", "SpecificCharacterSet")
NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}


@dataclass(frozen=True)
class Model:
    name: str
    levels: tuple[str, ...]


STUDY_ROOT = Model("study-root", (STUDY, SERIES, IMAGE))
PATIENT_ROOT = Model("patient-root", (PATIENT, STUDY, SERIES, IMAGE))


class Refused(Exception):
    """An identifier cadnode will not act on: the DIMSE status and the reason (ErrorComment)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def status_dataset(self) -> Dataset:
        status = Dataset()
        status.Status = self.status
        status.ErrorComment = self.reason[:64]  # LO
        return status


@dataclass(frozen=True)
class Request:
    """A checked identifier: its model, its level and what it names outright."""

    model: Model
    level: str
    identifier: Dataset
    narrowing: Narrowing

    @property
    def grouping(self) -> str:
        """The Held field whose value is one entity of the requested level."""
        return {
            PATIENT: "patient_id",
            STUDY: "study_uid",
            SERIES: "series_uid",
            IMAGE: "sop_instance_uid",
        }[self.level]


def checked(identifier: Dataset, model: Model, *, retrieve: bool = False) -> Request:
    """The identifier as a request, or Refused saying what is wrong with it.

    A retrieval (C-MOVE, C-GET) must name the entities of its level by their unique key; a
    query may leave it universal, give one value, a list of UIDs or (for Patient ID) a pattern.
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    if level not in model.levels:
        raise Refused(
            DOES_NOT_MATCH_SOP_CLASS,
            f"QueryRetrieveLevel {level!r} not in {'/'.join(model.levels)}",
        )
    named: dict[str, list[str]] = {}
    for above in model.levels[: model.levels.index(level)]:
        values = _values(identifier, UNIQUE_KEY[above])
        if len(values) != 1 or _has_wildcard(values[0]):
            raise Refused(
                DOES_NOT_MATCH_SOP_CLASS,
                f"{level} level needs one {UNIQUE_KEY[above]}",
            )
        named[above] = values
    own = _values(identifier, UNIQUE_KEY[level])
    if retrieve and not own:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"{UNIQUE_KEY[level]} is required")
    if own and (level != PATIENT or not any(_has_wildcard(v) for v in own)):
        named[level] = own
    patient = named.get(PATIENT, [])
    return Request(
        model=model,
        level=level,
        identifier=identifier,
        narrowing=Narrowing(
            patient_id=patient[0] if len(patient) == 1 else None,
            study_uids=named.get(STUDY, []),
            series_uids=named.get(SERIES, []),
            sop_instance_uids=named.get(IMAGE, []),
        ),
    )


def find(
    request: Request, index: QueryIndex, retrieve_ae_title: str
) -> Iterator[tuple[Dataset, bool]]:
    """Each matching entity's response, and whether every key in it was supported."""
    keys = [key for key in request.identifier if key.keyword not in NOT_KEYS]
    matched_keys = [key for key in keys if matchable(key, request.level)]
    supported = len(matched_keys) == len(keys)
    counted = any(key.keyword in COUNTED[request.level] for key in keys)
    if request.level in (PATIENT, STUDY):
        candidates = _grouped(request.level, index, matched_keys, counted=counted)
    else:
        candidates = _held(request, index, matched_keys)
    for candidate in candidates:
        candidate.RetrieveAETitle = retrieve_ae_title
        candidate.InstanceAvailability = "ONLINE"
        if all(_key_matches(candidate, key) for key in matched_keys):
            yield _response(candidate, request, matched_keys), supported


def _grouped(
    level: str, index: QueryIndex, keys: Sequence[DataElement], *, counted: bool
) -> Iterator[Dataset]:
    """Patients or studies, page by page, as SQL narrows them on QueryStudy (and on what each
    study holds); their counts read only when asked for."""
    conditions = _conditions(keys, STUDY_TABLE)
    if level == STUDY:
        conditions += _holding(keys)
    read = index.studies if level == STUDY else index.patients
    after: str | None = None
    while page := read(conditions, after):
        entities = [entity for entity, _ in page]
        tallies = index.tallies(UNIQUE_KEY[level], entities) if counted else {}
        for entity, attributes in page:
            candidate = Dataset.from_json(attributes)
            _add_counts(candidate, level, tallies.get(entity, Tally()))
            yield candidate
        after = entities[-1]


def _held(request: Request, index: QueryIndex, keys: Sequence[DataElement]) -> Iterator[Dataset]:
    """Series or images of the one study the request names, as SQL narrows their records."""
    held = index.held(request.narrowing, _conditions(keys, RECORD_TABLE))
    groups: dict[str, list[Held]] = {}
    for item in held:
        groups.setdefault(getattr(item, request.grouping), []).append(item)
    representatives = {key: _representative(items) for key, items in groups.items()}
    attributes = index.attributes(r.sop_instance_uid for r in representatives.values())
    for entity, items in groups.items():
        candidate = attributes.get(representatives[entity].sop_instance_uid)
        if candidate is not None:
            _add_counts(candidate, request.level, _tally(items))
            yield candidate


def _conditions(keys: Sequence[DataElement], table: Mapping[str, Any]) -> list[Condition]:
    """The keys a table has a column for, as SQL conditions on it."""
    found = []
    for key in keys:
        column = table.get(key.keyword)
        alternatives = None if column is None or key.VR == "SQ" else _alternatives(key)
        if alternatives is not None:
            found.append(condition(column, alternatives))
    return found


def _holding(keys: Sequence[DataElement]) -> list[Condition]:
    """Modalities and SOP Classes in Study: that one of the study's objects has them."""
    columns = {
        "ModalitiesInStudy": QueryRecord.modality,
        "SOPClassesInStudy": QueryRecord.sop_class_uid,
    }
    return [holding(c) for c in _conditions(keys, columns)]


def _representative(items: Sequence[Held]) -> Held:
    """The object whose header speaks for its entity: a received image before a result."""
    return min(items, key=lambda h: (h.held_as is not INSTANCE, h.sop_instance_uid))


def _tally(items: Sequence[Held]) -> Tally:
    return Tally(
        studies={h.study_uid for h in items},
        series={h.series_uid for h in items},
        modalities={h.modality for h in items if h.modality},
        sop_classes={h.sop_class_uid for h in items},
        instances=len(items),
        transfer_syntax=items[0].transfer_syntax,
    )


def _add_counts(candidate: Dataset, level: str, tally: Tally) -> None:
    if level == PATIENT:
        candidate.NumberOfPatientRelatedStudies = len(tally.studies)
        candidate.NumberOfPatientRelatedSeries = len(tally.series)
        candidate.NumberOfPatientRelatedInstances = tally.instances
    elif level == STUDY:
        candidate.ModalitiesInStudy = sorted(tally.modalities)
        candidate.SOPClassesInStudy = sorted(tally.sop_classes)
        candidate.NumberOfStudyRelatedSeries = len(tally.series)
        candidate.NumberOfStudyRelatedInstances = tally.instances
    elif level == SERIES:
        candidate.NumberOfSeriesRelatedInstances = tally.instances
    else:
        candidate.AvailableTransferSyntaxUID = tally.transfer_syntax


def matchable(key: DataElement, level: str) -> bool:
    """Whether `key` is matched at `level` (an attribute of it or a level above)."""
    keyword = key.keyword or keyword_for_tag(key.tag)
    if keyword in ANY_LEVEL:
        return True
    owner = LEVEL_OF.get(keyword)
    return owner is not None and RANK[owner] <= RANK[level]


def _key_matches(candidate: Dataset, key: DataElement) -> bool:
    if key.VR == "SQ":
        return matches(candidate, _only(key, key.value))
    alternatives = _alternatives(key)
    return alternatives is None or holds(candidate, key.tag, alternatives)


def _alternatives(key: DataElement) -> list[Wanted] | None:
    """What a non-sequence key asks of a value, any one alternative sufficing; None for
    universal matching: an empty key or a lone * (even for an entity without the value), or
    a multi-valued key with an empty value. A multi-valued key other than a UID list is
    "any of" its values (ModalitiesInStudy CT\\SR)."""
    if key.is_empty or (key.VM == 1 and str(key.value).strip() == "*"):
        return None
    if key.VR == "UI" or key.VM <= 1:
        return [wanted(key)]
    if any(not str(value).strip() for value in key.value):
        return None
    return [wanted(DataElement(key.tag, key.VR, value)) for value in key.value]


def _only(key: DataElement, value: object) -> Dataset:
    query = Dataset()
    query.add(DataElement(key.tag, key.VR, value))
    return query


def _response(candidate: Dataset, request: Request, matched_keys: list[DataElement]) -> Dataset:
    """The requested keys (a lower level's empty), the unique keys, the level."""
    asked = Dataset()
    for key in request.identifier:
        if key.keyword in NOT_KEYS:
            continue
        if any(key.tag == m.tag for m in matched_keys):
            asked.add(key)
        else:
            candidate.pop(key.tag, None)  # not this level's: returned, but empty
            asked.add(DataElement(key.tag, key.VR, None))
    answer = response(candidate, asked)
    for level in request.model.levels[: request.model.levels.index(request.level) + 1]:
        keyword = UNIQUE_KEY[level]
        if keyword in candidate:
            answer[keyword] = candidate[keyword]
        else:
            setattr(answer, keyword, "")
    answer.QueryRetrieveLevel = request.level
    return answer


def _values(identifier: Dataset, keyword: str) -> list[str]:
    if keyword not in identifier or identifier[keyword].is_empty:
        return []
    element = identifier[keyword]
    value = element.value
    values = list(value) if element.VM > 1 else [value]
    return [str(v).strip() for v in values if str(v).strip()]


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value
