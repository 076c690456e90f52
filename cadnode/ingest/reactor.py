"""An event-driven reactor for pynetdicom's associations: each PDU handled when it arrives.

pynetdicom 3.0 runs two polling loops per association. The DUL thread looks at its socket
(`select` with a zero timeout) and its queues, and sleeps `_run_loop_delay` (1 ms) after any
pass that found nothing; the association thread sleeps 1 ms before every look at its DIMSE
queue. On one association every request/response turn waits on those sleeps (half of
cadnode's time per instance against DCMTK's storescp), and an idle association still wakes
2000 times a second. Shortening the sleeps only spins the CPU.

Here both loops block until there is work, with the same state machine and the same order of
checks as pynetdicom's (the loop bodies below mirror `DULServiceProvider.run_reactor` and
`Association._run_reactor` of 3.0):

- the DUL thread polls its socket and a wake-up socketpair, with no timeout unless the ARTIM
  timer runs; a primitive put on its provider or event queue, and `kill_dul`/`stop_dul`,
  write to the socketpair;
- the association thread waits on a `threading.Event` that a message put on its DIMSE queue,
  a primitive put on the DUL's user queue, the DUL thread's end and `kill` set, with the
  network idle timer's remaining time as its timeout.

A C-STORE request is served on the DUL thread that decoded it (`EventDrivenDUL.divert`), when
the association is established and its own thread is serving nothing: no hand-off to that
thread and back for the response (measured: the receiving process's CPU per instance down by
a quarter). Any other request, and a C-STORE arriving while that thread serves one, goes to
the association's thread as in pynetdicom. The work a handler leaves for after its answer
(`after_answer`: the spool file and index row) is then done by the next request's handler
while its own bytes are flushed (`settle_pending`), or by the DUL thread once the peer has
been quiet for `SETTLE_AFTER_S`, and always before a release or abort is acted on.

The DUL thread also takes a P-DATA-TF PDU's items as views of the bytes it read
(`pdv_items`), where pynetdicom's own decoding copies the PDU, its body and each item's value
(0.28-0.34 ms of the DUL thread's CPU per 525 KB CT instance here, the views 0.16-0.20); a
handler bound to EVT_DATA_RECV (it is given the PDU's bytes) turns this off for its
association. And a C-STORE request's command set becomes its primitive here
(`QuickStoreRequest`, 0.13-0.15 ms where pynetdicom's conversion took 0.30-0.38).

`make_event_driven` converts an association before its thread starts; `request_handler`
gives an `AssociationServer` request handler that converts each one it accepts. Both apply
only to the pynetdicom versions whose loops they mirror (`SUPPORTED_VERSIONS`); with another
version `request_handler` returns pynetdicom's own handler and logs `receive.reactor_stock`.
Written to be offered upstream as a change to those two loops.
"""

from __future__ import annotations

import contextlib
import queue
import re
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
import structlog
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler

from cadnode.dicom.pdu import P_DATA_TF as P_DATA_TF_TYPE

log = structlog.get_logger("cadnode.ingest.reactor")

# The pynetdicom releases whose DUL and association loops the loops here mirror.
SUPPORTED_VERSIONS = ("3.0",)

# After-answer work of a C-STORE served on the DUL thread waits this long for the next
# request, to be done while that one is flushed; if none comes, it is done then.
SETTLE_AFTER_S = 0.02

READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL

PDU_HEADER_SIZE = 6  # type, reserved, length (PS3.8 9.3.1)
PDV_HEADER = struct.Struct(">IB")  # a PDV item's length, its presentation context ID


