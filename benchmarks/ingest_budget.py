"""Where one association's time goes: each step of a C-STORE, against storescp's whole time.

DCMTK storescu pushes a 300-instance 512x512 CT study over one association to cadnode's
receiver (in this process, on a fresh database and spool) and to DCMTK storescp, in the same
run. pynetdicom's own notification events time each instance's steps in cadnode:

  peer     our response on the wire -> the next request's first PDU: storescu reads the next
           file and sends it, and pynetdicom notices (its reader polls every 1 ms)
  receive  first PDU -> the request decoded whole (pynetdicom's PDU and DIMSE work)
  store    request decoded -> response handed to pynetdicom: its 1 ms poll, cadnode's handler
           (header check, durable write, index commit, event), pynetdicom building the response
  answer   response handed over -> on the wire (pynetdicom's 1 ms poll again)

Also, in the same run, what writing one such file costs: plainly (what storescp does) and
durably as cadnode does (`cadnode.core.files.write_durably`: write, fdatasync, rename, folder
fsync), the floor of any receiver with cadnode's durability. Every figure is also printed in
units of storescp's time per instance (storescp writes without fsync). The last lines are the
throughput ratios to storescp: cadnode's, and the ceilings for a receiver that did nothing
but the durable write, with an instant peer, and with the peer's turn estimated as
storescp's time less a plain write.

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

from benchmarks.ingest import Target, measure, push, storescp
from cadnode.core.db import Database
from cadnode.core.files import write_durably
from tests.ingest import node_settings
from tests.synthetic import write_ct_series

STEPS = ("peer", "receive", "store", "answer")
MARKED_EVENTS = {
    evt.EVT_PDU_RECV: "pdu in",
    evt.EVT_DIMSE_RECV: "request",
    evt.EVT_DIMSE_SENT: "response",
    evt.EVT_PDU_SENT: "pdu out",
}


class StepClock:
    """pynetdicom's PDU and DIMSE events on one association, grouped per C-STORE."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def observers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        return [(event, self._marker(name)) for event, name in MARKED_EVENTS.items()]

    def _marker(self, name: str) -> Callable[[Any], None]:
        def mark(_event: Any) -> None:
            with self._lock:
                self.marks.append((name, time.perf_counter()))

        return mark

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


def cadnode_push(files: list[Path], scratch: Path) -> tuple[float, dict[str, list[float]]]:
    """Seconds for storescu to push `files` to a fresh in-process receiver; its steps."""
    from cadnode.ingest.receive import Receiver

    clock = StepClock()
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        database = Database(Path(folder) / "cadnode.db")
        receiver = Receiver(node_settings(Path(folder)), database, lambda: None)
        port = receiver.start(observers=clock.observers())
        try:
            seconds = push(Target(port, "CADNODE", lambda: len(files)), files, 1)
        finally:
            receiver.stop(drain_timeout_s=0)
    return seconds, clock.steps()


def write_seconds(size: int, count: int, scratch: Path, durably: bool) -> float:
    """Median seconds to write a new `size`-byte file into one folder: as cadnode does
    (`write_durably`), or plainly (open, write, close: what storescp does)."""
    payload = os.urandom(size)
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        series = Path(folder) / "series"
        series.mkdir()
        seconds = []
        for index in range(count):
            path = series / f"{index}.dcm"
            start = time.perf_counter()
            if durably:
                write_durably(path, [payload])
            else:
                path.write_bytes(payload)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


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
        size = statistics.median(f.stat().st_size for f in files)
        ours: list[float] = []
        steps: dict[str, list[float]] = {step: [] for step in STEPS}
        anchor: list[float] = []
        for _ in range(args.repeat):  # interleaved, so both see the same machine load
            seconds, found = cadnode_push(files, scratch)
            ours.append(seconds)
            for step in STEPS:
                steps[step] += found[step]
            anchor.append(measure(storescp, scratch, files, 1))
        floor = write_seconds(int(size), args.ct, scratch, durably=True)
        plain = write_seconds(int(size), args.ct, scratch, durably=False)

    unit = statistics.median(anchor) / len(files)
    total = statistics.median(ours) / len(files)

    def show(label: str, seconds: float) -> None:
        print(f"  {label:<38} {seconds * 1e3:6.2f} ms  {seconds / unit:5.2f} units")

    print(f"CT {len(files)} x {size / 1e3:.0f} KB, one association, medians of {args.repeat}")
    print("  per instance; 1 unit = storescp's time per instance")
    show("storescp", unit)
    show("cadnode", total)
    for step in STEPS:
        show(f"  {step}", statistics.median(steps[step]))
    show("a new file, written plainly", plain)
    show("a new file, written durably (the floor)", floor)
    # What is left of storescp's time for storescu's own turn, at most (storescp also
    # decodes the request): the ceiling below is generous where that estimate is high.
    peer = max(unit - plain, 0.0)
    print(f"  cadnode / storescp throughput: {unit / total:.2f}x")
    print(f"  ceiling with durable writes, were the peer instant: {unit / floor:.2f}x")
    print(
        f"  ceiling with the peer's turn at most storescp's time less a plain write: "
        f"{unit / (peer + floor):.2f}x"
    )


if __name__ == "__main__":
    main()
