"""An outbox nothing stalls: each delivery's failure stays on that delivery.

A result file gone from the data dir, a destination removed from the configuration, a host
that does not resolve, an unreadable file: each is recorded on its own row (a dead letter at
once where no retry can help) and every other delivery goes on, its job settled and its
Storage Commitment asked. Destinations are kept by name and may be IPv6 addresses; objects go
from their files without being decoded whole (the dispatcher's peak memory is measured while
it sends a 200 MiB object).
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlmodel import select

from cadnode.core.backoff import Backoff
from cadnode.core.config import (
    Destination,
    DispatchSettings,
    Environment,
    PrioritySettings,
    UpsSettings,
)
from cadnode.core.db import (
    Database,
    Delivery,
    DeliveryState,
    FailureKind,
    JobState,
    Publication,
    PublicationChannel,
    PublicationState,
    ResultObject,
)
from cadnode.deliver.dispatch import Dispatcher
from cadnode.deliver.outbox import legacy_destination_names, rename_legacy_destinations
from cadnode.deliver.outbox_admin import delivery_rows, table
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.prioritize.policy import load_policy
from cadnode.prioritize.publish import Publisher
from cadnode.prioritize.stage import Prioritizer
from cadnode.prioritize.ups_notify import UpsPushChannel
from tests.ingest import storescp
from tests.peers import REPO, free_port, run_cadnode, run_orthanc, wait_for
from tests.rows import job_of, new_job
from tests.test_delivery_outage import outbox, outbox_config, push_films, studies
from tests.test_prioritize_stage import arrive
from tests.worklist_peers import UpsPushScp

FAST = DispatchSettings(max_attempts=5, backoff_initial_s=30, backoff_max_s=30, timeout_s=5)
UNRESOLVABLE = "no-such-host.invalid"  # RFC 2606: never resolves


def queue(
    database: Database, results: Path, destination: str, file: str, seed: int, uid: str = ""
) -> int:
    """A result of its own encoded job, kept as `file` under `results` (a chest film written
    there unless `seed` is 0), queued for the destination named `destination`; the job's id."""
    uid = uid or str(generate_uid())
    if seed:
        film = write_chest_radiograph(results / file, seed=seed)
        uid = str(film.SOPInstanceUID)
    with database.session() as session:
        job = new_job(session, uid, state=JobState.encoded)
        assert job.id is not None
        session.add(
            ResultObject(sop_instance_uid=uid, job_id=job.id, engine="e", modality="DX", path=file)
        )
        session.flush()
        session.add(Delivery(object_uid=uid, job_id=job.id, destination=destination))
        session.commit()
        return job.id


def delivery_of(database: Database, job_id: int) -> Delivery:
    with database.session() as session:
        return session.exec(select(Delivery).where(Delivery.job_id == job_id)).one()


def test_each_failure_stays_on_its_own_delivery(database: Database, tmp_path: Path) -> None:
    """One pass: none of these raises out of it, each is recorded with its reason."""
    closed = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    nowhere = Destination(ae_title="PACS", host=UNRESOLVABLE, port=104)
    (tmp_path / "garbage.dcm").write_bytes(b"not DICOM at all" * 16)
    jobs = {
        "gone": queue(database, tmp_path, "removed", "a.dcm", seed=1),
        "missing": queue(database, tmp_path, "closed", "missing.dcm", seed=0),
        "unreadable": queue(database, tmp_path, "closed", "garbage.dcm", seed=0),
        "unresolvable": queue(database, tmp_path, "nowhere", "b.dcm", seed=2),
        "refused": queue(database, tmp_path, "closed", "c.dcm", seed=3),
    }
    destinations = {"closed": closed, "nowhere": nowhere}
    Dispatcher(database, tmp_path, FAST, "CADNODE", destinations=destinations).advance()

    rows = {name: delivery_of(database, job) for name, job in jobs.items()}
    assert {name: (r.state.value, r.attempts) for name, r in rows.items()} == {
        "gone": ("failed", 1),  # dead at once: no retry brings a destination back
        "missing": ("failed", 1),  # dead at once: no retry brings a file back
        "unreadable": ("pending", 1),
        "unresolvable": ("pending", 1),
        "refused": ("pending", 1),
    }
    assert rows["gone"].last_error == "destination 'removed' is no longer configured"
    assert rows["missing"].last_error == "result file missing: missing.dcm"
    assert (rows["unreadable"].last_error or "").startswith("result file unreadable: garbage.dcm")
    assert "gaierror" in (rows["unresolvable"].last_error or "")
    assert "association not established" in (rows["refused"].last_error or "")
    # Settled in the same pass: a dead letter fails its job, the others wait.
    states = {name: job_of(database, job).state.value for name, job in jobs.items()}
    assert states == {
        "gone": "failed",
        "missing": "failed",
        "unreadable": "encoded",
        "unresolvable": "encoded",
        "refused": "encoded",
    }
    assert job_of(database, jobs["missing"]).failure is FailureKind.dead_letter


