"""WADO-RS: held objects as DICOM parts, their headers as DICOM JSON, their frames as bytes.

An instance goes as stored when the client takes its transfer syntax (`transfer-syntax=*`,
or it names the stored one); otherwise it is converted where that loses nothing cadnode
cannot undo: re-encoded among the uncompressed little-endian syntaxes (Explicit VR, the
default, and Implicit VR), a compressed image decompressed first, within
`limits.max_decoded_image_mb` (cadnode.dicom.pixels). Compressing is not offered: a request
only a compressed syntax other than the stored one satisfies is answered 406.

A frame goes uncompressed (application/octet-stream: little-endian native pixels, a 1-bit
frame from its first bit, padded to a byte) or, asked with `transfer-syntax=*` or its own
media type, as its stored codestream (image/jpeg, image/jls, image/jp2, image/x-dicom-rle).
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.encaps import get_frame
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cadnode.dicom.pixels import check_decodable, decoded_pixels, decompress

CHUNK = 2**20
BULK_BYTES = 1024  # a binary value longer than this is bulk data: a URI, not inline
DICOM = "application/dicom"
OCTETS = "application/octet-stream"
ANY_SYNTAX = "*"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
BINARY_VRS = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}
# A stored frame's codestream, by its transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_MEDIA = {
    JPEGBaseline8Bit: "image/jpeg",
    JPEGExtended12Bit: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg",
    JPEGLSLossless: "image/jls",
    JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2",
    JPEG2000: "image/jp2",
    RLELossless: "image/x-dicom-rle",
}


class NotAcceptable(ValueError):
    """No media type the client accepts can be given: 406, saying what can."""


class NotFound(LookupError):
    """A frame (or bulk data) the instance does not have: 404."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: `multipart/related; type=...; transfer-syntax=...`."""

    media_type: str  # the part's type (application/dicom, application/octet-stream, ...)
    transfer_syntax: str | None  # a UID, "*", or None: the media type's default
    quality: float

    @property
    def wants_stored(self) -> bool:
        return self.transfer_syntax == ANY_SYNTAX


def accepted(header: str | None, default_type: str) -> list[MediaRange]:
    """The Accept header's multipart media ranges, most wanted first; a missing header, or
    one that allows anything, is the default type in its default syntax."""
    ranges: list[MediaRange] = []
    for entry in filter(None, (part.strip() for part in (header or "").split(","))):
        ranges.extend(_media_range(entry, default_type))
    if not header or not header.strip():
        ranges.append(MediaRange(default_type, None, 1.0))
    return sorted(ranges, key=lambda r: -r.quality)


def _media_range(entry: str, default_type: str) -> list[MediaRange]:
    kind, *raw = (piece.strip() for piece in entry.split(";"))
    parameters = {}
    for piece in raw:
        name, _, value = piece.partition("=")
        parameters[name.strip().lower()] = value.strip().strip('"')
    try:
        quality = float(parameters.get("q", "1"))
    except ValueError:
        quality = 0.0
    syntax = parameters.get("transfer-syntax")
    kind = kind.lower()
    if kind in ("*/*", "multipart/*") or (kind == "multipart/related" and "type" not in parameters):
        return [MediaRange(default_type, syntax, quality)]
    if kind == "multipart/related":
        part = parameters["type"].lower()
        return [MediaRange(default_type if part == "*/*" else part, syntax, quality)]
    if kind in (DICOM, OCTETS) or kind.startswith("image/"):
        return [MediaRange(kind, syntax, quality)]  # singlepart asked: the parts' type
    return []


# -- instances ---------------------------------------------------------------------------


def instance_syntax(stored: UID, ranges: list[MediaRange]) -> UID | None:
    """The syntax to send an instance stored in `stored` in, per the first range that can
    have it; None when none can."""
    for media in ranges:
        if media.media_type != DICOM or media.quality <= 0:
            continue
        if media.wants_stored:
            return stored
        wanted = UID(media.transfer_syntax or ExplicitVRLittleEndian)
        if wanted == stored:
            return stored
        if wanted in UNCOMPRESSED:
            return wanted
    return None


def part10(path: Path, stored: UID, syntax: UID, limit: int) -> Iterator[bytes]:
    """The instance's Part 10 bytes in `syntax`: the file itself when stored so, in chunks."""
    if syntax == stored:
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk
        return
    dataset = dcmread(path)
    if stored.is_compressed:
        decompress(dataset, limit)
    dataset.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dataset.save_as(
        buffer,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=True,
        enforce_file_format=True,
    )
    yield buffer.getvalue()


# -- metadata ----------------------------------------------------------------------------


