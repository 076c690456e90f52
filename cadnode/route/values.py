"""What a rule can look at, and each value read as its DICOM type says.

A selector names one thing about an image: a DICOM attribute by keyword (`Modality`) or
tag (`(0018,5101)`), an attribute inside a sequence (`ViewCodeSequence.CodeMeaning`), one
component of a person name (`ReferringPhysicianName.family`), or a fact of the association
that brought the image (`calling_ae`, `called_ae`, `source_address`). Its kind says how
values compare: numbers as numbers (DS "1.6000" equals 1.6), dates, times and date-times as
such, an Age String "045Y" as 45 years, person names as text, addresses as IP addresses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DT, TM, PersonName


class Kind(StrEnum):
    number = "number"
    date = "date"
    time = "time"
    datetime = "date-time"
    age = "age"
    text = "text"
    name = "person name"
    address = "address"
    opaque = "binary or sequence"  # only exists / missing make sense

    @property
    def ordered(self) -> bool:
        """Values of this kind have an order: less_than, at_least, ... apply."""
        return self in (Kind.number, Kind.date, Kind.time, Kind.datetime, Kind.age)

    @property
    def textual(self) -> bool:
        """Values of this kind are text: regex applies."""
        return self in (Kind.text, Kind.name, Kind.address)


_KIND_OF_VR = {
    **dict.fromkeys(["DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"], Kind.number),
    "DA": Kind.date,
    "TM": Kind.time,
    "DT": Kind.datetime,
    "AS": Kind.age,
    "PN": Kind.name,
    **dict.fromkeys(["AE", "CS", "LO", "SH", "LT", "ST", "UT", "UC", "UR", "UI", "AT"], Kind.text),
}

NAME_COMPONENTS = {
    "family": "family_name",
    "given": "given_name",
    "middle": "middle_name",
    "prefix": "name_prefix",
    "suffix": "name_suffix",
}

# Facts of the association, recorded with each instance as it arrived.
CONNECTION = {"calling_ae": Kind.text, "called_ae": Kind.text, "source_address": Kind.address}


@dataclass(frozen=True, eq=False)
class Subject:
    """One image as the rules see it: its header and how it arrived."""

    header: Dataset
    calling_ae: str | None = None
    called_ae: str | None = None
    source_address: str | None = None
    label: str = ""  # how explain and test name it: a file path, a case name


class Unreadable:
    """A value present in the file that is not what its VR says (DS "abc"): never matches."""

    def __init__(self, raw: object, why: str) -> None:
        self.raw = raw
        self.why = why

    def __repr__(self) -> str:
        return f"{self.raw!r} ({self.why})"


@dataclass(frozen=True)
class Values:
    """What a selector found: the typed values and, for messages, the values as written."""

    typed: list[Any]
    shown: list[str]

    def describe(self) -> str:
        if not self.shown:
            return "missing"
        return self.shown[0] if len(self.shown) == 1 else f"[{', '.join(self.shown)}]"


@dataclass(frozen=True)
class Selector:
    text: str  # as the admin wrote it
    kind: Kind
    multi_valued: bool  # may hold several values (VM > 1, or inside a sequence)
    path: tuple[BaseTag, ...] = ()  # attribute tags, sequences first; empty for connection facts
    component: str | None = None  # a PersonName attribute
    fact: str | None = None  # a key of CONNECTION

    def read(self, unit: Sequence[Subject]) -> Values:
        """The values of the images in `unit`: one image's as it has them (ImageType's
        [ORIGINAL, PRIMARY]), several images' each once, in the order first seen."""
        typed: list[Any] = []
        shown: list[str] = []
        for subject in unit:
            seen = set(shown)
            for raw in self._raw_values(subject):
                value = self.kind_value(raw)
                if isinstance(value, Unreadable):
                    text = repr(value)
                else:
                    text = "(present)" if self.kind is Kind.opaque else _show(raw)
                if text not in seen:
                    typed.append(value)
                    shown.append(text)
        return Values(typed, shown)

    def _raw_values(self, subject: Subject) -> Iterator[Any]:
        if self.fact is not None:
            fact = getattr(subject, self.fact)
            if fact:
                yield fact
            return
        for dataset in _datasets_at(subject.header, self.path[:-1]):
            if self.path[-1] in dataset:
                yield from _element_values(_value(dataset, self.path[-1]), self.kind)

    def kind_value(self, raw: Any) -> Any:
        if isinstance(raw, Unreadable):
            return raw
        try:
            return read_as(self.kind, raw, self.component)
        except (ValueError, TypeError, OverflowError):
            return Unreadable(_text(raw), f"not a {self.kind.value}")


