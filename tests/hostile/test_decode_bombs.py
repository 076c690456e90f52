"""Decompression bombs: chest films whose few bytes of RLE, or ~150-byte JPEG 2000
codestream, claim 65535 x 65535 x 16 bits (8 GiB once decoded). The node does not decode
them (cadnode.dicom.pixels): each job fails once with a reason naming the limit, the node's memory
stays flat and it serves on, a restart does not try them again, and a C-GET or C-MOVE that
would need them decompressed fails that sub-operation while the association goes on."""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from openjpeg.utils import encode_array
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from cadnode.dicom.pixels import LIMIT_KEY
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom, write_chest_radiograph
from tests.dicom_validation import require_tool
from tests.hostile.memory import peak_mb, reset_peak, resident_mb
from tests.hostile.node import attacked_node
from tests.ingest import echo, json_events, named, sending_as_is
from tests.peers import Cadnode, free_port, port_open, storescu, wait_for

Result = TypeVar("Result")
SIDE = 65535
MAX_GROWTH_MB = 300
ALL_FAILED = "Refused: OutOfResourcesSubOperations"  # DCMTK's name for 0xA702
INFERRED = ("inferred", "encoded", "delivered", "prioritized")


def rle_bomb() -> bytes:
    """Two segments (16 bits, one sample), each one run: 'the next byte, 128 times'."""
    return struct.pack("<3L52x", 2, 64, 66) + b"\x81\x00" * 2


def j2k_bomb() -> bytes:
    """A real lossless codestream of a 32-pixel square, its SIZ made to say one 65535-square
    image in one 65535-square tile: openjpeg sizes its buffers from SIZ."""
    small = np.zeros((32, 32), np.uint16)
    codestream = bytearray(encode_array(small, bits_stored=16, photometric_interpretation=2))
    struct.pack_into(">II", codestream, 8, SIDE, SIDE)  # Xsiz, Ysiz
    struct.pack_into(">II", codestream, 24, SIDE, SIDE)  # XTsiz, YTsiz
    return bytes(codestream)


def chest_bomb(path: Path, syntax: UID, codestream: bytes, seed: int) -> Dataset:
    """A CR chest PA film (what the shipped rules send to the engines) holding `codestream`
    as its one frame, its header claiming SIDE x SIDE x 16 bits."""
    phantom = make_chest_phantom(seed, size=64)
    ds = chest_dataset(phantom, patient_id=f"BOMB-{seed}", patient_name="Bomb^Chest", seed=seed)
    ds.Modality = "CR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.Rows = ds.Columns = SIDE
    ds.BitsStored, ds.HighBit = 16, 15
    del ds.PixelData
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return ds


def jobs_of(node: Cadnode, study_uids: set[str]) -> dict[str, dict[str, Any]]:
    """The latest job row of each study, by Study Instance UID (`cadnode studies --json`)."""
    return {row["study_uid"]: row for row in node.studies() if row["study_uid"] in study_uids}


