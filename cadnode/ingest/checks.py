"""What receive checks in a dataset before it answers Success (docs/security.md).

A dataset is refused at the door, with a status and a reason, rather than accepted and then
failing inside a stage: every element's value must decode as its VR says, an image must
carry Pixel Data of the size its Rows, Columns, Samples, Bits Allocated and Frames give
(uncompressed), and a deflated dataset is inflated as a stream, to a scratch file, never
past `limits.max_inflated_mb`.
"""

from __future__ import annotations

import math
import tempfile
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import VR

INFLATE_CHUNK = 1 * 2**20
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_TAGS = (Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))
PIXEL_TAG_NUMBERS = frozenset(int(tag) for tag in PIXEL_TAGS)  # one hash, not three compares
KNOWN_VRS = frozenset(vr.value for vr in VR)
# VRs whose value is a run of fixed-size numbers: a length not a multiple is not decodable.
VALUE_SIZE = {
    "US": 2, "SS": 2, "OW": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "OF": 4, "OL": 4,
    "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8,
}  # fmt: skip


# Values shorter than this that decoded once are not decoded again (see _Decoded).
SMALL_VALUE = 256
CHARACTER_SET = Tag(0x0008, 0x0005)
_ABSENT = object()


class _Decoded:
    """The values of elements that decoded before, keyed by all that decides what they
    decode to: tag, VR, byte order, the dataset's character set and the value's bytes. Most
    of a series' header repeats from one instance to the next, and converting every element
    again was about a tenth of a CT instance's time in receive. Bounded: when full, the
    oldest half goes. Its values are shared: read them, never change them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: dict[tuple[object, ...], object] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> object:
        """The value decoded for `key`, or `_ABSENT`."""
        return self._values.get(key, _ABSENT)

    def add(self, key: tuple[object, ...], value: object) -> None:
        with self._lock:
            if len(self._values) >= self.capacity:
                for old in list(self._values)[: self.capacity // 2]:
                    del self._values[old]
            self._values[key] = value


_decoded = _Decoded(8192)


class TooLarge(Exception):
    """Inflating the dataset would pass the configured limit."""


def inflated(deflated: bytes | memoryview, limit: int, scratch: Path) -> BinaryIO:
    """The inflated dataset in a scratch file beside the spool (deleted when closed), read
    from the start; TooLarge as soon as more than `limit` bytes come out."""
    out = tempfile.TemporaryFile(dir=scratch, prefix=".inflating-")  # noqa: SIM115 - returned
    try:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, as pydicom
        pending: bytes | memoryview = deflated
        written = 0
        while pending:
            chunk = inflater.decompress(pending, INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            written += len(chunk)
            if written > limit:
                raise TooLarge(f"inflates past limits.max_inflated_mb ({limit // 2**20} MiB)")
            out.write(chunk)
            if not chunk:
                break
        out.write(inflater.flush())
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out


def undecodable(dataset: Dataset, inherited_charset: object = None) -> str | None:
    """The first element whose value does not decode as its VR says, in words; None if all do.
    Large values skipped over when reading (pixels) are checked by their length only."""
    charset = _charset(dataset.get_item(CHARACTER_SET, keep_deferred=True), inherited_charset)
    for tag in list(dataset.keys()):
        problem = _element_problem(dataset, tag, charset)
        if problem:
            return problem
    return None


def _element_problem(dataset: Dataset, tag: BaseTag, charset: object) -> str | None:
    raw = dataset.get_item(tag, keep_deferred=True)
    if not isinstance(raw, RawDataElement):
        return None  # decoded already
    vr = str(raw.VR) if raw.VR else ""
    if vr and vr not in KNOWN_VRS:
        return f"{tag}: unknown VR {vr!r}"
    size = VALUE_SIZE.get(vr)
    if size and raw.length not in (UNDEFINED_LENGTH, 0) and raw.length % size:
        return f"{tag}: a {vr} value of {raw.length} bytes"
    if int(tag) in PIXEL_TAG_NUMBERS or (raw.value is None and raw.length):
        return None  # pixels are checked against the image's size; deferred values stay put
    key = _known_key(raw, vr, charset)
    if key is not None and _decoded.get(key) is not _ABSENT:
        return None
    try:
        element = dataset[tag]
    except Exception as error:  # pydicom raises many kinds for a value it cannot read
        # Its message may quote the value (a name, an ID): only the element and the kind go out.
        return f"{tag} {vr} value does not decode ({type(error).__name__})"
    if element.VR == "SQ":
        for item in element.value:
            problem = undecodable(item, charset)
            if problem:
                return f"{tag} > {problem}"
    elif key is not None:
        _decoded.add(key, element.value)
    return None


def _charset(element: object, inherited: object) -> object:
    """A dataset's character set as a key: its own, or else its parent's (an item's)."""
    if element is None:
        return inherited
    value = getattr(element, "value", None)
    return value if isinstance(element, RawDataElement) else str(value)


def _known_key(raw: RawDataElement, vr: str, charset: object) -> tuple[object, ...] | None:
    """What decides whether a small value decodes; None for one not worth remembering."""
    value = raw.value
    if vr == "SQ" or not isinstance(value, bytes) or len(value) > SMALL_VALUE:
        return None
    return (raw.tag, vr, raw.is_implicit_VR, raw.is_little_endian, charset, value)


def values_of(dataset: Dataset, tags: Iterable[BaseTag]) -> list[object]:
    """The values of `tags` in `dataset` (None where absent), from the values decoded before
    where the same bytes were seen: a series' Rows or Study Instance UID, read for every
    instance, are converted once."""
    charset = _charset(dataset.get_item(CHARACTER_SET, keep_deferred=True), None)
    return [_value(dataset, tag, charset) for tag in tags]


def _value(dataset: Dataset, tag: BaseTag, charset: object) -> object:
    raw = dataset.get_item(tag, keep_deferred=True)
    if raw is None:
        return None
    if not isinstance(raw, RawDataElement):
        return raw.value
    key = _known_key(raw, str(raw.VR) if raw.VR else "", charset)
    value = _decoded.get(key) if key is not None else _ABSENT
    if value is _ABSENT:
        value = dataset[tag].value
        if key is not None:
            _decoded.add(key, value)
    return value


IMAGE_ATTRIBUTES = tuple(
    Tag(keyword)
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames")
)
SOP_CLASS = Tag(0x0008, 0x0016)


def pixel_data_problem(dataset: Dataset, transfer_syntax: UID) -> str | None:
    """Why an image's Pixel Data is missing or not of its declared size; None if it fits."""
    rows, columns, bits, samples, frames = values_of(dataset, IMAGE_ATTRIBUTES)
    pixel_tag = next((tag for tag in PIXEL_TAGS if tag in dataset), None)
    if pixel_tag is None:
        return "an image without Pixel Data" if _is_image(dataset) else None
    named = {"Rows": rows, "Columns": columns, "BitsAllocated": bits}
    missing = [name for name, value in named.items() if not value]
    if missing:
        return f"Pixel Data without {', '.join(missing)}"
    length = _length(dataset, pixel_tag)
    if transfer_syntax.is_encapsulated and pixel_tag == PIXEL_TAGS[0]:
        return None if length == UNDEFINED_LENGTH else "compressed Pixel Data not encapsulated"
    sizes = (rows, columns, samples or 1, frames or 1, bits)
    expected = math.ceil(math.prod(int(size) for size in sizes) / 8)  # type: ignore[call-overload]
    if length == UNDEFINED_LENGTH:
        return "encapsulated Pixel Data in an uncompressed transfer syntax"
    if length not in (expected, expected + expected % 2):
        return f"Pixel Data of {length} bytes, where its image attributes give {expected}"
    return None


def _length(dataset: Dataset, tag: BaseTag) -> int:
    element = dataset.get_item(tag, keep_deferred=True)
    if isinstance(element, RawDataElement):
        return int(element.length)
    if element.is_undefined_length:
        return UNDEFINED_LENGTH
    return len(element.value) if element.value is not None else 0


def _is_image(dataset: Dataset) -> bool:
    [sop_class] = values_of(dataset, [SOP_CLASS])
    return IMAGE_ATTRIBUTES[0] in dataset or "Image Storage" in UID(str(sop_class or "")).name
