"""The event-driven reactor (cadnode/ingest/reactor.py) under the receiver, and per-association
storage negotiation (cadnode/ingest/negotiation.py), against pynetdicom as the peer.

pynetdicom's own loops poll: an idle association's two threads wake every millisecond. Here
they block until a PDU, a queued primitive or a timer is due, and one C-ECHO costs a handful
of wake-ups: counted, not timed.
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler
from sqlmodel import select

from cadnode.core.db import Database, Instance
from cadnode.ingest.reactor import (
    EventDrivenAssociation,
    EventDrivenRequestHandler,
    QuickStoreRequest,
    QuickStores,
    pdv_items,
    request_handler,
    store_request_values,
    store_success_command,
)
from tests.ingest import captured_events, named, node_settings
from tests.peers import echoscu, wait_for

PRIVATE_CLASS = "1.2.826.0.1.3680043.9.7433.1.1"  # a private storage SOP class


class Accepted:
    """The receiver's associations, as they are accepted."""

    def __init__(self) -> None:
        self.associations: list[Any] = []

    def observer(self) -> tuple[Any, Any]:
        return (evt.EVT_ACCEPTED, lambda event: self.associations.append(event.assoc))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Accepted, Any]]:
    from cadnode.ingest.receive import Receiver

    accepted = Accepted()
    settings = node_settings(tmp_path, dicom={"network_timeout_s": 30})
    receiver = Receiver(settings, Database(tmp_path / "cadnode.db"), lambda: None)
    port = receiver.start(observers=[accepted.observer()])
    yield port, accepted, receiver
    receiver.stop(drain_timeout_s=0)


def associate(port: int, *contexts: str) -> Any:
    ae = AE(ae_title="PEER")
    for context in contexts or (Verification,):
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="CADNODE")
    assert association.is_established
    return association


def idle(association: Any) -> bool:
    return bool(association.waiting and association.dul.waiting)


def test_an_idle_association_blocks_with_no_timeout_but_the_network_one(
    served: tuple[int, Accepted, Any],
) -> None:
    port, accepted, _ = served
    peer = associate(port)
    wait_for(lambda: accepted.associations, 10, "the association to be accepted")
    [ours] = accepted.associations
    assert isinstance(ours, EventDrivenAssociation)
    wait_for(lambda: idle(ours), 10, "both reactor threads to wait")
    assert ours.dul.waiting_with is None  # the DUL waits on its socket and queues only
    assert ours.waiting_with is not None and ours.waiting_with > 1  # the network timeout
    before = (ours.wakeups, ours.dul.wakeups)

    other = associate(port)  # time passes, another association works: this one sleeps on
    assert other.send_c_echo().Status == 0
    other.release()

    assert idle(ours) and (ours.wakeups, ours.dul.wakeups) == before
    peer.release()


def test_each_c_echo_wakes_each_reactor_thread_a_handful_of_times(
    served: tuple[int, Accepted, Any],
) -> None:
    # DCMTK's echoscu is the peer: pynetdicom's requestor, sending C-ECHOs in a loop, can take
    # a response off its own queue in its reactor thread on a loaded host, log "Received
    # unexpected C-ECHO service message" and time out (pynetdicom issue 875). With 50 echoes
    # over one association taking milliseconds, the bound below is not what catches a poller:
    # the idle test above is.
    port, accepted, _ = served
    echoes = 50
    done = echoscu(port, calling_ae="PEER", repeat=echoes)
    assert done.returncode == 0, done.stderr
    [ours] = accepted.associations
    wait_for(lambda: not ours.is_alive() and not ours.dul.is_alive(), 10, "its threads to end")

    # A poll loop wakes once a millisecond; the reactor only for a PDU in (the request), a
    # message decoded, the response queued and sent: a few per echo, however slow the host,
    # and a few more for the association's request and release.
    association_and_release = 10
    assert ours.wakeups <= 3 * echoes + association_and_release
    assert ours.dul.wakeups <= 4 * echoes + association_and_release


def test_a_silent_peer_is_aborted_when_the_network_timeout_runs_out(tmp_path: Path) -> None:
    from cadnode.ingest.receive import Receiver

    accepted = Accepted()
    settings = node_settings(tmp_path, dicom={"network_timeout_s": 0.3})
    receiver = Receiver(settings, Database(tmp_path / "cadnode.db"), lambda: None)
    port = receiver.start(observers=[accepted.observer()])
    try:
        peer = associate(port)
        wait_for(lambda: accepted.associations, 10, "the association to be accepted")
        [ours] = accepted.associations
        wait_for(lambda: not ours.is_alive(), 10, "the reactor to end the association")
        assert ours.is_aborted
        wait_for(lambda: peer.is_aborted, 10, "the peer to see the abort")
    finally:
        receiver.stop(drain_timeout_s=0)