def test_a_missing_result_file_does_not_hold_back_the_other_studies(tmp_path: Path) -> None:
    """The finding as it was tried: with the PACS down, one study's result files removed; when
    the PACS comes back, that study's deliveries are dead letters at once, with the reason, and
    every other study's results arrive, are committed, and their jobs delivered."""
    pacs_port, node_port = free_port(), free_port()
    config = outbox_config(tmp_path, pacs_port, max_attempts=1000)
    settings = json.loads(config.read_text())
    settings["destinations"]["pacs"]["storage_commitment"] = True
    config.write_text(json.dumps(settings))
    env = {"CADNODE_CONFIG": str(config), "CADNODE_DICOM_PORT": str(node_port)}
    with run_cadnode(tmp_path / "node", None, **env) as node:
        films = push_films(node, tmp_path, range(901, 904))
        wait_for(
            lambda: (
                {row["state"] for row in studies(node)} == {"encoded"}
                and len(studies(node)) == len(films)
                and all(r["attempts"] >= 1 for r in outbox(node))
            ),
            90,
            "every result queued and tried while the PACS is down",
            interval_s=0.3,
        )
        broken = films[0]
        shutil.rmtree(node.data_dir / "results" / str(broken.StudyInstanceUID))
        known = {"DicomModalities": {"cadnode": ["CADNODE", "127.0.0.1", node_port]}}
        with run_orthanc(tmp_path / "orthanc", dicom_port=pacs_port, extra=known) as pacs:
            jobs = {row["study_uid"]: row for row in studies(node)}
            broken_job = jobs[broken.StudyInstanceUID]["job"]
            wait_for(
                lambda: all(
                    r["state"] == "failed"
                    if r["job"] == broken_job
                    else r["commitment"] == "committed"
                    for r in outbox(node)
                ),
                60,
                "the others sent and committed, the broken study's dead-lettered",
                interval_s=0.2,
            )
            wait_for(
                lambda: (
                    {row["job"]: row["state"] for row in studies(node)}
                    == {
                        row["job"]: "failed" if row["job"] == broken_job else "delivered"
                        for row in jobs.values()
                    }
                ),
                30,
                "every job settled",
            )
            held = {
                film.StudyInstanceUID: pacs.instances_of_study(film.StudyInstanceUID)
                for film in films
            }
        log = node.log_text()
    rows = outbox(node)
    dead = [r for r in rows if r["job"] == broken_job]
    assert dead and all(r["last_error"].startswith("result file missing: ") for r in dead)
    assert all(r["attempts"] < 1000 for r in dead)  # not retried to the limit
    assert held[broken.StudyInstanceUID] == []
    assert all(held[film.StudyInstanceUID] for film in films[1:])
    assert sum(len(ids) for ids in held.values()) == len(rows) - len(dead)
    assert '"event": "stage.crashed"' not in log
    # The log says why, without the path (it holds the study's UIDs).
    assert '"reason": "result file missing"' in log
    assert str(broken.StudyInstanceUID) not in log


