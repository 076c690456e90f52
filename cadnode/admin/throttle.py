"""What credential checks may cost the node: how many run at once, and how often one source
address may fail.

An Argon2 check of the shipped parameters takes 64 MiB and a fraction of a second of CPU. Run
on the event loop, a few dozen wrong logins stall every other request (health probes
included); run one per request thread, 32 wrong tokens at once take 2 GB. So checks run in a
small pool of their own threads (`http.auth_workers`), with a short queue in front: past it a
request is answered 503 at once rather than waiting, and nothing ever spawns another check.
Failures are counted per source address over the last minute (`http.auth_failures_per_minute`);
checks in flight count against the allowance too, so a burst cannot slip past it before the
first failures are in. Past it the address is locked out (429) until its failures age out.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

WINDOW_S = 60.0
# Addresses remembered at once; the least recently seen is forgotten first (a flood from many
# addresses must not grow the table without bound).
MAX_ADDRESSES = 10_000
# Checks that may wait for a worker, per worker: a login waits at most this many checks.
QUEUE_PER_WORKER = 4


@dataclass(frozen=True)
class Lockout:
    retry_after_s: int
    new: bool  # the first refusal of this lockout: the one the audit trail records
    failures: int


@dataclass
class _Address:
    failures: deque[float] = field(default_factory=deque)
    in_flight: int = 0
    locked_until: float = 0.0


class FailureLimiter:
    """Failed checks per source address over a sliding minute; checks in flight count too."""

    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._max_addresses = max_addresses
        self._addresses: OrderedDict[str, _Address] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, address: str) -> Lockout | None:
        """Reserve one check for `address` (settle it later), or say how long it is locked out."""
        with self._lock:
            record, now = self._record(address), self._clock()
            lockout = self._lockout(record, now)
            if lockout is None:
                record.in_flight += 1
            return lockout

    def check(self, address: str) -> Lockout | None:
        """The lockout, if any, without reserving a check (to refuse before reading a body)."""
        with self._lock:
            record = self._addresses.get(address)  # an address never seen is not remembered
            return None if record is None else self._lockout(record, self._clock())

    def settle(self, address: str, *, failed: bool) -> None:
        """A reserved check is over; a failure counts for the next minute."""
        with self._lock:
            record = self._record(address)
            record.in_flight = max(0, record.in_flight - 1)
            if failed:
                record.failures.append(self._clock())

    def _record(self, address: str) -> _Address:
        record = self._addresses.get(address)
        if record is None:
            record = self._addresses[address] = _Address()
            while len(self._addresses) > self._max_addresses:
                self._addresses.popitem(last=False)
        self._addresses.move_to_end(address)
        return record

    def _lockout(self, record: _Address, now: float) -> Lockout | None:
        while record.failures and record.failures[0] <= now - WINDOW_S:
            record.failures.popleft()
        failures = len(record.failures)
        if failures + record.in_flight < self.per_minute:
            return None
        # Free again when enough failures have aged out; if checks in flight are what fills
        # the allowance, they settle within a second or so.
        excess = failures - self.per_minute
        wait = record.failures[excess] + WINDOW_S - now if excess >= 0 else 1.0
        retry_after = max(1, math.ceil(wait))
        new = now >= record.locked_until
        if new:
            record.locked_until = now + retry_after
        return Lockout(retry_after, new, failures)


class Busy(Exception):
    """Every worker is busy and the queue in front of them is full."""


class CheckPool:
    """At most `workers` checks at once in their own threads, at most `queue` more waiting."""

    def __init__(self, workers: int, queue: int | None = None) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="admin-auth")
        self._capacity = workers + (QUEUE_PER_WORKER * workers if queue is None else queue)
        self._pending = 0
        self._lock = threading.Lock()

    async def run(self, work: Callable[[], T]) -> T:
        with self._lock:
            if self._pending >= self._capacity:
                raise Busy()
            self._pending += 1
        try:
            future = self._executor.submit(work)
        except RuntimeError:  # shut down: the node is stopping
            self._done(None)
            raise Busy() from None
        # The slot frees when the check ends, not when its request gives up waiting.
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def _done(self, _future: Future[T] | None) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