def test_a_private_storage_class_is_taken_without_a_process_wide_switch(
    served: tuple[int, Accepted, Any],
) -> None:
    port, _, receiver = served
    peer = associate(port, PRIVATE_CLASS)
    status = peer.send_c_store(private_instance())
    peer.release()

    assert status.Status == 0
    assert not _config.UNRESTRICTED_STORAGE_SERVICE
    assert len(list(receiver.spool.folder.rglob("*.dcm"))) == 1


def private_instance() -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = PRIVATE_CLASS
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "OT"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


def test_another_pynetdicom_version_gets_the_stock_reactor_and_says_so() -> None:
    with captured_events() as events:
        assert request_handler(version="3.0.4") is EventDrivenRequestHandler
        assert request_handler(version="3.1.0") is RequestHandler
        assert request_handler(event_driven=False) is RequestHandler
    [fallback] = named(events, "receive.reactor_stock")
    assert fallback["pynetdicom"] == "3.1.0"


@pytest.mark.parametrize(
    ("sop_class", "instance", "message_id"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 1),  # an even and an odd length
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.826.0.1.3680043.9.7433.12345", 65535),
    ],
)
def test_a_quick_store_success_response_is_byte_for_byte_pynetdicoms(
    sop_class: str, instance: str, message_id: int
) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.AffectedSOPInstanceUID = instance
    response.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    [data] = list(message.encode_msg(1, 16384))
    assert data.presentation_data_value_list == [
        (1, b"\x03" + store_success_command(sop_class, instance, message_id))
    ]


def test_a_store_is_answered_quickly_only_with_plain_success(
    served: tuple[int, Accepted, Any],
) -> None:
    """pynetdicom's logging handlers are gone from the node's associations (its own stay),
    a Success goes out through the quick path, a failure status pynetdicom's way, and the
    peer reads both."""
    port, accepted, receiver = served
    responses: list[int] = []  # the statuses pynetdicom's own send_msg encoded
    original = DIMSEServiceProvider.send_msg

    def counted(self: Any, primitive: Any, context_id: int) -> None:
        if primitive.MessageIDBeingRespondedTo is not None:
            responses.append(primitive.Status)
        original(self, primitive, context_id)

    no_study = private_instance()
    del no_study.StudyInstanceUID
    DIMSEServiceProvider.send_msg = counted  # type: ignore[method-assign]
    try:
        peer = associate(port, PRIVATE_CLASS)
        wait_for(lambda: accepted.associations, 10, "the association to be accepted")
        [node_side] = accepted.associations
        statuses = [
            peer.send_c_store(private_instance()).Status,
            peer.send_c_store(no_study).Status,
        ]
        peer.release()
    finally:
        DIMSEServiceProvider.send_msg = original  # type: ignore[method-assign]
    assert statuses == [0x0000, 0xC000]
    assert responses == [0xC000]  # the Success went the quick way, past pynetdicom's
    assert isinstance(node_side.dimse, QuickStores)
    for event in (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT):
        modules = {handler.__module__ for handler, _ in node_side.get_handlers(event)}
        assert "pynetdicom._handlers" not in modules
    handler, _ = node_side.get_handlers(evt.EVT_C_STORE)
    assert handler.__self__ is receiver  # the node's own handlers stay


def indexed_instances(database: Database) -> list[str]:
    with database.session() as session:
        return list(session.exec(select(Instance.sop_instance_uid)).all())