@contextlib.contextmanager
def ipv6_relay(target_port: int) -> Iterator[tuple[int, list[str]]]:
    """A TCP relay listening on [::1] that pipes each connection to 127.0.0.1:`target_port`:
    neither DCMTK 3.6.7's storescp nor Orthanc 1.10 listens on IPv6. Yields its port and the
    addresses of the clients it accepted."""
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.bind(("::1", 0))
    server.listen()
    clients: list[str] = []
    opened: list[socket.socket] = []

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while True:
            try:
                client, address = server.accept()
            except OSError:
                return  # closed
            clients.append(address[0])
            upstream = socket.create_connection(("127.0.0.1", target_port))
            opened.extend([client, upstream])
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1], clients
    finally:
        server.close()
        for connection in opened:
            connection.close()


def test_an_ipv6_destination_receives_its_objects(database: Database, tmp_path: Path) -> None:
    received = tmp_path / "received"
    job_id = queue(database, tmp_path, "pacs", "sr.dcm", seed=7)
    with storescp(received) as port, ipv6_relay(port) as (relay_port, clients):
        configured = {"ae_title": "STORESCP", "host": "::1", "port": relay_port}
        destinations = {"pacs": Destination.model_validate(configured)}
        Dispatcher(database, tmp_path, FAST, "CADNODE", destinations=destinations).advance()
        delivery = delivery_of(database, job_id)
        assert delivery.state is DeliveryState.sent, delivery.last_error
        [stored] = list(received.iterdir())
        assert clients == ["::1"]
    assert dcmread(stored).SOPInstanceUID == delivery.object_uid
    assert job_of(database, job_id).state.value == "delivered"
    listing = table(delivery_rows(database, None, destinations))
    assert f"pacs (STORESCP@[::1]:{relay_port})" in listing
    assert "pacs (not configured)" in table(delivery_rows(database, None, {}))


def test_ipv6_addresses_in_the_configuration() -> None:
    bare = Destination(ae_title="PACS", host="::1", port=104)
    bracketed = Destination(ae_title="PACS", host="[0:0:0:0:0:0:0:1]", port=104)
    assert bare.host == bracketed.host == "::1"
    assert str(bare) == "PACS@[::1]:104"
    assert Destination.parse("PACS@[fd00::2]:4242").host == "fd00::2"
    environment = Environment.read({"CADNODE_DESTINATION": "PACS@[::1]:104"})
    assert environment.destination == bare
    for host in ("::1]", "[pacs]", "pacs:104", "PACS@pacs", "two words", ""):
        with pytest.raises(ValueError, match="host"):
            Destination(ae_title="PACS", host=host, port=104)
    with pytest.raises(ValueError, match=r"AE@\[IPv6\]:port"):
        Destination.parse("PACS@::1:104")  # ambiguous without brackets


def test_rows_of_before_take_the_name_configured_for_their_address(
    database: Database, tmp_path: Path
) -> None:
    """Rows queued before deliveries named their destination hold `AE@host:port`: at start
    each takes the name now configured for that address; one no destination has keeps it."""
    configured = {
        "pacs": Destination(ae_title="ORTHANC", host="127.0.0.1", port=4242),
        "CADNODE_DESTINATION": Destination(ae_title="PACS", host="pacs.example.org", port=104),
    }
    assert legacy_destination_names(configured) == {
        "ORTHANC@127.0.0.1:4242": "pacs",
        "PACS@pacs.example.org:104": "CADNODE_DESTINATION",
    }
    old = ["ORTHANC@127.0.0.1:4242", "PACS@pacs.example.org:104", "GONE@10.0.0.9:104"]
    jobs = [queue(database, tmp_path, text, f"{i}.dcm", seed=0) for i, text in enumerate(old)]
    assert rename_legacy_destinations(database, configured) == 2
    assert rename_legacy_destinations(database, configured) == 0  # once is enough
    names = [delivery_of(database, job).destination for job in jobs]
    assert names == ["pacs", "CADNODE_DESTINATION", "GONE@10.0.0.9:104"]


