"""Pixel data decoded within bounds: the one way cadnode turns stored pixels into an array.

A compressed image costs what it claims, not what it weighs: an RLE frame of a few bytes or
a 100-byte JPEG 2000 codestream may claim 65535 x 65535 x 16 bits, 8 GiB once decoded. So
before any decoder runs, two things are checked, and the image is refused (`ImageRefused`,
permanent: decoding it again would fail again) if either fails:

1. what the dataset declares (rows x columns x samples x frames x bits allocated) against
   `limits.max_decoded_image_mb`: pydicom sizes its output from these;
2. each frame's codestream header against the dataset, since the codecs size their own
   buffers from it: JPEG 2000 SIZ (image size, components, precision, tile count), JPEG and
   JPEG-LS SOF (height, width, components, precision), RLE (segment count and offsets).
   A compressed transfer syntax with no such check here (MPEG, HEVC, ...) is refused.

Every decode path (inference preprocessing, Q/R conversion, thumbnails, overlays) goes
through `decoded_pixels` or `decompress`, never `Dataset.pixel_array` or `.decompress()`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice, pairwise

import numpy as np
from pydicom import Dataset
from pydicom.encaps import generate_frames

# pydicom's own header parsers, the ones its decoders read the same headers with (private
# names: tests/test_pixels.py fails loudly if a pydicom release moves them). JPEG 2000 has
# only `get_j2k_parameters`, which reads the precision, not the image size: SIZ is read here.
from pydicom.pixels.decoders.rle import _rle_parse_header
from pydicom.pixels.utils import _get_jpg_parameters, pixel_array
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from cadnode.core.config import LimitsSettings

LIMIT_KEY = "limits.max_decoded_image_mb"
DEFAULT_LIMIT = LimitsSettings().max_decoded_image_bytes
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A JPEG 2000 tile-part names its tile in 16 bits (Isot, 15444-1 A.4.2): more tiles than
# this is not a valid codestream, and the codec allocates per tile before decoding any.
MAX_J2K_TILES = 65535
MIB = 2**20


class ImageRefused(ValueError):
    """An image cadnode will not decode: over the size limit, or its codestream's header
    disagrees with its dataset. Permanent: the same bytes are refused every time."""

    def __init__(self, reason: str, limit: int) -> None:
        self.reason = reason
        self.limit = limit
        super().__init__(f"image not decoded: {reason} (limit {limit / MIB:g} MiB, {LIMIT_KEY})")


@dataclass(frozen=True)
class Declared:
    """What the dataset says its decoded pixels are."""

    rows: int
    columns: int
    samples: int
    frames: int
    bits_allocated: int

    @property
    def bytes_per_sample(self) -> int:
        return -(-self.bits_allocated // 8)  # 1-bit pixels decode to a byte each

    @property
    def decoded_bytes(self) -> int:
        return self.rows * self.columns * self.samples * self.frames * self.bytes_per_sample

    def __str__(self) -> str:
        return (
            f"{self.rows} x {self.columns} x {self.samples} sample(s) x {self.frames} "
            f"frame(s) x {self.bits_allocated} bits"
        )


def decoded_pixels(dataset: Dataset, limit: int, *, frame: int | None = None) -> np.ndarray:
    """`dataset.pixel_array` once the image is checked (or only frame `frame`, 0-based):
    the same array, or ImageRefused before a byte is decoded."""
    check_decodable(dataset, limit)
    # Decoders would also decode frames found beyond Number of Frames: not past the check.
    array: np.ndarray = pixel_array(dataset, index=frame, allow_excess_frames=False)
    return array


def decompress(dataset: Dataset, limit: int) -> None:
    """`dataset.decompress()` in place (same SOP Instance UID) once the image is checked."""
    check_decodable(dataset, limit)
    dataset.decompress(generate_instance_uid=False, allow_excess_frames=False)


def check_decodable(dataset: Dataset, limit: int) -> Declared:
    """What decoding `dataset` would produce, or ImageRefused saying why it is not done."""
    declared = _declared(dataset, limit)
    if declared.decoded_bytes > limit:
        size = f"{declared.decoded_bytes / MIB:.4g} MiB"
        raise ImageRefused(f"{declared} = {size} decoded, over the limit", limit)
    syntax = _transfer_syntax(dataset, limit)
    if not syntax.is_encapsulated:
        return declared  # native pixels: the bytes are all there, checked by pydicom
    check = _codestream_check(syntax)
    if check is None:
        raise ImageRefused(f"no codestream check for transfer syntax {syntax.name}", limit)
    for number, codestream in enumerate(_frames(dataset, declared, limit), start=1):
        if (problem := check(codestream, declared)) is not None:
            raise ImageRefused(f"frame {number}: {problem}", limit)
    return declared


def _transfer_syntax(dataset: Dataset, limit: int) -> UID:
    meta = getattr(dataset, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "")
    if not syntax.is_transfer_syntax:
        raise ImageRefused(f"no known transfer syntax ({syntax or 'none'})", limit)
    return syntax


def _declared(dataset: Dataset, limit: int) -> Declared:
    if not any(keyword in dataset for keyword in PIXEL_KEYWORDS):
        raise ImageRefused("the dataset has no pixel data", limit)
    return Declared(
        rows=_positive(dataset, "Rows", limit),
        columns=_positive(dataset, "Columns", limit),
        samples=_positive(dataset, "SamplesPerPixel", limit),
        frames=_positive(dataset, "NumberOfFrames", limit, absent=1),
        bits_allocated=_positive(dataset, "BitsAllocated", limit),
    )


def _positive(dataset: Dataset, keyword: str, limit: int, absent: int = 0) -> int:
    """An Image Pixel attribute as a positive integer (`absent` where it may be left out)."""
    value = dataset.get(keyword)
    try:
        number = absent if value in (None, "") else int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ImageRefused(f"{keyword} is missing or not a positive number", limit)
    return number


def _frames(dataset: Dataset, declared: Declared, limit: int) -> Iterator[bytes]:
    """Each declared frame's codestream, split as pydicom's decoders split them."""
    offsets = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        offsets = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    frames = generate_frames(
        dataset.PixelData, number_of_frames=declared.frames, extended_offsets=offsets
    )
    try:
        yield from islice(frames, declared.frames)
    except ValueError as error:  # fragments pydicom cannot split, it could not decode either
        raise ImageRefused(f"the encapsulated pixel data is malformed: {error}", limit) from error


# --- codestream headers: each returns what disagrees with the dataset, or None -----------

Check = Callable[[bytes, Declared], str | None]


def _codestream_check(syntax: UID) -> Check | None:
    if syntax in JPEG2000TransferSyntaxes:
        return _j2k_disagrees
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        return _jpeg_disagrees
    if syntax == RLELossless:
        return _rle_disagrees
    return None


def _disagreement(codec: str, found: tuple[int, int, int, int], declared: Declared) -> str | None:
    """`found`: the codestream's (height, width, components, precision)."""
    height, width, components, precision = found
    wanted = (declared.rows, declared.columns, declared.samples)
    if (height, width, components) == wanted and 0 < precision <= declared.bits_allocated:
        return None
    return (
        f"the {codec} header says {height} x {width} x {components} component(s) at "
        f"{precision} bits, the dataset {declared.rows} x {declared.columns} x "
        f"{declared.samples} at {declared.bits_allocated} bits allocated"
    )