def test_a_store_is_answered_once_durable_and_settled_before_the_release_is_answered(
    served: tuple[int, Accepted, Any],
) -> None:
    """On SQLite the Success leaves once the bytes are durable; the spool file and the
    index row are made after it (here: once the peer has been quiet for SETTLE_AFTER_S),
    and in any case before the association's release is answered."""
    port, _, receiver = served
    settle, entered, go = receiver.spool.settle, threading.Event(), threading.Event()

    def held_back(secured: Any) -> Any:
        entered.set()
        assert go.wait(30), "the test never let the settle go on"
        return settle(secured)

    receiver.spool.settle = held_back
    instance = private_instance()
    peer = associate(port, PRIVATE_CLASS)
    try:
        assert peer.send_c_store(instance).Status == 0x0000
        wait_for(entered.is_set, 30, "the settle to begin with no next request")
        assert indexed_instances(receiver.database) == []
        assert not list(receiver.spool.folder.rglob("*.dcm"))
    finally:
        go.set()
        peer.release()
    assert indexed_instances(receiver.database) == [instance.SOPInstanceUID]
    assert len(list(receiver.spool.folder.rglob("*.dcm"))) == 1


def test_a_file_that_cannot_be_made_after_the_answer_is_made_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender had Success, so its instance is not lost when its spool file cannot be
    written afterwards: the failure is logged, the journal segment holding its record is
    kept, and the next start makes the file from it and indexes it."""
    from cadnode.ingest import journal
    from cadnode.ingest.receive import Receiver

    settings = node_settings(tmp_path)
    database = Database(tmp_path / "cadnode.db")
    receiver = Receiver(settings, database, lambda: None)
    port = receiver.start()
    write_aside = journal.write_aside

    def disk_full(*_: Any) -> Any:
        raise OSError(28, "No space left on device")

    instances = [private_instance(), private_instance()]
    with captured_events() as events:
        peer = associate(port, PRIVATE_CLASS)
        assert peer.send_c_store(instances[0]).Status == 0x0000
        first = [instances[0].SOPInstanceUID]
        wait_for(lambda: indexed_instances(database) == first, 30, "the first to be settled")
        monkeypatch.setattr(journal, "write_aside", disk_full)
        assert peer.send_c_store(instances[1]).Status == 0x0000
        peer.release()
        monkeypatch.setattr(journal, "write_aside", write_aside)
        receiver.stop(drain_timeout_s=0)
    [failed] = named(events, "instance.not_settled")
    assert failed["calling_ae"] == "PEER"
    assert named(events, "journal.segment_kept")
    [closed] = named(events, "association.released")
    assert (closed["stored"], closed["failed"]) == (1, 1)
    assert indexed_instances(database) == [instances[0].SOPInstanceUID]

    restarted = Receiver(settings, database, lambda: None)
    restarted.reconcile()
    restarted.spool.close()
    assert sorted(indexed_instances(database)) == sorted(i.SOPInstanceUID for i in instances)
    assert len(list(restarted.spool.folder.rglob("*.dcm"))) == 2


def test_an_instance_is_settled_on_the_dul_thread_while_the_next_one_is_flushed(
    served: tuple[int, Accepted, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-STORE is served on the DUL thread that decoded it (no hand-off to the
    association's thread), and its file and row are made while the next instance's journal
    record is flushed; the last one's before the release is answered."""
    from cadnode.ingest import reactor

    monkeypatch.setattr(reactor, "SETTLE_AFTER_S", 120)  # never for want of a next request
    port, accepted, receiver = served
    journal, spool = receiver.spool.journal, receiver.spool
    assert journal is not None
    steps: list[tuple[str, str, int]] = []
    record, settle = journal.record, spool.settle

    def recorded(relative: Path, *args: Any) -> Any:
        steps.append(("flush begins", relative.stem, threading.get_ident()))
        try:
            return record(relative, *args)
        finally:
            steps.append(("flush ends", relative.stem, threading.get_ident()))

    def settled(secured: Any) -> Any:
        steps.append(("settle", secured.arrival.sop_instance_uid, threading.get_ident()))
        return settle(secured)

    monkeypatch.setattr(journal, "record", recorded)
    monkeypatch.setattr(spool, "settle", settled)
    first, second = private_instance(), private_instance()
    peer = associate(port, PRIVATE_CLASS)
    assert [peer.send_c_store(i).Status for i in (first, second)] == [0x0000, 0x0000]
    wait_for(lambda: accepted.associations, 10, "the association to be accepted")
    [node_side] = accepted.associations
    peer.release()
    one, two = first.SOPInstanceUID, second.SOPInstanceUID
    assert [(step, uid) for step, uid, _ in steps] == [
        ("flush begins", one),
        ("flush ends", one),
        ("flush begins", two),
        ("settle", one),
        ("flush ends", two),
        ("settle", two),
    ]
    dul_thread = node_side.dul.ident
    assert [thread for _, _, thread in steps[:5]] == [dul_thread] * 5
    assert node_side.dul.served_here == 2
    assert sorted(indexed_instances(receiver.database)) == sorted([one, two])


