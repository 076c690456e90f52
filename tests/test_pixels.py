"""cadnode.dicom.pixels: images decoded only within the limit, and only when each codestream's own
header agrees with its dataset; honest images decode exactly as `pixel_array` does."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, JPEG2000Lossless

from cadnode.dicom.pixels import (
    DEFAULT_LIMIT,
    LIMIT_KEY,
    ImageRefused,
    check_decodable,
    decoded_pixels,
    decompress,
)

HONEST = [
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 in a JP2 wrapper, as older GDCM wrote it
    "JPGExtended.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "rtdose_rle.dcm",  # 15 frames
    "image_dfl.dcm",  # deflated dataset, native pixels
]


def read(name: str) -> Dataset:
    return dcmread(str(get_testdata_file(name)))


def frame_bytes(ds: Dataset) -> bytearray:
    """The first frame's codestream, to be altered and put back with `with_frame`."""
    return bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


def with_frame(ds: Dataset, codestream: bytes | bytearray) -> Dataset:
    ds.PixelData = encapsulate([bytes(codestream)])
    return ds


def refusal(ds: Dataset, limit: int = DEFAULT_LIMIT) -> str:
    with pytest.raises(ImageRefused) as refused:
        decoded_pixels(ds, limit)
    message = str(refused.value)
    assert LIMIT_KEY in message  # every refusal names the setting that governs it
    return message


# --- honest images ---------------------------------------------------------------------


@pytest.mark.parametrize("name", HONEST)
def test_honest_images_decode_exactly_as_pixel_array(name: str) -> None:
    expected = read(name).pixel_array
    decoded = decoded_pixels(read(name), DEFAULT_LIMIT)
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)


@pytest.mark.parametrize("name", ["rtdose_rle.dcm", "SC_rgb_rle_2frame.dcm", "MR_small.dcm"])
def test_one_frame_decodes_as_that_frame_of_pixel_array(name: str) -> None:
    everything = read(name).pixel_array
    frames = int(read(name).get("NumberOfFrames", 1) or 1)
    last = decoded_pixels(read(name), DEFAULT_LIMIT, frame=frames - 1)
    assert np.array_equal(last, everything[-1] if frames > 1 else everything)


def test_decompress_converts_an_honest_image_in_place() -> None:
    ds = read("JPEG2000.dcm")
    uid = ds.SOPInstanceUID
    decompress(ds, DEFAULT_LIMIT)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == uid  # the same object, in another transfer syntax
    assert np.array_equal(ds.pixel_array, read("JPEG2000.dcm").pixel_array)


# --- the limit -------------------------------------------------------------------------


def test_an_image_over_the_limit_is_refused_naming_the_limit() -> None:
    ds = read("MR_small.dcm")  # 64 x 64 x 16 bits = 8 KiB
    assert check_decodable(ds, 8192).decoded_bytes == 8192
    message = refusal(ds, 8191)
    assert "64 x 64 x 1 sample(s) x 1 frame(s) x 16 bits" in message
    assert f"(limit {8191 / 2**20:g} MiB, {LIMIT_KEY})" in message


def test_frames_and_samples_count_towards_the_limit() -> None:
    ds = read("SC_rgb_rle_16bit_2frame.dcm")  # 100 x 100 x 3 x 2 frames x 16 bits
    assert check_decodable(ds, DEFAULT_LIMIT).decoded_bytes == 100 * 100 * 3 * 2 * 2
    refusal(ds, 100 * 100 * 3 * 2 * 2 - 1)


def test_a_dataset_claiming_65535_squared_is_refused_before_decoding() -> None:
    """The RLE bomb: a frame of a few bytes, 8 GiB once decoded."""
    ds = read("MR_small_RLE.dcm")
    ds.Rows = ds.Columns = 65535
    with_frame(ds, struct.pack("<3L52x", 2, 64, 66) + b"\x81\x00\x81\x00")
    assert "8192 MiB decoded, over the limit" in refusal(ds)


@pytest.mark.parametrize(
    ("keyword", "value"), [("Rows", None), ("Columns", 0), ("BitsAllocated", None)]
)
def test_missing_or_empty_image_attributes_are_refused(keyword: str, value: int | None) -> None:
    ds = read("MR_small.dcm")
    if value is None:
        del ds[keyword]
    else:
        setattr(ds, keyword, value)
    assert f"{keyword} is missing" in refusal(ds)


def test_a_dataset_without_pixel_data_is_refused() -> None:
    ds = read("MR_small.dcm")
    del ds.PixelData
    assert "no pixel data" in refusal(ds)


# --- codestream headers ----------------------------------------------------------------

# JPEG 2000 SIZ fields, from the start of a bare codestream (15444-1 A.5.1).
XSIZ, YSIZ, XTSIZ, YTSIZ, CSIZ, SSIZ = 8, 12, 24, 28, 40, 42


def patched(ds: Dataset, *changes: tuple[int, str, int]) -> Dataset:
    """`ds` with its first codestream changed: (offset, struct format, value) each."""
    codestream = frame_bytes(ds)
    for offset, layout, value in changes:
        struct.pack_into(layout, codestream, offset, value)
    return with_frame(ds, codestream)


