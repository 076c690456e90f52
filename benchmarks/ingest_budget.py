"""Where one association's time goes: each step of a C-STORE, against storescp's whole time.

DCMTK storescu pushes a 300-instance 512x512 CT study over one association to cadnode's
receiver (in this process, on a fresh database and spool) and to DCMTK storescp, in the same
run. pynetdicom's own notification events (and the receiver's handler returning) time each
instance's steps in cadnode:

  peer     our response on the wire -> the next request's first PDU: storescu reads the next
           file and sends it, and pynetdicom notices (the stock reader polls every 1 ms)
  receive  first PDU -> the request decoded whole (pynetdicom's PDU and DIMSE work, and the
           peer sending the rest of the request's PDUs)
  store    request decoded -> cadnode's handler returns: pynetdicom handing the request to
           the association's thread (the stock one polls every 1 ms) and to the handler,
           which checks the header and writes durably; before, it also makes the file,
           commits the index row and logs; after, the request is served on the DUL thread
           that decoded it, and the previous instance's file and row are made while this
           one's journal record is flushed
  answer   handler returned -> the response on the wire: pynetdicom building and encoding
           it (the reactor's quick path for a Success), the DUL thread sending it (the stock
           one polls every 1 ms)

(No handler is bound to EVT_DIMSE_SENT: one there would turn the quick response path off.)

Each step is shown before and after, in the same run: "before" is round 1's receive path
(`dicom.reactor: stock`, pynetdicom's polling loops; `storage.spool_journal: false`, each
file written, fdatasynced, renamed and its folder fsynced before the answer), "after" the
event-driven reactor and the spool's journal (cadnode/ingest/reactor.py, journal.py), and
"nothing stored" a ceiling, not a mode: "after" with the durable write and the index commit
left out (each instance still decoded and checked, then answered as a duplicate), what
pynetdicom and the checks alone cost.

Every receiver (storescp too) first takes a warm-up study of the same size and settles
(benchmarks/ingest.py). Also, in the same run, what writing one such file costs: plainly
(what storescp does), durably by rename (`cadnode.core.files.write_durably`) and durably by
the journal (one record and one fdatasync, then the file written and renamed, unflushed)
into a new segment or a reused spare: the floors of a receiver with cadnode's durability.
Every figure is also printed in units of storescp's time per instance (storescp writes
without fsync). The last lines are the throughput ratios to storescp, before and after, and
the ceilings for a receiver that did nothing but the durable write, with an instant peer, and
with the peer's turn estimated as storescp's time less a plain write. "The handler's thread's
CPU" is the CPU time per instance of the thread that ran the C-STORE handler: on the
event-driven reactor the one thread that reads, checks, stores and answers each instance in
turn (and makes the previous one's file and row during the flush), so the closer its share
of the time per instance comes to 100%, the more that time is its CPU, not waiting.

    .venv/bin/python benchmarks/ingest_budget.py [--ct 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import evt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ingest import Target, measure, push, storescp, warmed
from cadnode.core.db import Database
from cadnode.core.files import write_durably
from cadnode.ingest.journal import SUFFIX, Journal, journal_folder
from cadnode.ingest.spool import Secured
from tests.ingest import node_settings
from tests.synthetic import write_ct_series

STEPS = ("peer", "receive", "store", "answer")
HANDLER_CPU = "the handler's thread's CPU"
MARKED_EVENTS = {
    evt.EVT_PDU_RECV: "pdu in",
    evt.EVT_DIMSE_RECV: "request",
    evt.EVT_PDU_SENT: "pdu out",
}


class StepClock:
    """pynetdicom's PDU and DIMSE events on one association, and the handler returning
    ("response"), grouped per C-STORE."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self.handler_cpu: list[tuple[int, float]] = []  # (thread, its CPU seconds so far)
        self._lock = threading.Lock()

    def observers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        return [(event, self._marker(name)) for event, name in MARKED_EVENTS.items()]

    def _marker(self, name: str) -> Callable[[Any], None]:
        def mark(_event: Any) -> None:
            with self._lock:
                self.marks.append((name, time.perf_counter()))

        return mark

    def timing_returns(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """`handler`, marking "response" as it returns."""
        mark = self._marker("response")

        def timed(*args: Any, **kwargs: Any) -> Any:
            try:
                return handler(*args, **kwargs)
            finally:
                mark(None)
                with self._lock:
                    self.handler_cpu.append((threading.get_ident(), time.thread_time()))

        return timed

    def handler_thread_cpu(self) -> float:
        """CPU seconds per instance of the thread that ran the handler, from its first
        instance's answer to its last: on the event-driven reactor, the thread that also
        reads, decodes and answers every PDU; on pynetdicom's own, the association's."""
        with self._lock:
            marks = list(self.handler_cpu)
        busiest = max({thread for thread, _ in marks}, key=[t for t, _ in marks].count)
        times = [cpu for thread, cpu in marks if thread == busiest]
        return (times[-1] - times[0]) / max(len(times) - 1, 1)

    def steps(self) -> dict[str, list[float]]:
        """Seconds of each step, one value per instance."""
        found: dict[str, list[float]] = {step: [] for step in STEPS}
        sent = first_in = request = response = None
        for name, at in self.marks:
            if name == "pdu in" and first_in is None:
                first_in = at
            elif name == "request":
                request = at
            elif name == "response":
                response = at
            elif name == "pdu out" and None not in (first_in, request, response):
                if sent is not None:  # not the first request (the association's AC before it)
                    found["peer"].append(first_in - sent)  # type: ignore[operator]
                found["receive"].append(request - first_in)  # type: ignore[operator]
                found["store"].append(response - request)  # type: ignore[operator]
                found["answer"].append(at - response)  # type: ignore[operator]
                sent, first_in, request, response = at, None, None, None
        return found


# Round 1's receive path, and this one's.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "before": {"dicom": {"reactor": "stock"}, "storage": {"spool_journal": False}},
    "after": {"dicom": {"reactor": "events"}, "storage": {"spool_journal": True}},
    # Not a mode of the node, a ceiling: "after" with nothing written or indexed (every
    # instance is checked, then answered as a duplicate), what the DICOM stack alone costs.
    "nothing stored": {"dicom": {"reactor": "events"}, "storage": {"spool_journal": True}},
}