def dcmtk_retrieve(node: Cadnode, tool: str, study_uid: str, *options: str) -> str:
    """DCMTK's getscu or movescu for one study; each proposes uncompressed syntaxes only."""
    done = subprocess.run(
        [
            require_tool(tool),
            "-v",
            "-aec",
            "CADNODE",
            "-S",
            *options,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(node.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


@contextmanager
def uncompressed_viewer(folder: Path) -> Iterator[int]:
    """DCMTK's storescp as VIEWER, taking the uncompressed transfer syntaxes only (its
    default): a C-MOVE destination for which a compressed object would need decompressing."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [require_tool("storescp"), "-aet", "VIEWER", "-od", str(folder), str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 20, "storescp to listen")
        yield port
    finally:
        process.terminate()
        process.wait(10)


def gets_then_echo(node: Cadnode, study_uids: list[str]) -> list[tuple[int, int]]:
    """C-GETs of `study_uids` on one association taking uncompressed CR images only, then a
    C-ECHO on it: each final (status, failed sub-operations), once the echo succeeded."""
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(
        ComputedRadiographyImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    association = ae.associate(
        "127.0.0.1",
        node.dicom_port,
        ae_title="CADNODE",
        ext_neg=[build_role(ComputedRadiographyImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    assert association.is_established
    finals = []
    try:
        for study_uid in study_uids:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = study_uid
            responses = association.send_c_get(
                identifier, StudyRootQueryRetrieveInformationModelGet
            )
            final = [status for status, _ in responses][-1]
            finals.append((int(final.Status), int(final.NumberOfFailedSuboperations)))
        assert association.send_c_echo().Status == 0x0000  # the association goes on
    finally:
        association.release()
    return finals


def viewer_at(port: int) -> dict[str, Any]:
    return {"viewer": {"ae_title": "VIEWER", "host": "127.0.0.1", "port": port}}


def grown_mb(node: Cadnode, attack: Callable[[], Result]) -> tuple[Result, float]:
    """What `attack` returns, and how far the node's peak resident memory rose during it."""
    pid = node.process.pid
    before = resident_mb(pid)
    reset_peak(pid)
    result = attack()
    return result, peak_mb(pid) - before


def push_until_failed(node: Cadnode, bombs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Send each bomb as it is (its own transfer syntax); their jobs' rows once all failed."""
    for path in bombs.values():
        sent = storescu(node.dicom_port, path, options=sending_as_is(path))
        assert sent.returncode == 0, sent.stderr

    def all_failed() -> dict[str, dict[str, Any]] | None:
        rows = jobs_of(node, set(bombs))
        done = len(rows) == len(bombs) and all(r["state"] == "failed" for r in rows.values())
        return rows if done else None

    failed: dict[str, dict[str, Any]] = wait_for(all_failed, 60, "the bombs' jobs to fail", 0.5)
    return failed


def retrieve_uncompressed(node: Cadnode, study_uids: list[str], folder: Path) -> None:
    """getscu, movescu to VIEWER, then one pynetdicom association, for each study: one
    failed sub-operation, nothing received, and the association still answers."""
    failed_one = re.compile(r"Completed Suboperations\s*: 0\n.*Failed Suboperations\s*: 1")
    for study_uid in study_uids:
        got = folder / "got" / study_uid
        got.mkdir(parents=True)
        output = dcmtk_retrieve(node, "getscu", study_uid, "-od", str(got))
        assert output.startswith("rc=0") and failed_one.search(output), output
        output = dcmtk_retrieve(node, "movescu", study_uid, "-aem", "VIEWER")
        assert f"Final Move Response ({ALL_FAILED})" in output, output
        assert not list(got.iterdir())
    assert gets_then_echo(node, study_uids) == [(0xA702, 1)] * len(study_uids)
    assert not list((folder / "viewer").iterdir())


def test_decode_bombs_fail_once_within_memory_and_are_not_replayed(tmp_path: Path) -> None:
    bombs = {
        chest_bomb(tmp_path / f"{name}.dcm", syntax, codestream, seed).StudyInstanceUID: (
            tmp_path / f"{name}.dcm"
        )
        for name, syntax, codestream, seed in (
            ("rle", RLELossless, rle_bomb(), 1),
            ("j2k", JPEG2000Lossless, j2k_bomb(), 2),
        )
    }
    assert all(path.stat().st_size < 4096 for path in bombs.values())
    with (
        uncompressed_viewer(tmp_path / "viewer") as viewer,
        attacked_node(tmp_path / "node", destinations=viewer_at(viewer)) as node,
    ):
        failed, growth = grown_mb(node, lambda: push_until_failed(node, bombs))
        assert growth < MAX_GROWTH_MB, f"inference grew the node by {growth:.0f} MB"
        assert echo(node.dicom_port).startswith("rc=0")  # still serving
        retrieve = partial(retrieve_uncompressed, node, sorted(bombs), tmp_path)
        _, growth = grown_mb(node, retrieve)
        assert growth < MAX_GROWTH_MB, f"C-GET and C-MOVE grew the node by {growth:.0f} MB"
        first_run = node.log_text()
    for row in failed.values():
        assert LIMIT_KEY in row["reason"] and "(attempt 1 of 3, not retried)" in row["reason"]
        assert "65535 x 65535 x 1 sample(s) x 1 frame(s) x 16 bits" in row["reason"]
    events = json_events(first_run)
    refused = named(events, "retrieve.refused")
    assert len(refused) == 6 and all(LIMIT_KEY in e["reason"] for e in refused)
    for name, count in (("retrieve.get", 4), ("retrieve.move", 2)):
        retrievals = [e for e in named(events, name) if e.get("matches") == 1]
        assert [(e["completed"], e["failed"]) for e in retrievals] == [(0, 1)] * count
    bomb_jobs = {row["job"] for row in failed.values()}
    assert len([e for e in named(events, "inference.started") if e["job"] in bomb_jobs]) == 2

    # Restart on the same data: an honest film goes through, the bombs are not tried again.
    with attacked_node(tmp_path / "node") as node:
        film = write_chest_radiograph(tmp_path / "film.dcm", seed=3, size=128)
        assert storescu(node.dicom_port, tmp_path / "film.dcm").returncode == 0
        study = film.StudyInstanceUID
        wait_for(
            lambda: jobs_of(node, {study}).get(study, {}).get("state") in INFERRED,
            60,
            "the honest film inferred after the restart",
            0.5,
        )
        assert jobs_of(node, set(bombs)) == failed  # same state, reason, time: untouched
        later = json_events(node.log_text()[len(first_run) :])
    assert not [e for e in named(later, "inference.started") if e["job"] in bomb_jobs]