def metadata(path: Path, bulk_uri: str) -> dict[str, Any]:
    """The instance's header as DICOM JSON; each large binary value (the pixels among them)
    as a BulkDataURI under `bulk_uri`, never read."""
    dataset = dcmread(path, defer_size=BULK_BYTES)
    bulk: dict[int, str] = {}
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None:  # deferred: large
            vr = _vr(raw)
            if vr in BINARY_VRS:
                bulk[int(tag)] = vr
                del dataset[tag]
    answer = dataset.to_json_dict(bulk_data_threshold=2**31)
    for number, vr in bulk.items():
        answer[f"{number:08X}"] = {"vr": vr, "BulkDataURI": f"{bulk_uri}/{number:08X}"}
    return dict(sorted(answer.items()))


def _vr(raw: RawDataElement | DataElement) -> str:
    """The element's VR, from the file or (implicit VR) the dictionary; OB for OB or OW."""
    vr = str(raw.VR) if raw.VR else dictionary_VR(raw.tag)
    return "OB" if " or " in vr else vr


def bulk_value(path: Path, tag: int) -> bytes:
    """One top-level binary value, as stored (native pixels: all frames, little endian)."""
    dataset = dcmread(path)
    if tag not in dataset or _vr(dataset.get_item(tag)) not in BINARY_VRS:
        raise NotFound(f"the instance has no bulk data ({tag:08X})")
    return bytes(dataset[tag].value)


# -- frames ------------------------------------------------------------------------------


def frame_numbers(text: str, most: int) -> list[int]:
    """`/frames/1,3,5` as [1, 3, 5]; ValueError for anything else or more than `most`."""
    parts = text.split(",")
    if len(parts) > most:
        raise ValueError(
            f"{len(parts)} frames asked, more than {most} (dicomweb.retrieve_max_frames)"
        )
    if not all(p.strip().isascii() and p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"frame numbers are whole numbers from 1, comma-separated: {text!r}")
    return [int(p) for p in parts]


@dataclass(frozen=True)
class Frames:
    """An image's frames as a client asked for them: the parts' media type and bytes."""

    media_type: str
    transfer_syntax: UID
    parts: list[bytes]


def frames(path: Path, numbers: list[int], ranges: list[MediaRange], limit: int) -> Frames:
    dataset = dcmread(path)
    declared = check_decodable(dataset, limit)
    stored = UID(dataset.file_meta.TransferSyntaxUID)
    outside = [n for n in numbers if n > declared.frames]
    if outside:
        raise NotFound(f"frame(s) {outside} beyond the instance's {declared.frames}")
    for media in ranges:
        if media.quality <= 0:
            continue
        stored_media = FRAME_MEDIA.get(stored, OCTETS)
        as_stored = media.wants_stored or media.media_type == stored_media
        if stored.is_compressed and as_stored and media.transfer_syntax in (None, "*", stored):
            return Frames(stored_media, stored, _codestreams(dataset, numbers, declared.frames))
        if media.media_type == OCTETS and media.transfer_syntax in (
            None,
            ANY_SYNTAX,
            ExplicitVRLittleEndian,
        ):
            return Frames(OCTETS, ExplicitVRLittleEndian, _native(dataset, numbers, stored, limit))
    raise NotAcceptable(
        f"frames are given as {OCTETS}"
        + (f" or as stored ({FRAME_MEDIA[stored]})" if stored in FRAME_MEDIA else "")
    )


def _codestreams(dataset: Dataset, numbers: list[int], count: int) -> list[bytes]:
    return [get_frame(dataset.PixelData, n - 1, number_of_frames=count) for n in numbers]


def _native(dataset: Dataset, numbers: list[int], stored: UID, limit: int) -> list[bytes]:
    """Each frame's pixels uncompressed, little endian; 1-bit frames from their first bit."""
    if stored.is_compressed:
        return [_little_endian(decoded_pixels(dataset, limit, frame=n - 1)) for n in numbers]
    bits = int(dataset.BitsAllocated)
    samples = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1))
    data: bytes = dataset.PixelData
    if bits != 1:
        size = samples * bits // 8
        return [data[(n - 1) * size : n * size] for n in numbers]
    return [_bits(data, (n - 1) * samples, samples) for n in numbers]


def _little_endian(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _bits(data: bytes, first: int, count: int) -> bytes:
    """`count` bits of 1-bit pixel data from bit `first` (DICOM packs them from each byte's
    least significant bit), repacked to start a byte."""
    start, end = first // 8, -(-(first + count) // 8)
    unpacked = np.unpackbits(np.frombuffer(data[start:end], np.uint8), bitorder="little")
    offset = first - start * 8
    return np.packbits(unpacked[offset : offset + count], bitorder="little").tobytes()


# -- multipart ---------------------------------------------------------------------------


def boundary() -> str:
    return secrets.token_hex(16)


def multipart(parts: Iterable[tuple[str, Iterable[bytes]]], separator: str) -> Iterator[bytes]:
    """A multipart/related body: each (Content-Type, chunks) as one part, streamed."""
    for content_type, chunks in parts:
        yield f"--{separator}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{separator}--\r\n".encode()