J2K_LIES: dict[str, tuple[tuple[int, str, int], ...]] = {
    "size": ((XSIZ, ">I", 65535), (YSIZ, ">I", 65535)),
    "components": ((CSIZ, ">H", 3),),
    "precision": ((SSIZ, ">B", 31),),  # 32 bits in a 16-bit dataset
    "tiles": ((XTSIZ, ">I", 1), (YTSIZ, ">I", 1)),  # one tile a pixel: 262144 tiles
}


@pytest.mark.parametrize("lie", sorted(J2K_LIES))
def test_a_jpeg_2000_siz_that_disagrees_with_the_dataset_is_refused(lie: str) -> None:
    ds = patched(read("JPEG2000.dcm"), *J2K_LIES[lie])
    message = refusal(ds)
    assert "frame 1: the JPEG 2000 SIZ" in message
    if lie == "size":
        assert "says 65535 x 65535 x 1 component(s)" in message
        assert "the dataset 1024 x 256 x 1" in message


def test_a_jpeg_2000_frame_without_soc_and_siz_is_refused() -> None:
    ds = with_frame(read("JPEG2000.dcm"), b"\x00" * 200)
    assert "not a JPEG 2000 codestream" in refusal(ds)


def sof_offset(codestream: bytes | bytearray, marker: bytes) -> int:
    """Where the SOF segment's fields start (after marker and length)."""
    return codestream.index(marker) + 4


@pytest.mark.parametrize(
    ("name", "marker"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", b"\xff\xc0"),  # baseline
        ("JPGExtended.dcm", b"\xff\xc1"),  # extended, 12 bits
        ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7"),  # JPEG-LS SOF55
    ],
)
def test_a_jpeg_sof_that_disagrees_with_the_dataset_is_refused(name: str, marker: bytes) -> None:
    ds = read(name)
    start = sof_offset(frame_bytes(ds), marker)
    # precision (1 byte), then height and width (2 bytes each, big endian)
    message = refusal(patched(ds, (start + 1, ">H", 65535), (start + 3, ">H", 65535)))
    assert "the JPEG SOF header says 65535 x 65535" in message


def test_a_jpeg_sof_with_other_components_or_precision_is_refused() -> None:
    ds = read("SC_rgb_jpeg_dcmtk.dcm")  # 8-bit RGB
    start = sof_offset(frame_bytes(ds), b"\xff\xc0")
    assert "x 1 component(s) at 8 bits" in refusal(patched(ds, (start + 5, ">B", 1)))
    assert "at 16 bits, the dataset" in refusal(
        patched(read("SC_rgb_jpeg_dcmtk.dcm"), (start, ">B", 16))
    )


def test_a_jpeg_frame_without_a_sof_is_refused() -> None:
    ds = with_frame(read("SC_rgb_jpeg_dcmtk.dcm"), b"\xff\xd8\xff\xd9")
    assert "no JPEG SOF segment" in refusal(ds)


RLE_LIES: dict[str, Callable[[bytearray], None]] = {
    # MR_small_RLE: 16 bits, one sample: two segments, the first at 64.
    "count": lambda rle: struct.pack_into("<L", rle, 0, 3),
    "too many": lambda rle: struct.pack_into("<L", rle, 0, 16),
    "first offset": lambda rle: struct.pack_into("<L", rle, 4, 60),
    "descending": lambda rle: struct.pack_into("<L", rle, 8, 64),
    "past the end": lambda rle: struct.pack_into("<L", rle, 8, len(rle) + 10),
}


@pytest.mark.parametrize("lie", sorted(RLE_LIES))
def test_an_rle_header_that_disagrees_with_the_dataset_is_refused(lie: str) -> None:
    ds = read("MR_small_RLE.dcm")
    codestream = frame_bytes(ds)
    RLE_LIES[lie](codestream)
    message = refusal(with_frame(ds, codestream))
    assert "frame 1: the RLE" in message


def test_every_frame_is_checked() -> None:
    ds = read("SC_rgb_rle_2frame.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=2))
    second = bytearray(frames[1])
    struct.pack_into("<L", second, 0, 1)  # one segment where RGB needs three
    ds.PixelData = encapsulate([frames[0], bytes(second)])
    assert "frame 2: the RLE header has 1 segment(s), the dataset needs 3" in refusal(ds)


def test_malformed_encapsulation_is_refused() -> None:
    ds = read("MR_small_RLE.dcm")
    ds.PixelData = b"\x00" * 64  # no item tags
    assert "encapsulated pixel data is malformed" in refusal(ds)


def test_a_compressed_syntax_without_a_header_check_is_refused() -> None:
    ds = read("MR_small_RLE.dcm")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    assert "no codestream check for transfer syntax MPEG2" in refusal(ds)


def test_decompress_refuses_a_bomb_and_leaves_the_dataset_as_it_was() -> None:
    ds = patched(read("JPEG2000.dcm"), *J2K_LIES["size"])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    before = ds.PixelData
    with pytest.raises(ImageRefused):
        decompress(ds, DEFAULT_LIMIT)
    assert ds.PixelData == before and ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
