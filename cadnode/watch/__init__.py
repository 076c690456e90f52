"""Watchdogs: stalls that would otherwise pass in silence raise alerts, cleared when they end.

The watch stage (`stage.py`) looks, every `alerts.check_every`, for jobs stuck in one state
(`stalls.py`), destinations failing every attempt (`destinations.py`), senders silent past
their usual rhythm (`senders.py`) and a disk filling towards its watermark (`disk.py`). Each
condition is an Alert row (cadnode.core.db), raised once when it has lasted past its
threshold and cleared when it ends (`ledger.py`); each raise and clear is a log event and a
notification by webhook and email (`notify.py`), and active alerts are a metric, a banner on
the dashboard and `cadnode alerts` (`listing.py`).
"""

from cadnode.watch.stage import Watchdog

__all__ = ["Watchdog"]
