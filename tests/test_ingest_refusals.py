"""Refusing clearly: unknown peers, a full disk, bad datasets, stalling and garbage-sending peers.

Every refusal is a standard answer the sender can act on (an A-ASSOCIATE-RJ reason, a DIMSE
failure status, an abort) plus an event naming the peer and the reason; the node goes on.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlmodel import select

from cadnode.core import audit
from cadnode.core.config import load_settings
from cadnode.core.db import Database, Instance
from cadnode.core.yamlfile import ConfigError
from tests.ingest import captured_events, echo, named, receiving
from tests.peers import storescu
from tests.synthetic import write_image


def test_an_unknown_calling_ae_is_rejected_with_the_standard_reason(
    tmp_path: Path, database: Database
) -> None:
    peers = [{"ae_title": "CT_ROOM_1"}]
    with (
        captured_events() as events,
        receiving(tmp_path, database, dicom={"peers": peers, "accept_any_peer": False}) as node,
    ):
        assert "rc=0" in echo(node.port, calling_ae="CT_ROOM_1")
        refused = echo(node.port, calling_ae="INTRUDER")
    assert "Calling AE Title Not Recognized" in refused, refused
    [event] = named(events, "association.refused")
    assert event["calling_ae"] == "INTRUDER" and event["peer"].startswith("127.0.0.1:")
    assert "not a configured peer" in event["reason"]


def test_a_peer_is_accepted_only_from_its_configured_host(
    tmp_path: Path, database: Database
) -> None:
    peers = [
        {"ae_title": "LOCAL_CT", "host": "127.0.0.1"},
        {"ae_title": "NAMED_CT", "host": "localhost"},  # a host name, resolved when it calls
        {"ae_title": "REMOTE_CT", "host": "10.20.0.0/16"},
    ]
    with receiving(tmp_path, database, dicom={"peers": peers, "accept_any_peer": False}) as node:
        assert "rc=0" in echo(node.port, calling_ae="LOCAL_CT")
        assert "rc=0" in echo(node.port, calling_ae="NAMED_CT")
        refused = echo(node.port, calling_ae="REMOTE_CT")
    assert "Calling AE Title Not Recognized" in refused, refused


def test_a_wrong_called_ae_is_rejected(tmp_path: Path, database: Database) -> None:
    with receiving(tmp_path, database) as node:
        refused = echo(node.port, called_ae="SOMEONE_ELSE")
    assert "Called AE Title Not Recognized" in refused, refused


def test_any_peer_is_accepted_only_from_the_configured_networks(
    tmp_path: Path, database: Database
) -> None:
    with receiving(tmp_path / "a", database) as node:  # the default: any AE, loopback only
        assert "rc=0" in echo(node.port, calling_ae="WHOEVER")
    elsewhere = {"accept_any_peer": True, "any_peer_networks": ["10.0.0.0/8"]}
    with receiving(tmp_path / "b", database, dicom=elsewhere) as node:
        assert "Calling AE Title Not Recognized" in echo(node.port, calling_ae="WHOEVER")


def test_a_disk_below_the_watermark_refuses_with_out_of_resources_then_recovers(
    tmp_path: Path, database: Database
) -> None:
    image = tmp_path / "ct.dcm"
    write_image(image, CTImageStorage, "CT")
    beyond_any_disk = {"min_free_mb": 2**40}  # a watermark above the real free space
    with (
        captured_events() as events,
        receiving(tmp_path, database, storage=beyond_any_disk) as node,
    ):
        refused = storescu(node.port, image, options=("-v",))
        assert "Received Store Response (Refused: OutOfResources)" in refused.stderr
        node.receiver.spool.disk.min_free_bytes = 0  # space came back
        assert storescu(node.port, image).returncode == 0
    assert len(named(events, "disk.low")) == 1 and len(named(events, "disk.recovered")) == 1
    [rejected] = named(events, "instance.rejected")
    assert rejected["status"] == "0xa700" and "watermark" in rejected["reason"]
    with database.session() as session:
        assert len(session.exec(select(Instance)).all()) == 1


@contextmanager
def raw_store_sending() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes as they are, even ones it could not encode."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def with_dataset(source: Path, target: Path, dataset: bytes) -> Path:
    """`source`'s File Meta Information followed by `dataset`."""
    data = source.read_bytes()
    (meta_length,) = struct.unpack("<I", data[140:144])
    target.write_bytes(data[: 144 + meta_length] + dataset)
    return target


