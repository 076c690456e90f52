"""What modalities really send: pydicom's own oddly-encoded test files, pushed with DCMTK.

Each file goes through DCMTK's storescu in its own transfer syntax, both to cadnode and to
DCMTK's storescp in bit-preserving mode (the reference: it writes the dataset exactly as it
came off the wire). cadnode's stored dataset must be those same bytes, and its pixels must
decode from the spool (pydicom's plugins) to what the original file decodes to.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from pydicom import dcmread
from pydicom import uid as uids
from pydicom.uid import generate_uid
from sqlmodel import select

from cadnode.core.db import Database, Instance
from tests.dicom_validation import require_tool
from tests.ingest import dataset_bytes, receiving, sending_as_is, storescp
from tests.peers import storescu
from tests.synthetic import write_image

PYDICOM_FILES = Path(pydicom.data.get_testdata_file("JPEG2000.dcm")).parent  # type: ignore[arg-type]

FILES = [
    "JPEG2000.dcm",  # JPEG 2000 (lossy)
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless (study/series UIDs added below)
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPGExtended.dcm",  # JPEG extended, 12 bit
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, colour
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, first-order prediction
    "MR_small_RLE.dcm",  # RLE lossless
    "SC_rgb_rle_2frame.dcm",  # RLE, multi-frame colour
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "image_dfl.dcm",  # deflated explicit VR little endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "CT_small.dcm",  # explicit VR little endian
]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    folder = tmp_path_factory.mktemp("storescp")
    with storescp(folder) as port:
        yield port, folder


def as_sent(name: str, folder: Path) -> Path:
    """The test file; JPEGLSNearLossless_16 lacks the study and series UIDs every instance
    needs (cadnode refuses it as is: see the test below), so a copy gets them, pixels untouched."""
    original = PYDICOM_FILES / name
    if name != "JPEGLSNearLossless_16.dcm":
        return original
    dataset = dcmread(original)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    copy = folder / name
    dataset.save_as(copy, enforce_file_format=True)
    return copy


@pytest.mark.parametrize("name", FILES)
def test_stored_byte_exact_and_decodable(
    name: str, oracle: tuple[int, Path], tmp_path: Path, database: Database
) -> None:
    sent = as_sent(name, tmp_path)
    original = dcmread(sent)
    oracle_port, oracle_folder = oracle
    reference = storescu(oracle_port, sent, called_ae="STORESCP", options=sending_as_is(sent))
    assert reference.returncode == 0, reference.stderr
    [wire] = oracle_folder.glob(f"*{original.SOPInstanceUID}")

    with receiving(tmp_path, database) as node:
        done = storescu(node.port, sent, options=sending_as_is(sent))
        assert done.returncode == 0, done.stderr
        with database.session() as session:
            instance = session.get(Instance, original.SOPInstanceUID)
        assert instance is not None, "not indexed"
        stored = node.spool / instance.path

    assert instance.transfer_syntax == original.file_meta.TransferSyntaxUID
    assert dcmread(stored).file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert dataset_bytes(stored) == dataset_bytes(wire), "not the bytes the sender sent"
    assert np.array_equal(dcmread(stored).pixel_array, original.pixel_array)


def test_deflated_file_is_valid_for_dcmtk(tmp_path: Path, database: Database) -> None:
    sent = PYDICOM_FILES / "image_dfl.dcm"
    with receiving(tmp_path, database) as node:
        assert storescu(node.port, sent, options=sending_as_is(sent)).returncode == 0
        [stored] = node.spool.rglob("*.dcm")
    dump = subprocess.run(
        [require_tool("dcmdump"), "-q", str(stored)], capture_output=True, text=True, check=False
    )
    assert dump.returncode == 0 and "PixelData" in dump.stdout, dump.stderr
    assert "Deflated" in dump.stdout  # (0002,0010) says so, and DCMTK inflated it to read it


def test_an_instance_without_study_and_series_uids_is_refused(
    tmp_path: Path, database: Database
) -> None:
    sent = PYDICOM_FILES / "JPEGLSNearLossless_16.dcm"
    with receiving(tmp_path, database) as node:
        done = storescu(node.port, sent, options=(*sending_as_is(sent), "-v"))
        with database.session() as session:
            assert session.exec(select(Instance)).all() == []
    assert "Received Store Response (Error: CannotUnderstand)" in done.stderr, done.stderr


SOP_CLASSES = [  # (SOP class, modality, frames): what CR/DX, mammography, DBT, CT, MR send
    (uids.ComputedRadiographyImageStorage, "CR", 1),
    (uids.DigitalXRayImageStorageForPresentation, "DX", 1),
    (uids.DigitalXRayImageStorageForProcessing, "DX", 1),
    (uids.DigitalMammographyXRayImageStorageForPresentation, "MG", 1),
    (uids.DigitalMammographyXRayImageStorageForProcessing, "MG", 1),
    (uids.BreastTomosynthesisImageStorage, "MG", 12),
    (uids.EnhancedCTImageStorage, "CT", 8),
    (uids.EnhancedMRImageStorage, "MR", 8),
    (uids.CTImageStorage, "CT", 1),
    (uids.MRImageStorage, "MR", 1),
]


def test_every_kind_of_image_is_accepted_in_one_association(
    tmp_path: Path, database: Database
) -> None:
    files = []
    for i, (sop_class, modality, frames) in enumerate(SOP_CLASSES):
        files.append(tmp_path / f"{i}.dcm")
        write_image(files[-1], sop_class, modality, frames=frames)
    with receiving(tmp_path, database) as node:
        done = storescu(node.port, *files, options=("-R",))
        assert done.returncode == 0, done.stderr
        with database.session() as session:
            stored = {i.sop_class_uid: node.spool / i.path for i in session.exec(select(Instance))}
    assert set(stored) == {sop_class for sop_class, _, _ in SOP_CLASSES}
    for sop_class, _, frames in SOP_CLASSES:
        pixels = dcmread(stored[sop_class]).pixel_array
        assert pixels.shape == ((frames, 64, 64) if frames > 1 else (64, 64))