def supported(version: str = pynetdicom.__version__) -> bool:
    return ".".join(version.split(".")[:2]) in SUPPORTED_VERSIONS


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls `wake` after every put (put_nowait included)."""

    def __init__(self, wake: Callable[[], None], items: list[Any]) -> None:
        super().__init__()
        self._wake = wake
        self.queue.extend(items)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _RequestQueue(_WakingQueue):
    """The DIMSE provider's queue of decoded messages: a C-STORE request is served on the
    DUL thread that decoded it when the association's thread is idle (`EventDrivenDUL.divert`),
    anything else goes to the association's thread."""

    def __init__(self, association: EventDrivenAssociation, items: list[Any]) -> None:
        super().__init__(association.wake, items)
        self._dul = association.dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, message = item
        store = isinstance(message, C_STORE) and message.is_valid_request
        if not (store and self.empty() and self._dul.divert(context_id, message)):
            super().put(item, block, timeout)


def _waking(old: queue.Queue[Any], wake: Callable[[], None]) -> _WakingQueue:
    return _WakingQueue(wake, list(old.queue))


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL, blocking on its socket and its queues instead of polling them."""

    _waker: socket.socket
    _woken: socket.socket
    wakeups: int  # times the reactor came back from a wait (tests count them)
    waiting: bool  # in a wait now
    waiting_with: float | None  # that wait's timeout (None: none)

    def _become_event_driven(self, wake_association: Callable[[], None]) -> None:
        self._woken, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        self._woken.setblocking(False)
        self.wakeups = 0
        self.waiting, self.waiting_with = False, None
        self.served_here = 0
        self._wake_association = wake_association
        self._diverted: tuple[int, C_STORE] | None = None
        self.event_queue = _waking(self.event_queue, self.wake)
        self.to_provider_queue = _waking(self.to_provider_queue, self.wake)
        self.to_user_queue = _waking(self.to_user_queue, wake_association)

    def wake(self) -> None:
        if threading.get_ident() == self.ident:
            return  # its own put (an event for its state machine): it looks before it waits
        # Full: a wake-up is pending already; closed: the reactor has ended.
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")

    def divert(self, context_id: int, request: C_STORE) -> bool:
        """Take a C-STORE request decoded on this thread to serve it here (`_serve_diverted`),
        if the association's thread is serving nothing and has established the association
        (a peer may send its first request while that thread still runs the handlers of
        EVT_ACCEPTED); False: it goes to that thread."""
        assoc = cast(EventDrivenAssociation, self.assoc)
        on_this_thread = threading.get_ident() == self.ident
        busy = assoc.serving or self._diverted is not None
        if not on_this_thread or not assoc.is_established or busy:
            return False
        self._diverted = (context_id, request)
        return True

    def _serve_diverted(self) -> None:
        """Serve a diverted C-STORE request. Its `after_answer` work is left for later: to
        the next request's handler, done while that one's bytes are flushed
        (`settle_pending`), or done here once the peer has been quiet for `SETTLE_AFTER_S`."""
        diverted, self._diverted = self._diverted, None
        if diverted is None:
            return
        cast(EventDrivenAssociation, self.assoc)._serve_request(diverted[1], diverted[0])
        self.served_here += 1

    def run(self) -> None:  # Thread.run: the target bound at __init__ is the stock loop
        try:
            self.run_reactor()
        finally:
            cast(EventDrivenAssociation, self.assoc)._do_after_answer()
            self._waker.close()
            self._woken.close()
            self._wake_association()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's, joining the thread rather than polling it."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if threading.current_thread() is not self:
            self.join()
        return True

    def run_reactor(self) -> None:
        """pynetdicom's `run_reactor`, its sleep replaced by `_wait`."""
        self._idle_timer.start()
        poller = select.poll()
        poller.register(self._woken, select.POLLIN)
        watched = -1
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as error:
                self._abort_after(error)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                watched = self._wait(poller, watched)
                continue
            self.state_machine.do_action(event)
            try:
                self._serve_diverted()
            except Exception as error:
                self._abort_after(error)
                return

    def _wait(self, poller: Any, watched: int) -> int:
        """Block until the socket has data (or closes), a wake-up comes or the ARTIM timer
        expires; returns the descriptor now watched."""
        connection = self.socket.socket if self.socket is not None else None
        descriptor = connection.fileno() if connection is not None else -1
        if descriptor != watched:
            if watched >= 0:
                poller.unregister(watched)
            if descriptor >= 0:
                poller.register(descriptor, READABLE)
        assoc = cast(EventDrivenAssociation, self.assoc)
        if assoc._after_answer and not poller.poll(int(SETTLE_AFTER_S * 1000)):
            assoc._do_after_answer()  # the peer is quiet: no next request to do it during
        timeout = self._artim_remaining()
        self.waiting, self.waiting_with = True, timeout
        poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
        self.waiting = False
        self.wakeups += 1
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while self._woken.recv(4096):
                pass
        return descriptor

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom's `_decode_pdu`, a P-DATA-TF's items taken as views of `bytestream`
        (`pdv_items`) rather than copies; an item that does not fit raises, as pynetdicom's
        decoding does (its caller answers with Evt19: the association is aborted)."""
        plain = bytestream[:1] == bytes([P_DATA_TF_TYPE])
        if not plain or self.assoc.get_handlers(evt.EVT_DATA_RECV):
            return super()._decode_pdu(bytestream)
        pdu = P_DATA_TF()
        pdu.presentation_data_value_items = pdv_items(memoryview(bytestream)[PDU_HEADER_SIZE:])
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt10"

    def _artim_remaining(self) -> float | None:
        timer = self.artim_timer
        running = timer._start_time is not None and timer._end_time is None
        return timer.remaining if running and timer.timeout is not None else None

    def _abort_after(self, error: Exception) -> None:
        """pynetdicom's handling of an exception in the loop: A-ABORT, bypassing the state
        machine, and both reactors stopped."""
        log.error("association.reactor_failed", error=f"{type(error).__name__}: {error}")
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


def pdv_items(items: memoryview) -> list[PresentationDataValueItem]:
    """A P-DATA-TF PDU's Presentation Data Value items (PS3.8 9.3.5.1), each value (its
    message control header, then the fragment) a view of `items`, nothing copied.
    ValueError for an item cut short, running past the PDU, or too short to hold its
    presentation context ID and message control header (PS3.8 E.2)."""
    found = []
    offset, end = 0, len(items)
    while offset < end:
        if end - offset < PDV_HEADER.size:
            raise ValueError(f"a PDV item's header cut short at byte {offset}")
        length, context_id = PDV_HEADER.unpack_from(items, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError(f"a PDV item of {length} bytes at byte {offset} of {end}")
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        # A view, read as bytes are by pynetdicom's DIMSE decoding (indexed, sliced, written).
        value = items[offset + PDV_HEADER.size : offset + 4 + length]
        item.presentation_data_value = cast(bytes, value)
        found.append(item)
        offset += 4 + length
    return found


class EventDrivenAssociation(Association):
    """pynetdicom's association, waiting for work instead of sleeping 1 ms per look."""

    _work: threading.Event
    _after_answer: list[Callable[[], None]]
    _settling: threading.Lock  # held while after-answer work runs, on whichever thread
    serving: bool  # this thread is serving a request
    dul: EventDrivenDUL
    wakeups: int  # times the reactor came back from a wait (tests count them)
    waiting: bool  # in a wait now
    waiting_with: float | None  # that wait's timeout (None: none)

    def wake(self) -> None:
        self._work.set()

    def kill(self) -> None:
        self._kill = True
        self.wake()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's `_run_reactor`, its sleep replaced by `_wait_for_work`."""
        self._is_paused = False
        self._work.set()  # look once before waiting: a request may be queued already
        while not self._kill:
            self._wait_for_work()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if self._serve_next() or self._ended():
                return

    def _wait_for_work(self) -> None:
        # Paused while it waits: it touches no queue until past the checkpoint, so a
        # send_*() or release() from another thread need not wait for it to come round.
        self._is_paused = True
        timer = self.dul._idle_timer
        timeout = max(0.0, timer.remaining) if timer.timeout is not None else None
        self.waiting, self.waiting_with = True, timeout
        self._work.wait(timeout)
        self.waiting = False
        self.wakeups += 1
        self._work.clear()

    def _serve_next(self) -> bool:
        """Serve a request if one is decoded; True if the association has ended (as in
        pynetdicom: released or aborted by the peer)."""
        context_id, message = self.dimse.get_msg(block=False)
        if message:
            self._do_after_answer()  # an earlier request's, served on the DUL thread
            self.serving = True
            try:
                self._serve_request(message, int(context_id or 0))
            finally:
                self.serving = False
                self._do_after_answer()
        if self.is_established and self.acse.is_release_requested():
            self._do_after_answer()  # done before the peer hears the association is over
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self._do_after_answer()
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_ABORTED, {})
            self.kill()
            return True
        return False

    def _do_after_answer(self) -> None:
        """The work handlers left for after their responses (`after_answer`), in order; on
        either reactor thread or a handler's (`settle_pending`): one at a time, so that a
        caller finds it done, not just taken by another thread."""
        with self._settling:
            while self._after_answer:
                work = self._after_answer.pop(0)
                try:
                    work()
                except Exception:  # the handler's own failure: the association goes on
                    log.exception("association.after_answer_failed")

    def _ended(self) -> bool:
        """The DUL thread has gone, or the network timeout ran out (A-ABORT, or A-RELEASE
        where `network_timeout_response` asks for it)."""
        if not self.dul.is_alive():
            self.kill()
            return True
        if not self.dul.idle_timer_expired():
            return False
        log.warning("association.network_timeout")
        if self.network_timeout_response == "A-RELEASE":
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self.release()
            self._is_paused = False
        else:
            self.abort()
        self.kill()
        return True