# SIZ after SOC (15444-1 A.5.1): Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz,
# XTOsiz, YTOsiz, Csiz; then Ssiz, XRsiz, YRsiz per component.
_SIZ = struct.Struct(">HHIIIIIIIIH")
_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _j2k_disagrees(codestream: bytes, declared: Declared) -> str | None:
    start = _j2k_start(codestream)
    if start is None or len(codestream) < start + 4 + _SIZ.size:
        return "not a JPEG 2000 codestream (no SOC and SIZ markers at its start)"
    siz = start + 4
    _, _, x, y, x0, y0, tile_x, tile_y, tile_x0, tile_y0, components = _SIZ.unpack_from(
        codestream, siz
    )
    depths = codestream[siz + _SIZ.size : siz + _SIZ.size + 3 * components : 3]
    origins_fit = tile_x0 <= x0 < x and tile_y0 <= y0 < y
    if len(depths) != components or not (origins_fit and tile_x and tile_y):
        return "the JPEG 2000 SIZ segment is truncated or its sizes are invalid"
    tiles = -(-(x - tile_x0) // tile_x) * -(-(y - tile_y0) // tile_y)
    if tiles > MAX_J2K_TILES:
        return f"the JPEG 2000 SIZ segment asks for {tiles} tiles (at most {MAX_J2K_TILES})"
    precision = max((depth & 0x7F) + 1 for depth in depths) if depths else 0
    return _disagreement("JPEG 2000 SIZ", (y - y0, x - x0, components, precision), declared)


def _j2k_start(data: bytes) -> int | None:
    """Where the codestream (SOC, then SIZ, which must come second) starts: at once, as
    DICOM wants (PS3.5 A.4.4), or in the JP2 file format's contiguous codestream box, which
    some writers (older GDCM) wrap it in and the codecs accept."""
    if data.startswith(_SOC_SIZ):
        return 0
    if not data.startswith(_JP2_SIGNATURE):
        return None
    offset = len(_JP2_SIGNATURE)
    while offset + 8 <= len(data):  # boxes: length (0: to the end, 1: 64-bit follows), type
        length, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if length == 1 and offset + 16 <= len(data):
            length, header = struct.unpack_from(">Q", data, offset + 8)[0], 16
        if kind == b"jp2c":
            inner = offset + header
            return inner if data.startswith(_SOC_SIZ, inner) else None
        if length < header:
            return None
        offset += length
    return None


def _jpeg_disagrees(codestream: bytes, declared: Declared) -> str | None:
    info = _get_jpg_parameters(codestream)  # the SOF (or JPEG-LS SOF55) segment
    if "height" not in info:
        return "no JPEG SOF segment could be read"
    found = (info["height"], info["width"], info["components"], info["precision"])
    return _disagreement("JPEG SOF", found, declared)


def _rle_disagrees(codestream: bytes, declared: Declared) -> str | None:
    # PS3.5 G.3: one segment per byte of each sample, the first right after the 64-byte
    # header, each starting after the previous one and inside the frame.
    if declared.bits_allocated % 8:
        return f"RLE cannot carry {declared.bits_allocated}-bit samples"
    try:
        offsets = _rle_parse_header(codestream[:64])
    except ValueError as error:
        return f"the RLE header is invalid: {error}"
    wanted = declared.samples * declared.bytes_per_sample
    if len(offsets) != wanted:
        return f"the RLE header has {len(offsets)} segment(s), the dataset needs {wanted}"
    bounds = [*offsets, len(codestream)]
    if offsets[0] != 64 or any(a >= b for a, b in pairwise(bounds)):
        size = len(codestream)
        return f"the RLE segment offsets {offsets} are not ascending within its {size} bytes"
    return None