def cadnode_push(
    files: list[Path],
    warm_up: list[Path],
    scratch: Path,
    sections: dict[str, dict[str, Any]],
    store: bool = True,
) -> tuple[float, dict[str, list[float]]]:
    """Seconds for storescu to push `files` to a fresh in-process receiver, after it took
    `warm_up` and its journal checkpointed (benchmarks/ingest.py); its steps."""
    from cadnode.ingest.receive import Receiver

    clock = StepClock()
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        database = Database(Path(folder) / "cadnode.db")
        settings = node_settings(Path(folder), **sections)
        receiver = Receiver(settings, database, lambda: None)
        if not store:  # every instance taken for a copy stored before, and not indexed
            receiver.spool.secure = lambda arrival, *_: Secured(arrival, 0, stored_before=True)  # type: ignore[method-assign]
            receiver.spool.settle = lambda _: None  # type: ignore[method-assign]
        # The C-STORE handler's work before its answer: all of it (`take`), or up to the
        # durable bytes (`secure`) with the rest after the answer. Within `take`, `secure`
        # marks first and `take` last: the last mark is the one counted.
        intake = receiver.intake
        intake.take = clock.timing_returns(intake.take)  # type: ignore[method-assign]
        intake.secure = clock.timing_returns(intake.secure)  # type: ignore[method-assign]
        port = receiver.start(observers=clock.observers())
        spool = settings.storage.spool
        try:
            target = Target(
                port,
                "CADNODE",
                lambda: len(files),
                lambda: not any(journal_folder(spool).glob(f"*{SUFFIX}")),
            )
            warmed(target, warm_up, 1)
            clock.marks.clear()
            clock.handler_cpu.clear()
            seconds = push(target, files, 1)
        finally:
            receiver.stop(drain_timeout_s=0)
    return seconds, {**clock.steps(), HANDLER_CPU: [clock.handler_thread_cpu()]}


WRITES = (
    "plainly",
    "durably by rename",
    "durably by the journal, a new segment",
    "durably by the journal, a spare reused",
)


