"""The one retry schedule: exponential back-off with a ceiling and a limit on attempts.

Every stage that tries again later uses it (dispatch's deliveries and publish's
publications through cadnode/deliver/outbox.py, infer's engine attempts), each with its
own settings (`dispatch.backoff_*` and `max_attempts`, `engines.retry_backoff_s` and
`max_attempts`).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

# 2**60 seconds outlasts any deployment; the cap only keeps the arithmetic finite.
_MAX_EXPONENT = 60


@dataclass(frozen=True)
class Backoff:
    """Wait `initial_s` after the first failed try, twice as long after each one after it,
    never longer than `max_s`; after `max_attempts` tries in all, give up."""

    initial_s: float
    max_attempts: int
    max_s: float = math.inf

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s <= 0:
            raise ValueError("back-off delays must be positive")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay_s(self, attempts: int) -> float:
        """Seconds to wait after `attempts` failed tries (1: after the first)."""
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        exponent = min(attempts - 1, _MAX_EXPONENT)
        return min(self.initial_s * 2.0**exponent, self.max_s)

    def gives_up(self, attempts: int) -> bool:
        """True once `attempts` tries have been made: no more are scheduled."""
        return attempts >= self.max_attempts

    def next_attempt_at(self, attempts: int, now: dt.datetime | None = None) -> dt.datetime | None:
        """When to try again after `attempts` failed tries, or None at the limit."""
        if self.gives_up(attempts):
            return None
        start = now if now is not None else dt.datetime.now(dt.UTC)
        return start + dt.timedelta(seconds=self.delay_s(attempts))