def test_a_worklist_recipient_that_does_not_resolve_holds_back_no_other(
    database: Database, tmp_path: Path
) -> None:
    """UPS push to a host that does not resolve (the association raises, not refuses): that
    publication is retried with its reason, and the other worklist still gets the workitem."""
    policy = load_policy(REPO / "config" / "priority.yaml")
    settings = PrioritySettings(ups=UpsSettings(push=["nowhere", "worklist"]))
    arrive(database, tmp_path, seed=11)
    Prioritizer(database, tmp_path, policy, settings, retrieve_ae="CADNODE").advance()
    with UpsPushScp() as worklist:
        recipients = {
            "nowhere": Destination(ae_title="WORKLIST", host=UNRESOLVABLE, port=104),
            "worklist": Destination(ae_title="WORKLIST", host="127.0.0.1", port=worklist.port),
        }
        channel = UpsPushChannel("CADNODE", recipients, timeout_s=5)
        backoff = Backoff(initial_s=30, max_attempts=5)
        Publisher(database, {PublicationChannel.ups_push: channel}, backoff).advance()
        assert [kind for kind, _, _ in worklist.requests] == ["N-CREATE"]
    with database.session() as session:
        pushed = {
            p.destination: p
            for p in session.exec(
                select(Publication).where(Publication.channel == PublicationChannel.ups_push)
            )
        }
    assert pushed["worklist"].state is PublicationState.sent
    assert pushed["nowhere"].state is PublicationState.pending
    assert pushed["nowhere"].attempts == 1 and "gaierror" in (pushed["nowhere"].last_error or "")


# -- a large object, sent without being read whole -------------------------------------------

LARGE_MIB = 200


def measure_dispatch(folder: str, uid: str, port: str) -> None:
    """In a fresh interpreter (the test's own memory would hide the dispatcher's): queue the
    object in `folder`/large.dcm for storescp on `port`, send it, and print the peak resident
    memory before and after, and how the delivery ended, as JSON."""
    database = Database(Path(folder) / "cadnode.db")
    job_id = queue(database, Path(folder), "pacs", "large.dcm", seed=0, uid=uid)
    pacs = {"pacs": Destination(ae_title="STORESCP", host="127.0.0.1", port=int(port))}
    settings = DispatchSettings(timeout_s=120)
    dispatcher = Dispatcher(database, Path(folder), settings, "CADNODE", destinations=pacs)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dispatcher.advance()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    delivery = delivery_of(database, job_id)
    state, error = delivery.state.value, delivery.last_error
    print(json.dumps({"before_kib": before, "peak_kib": peak, "state": state, "error": error}))


MEASURE = "import sys; from tests.test_outbox_stalls import measure_dispatch as m; m(*sys.argv[1:])"


def write_large_object(path: Path, mebibytes: int) -> str:
    """A multi-frame Secondary Capture of `mebibytes` 1024x1024 8-bit frames, all zero; the
    pixels are a sparse extension of the file, so writing it costs neither memory nor disk."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC Image
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "LARGE", "Large^Object", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = mebibytes
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.save_as(path, enforce_file_format=True)
    length = mebibytes * 1024 * 1024
    with path.open("r+b") as file:
        file.seek(0, 2)
        file.write(b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", length))  # (7FE0,0010)
        file.truncate(file.tell() + length)
    return str(ds.SOPInstanceUID)


def test_a_large_object_is_sent_without_being_read_whole(tmp_path: Path) -> None:
    uid = write_large_object(tmp_path / "large.dcm", LARGE_MIB)
    with storescp(tmp_path / "received", "--ignore", "-pdu", "131072") as port:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(tmp_path), uid, str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    grown_mib = (measured["peak_kib"] - measured["before_kib"]) / 1024
    print(
        f"sending a {LARGE_MIB} MiB object: the dispatcher's peak memory grew {grown_mib:.1f} MiB "
        f"(from {measured['before_kib'] / 1024:.0f} MiB)"
    )
    assert measured["state"] == "sent", measured["error"]
    assert grown_mib < LARGE_MIB / 10  # read whole, it would grow by the object's size at least