def test_bad_datasets_get_failure_statuses_and_the_association_goes_on(
    tmp_path: Path, database: Database
) -> None:
    good = tmp_path / "good.dcm"
    write_image(good, CTImageStorage, "CT")
    garbage = with_dataset(good, tmp_path / "garbage.dcm", b"GARBAGE, NOT A DATASET" * 9)
    as_mr = dcmread(good)
    as_mr.SOPClassUID = MRImageStorage  # the dataset says MR, the request (its meta) says CT
    mismatch = tmp_path / "mismatch.dcm"
    as_mr.save_as(mismatch)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # the files' own
    with (
        captured_events() as events,
        receiving(tmp_path, database) as node,
        raw_store_sending(),
    ):
        association = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
        assert association.is_established
        statuses = [association.send_c_store(path).Status for path in (garbage, mismatch, good)]
        association.release()
    assert statuses == [0xC000, 0xA900, 0x0000]
    reasons = [event["reason"] for event in named(events, "instance.rejected")]
    assert "cannot be decoded" in reasons[0] and "SOP Class UID" in reasons[1]
    assert all(event["calling_ae"] == "MODALITY" for event in named(events, "instance.rejected"))


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer (the node) closed `sock` within `seconds`."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sock.recv(4096) == b"":
                return True
    except (TimeoutError, ConnectionResetError):
        return False
    return False


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(struct.pack(">BBL", 0x01, 0, 1000) + b"\x00\x01" + b"\x00" * 8, id="stall"),
        pytest.param(b"\x77GARBAGE, NOT A PDU" * 8, id="garbage"),
    ],
)
def test_a_stalling_or_garbage_peer_is_cut_off_and_nobody_else_waits(
    sent: bytes, tmp_path: Path, database: Database
) -> None:
    timeouts = {"network_timeout_s": 1, "acse_timeout_s": 1}
    with receiving(tmp_path, database, dicom=timeouts) as node:
        bad = socket.create_connection(("127.0.0.1", node.port))
        bad.sendall(sent)  # an association request cut short mid-PDU, or noise
        start = time.monotonic()
        assert "rc=0" in echo(node.port), "another peer must be served meanwhile"
        served_in = time.monotonic() - start
        assert closed_within(bad, 5), "the node must close the bad connection"
    assert served_in < 1.0, "the good peer waited on the bad one"


def test_a_peer_stalling_mid_pdu_in_an_association_is_aborted(
    tmp_path: Path, database: Database
) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    with receiving(tmp_path, database, dicom={"network_timeout_s": 1}) as node:
        association = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
        assert association.is_established
        # A P-DATA-TF header announcing 1000 bytes, 10 of them, then silence.
        association.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
        assert "rc=0" in echo(node.port)
        deadline = time.monotonic() + 5
        while association.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not association.is_established, "the node must drop the stalled association"