def write_seconds(size: int, count: int, scratch: Path) -> dict[str, float]:
    """Median seconds to write a new `size`-byte file into one folder, each way in turn (so
    all see the same disk): plainly (open, write, close: what storescp does), durably by
    rename (`write_durably`, round 1) or by the spool's journal (this round), into a new
    segment (a node's first study) or over a spare's old bytes (every later one)."""
    payload = os.urandom(size)
    seconds: dict[str, list[float]] = {how: [] for how in WRITES}
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        root = Path(folder)
        journals = {how: Journal(root / how, idle_s=3600) for how in WRITES[2:]}
        for index in range(count):  # the spare, as a first study leaves it
            journals[WRITES[3]].write(Path("warm-up") / f"{index}.dcm", [payload])
        journals[WRITES[3]].checkpoint()
        for how in WRITES:
            (root / how / "series").mkdir(parents=True)
        for index in range(count):
            for how in WRITES:
                path = Path("series") / f"{index}.dcm"
                start = time.perf_counter()
                if how in journals:
                    journals[how].write(path, [payload])
                elif how == "durably by rename":
                    write_durably(root / how / path, [payload])
                else:
                    (root / how / path).write_bytes(payload)
                seconds[how].append(time.perf_counter() - start)
        for journal in journals.values():
            journal.close()
    return {how: statistics.median(values) for how, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=300, help="CT instances")
    parser.add_argument("--repeat", type=int, default=3, help="pushes to each (median)")
    args = parser.parse_args()
    # The receiver's events would swamp the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory(prefix="cadnode-budget-") as scratch_name:
        scratch = Path(scratch_name)
        files = write_ct_series(scratch / "ct", args.ct)
        warm_up = write_ct_series(scratch / "ct-warm", args.ct)
        size = statistics.median(f.stat().st_size for f in files)
        totals: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        steps: dict[str, dict[str, list[float]]] = {
            variant: {step: [] for step in (*STEPS, HANDLER_CPU)} for variant in VARIANTS
        }
        anchor: list[float] = []
        writes_first = write_seconds(int(size), args.ct, scratch)
        for _ in range(args.repeat):  # interleaved, so all see the same machine load
            for variant, sections in VARIANTS.items():
                store = variant != "nothing stored"
                seconds, found = cadnode_push(files, warm_up, scratch, sections, store)
                totals[variant].append(seconds)
                for step in (*STEPS, HANDLER_CPU):
                    steps[variant][step] += found[step]
            anchor.append(measure(storescp, scratch, files, 1, warm_up).seconds)
        writes_last = write_seconds(int(size), args.ct, scratch)

    unit = statistics.median(anchor) / len(files)
    total = {variant: statistics.median(values) / len(files) for variant, values in totals.items()}

    def show(label: str, *seconds: float) -> None:
        cells = "".join(f"  {s * 1e3:6.2f} ms {s / unit:5.2f} u" for s in seconds)
        print(f"  {label:<44}{cells}")

    print(f"CT {len(files)} x {size / 1e3:.0f} KB, one association, medians of {args.repeat}")
    print("  per instance; 1 unit (u) = storescp's time per instance")
    print(f"  {'':<44}" + "".join(f"  {variant:>17}" for variant in VARIANTS))
    show("storescp", unit)
    show("cadnode", *total.values())
    for step in STEPS:
        show(f"  {step}", *(statistics.median(steps[v][step]) for v in VARIANTS))
    handler_cpu = {v: statistics.median(steps[v][HANDLER_CPU]) for v in VARIANTS}
    show(HANDLER_CPU, *handler_cpu.values())
    print("  a new file, before the pushes / after them (the disk may slow down as they go):")
    for how in WRITES:
        show(f"  {how}", writes_first[how], writes_last[how])
    for variant in VARIANTS:
        print(f"  cadnode / storescp throughput, {variant}: {unit / total[variant]:.2f}x")
    # On the event-driven reactor one thread reads, decodes, stores and answers each
    # instance in turn: near 100%, its CPU is the time per instance, whatever hides under it.
    share = handler_cpu["after"] / total["after"]
    print(f"  after: the handler's thread was on a CPU for {share:.0%} of the time per instance")
    # What is left of storescp's time for storescu's own turn, at most (storescp also
    # decodes the request): the ceiling below is generous where that estimate is high.
    peer = max(unit - writes_first["plainly"], 0.0)
    for how in WRITES[1:]:
        floor = writes_first[how]
        print(f"  written {how}: ceiling were the peer instant {unit / floor:.2f}x,")
        estimated = unit / (peer + floor)
        print(f"    with the peer's turn at most storescp's less a plain write {estimated:.2f}x")


if __name__ == "__main__":
    main()
