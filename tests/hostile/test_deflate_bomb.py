"""A deflate bomb: a Deflated Explicit VR Little Endian dataset of about 1 MB on the wire
that inflates to 1 GiB (a private OB element of zeros). The node inflates it as a stream,
refuses it past `limits.max_inflated_mb`, and serves the same association on."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.hostile.memory import peak_mb, reset_peak, resident_mb
from tests.hostile.node import attacked_node
from tests.ingest import json_events, named
from tests.synthetic import write_image

ONE_GIB = 2**30


def deflate_bomb(image: Path, target: Path) -> Path:
    """`image`'s elements, then (7FE1,1010) OB of 1 GiB of zeros, deflated as a stream."""
    source = dcmread(image)
    body = source.copy()
    del body.PixelData  # the bomb's zeros follow the header; order needs (7FE1,xxxx) last
    header = _explicit_little(body)
    element = struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, ONE_GIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [compressor.compress(header + element)]
    zeros = bytes(16 * 2**20)
    chunks += [compressor.compress(zeros) for _ in range(ONE_GIB // len(zeros))]
    chunks.append(compressor.flush())
    meta = source.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with target.open("wb") as out:
        out.write(b"\x00" * 128 + b"DICM" + _meta_bytes(meta))
        for chunk in chunks:
            out.write(chunk)
    return target


def _explicit_little(dataset: object) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    write_dataset(buffer, dataset, ExplicitVRLittleEndian)  # type: ignore[arg-type]
    return buffer.getvalue()


def _meta_bytes(meta: object) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_a_deflate_bomb_is_refused_without_being_inflated_in_memory(tmp_path: Path) -> None:
    good = tmp_path / "ct.dcm"
    write_image(good, CTImageStorage, "CT")
    bomb = deflate_bomb(good, tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 2 * 2**20
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        with attacked_node(tmp_path / "node") as node:
            before = resident_mb(node.process.pid)
            reset_peak(node.process.pid)
            association = ae.associate("127.0.0.1", node.dicom_port, ae_title="CADNODE")
            assert association.is_established
            statuses = [association.send_c_store(path).Status for path in (bomb, good)]
            association.release()
            growth = peak_mb(node.process.pid) - before
            events = json_events(node.log_text())
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0xA700, 0x0000]
    assert growth < 100, f"the node grew by {growth:.0f} MB"
    [refused] = named(events, "instance.rejected")
    assert "limits.max_inflated_mb" in refused["reason"]