def test_a_request_that_arrives_before_the_association_is_established_waits_for_it(
    tmp_path: Path,
) -> None:
    """The peer has the A-ASSOCIATE-AC, and sends its first C-STORE, while the node's
    association thread still runs the EVT_ACCEPTED handlers: the DUL thread decodes the
    request then, and leaves it to that thread, which serves it once the association is
    established. (Served on the DUL thread at once, the instance was stored but pynetdicom,
    finding the association not established, never answered it.)"""
    from cadnode.ingest.receive import Receiver

    decoded, served = threading.Event(), threading.Event()
    established_when_served: list[bool] = []

    def accepted_slowly(_: Any) -> None:
        assert decoded.wait(30), "the peer's first request never came"
        served.wait(1)  # a second for the request to be served too soon, as it was

    observers = [(evt.EVT_DIMSE_RECV, lambda _: decoded.set()), (evt.EVT_ACCEPTED, accepted_slowly)]
    settings = node_settings(tmp_path, dicom={"network_timeout_s": 30})
    receiver = Receiver(settings, Database(tmp_path / "cadnode.db"), lambda: None)
    on_store = receiver._on_store

    def watched(event: Any) -> int:
        established_when_served.append(bool(event.assoc.is_established))
        served.set()
        return on_store(event)

    receiver._on_store = watched  # type: ignore[method-assign]
    port = receiver.start(observers=observers)
    try:
        peer = associate(port, PRIVATE_CLASS)
        peer.dimse_timeout = 30
        instance = private_instance()
        answer = peer.send_c_store(instance)
        peer.release()
        assert established_when_served == [True]
        assert answer.get("Status") == 0x0000
        assert indexed_instances(receiver.database) == [instance.SOPInstanceUID]
    finally:
        receiver.stop(drain_timeout_s=0)


