"""The disk filling: free space under the data dir falling fast enough to reach the storage
watermark (`storage.min_free_mb`, below which C-STORE is refused) within `alerts.disk_horizon`.

Free space is sampled at each check and its trend is the least-squares slope over the last
`alerts.disk_window`: it is the net of what arrives and what housekeeping frees, so it says
whether retention keeps up, whatever deletes. A trend needs three samples over a quarter of
the window. Once raised, the alert clears when the disk stops filling or the projection
passes the horizon by half again (so a projection hovering at the horizon raises it once).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path

from cadnode.core.audit import aware
from cadnode.core.db import AlertKind
from cadnode.watch.findings import Finding, OpenAlerts, human

SUBJECT = "data dir"
CLEAR_MARGIN = 1.5  # a raised alert clears past the horizon times this
MIN_SAMPLES = 3


def free_bytes_under(path: Path) -> int:
    return shutil.disk_usage(path).free


class DiskTrend:
    def __init__(
        self,
        path: Path,
        window_s: float,
        free_bytes: Callable[[Path], int] = free_bytes_under,
    ) -> None:
        self.path = path
        self.window = dt.timedelta(seconds=window_s)
        self.free_bytes = free_bytes
        self.samples: deque[tuple[dt.datetime, int]] = deque()

    def sample(self, now: dt.datetime) -> None:
        self.samples.append((now, self.free_bytes(self.path)))
        while self.samples and now - self.samples[0][0] > self.window:
            self.samples.popleft()

    def seconds_to(self, floor_bytes: float) -> float | None:
        """When free space reaches `floor_bytes` at the present trend: None if it is not
        falling (or there is no trend yet), 0 if it is there already."""
        if len(self.samples) < MIN_SAMPLES:
            return None
        span = (self.samples[-1][0] - self.samples[0][0]).total_seconds()
        if span < self.window.total_seconds() / 4:
            return None
        slope = _slope(self.samples)  # bytes per second
        free = self.samples[-1][1]
        if free <= floor_bytes:
            return 0.0
        return None if slope >= 0 else (free - floor_bytes) / -slope

    def finding(
        self, now: dt.datetime, *, floor_bytes: float, horizon_s: float, watched: OpenAlerts
    ) -> Finding | None:
        left = self.seconds_to(floor_bytes)
        open_row = watched.get((AlertKind.disk_filling, SUBJECT))
        raised = open_row is not None and open_row.raised_at is not None
        limit = horizon_s * (CLEAR_MARGIN if raised else 1.0)
        if left is None or left >= limit:
            return None
        free = self.samples[-1][1]
        detail = (
            f"{_gib(free)} free and falling {_gib(-_slope(self.samples) * 3600)}/h: "
            f"the {_gib(floor_bytes)} watermark (storage.min_free_mb) in about {human(left)}"
            if left > 0
            else f"{_gib(free)} free: at the {_gib(floor_bytes)} watermark (storage.min_free_mb)"
        )
        since = aware(open_row.since) if open_row is not None else now
        return Finding(AlertKind.disk_filling, SUBJECT, detail, since)


def _slope(samples: deque[tuple[dt.datetime, int]]) -> float:
    start = samples[0][0]
    xs = [(at - start).total_seconds() for at, _ in samples]
    ys = [float(free) for _, free in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"