class QuickStores(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with a plain C-STORE request and its Success response
    converted here rather than through pydicom.

    - A request's command set becomes its C_STORE primitive (`QuickStoreRequest`) from its
      bytes, where pynetdicom converts each element through pydicom (0.30-0.38 ms of CPU
      per request here, this 0.13-0.15); a command set in any but the plain form
      (`store_request_values`), or one that came in the same PDU as its whole dataset, goes
      pynetdicom's way.
    - A Success response is sent as bytes made here: pynetdicom builds a pydicom Dataset of
      its seven elements and encodes it twice (once for its group length), about a quarter
      of a millisecond per instance; a Success response with no optional element is a fixed
      layout (`store_success_command`). Anything else (a failure or warning status, a peer
      whose largest PDU cannot take the command, a handler bound to EVT_DIMSE_SENT that
      expects pynetdicom's message) goes pynetdicom's way.
    """

    def receive_primitive(self, primitive: P_DATA) -> None:
        super().receive_primitive(primitive)
        receiving = self.message
        # A C-STORE request whose command set is whole and whose dataset is still to come
        # (senders send them in separate PDUs; one that came whole went pynetdicom's way).
        if type(receiving) is C_STORE_RQ:
            receiving.__class__ = QuickStoreRequest

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = _success_command(primitive)
        limit = self.maximum_pdu_size
        fits = command is not None and (not limit or len(command) + 6 <= limit)
        if not fits or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        assert command is not None
        data = P_DATA()
        # One PDV: the whole command set, its last fragment (PS3.8 E.2 control header 0x03).
        data.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(data)


class QuickStoreRequest(C_STORE_RQ):
    """pynetdicom's C-STORE request message, made into its primitive from the command
    set's bytes where they are in the plain form, exactly as pynetdicom would make it."""

    def message_to_primitive(self) -> Any:
        command = self.encoded_command_set.getvalue()
        values = store_request_values(command)
        if values is None:
            return super().message_to_primitive()
        primitive = C_STORE()
        for name, value in values.items():  # through the primitive's own checks, as pynetdicom
            setattr(primitive, name, value)
        # What pynetdicom's message_to_primitive sets besides the command's values.
        primitive.DataSet = self.data_set
        primitive._context_id = self.context_id
        primitive._dataset_path = self._data_set_path
        primitive._dataset_file = self._data_set_file
        return primitive


# pynetdicom looks a message's parameters and primitive up by its class's name.
QuickStoreRequest.__name__ = C_STORE_RQ.__name__


# The elements of a C-STORE request's command set (PS3.7 9.3.1.1) taken here, by element
# number (group 0000): the C_STORE parameter each sets (None: not a parameter), its VR.
# Any other element (a Move Originator's AE title among them) leaves the conversion to
# pynetdicom.
STORE_REQUEST_ELEMENTS: dict[int, tuple[str | None, str]] = {
    0x0000: (None, "UL"),  # Command Group Length
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: (None, "US"),  # Command Field
    0x0110: ("MessageID", "US"),
    0x0700: ("Priority", "US"),
    0x0800: (None, "US"),  # Command Data Set Type
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
VALUE_LENGTHS = {"UL": 4, "US": 2}
COMMAND_ELEMENT = struct.Struct("<HHI")  # Implicit VR Little Endian: group, element, length
# A UID's bytes as pydicom reads them to one value: digits and dots, padded with NULs or
# spaces (which pydicom strips).
PLAIN_UID = re.compile(rb"[0-9.]+[\0 ]*")


def store_request_values(command: bytes) -> dict[str, int | str] | None:
    """The C_STORE parameters of a C-STORE request's command set, each as pydicom would
    read it; None for a command set in any other form (an element not in
    `STORE_REQUEST_ELEMENTS`, a length its VR does not allow, a UID of other characters,
    an element cut short), which pynetdicom converts itself."""
    values: dict[str, int | str] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < COMMAND_ELEMENT.size:
            return None
        group, element, length = COMMAND_ELEMENT.unpack_from(command, offset)
        value = command[offset + COMMAND_ELEMENT.size : offset + COMMAND_ELEMENT.size + length]
        offset += COMMAND_ELEMENT.size + length
        known = STORE_REQUEST_ELEMENTS.get(element) if group == 0 else None
        if known is None or len(value) != length:
            return None
        name, vr = known
        if vr == "UI":
            if not PLAIN_UID.fullmatch(value):
                return None
            converted: int | str = value.decode("ascii").rstrip("\0 ")
        elif length != VALUE_LENGTHS[vr]:
            return None
        else:
            converted = int.from_bytes(value, "little")
        if name is not None:
            values[name] = converted
    return values


def _success_command(primitive: Any) -> bytes | None:
    """The command set of a plain C-STORE Success response, or None for any other message."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    plain = primitive.Status == 0x0000 and primitive.ErrorComment is None
    sop_class, instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if not plain or primitive.OffendingElement is not None or not sop_class or not instance:
        return None
    return store_success_command(str(sop_class), str(instance), primitive.MessageIDBeingRespondedTo)


C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101


def store_success_command(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """A C-STORE-RSP command set with Status Success, Implicit VR Little Endian (PS3.7 9.3.1.2,
    PS3.7 6.3.1): the elements pynetdicom would encode, in tag order, group length first."""
    elements = (
        _element(0x0002, _uid(sop_class_uid)),  # Affected SOP Class UID
        _element(0x0100, struct.pack("<H", C_STORE_RSP)),  # Command Field
        _element(0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),  # Command Data Set Type
        _element(0x0900, struct.pack("<H", 0x0000)),  # Status
        _element(0x1000, _uid(sop_instance_uid)),  # Affected SOP Instance UID
    )
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body  # Command Group Length


def _element(number: int, value: bytes) -> bytes:
    """A group 0000 element, Implicit VR Little Endian: tag, 32-bit length, value."""
    return COMMAND_ELEMENT.pack(0x0000, number, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\0" * (len(encoded) % 2)  # UI: padded with NUL to an even length


# pynetdicom's own notification handlers, bound to every association ("standard" logging):
# they describe each PDU and DIMSE message to the "pynetdicom" logger at INFO and DEBUG,
# which the node never shows (libraries log at WARNING, cadnode/core/logs.py), and the one
# for a C-STORE request copies the whole dataset to see whether it is empty.
LOGGING_EVENTS = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)
PYNETDICOM_HANDLERS = "pynetdicom._handlers"


def unbind_pynetdicom_logging(association: Association) -> None:
    """Unbind pynetdicom's logging handlers from an association (its public bind API)."""
    for event in LOGGING_EVENTS:
        bound = cast(list[tuple[Callable[..., Any], Any]], association.get_handlers(event))
        for handler, _ in list(bound):  # a notification event's: (handler, arguments) pairs
            if getattr(handler, "__module__", "") == PYNETDICOM_HANDLERS:
                association.unbind(event, handler)


def answers_first(association: Any) -> bool:
    """Whether `after_answer` on this association runs its work after the response."""
    return isinstance(association, EventDrivenAssociation)


def settle_pending(association: Any) -> None:
    """Do the after-answer work left on this association by earlier requests (from a
    handler: while its own bytes are flushed, or before it takes a lock that work holds)."""
    if isinstance(association, EventDrivenAssociation):
        association._do_after_answer()


def after_answer(association: Any, work: Callable[[], None]) -> None:
    """Run `work` after the response to the request now being served (an event-driven
    association, from its request handler), else at once: once the response is handed to
    the DUL thread, or, for a C-STORE served on the DUL thread, during the next request
    (`settle_pending`), when the peer is quiet, or before a release or abort."""
    if isinstance(association, EventDrivenAssociation):
        association._after_answer.append(work)
    else:
        work()


def make_event_driven(association: Association) -> None:
    """Convert an association (acceptor or requestor) whose threads have not started."""
    if association.is_alive() or association.dul.is_alive():
        raise RuntimeError("an association is made event-driven before it starts")
    association.__class__ = EventDrivenAssociation
    association.dul.__class__ = EventDrivenDUL
    converted = association  # now an EventDrivenAssociation
    assert isinstance(converted, EventDrivenAssociation)
    converted._work = threading.Event()
    converted._after_answer = []
    converted._settling = threading.Lock()
    converted.serving = False
    converted.wakeups = 0
    converted.waiting, converted.waiting_with = False, None
    converted.dul._become_event_driven(converted.wake)
    converted.dimse.msg_queue = _RequestQueue(converted, list(converted.dimse.msg_queue.queue))
    converted.dimse.__class__ = QuickStores


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, its association made event-driven before it starts,
    converting plain C-STORE requests and answers itself (QuickStores), without
    pynetdicom's logging handlers."""

    def _create_association(self) -> Association:
        association = super()._create_association()
        unbind_pynetdicom_logging(association)
        make_event_driven(association)
        return association


def request_handler(
    event_driven: bool = True, version: str = pynetdicom.__version__
) -> type[RequestHandler]:
    """The request handler for an `AssociationServer`: event-driven where this pynetdicom is
    one whose loops are mirrored here (and `event_driven` asks for it), else pynetdicom's."""
    if event_driven and supported(version):
        log.info("receive.reactor", reactor="event-driven", pynetdicom=version)
        return EventDrivenRequestHandler
    if not event_driven:
        log.info("receive.reactor", reactor="stock", pynetdicom=version)
        return RequestHandler
    log.warning(
        "receive.reactor_stock",
        pynetdicom=version,
        supported=list(SUPPORTED_VERSIONS),
        reason="this pynetdicom's loops are not the ones cadnode/ingest/reactor.py mirrors",
    )
    return RequestHandler