def test_two_associations_sending_each_others_instances_never_wait_on_each_other(
    served: tuple[int, Accepted, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each association holds its last instance's lock until that instance is settled
    (during its next request). A sends X then Y while B sends Y then X: each next request
    waits for the other's last instance, so each lets its own go first (`hold`'s
    `before_waiting`): both answered, each instance indexed once."""
    from cadnode.ingest import reactor

    monkeypatch.setattr(reactor, "SETTLE_AFTER_S", 120)  # settled only by a next request
    port, _, receiver = served
    x, y = private_instance(), private_instance()
    firsts_answered = threading.Barrier(2, timeout=30)
    answers: dict[str, list[int]] = {}

    def send(name: str, first: Dataset, second: Dataset) -> None:
        peer = associate(port, PRIVATE_CLASS)
        peer.dimse_timeout = 30
        statuses = [peer.send_c_store(first).get("Status")]
        firsts_answered.wait()
        statuses.append(peer.send_c_store(second).get("Status"))
        peer.release()
        answers[name] = statuses

    senders = [
        threading.Thread(target=send, args=("A", x, y)),
        threading.Thread(target=send, args=("B", y, x)),
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(90)
    assert answers == {"A": [0x0000, 0x0000], "B": [0x0000, 0x0000]}
    assert sorted(indexed_instances(receiver.database)) == sorted(
        [x.SOPInstanceUID, y.SOPInstanceUID]
    )


STORE_PARAMETERS = (
    "MessageID",
    "Priority",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
    "DataSet",
    "_context_id",
)


def store_request_command(**parameters: Any) -> bytes:
    """A C-STORE request's command set, as pynetdicom encodes it."""
    request = C_STORE()
    for name, value in parameters.items():
        setattr(request, name, value)
    request.DataSet = io.BytesIO(b"\x08\x00\x18\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    sent = [
        value
        for data in message.encode_msg(1, 2**20)
        for _, value in data.presentation_data_value_list
    ]
    [command] = [value[1:] for value in sent if value[0] & 1]  # the command, in one fragment
    return bytes(command)


def received(command: bytes, as_class: type[Any]) -> Any:
    """A whole C-STORE request received with `command`, converted as `as_class` does."""
    data = P_DATA_TF()
    data.presentation_data_value_items = pdv_items(
        memoryview(struct.pack(">IB", len(command) + 2, 3) + b"\x03" + command)
    )
    message = DIMSEMessage()
    message.decode_msg(data.to_primitive())
    message.__class__ = as_class
    message.data_set = io.BytesIO(b"the dataset")
    return message.message_to_primitive()


@pytest.mark.parametrize(
    "parameters",
    [
        {"MessageID": 1, "AffectedSOPInstanceUID": "1.2.3.4", "Priority": 2},  # even length
        {"MessageID": 65535, "AffectedSOPInstanceUID": "1.2.3", "Priority": 0},  # NUL-padded
        {"MessageID": 7, "AffectedSOPInstanceUID": "1.2.3", "MoveOriginatorMessageID": 9},
        # A Move Originator's AE title: pynetdicom's own conversion.
        {"MessageID": 8, "AffectedSOPInstanceUID": "1.2.3", "MoveOriginatorMessageID": 9,
         "MoveOriginatorApplicationEntityTitle": "MOVER"},
    ],
)  # fmt: skip
def test_a_store_request_becomes_the_primitive_pynetdicom_would_make(
    parameters: dict[str, Any],
) -> None:
    command = store_request_command(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", **parameters)
    ours, pynetdicoms = received(command, QuickStoreRequest), received(command, C_STORE_RQ)
    for name in STORE_PARAMETERS:
        if name != "DataSet":
            assert getattr(ours, name) == getattr(pynetdicoms, name), name
    assert ours.DataSet.getvalue() == pynetdicoms.DataSet.getvalue() == b"the dataset"
    left_to_pynetdicom = "MoveOriginatorApplicationEntityTitle" in parameters
    assert (store_request_values(command) is None) == left_to_pynetdicom


def element(number: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, number, len(value)) + value


@pytest.mark.parametrize(
    ("command", "why"),
    [
        (element(0x0002, b"1.2.3\\1.2.4\0"), "two UIDs in one value"),
        (element(0x0002, b"1.2.\xe9\0"), "a UID of other characters"),
        (element(0x0002, b""), "an empty UID"),
        (element(0x0110, b"\x01\x00\x02\x00"), "two message IDs"),
        (element(0x0900, b"\x00\x00"), "a Status in a request"),
        (struct.pack("<HHI", 0x0008, 0x0002, 2) + b"\x01\x00", "another group"),
        (element(0x0110, b"\x01\x00")[:9], "an element cut short"),
        (element(0x0110, b"\x01\x00")[:6], "a header cut short"),
    ],
)
def test_a_store_request_in_any_other_form_is_left_to_pynetdicom(command: bytes, why: str) -> None:
    assert store_request_values(command) is None, why


def test_pdv_items_are_views_of_the_pdu_and_one_that_does_not_fit_is_refused() -> None:
    first, second = b"\x03" + b"command", b"\x02" + b"last fragment"
    items = struct.pack(">IB", len(first) + 1, 1) + first
    items += struct.pack(">IB", len(second) + 1, 3) + second
    buffer = bytearray(items)
    found = pdv_items(memoryview(buffer))
    assert [(i.presentation_context_id, bytes(i.presentation_data_value)) for i in found] == [
        (1, first),
        (3, second),
    ]
    buffer[5] = 0x01  # the first item's control header, changed in the PDU's bytes
    assert found[0].presentation_data_value[0] == 0x01  # seen through the view: no copy
    for bad in (
        items[:3],  # an item's header cut short
        items[:-1],  # the last item runs past the PDU
        struct.pack(">IB", 1, 1),  # no room for the message control header
    ):
        with pytest.raises(ValueError):
            pdv_items(memoryview(bad))


def test_the_store_requests_of_a_real_association_take_the_quick_conversion(
    served: tuple[int, Accepted, Any],
) -> None:
    """The node's side of an association: each C-STORE request, its command set in a PDU of
    its own (as pynetdicom and DCMTK send it), is converted by QuickStoreRequest."""
    port, accepted, receiver = served
    kinds: list[type[Any]] = []
    peer = associate(port, PRIVATE_CLASS)
    wait_for(lambda: accepted.associations, 10, "the association to be accepted")
    [node_side] = accepted.associations
    node_side.bind(evt.EVT_DIMSE_RECV, lambda event: kinds.append(type(event.message)))
    statuses = [peer.send_c_store(private_instance()).Status for _ in range(3)]
    peer.release()
    assert statuses == [0x0000] * 3
    assert kinds == [QuickStoreRequest] * 3
    wait_for(lambda: len(indexed_instances(receiver.database)) == 3, 10, "three instances")
