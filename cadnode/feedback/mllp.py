"""The MLLP listener for final reports (`feedback.mllp`): HL7 v2 ORU^R01 in, ACK out.

An asyncio server in its own thread. What a sender may cost is bounded before it is spent:
a connection from outside `allowed_networks` is closed unread; at most `max_connections`
at once (more are closed at once); a message is read up to `max_message_kb` (past it: AR,
and the connection closed, its rest unread); a connection silent for `timeout_s` is closed.
Parsing, labelling and the database's commit run off the event loop, two at a time.

Every message gets an ACK (cadnode.feedback.oru) and a log event (`feedback.report` when
taken, `feedback.refused` with the reason when not), naming the sender and the message's
control ID, never the patient, the accession number or the report's words. A bad message
never stops the listener: each is answered and the connection goes on (or is closed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from concurrent.futures import ThreadPoolExecutor

import structlog

from cadnode.core.config import FeedbackMllp
from cadnode.core.db import Database, FeedbackSource
from cadnode.core.hl7v2 import END, START
from cadnode.feedback.labels import ReportReader
from cadnode.feedback.oru import FINAL, AckCode, Header, Refused, acknowledgement, header_of
from cadnode.feedback.oru import read_report as parse_report
from cadnode.feedback.record import Said, find_target, keep

log = structlog.get_logger("cadnode.feedback")
DISCARD_S = 1.0  # how long the rest of an oversized message is drained before closing
HEADER_BYTES = 4096  # read of an oversized message to answer it: its MSH segment


class ReportListener:
    def __init__(self, settings: FeedbackMllp, database: Database, reader: ReportReader) -> None:
        self.settings = settings
        self.database = database
        self.reader = reader
        self.networks = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
        self.max_bytes = settings.max_message_kb * 1024
        self._work = ThreadPoolExecutor(2, thread_name_prefix="feedback-report")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._bound = threading.Event()
        self._connections = 0
        self._failure = "no answer within 10 s"
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> int:
        """Listen; returns the port (an ephemeral one when `port` is 0)."""
        self._thread = threading.Thread(target=self._run, name="feedback-mllp", daemon=True)
        self._thread.start()
        if not self._bound.wait(10) or not self.port:
            raise RuntimeError(
                f"feedback.mllp: cannot listen on {self.settings.bind}:{self.settings.port}"
                f" ({self._failure})"
            )
        log.info("feedback.listening", bind=self.settings.bind, port=self.port)
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
        self._work.shutdown(wait=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except OSError as error:  # the port taken, the address not this host's
            self._failure = f"{type(error).__name__}: {error}"
        finally:
            self._bound.set()  # a failed bind: start() stops waiting and says so

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        # StreamReader's limit: readuntil() stops with LimitOverrunError past it.
        server = await asyncio.start_server(
            self._connection, self.settings.bind, self.settings.port, limit=self.max_bytes + 3
        )
        self.port = int(server.sockets[0].getsockname()[1])
        self._bound.set()
        async with server:
            await self._stopped.wait()

    # -- one connection -------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = str((writer.get_extra_info("peername") or ("unknown",))[0])
        if not self._allowed(address):
            log.warning("feedback.refused", reason="address not allowed", address=address)
            writer.close()
            return
        if self._connections >= self.settings.max_connections:
            log.warning("feedback.refused", reason="too many connections", address=address)
            writer.close()
            return
        self._connections += 1
        try:
            await self._messages(reader, writer, address)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went, or fell silent: nothing to answer
        finally:
            self._connections -= 1
            writer.close()

    async def _messages(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await asyncio.wait_for(reader.readuntil(END), self.settings.timeout_s)
            except asyncio.LimitOverrunError:
                reason = f"message over {self.settings.max_message_kb} KB"
                header = header_of(_decode(await reader.read(HEADER_BYTES)))  # its MSH
                log.warning(
                    "feedback.refused",
                    reason=reason,
                    control_id=header.control_id,
                    sender=header.author,
                    address=address,
                )
                await self._answer(writer, acknowledgement(header, AckCode.AR, reason))
                await self._discard(reader, writer)
                return  # the framing cannot be trusted past here
            except asyncio.IncompleteReadError as ended:
                if ended.partial.strip():
                    log.warning(
                        "feedback.refused", reason="connection closed mid-message", address=address
                    )
                return
            ack = await loop.run_in_executor(self._work, self.handle, frame, address)
            await self._answer(writer, ack)

    async def _discard(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After refusing an oversized message: say no more, and let what the sender already
        sent drain (a little, briefly) so closing does not reset the connection under the
        ACK before the sender reads it."""
        if writer.can_write_eof():
            writer.write_eof()
        budget = self.max_bytes * 4
        try:
            while budget > 0:
                chunk = await asyncio.wait_for(reader.read(65536), DISCARD_S)
                if not chunk:
                    return
                budget -= len(chunk)
        except TimeoutError:
            return

    def _allowed(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    async def _answer(self, writer: asyncio.StreamWriter, ack: str) -> None:
        writer.write(START + ack.encode("utf-8") + END)
        await asyncio.wait_for(writer.drain(), self.settings.timeout_s)

    # -- one message (off the event loop) ---------------------------------------------------

    def handle(self, frame: bytes, address: str) -> str:
        """The ACK for one framed message, having kept what the report concluded."""
        text = _decode(frame)
        header = header_of(text)
        try:
            code, reason = self._take(text, header, address)
        except Refused as refused:
            log.warning(
                "feedback.refused",
                reason=refused.reason,
                ack=refused.code.value,
                control_id=header.control_id,
                sender=header.author,
                address=address,
            )
            return acknowledgement(header, refused.code, refused.reason)
        return acknowledgement(header, code, reason)

    def _take(self, text: str, header: Header, address: str) -> tuple[AckCode, str]:
        if not text.startswith("MSH"):
            raise Refused(AckCode.AR, "not an HL7 v2 message: no MSH segment first")
        facilities = self.settings.allowed_facilities
        if facilities and header.sending_facility not in facilities:
            raise Refused(AckCode.AR, "sending facility (MSH-4) not allowed")
        report = parse_report(text)
        if report.status not in FINAL:
            log.info(
                "feedback.report",
                taken=False,
                status=report.status,
                control_id=header.control_id,
                sender=header.author,
            )
            return AckCode.AA, f"result status {report.status}: only a final report is kept"
        if not (report.accession or report.study_uid):
            raise Refused(AckCode.AE, "no accession number (OBR-3, ORC-3) nor Study Instance UID")
        with self.database.session() as session:
            target = find_target(session, accession=report.accession, study_uid=report.study_uid)
        if target is None:
            raise Refused(AckCode.AE, "unknown study: no study held with this accession number")
        labelled = self.reader.label(report.text)
        said = [Said(item.finding, item.conclusion, item.evidence) for item in labelled]
        keep(
            self.database,
            target,
            said,
            source=FeedbackSource.report,
            author=header.author,
            report_id=report.accession or header.control_id,
            address=address,
        )
        log.info(
            "feedback.report",
            taken=True,
            job=target.job_id,
            findings=len(said),
            control_id=header.control_id,
            sender=header.author,
        )
        return AckCode.AA, f"{len(said)} finding(s) labelled"


def _decode(frame: bytes) -> str:
    """The message inside its MLLP frame (anything before the start byte is line noise);
    UTF-8, else Latin-1, which decodes any byte (MSH-18 names other sets rarely)."""
    body = frame[frame.find(START) + 1 :] if START in frame else frame
    body = body.removesuffix(END)
    try:
        return body.decode("utf-8").strip()
    except UnicodeDecodeError:
        return body.decode("latin-1").strip()