def parse_selector(text: str) -> Selector:
    """The selector an admin wrote as a key of a condition; ValueError says what is wrong."""
    if text in CONNECTION:
        return Selector(text, CONNECTION[text], multi_valued=False, fact=text)
    parts = text.split(".")
    component = None
    if len(parts) > 1 and parts[-1] in NAME_COMPONENTS:
        component = NAME_COMPONENTS[parts.pop()]
    tags = tuple(_tag_of(part) for part in parts)
    for sequence in tags[:-1]:
        if _vr_of(sequence) != "SQ":
            raise ValueError(f"{_name(sequence)} is not a sequence: only a sequence takes '.'")
    vr = _vr_of(tags[-1])
    if component is not None and vr != "PN":
        raise ValueError(f"{_name(tags[-1])} is not a person name: it has no {parts[-1]!r}")
    multi = len(tags) > 1 or _multi_valued(tags[-1])
    return Selector(text, _kind_of_vr(vr), multi, path=tags, component=component)


def read_as(kind: Kind, raw: Any, component: str | None = None) -> Any:
    """A value from a DICOM file as `kind`; ValueError when it is not one."""
    if kind is Kind.number:
        if isinstance(raw, bytes | bool):
            raise TypeError("not a number")
        return float(raw)
    if kind is Kind.date:
        return _naive(DA(raw) if isinstance(raw, str) else raw, dt.date)
    if kind is Kind.time:
        return _naive(TM(raw) if isinstance(raw, str) else raw, dt.time)
    if kind is Kind.datetime:
        return _naive(DT(raw) if isinstance(raw, str) else raw, dt.datetime)
    if kind is Kind.age:
        return age_in_years(str(raw))
    if kind is Kind.name:
        name = raw if isinstance(raw, PersonName) else PersonName(str(raw))
        return str(getattr(name, component)) if component else str(name)
    if kind is Kind.address:
        return ipaddress.ip_address(str(raw))
    return _text(raw)


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def age_in_years(text: str) -> float:
    """An Age String (`045Y`, `006M`, `003W`, `010D`) in years."""
    match = _AGE.match(text.upper())
    if match is None:
        raise ValueError(f"{text!r} is not an Age String like 045Y, 006M, 003W or 010D")
    return int(match[1]) * _DAYS_PER_UNIT[match[2]] / 365.25


def _naive(value: Any, kind: type) -> Any:
    """Offsets are ignored: a rule says 08:00 and means the wall clock the file says."""
    if value is None:
        raise ValueError("empty")
    if not isinstance(value, kind):
        raise TypeError(f"not a {kind.__name__}")
    if isinstance(value, dt.datetime | dt.time) and value.tzinfo is not None:
        return value.replace(tzinfo=None)
    return value


def _text(raw: Any) -> str:
    if isinstance(raw, bytes):  # a private or unknown attribute read without a VR
        return raw.decode("latin-1").strip("\x00 ")
    return str(raw).strip()


def _show(raw: Any) -> str:
    return repr(_text(raw)) if isinstance(raw, bytes | str | PersonName) else repr(raw)


def _value(dataset: Dataset, tag: BaseTag) -> Any:
    try:
        return dataset[tag].value
    except (ValueError, TypeError, OverflowError):  # not what its VR says: DS "abc"
        return Unreadable(_text(dataset.get_item(tag).value), "not what its VR says")


def _element_values(value: Any, kind: Kind) -> Iterator[Any]:
    if value is None or (isinstance(value, Sized) and len(value) == 0):
        return  # present but empty: as good as missing
    if kind is not Kind.opaque and isinstance(value, MultiValue | list | tuple):
        yield from (v for v in value if v is not None and v != "")
    else:
        yield value


def _datasets_at(header: Dataset, sequences: tuple[BaseTag, ...]) -> list[Dataset]:
    datasets = [header]
    for tag in sequences:
        datasets = [item for ds in datasets if tag in ds for item in ds[tag].value or []]
    return datasets


_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


def _tag_of(part: str) -> BaseTag:
    written = _TAG.match(part)
    if written:
        return Tag(int(written[1], 16), int(written[2], 16))
    tag = tag_for_keyword(part)
    if tag is None:
        raise ValueError(
            f"{part!r} is not a DICOM keyword or tag: expected a keyword like ViewPosition, "
            f"a tag like (0018,5101), or one of {', '.join(CONNECTION)}"
        )
    return Tag(tag)


def _vr_of(tag: BaseTag) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"  # private or unknown: read as text


def _kind_of_vr(vr: str) -> Kind:
    """`US or SS` (the VR depends on the file) is a number either way."""
    kinds = {_KIND_OF_VR.get(one.strip(), Kind.opaque) for one in vr.split(" or ")}
    if vr == "UN":
        return Kind.text
    return kinds.pop() if len(kinds) == 1 else Kind.opaque


def _multi_valued(tag: BaseTag) -> bool:
    try:
        return str(dictionary_VM(tag)) != "1"
    except KeyError:
        return True


def _name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or str(tag)
