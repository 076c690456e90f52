"""Structured JSON logs, one event per state change, never a patient identifier.

Code logs internal ids (job, study row) rather than DICOM identifiers; the redaction
processor is the safety net for any key that could carry a patient's identity.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patientname",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "accession_number",
        "accessionnumber",
        "other_patient_ids",
    }
)


def redact_patient_identifiers(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in REDACTED_KEYS:
            event[key] = "[redacted]"
    return event


# Whether loggers are cached on first use (faster). The tests turn it off for the whole
# process: a cached logger keeps the configuration of its first use and escapes
# `structlog.testing.capture_logs`, also after a test runs the CLI in-process.
CACHE_LOGGERS = True


class _StandardError(logging.StreamHandler[Any]):
    """A handler writing to whatever `sys.stderr` is when it writes: one configured while
    stderr was redirected (the CLI run in-process, under a test's capture) must not keep
    writing to the redirect after it is closed."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:  # StreamHandler sets it: always sys.stderr here
        pass


def configure(level: str = "INFO") -> None:
    """Every record, ours and the libraries', leaves through one stdlib handler.

    One handler means one lock around each write, so events from concurrent threads never
    share a line. Our loggers ("cadnode.*") log at `level`; libraries stay at WARNING,
    since pynetdicom dumps whole datasets at DEBUG.
    """
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_patient_identifiers,
    ]
    handler = _StandardError()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("cadnode").setLevel(level)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=CACHE_LOGGERS,
    )