def test_peer_and_tls_settings_are_checked_at_load_with_their_position(tmp_path: Path) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text(
        "dicom:\n"
        "  peers:\n"
        "    - ae_title: CT_ROOM_1\n"
        "      host: not a host!\n"
        "  tls:\n"
        "    certificate: tls/node.crt\n"
        "    private_key: tls/node.key\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings({"CADNODE_CONFIG": str(config)})
    [problem] = caught.value.problems
    assert problem.startswith(f"{config}:4:") and "dicom.peers.0.host" in problem

    config.write_text("dicom:\n  tls:\n    certificate: tls/node.crt\n    private_key: k.pem\n")
    tls = load_settings({"CADNODE_CONFIG": str(config)}).dicom.tls
    assert tls is not None and tls.certificate == tmp_path / "tls" / "node.crt"  # file-relative


def _with_bytes_replaced(source: Path, target: Path, old: bytes, new: bytes) -> Path:
    data = source.read_bytes()
    assert data.count(old) == 1, old
    target.write_bytes(data.replace(old, new))
    return target


def test_what_does_not_decode_or_fit_its_image_is_refused_at_the_door(
    tmp_path: Path, database: Database
) -> None:
    """Answered with a failure status, an event and an audit entry, never 0x0000 and then a
    failure inside a stage; the association goes on."""
    good = tmp_path / "good.dcm"
    write_image(good, CTImageStorage, "CT")
    labelled = dcmread(good)
    labelled.add_new(0x00091010, "LO", "abcd")
    labelled.save_as(tmp_path / "labelled.dcm")
    unknown_vr = _with_bytes_replaced(
        tmp_path / "labelled.dcm", tmp_path / "zz.dcm", b"\x09\x00\x10\x10LO", b"\x09\x00\x10\x10ZZ"
    )
    rows = dcmread(good).Rows.to_bytes(2, "little")
    odd_us = _with_bytes_replaced(
        good, tmp_path / "us3.dcm", b"\x28\x00\x10\x00US\x02\x00" + rows,
        b"\x28\x00\x10\x00US\x03\x00" + rows + b"\x00",
    )  # fmt: skip
    no_pixels = dcmread(good)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no-pixels.dcm")
    short = dcmread(good)
    short.PixelData = short.PixelData[:-64]
    short.save_as(tmp_path / "short.dcm")
    sent = [unknown_vr, odd_us, tmp_path / "no-pixels.dcm", tmp_path / "short.dcm", good]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    with (
        captured_events() as events,
        receiving(tmp_path, database) as node,
        raw_store_sending(),
    ):
        association = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
        assert association.is_established
        statuses = [association.send_c_store(path).Status for path in sent]
        association.release()
    assert statuses == [0xC000, 0xC000, 0xC000, 0xC000, 0x0000]
    reasons = [event["reason"] for event in named(events, "instance.rejected")]
    assert "unknown VR 'ZZ'" in reasons[0]
    assert "(0028,0010): a US value of 3 bytes" in reasons[1]
    assert "without Pixel Data" in reasons[2]
    assert "Pixel Data of" in reasons[3] and "image attributes give" in reasons[3]
    refusals = [e for e in audit.events(database) if e.kind == audit.INSTANCE_REFUSED]
    assert [e.details["status"] for e in refusals] == ["0xc000"] * 4
    with database.session() as session:
        assert len(session.exec(select(Instance)).all()) == 1


def test_a_deflated_dataset_inflating_past_the_limit_is_refused_and_the_association_goes_on(
    tmp_path: Path, database: Database
) -> None:
    deflated, good = tmp_path / "deflated.dcm", tmp_path / "ct.dcm"
    write_image(good, CTImageStorage, "CT")
    image = dcmread(good)
    image.PixelData = b"\x00" * (3 * 2**20)  # inflates to 3 MiB; compresses to a few KB
    image.Rows, image.Columns = 1024, 1536
    image.save_as(deflated, implicit_vr=False, little_endian=True)
    as_deflated = dcmread(deflated)
    as_deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    as_deflated.save_as(deflated, enforce_file_format=True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    limits = {"max_inflated_mb": 2}
    with (
        captured_events() as events,
        receiving(tmp_path, database, limits=limits) as node,
    ):
        association = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
        statuses = [association.send_c_store(path).Status for path in (deflated, good)]
        association.release()
    assert statuses == [0xA700, 0x0000]
    [rejected] = named(events, "instance.rejected")
    assert "limits.max_inflated_mb" in rejected["reason"]
