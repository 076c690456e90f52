from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.peers import REPO

SCRIPT = """
import logging, structlog
from cadnode.core import logs
logs.configure()
log = structlog.get_logger("cadnode.test")
log.info("instance.received", job=3, patient_id="PID-9", PatientName="Doe^J")
logging.getLogger("pynetdicom").error("TCP Initialisation Error: refused")
logging.getLogger("pynetdicom").debug("a dataset dump that must not appear")
"""

CONCURRENT = """
import logging, threading, structlog
from cadnode.core import logs
logs.configure()
ours, library = structlog.get_logger("cadnode.test"), logging.getLogger("pynetdicom")
def chatter(n):
    for i in range(300):
        if n % 2:
            ours.info("instance.received", thread=n, i=i, padding="x" * 200)
        else:
            library.warning("a library's own record %d %s", i, "y" * 200)
threads = [threading.Thread(target=chatter, args=(n,)) for n in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def logged_events(script: str) -> tuple[str, list[dict[str, Any]]]:
    """Run `script` in a fresh interpreter; its stderr, and every line of it parsed as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    return done.stderr, [json.loads(line) for line in done.stderr.splitlines()]


def test_every_line_is_json_and_patient_keys_are_redacted() -> None:
    stderr, events = logged_events(SCRIPT)
    assert [e["event"] for e in events] == [
        "instance.received",
        "TCP Initialisation Error: refused",
    ]
    first, library = events
    assert first["job"] == 3
    assert first["patient_id"] == first["PatientName"] == "[redacted]"
    assert "PID-9" not in stderr and "Doe^J" not in stderr
    assert library["logger"] == "pynetdicom" and library["level"] == "error"


def test_events_from_concurrent_threads_never_share_a_line() -> None:
    _, events = logged_events(CONCURRENT)
    assert len(events) == 8 * 300


REDIRECTED = """
import contextlib, io, structlog
from cadnode.core import logs
redirect = io.StringIO()
with contextlib.redirect_stderr(redirect):  # as the CLI run in-process under a test's capture
    logs.configure()
redirect.close()
structlog.get_logger("cadnode.test").warning("after.the.redirect")
"""


def test_logging_set_up_under_a_redirect_goes_to_stderr_once_it_is_over() -> None:
    text, events = logged_events(REDIRECTED)  # every line JSON: no "--- Logging error ---"
    assert [event["event"] for event in events] == ["after.the.redirect"], text
