"""The C-STORE SCP against DCMTK's storescu and echoscu, in process with a real database."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000, UID, CTImageStorage
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlmodel import select

from cadnode.core.config import DicomSettings, Settings, StorageSettings
from cadnode.core.db import Database, Instance, Job, JobState
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.ingest.receive import Receiver, file_meta
from tests.peers import echoscu, storescu


@pytest.fixture
def receiving(tmp_path: Path, database: Database) -> Iterator[tuple[Receiver, int, list[int]]]:
    settings = Settings(
        storage=StorageSettings(data_dir=tmp_path / "var"), dicom=DicomSettings(port=0)
    )
    nudges: list[int] = []
    receiver = Receiver(settings, database, on_indexed=lambda: nudges.append(1))
    port = receiver.start()
    yield receiver, port, nudges
    receiver.stop()


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information: what the sender's dataset was."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    (meta_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL value
    return data[144 + meta_length :]


def instances(database: Database) -> list[Instance]:
    with database.session() as session:
        return list(session.exec(select(Instance)).all())


def test_echo(receiving: tuple[Receiver, int, list[int]]) -> None:
    _, port, _ = receiving
    assert echoscu(port).returncode == 0


def test_a_stored_instance_is_byte_exact_indexed_and_announced(
    receiving: tuple[Receiver, int, list[int]], database: Database, tmp_path: Path
) -> None:
    receiver, port, nudges = receiving
    sent = tmp_path / "chest.dcm"
    ds = write_chest_radiograph(sent, seed=7)
    done = storescu(port, sent)
    assert done.returncode == 0, done.stderr
    [instance] = instances(database)
    stored = receiver.spool.folder / instance.path
    assert dataset_bytes(stored) == dataset_bytes(sent)
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.calling_ae == "MODALITY"
    assert dcmread(stored).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert nudges, "a new job must wake the stages"
    with database.session() as session:
        job = session.get(Job, instance.job_id)
        assert job is not None and job.state is JobState.received and job.instance_count == 1


def test_the_same_instance_twice_is_stored_once(
    receiving: tuple[Receiver, int, list[int]], database: Database, tmp_path: Path
) -> None:
    receiver, port, _ = receiving
    sent = tmp_path / "chest.dcm"
    write_chest_radiograph(sent, seed=8)
    assert storescu(port, sent).returncode == 0
    assert storescu(port, sent).returncode == 0
    assert len(instances(database)) == 1
    assert len(list(receiver.spool.folder.rglob("*.dcm"))) == 1


def test_missing_uids_are_refused_with_a_status_and_the_node_goes_on(
    receiving: tuple[Receiver, int, list[int]], database: Database, tmp_path: Path
) -> None:
    _, port, _ = receiving
    bad = tmp_path / "bad.dcm"
    ds = write_chest_radiograph(bad, seed=9)
    del ds.StudyInstanceUID
    ds.save_as(bad, enforce_file_format=True)
    good = tmp_path / "good.dcm"
    write_chest_radiograph(good, seed=10)

    done = storescu(port, bad, good, options=("--no-halt", "-v"))
    assert "Received Store Response (Error: CannotUnderstand)" in done.stderr, done.stderr
    assert [i.sop_instance_uid for i in instances(database)] == [dcmread(good).SOPInstanceUID]


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498." + "1" * 37])
def test_file_meta_from_the_cached_encoding_is_pydicoms_own(uid: str) -> None:
    """receive encodes File Meta Information once per SOP class, syntax, sender and UID
    length, and splices each instance's UID in: the bytes must be what pydicom writes."""
    meta = create_file_meta(
        sop_class_uid=CTImageStorage, sop_instance_uid=UID(uid), transfer_syntax=JPEG2000
    )
    meta.SourceApplicationEntityTitle = "CT_ROOM_1"
    written = file_meta(CTImageStorage, uid, JPEG2000, "CT_ROOM_1")
    assert written == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    read = dcmread(io.BytesIO(written + b"\x08\x00\x18\x00UI\x00\x00"), force=True).file_meta
    assert read.MediaStorageSOPInstanceUID == uid
    assert read.SourceApplicationEntityTitle == "CT_ROOM_1"
