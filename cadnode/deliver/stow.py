"""STOW-RS delivery: result objects to a DICOMweb destination (one configured by `url`).

Dispatch hands this module the pending objects of one such destination; they go as stored
(Part 10 files, never decoded), several to a multipart/related request
(`instances_per_request`), up to `max_in_flight` requests at once on a small thread pool.
Each request yields one outcome per object, judged from the server's answer instance by
instance, and dispatch records it on that object's delivery through the same outbox as a
C-STORE (cadnode/deliver/dispatch.py): sent only once the answer names the object as stored.

How an answer is judged (PS3.18 10.5):
- 200 or 202: an object is stored only if the Referenced SOP Sequence names its SOP Instance
  UID and the Failed SOP Sequence does not. A Failed SOP Sequence entry fails that object
  (a server that answered 200 while storing nothing is caught here), and so does an answer
  that does not name it at all, or that is not DICOM JSON. Both are retried with back-off.
- 202: stored with warnings; the Warning Reason (and any HTTP Warning header) is returned
  with the object, for its delivery to keep.
- 409: nothing was stored; each object fails with the reason the answer gives it.
- 401 and 403, and other 4xx but 408 and 429, and redirects: permanent, no retry sends the
  same request differently; dead-lettered at once, for an admin to fix the destination and
  `cadnode deliveries retry` them.
- 408, 429, 5xx, timeouts, refused or broken connections: transient, retried with back-off.

Why not dicomweb-client's `store_instances`: it takes decoded pydicom datasets and writes them
again (dispatch sends the stored bytes, streamed from disk), retries inside the call with its
own sleeps (blocking dispatch; the outbox has the retry schedule), has one timeout for every
request and none for the whole of one, and returns the answer parsed with its HTTP status
dropped (200 and 202 look alike) or raises on 409. httpx, already a dependency, with the
multipart writer below, leaves every one of those decisions here.

A request has one deadline, `timeout_s` plus `timeout_s_per_mb` for each MB it carries: each
connect, write and read waits at most that long, and the body and the answer are read in
chunks that check it, so a server that stalls half-way through never holds a request much
past it (by one wait at most).
"""

from __future__ import annotations

import functools
import json
import ssl
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from cadnode.core.config import StowDestination

log = structlog.get_logger("cadnode.deliver.stow")

CHUNK_BYTES = 256 * 1024
# A STOW-RS answer lists each instance in a few hundred bytes: more than this is not one.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
MB = 1024 * 1024

# PS3.18 Table I.2-3 (STOW-RS Failure Reason) and I.2-4 (Warning Reason), by code or range.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xC122: "transfer syntax not supported",
}
FAILURE_RANGES = {
    0xA700: "out of resources",
    0xA900: "does not match SOP class",
    0xC000: "cannot understand",
}
WARNING_REASONS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}

# DICOM JSON tags (PS3.18 F.2) of the store response.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


@dataclass(frozen=True)
class StowObject:
    """One object to send: `key` is its delivery's id, `path` its Part 10 file."""

    key: int
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class StowOutcome:
    """What the server's answer says of one object. `reason` is in words and goes to the log;
    `detail` (the server's own words, which may name the study) only to the delivery."""

    key: int
    stored: bool
    reason: str = ""
    detail: str = ""
    final: bool = False  # no retry can help: dead-letter at once
    warning: str | None = None
    status: str = ""  # the HTTP status, e.g. "HTTP 200"


class _DeadlinePassed(Exception):
    pass


def send_all(destination: StowDestination, objects: Sequence[StowObject]) -> Iterator[StowOutcome]:
    """Every object sent, in requests of `instances_per_request`, `max_in_flight` at once;
    each request's outcomes yielded as soon as it ends (on the caller's thread, which
    records them). Never raises for what the network or the server does."""
    size = destination.instances_per_request
    batches = [objects[i : i + size] for i in range(0, len(objects), size)]
    if not batches:
        return
    workers = min(destination.max_in_flight, len(batches))
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    verify = _tls_context(destination.ca_file)
    with (
        httpx.Client(verify=verify, limits=limits, follow_redirects=False) as client,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stow") as pool,
    ):
        requests = [pool.submit(store, client, destination, batch) for batch in batches]
        for request in as_completed(requests):
            yield from request.result()


@functools.lru_cache(maxsize=16)
def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Made once per CA file: loading a CA bundle costs more than a request on loopback."""
    return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))


def store(
    client: httpx.Client, destination: StowDestination, batch: Sequence[StowObject]
) -> list[StowOutcome]:
    """One STOW-RS request for `batch`, one outcome per object."""
    started = time.monotonic()
    try:
        sizes = [item.path.stat().st_size for item in batch]
    except OSError as error:  # removed since dispatch read its header
        return _all(batch, stored=False, reason="STOW-RS: file missing", detail=str(error))
    deadline_s = destination.timeout_s + destination.timeout_s_per_mb * sum(sizes) / MB
    try:
        status, headers, body = _post(client, destination, batch, sizes, deadline_s)
    except (httpx.TimeoutException, _DeadlinePassed):
        return _all(batch, stored=False, reason=f"STOW-RS: no answer within {deadline_s:.0f} s")
    except httpx.TransportError as error:
        return _all(batch, stored=False, reason="STOW-RS: connection failed", detail=str(error))
    except OSError as error:  # a file removed meanwhile, a secret unreadable
        return _all(batch, stored=False, reason="STOW-RS: cannot read", detail=str(error))
    except Exception as error:  # anything else fails this request alone
        reason = f"STOW-RS raised {type(error).__name__}"
        return _all(batch, stored=False, reason=reason, detail=str(error))
    outcomes = judge(status, headers, body, batch)
    log.info(
        "stow.answered",
        destination=destination.url,
        status=status,
        instances=len(batch),
        stored=sum(o.stored for o in outcomes),
        seconds=round(time.monotonic() - started, 3),
    )
    return outcomes


def _post(
    client: httpx.Client,
    destination: StowDestination,
    batch: Sequence[StowObject],
    sizes: list[int],
    deadline_s: float,
) -> tuple[int, httpx.Headers, bytes]:
    deadline = time.monotonic() + deadline_s
    boundary = uuid.uuid4().hex
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **_authorization(destination),
    }
    if not destination.chunked:
        headers["Content-Length"] = str(_multipart_length(boundary, sizes))
    request = client.build_request(
        "POST",
        destination.url.rstrip("/") + "/studies",
        headers=headers,
        content=_multipart(boundary, batch, deadline),
        timeout=httpx.Timeout(deadline_s),
    )
    response = client.send(request, stream=True, auth=_basic(destination))
    try:
        return response.status_code, response.headers, _read_answer(response, deadline)
    finally:
        response.close()


def _authorization(destination: StowDestination) -> dict[str, str]:
    """The bearer token, read again for each request (so a rotated one needs no restart)."""
    token_file = destination.auth.bearer_token_file
    if token_file is None:
        return {}
    return {"Authorization": f"Bearer {token_file.read_text(encoding='utf-8').strip()}"}


def _basic(destination: StowDestination) -> httpx.BasicAuth | None:
    auth = destination.auth
    if auth.username is None or auth.password_file is None:
        return None
    return httpx.BasicAuth(auth.username, auth.password_file.read_text(encoding="utf-8").strip())


def _part_head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def _multipart_length(boundary: str, sizes: list[int]) -> int:
    closing = len(f"--{boundary}--\r\n")
    return sum(len(_part_head(boundary)) + size + 2 for size in sizes) + closing


def _multipart(boundary: str, batch: Sequence[StowObject], deadline: float) -> Iterator[bytes]:
    """The body, streamed from the files in chunks, each checking the request's deadline."""
    for item in batch:
        yield _part_head(boundary)
        with item.path.open("rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                _check(deadline)
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _read_answer(response: httpx.Response, deadline: float) -> bytes:
    """The answer's body, bounded in size and in time."""
    body = bytearray()
    for chunk in response.iter_bytes(CHUNK_BYTES):
        _check(deadline)
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer over {MAX_ANSWER_BYTES} bytes is not a STOW-RS one")
    return bytes(body)


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise _DeadlinePassed


def judge(
    status: int, headers: httpx.Headers | dict[str, str], body: bytes, batch: Sequence[StowObject]
) -> list[StowOutcome]:
    """One outcome per object of `batch` from the server's answer (the module's doc)."""
    shown = f"HTTP {status}"
    if status in (200, 202, 409):
        return _per_instance(status, headers, body, batch)
    if status in (401, 403):
        reason = f"STOW-RS refused: {shown} (check the destination's auth and the server's)"
        return _all(batch, stored=False, reason=reason, detail=_text(body), final=True)
    if 300 <= status < 400:
        moved = httpx.Headers(headers).get("Location", "")
        reason = f"STOW-RS: {shown}, redirected (give the destination the url it names)"
        return _all(batch, stored=False, reason=reason, detail=moved, final=True)
    permanent = 400 <= status < 500 and status not in (408, 429)
    reason = f"STOW-RS failed: {shown}"
    return _all(batch, stored=False, reason=reason, detail=_text(body), final=permanent)


def _per_instance(
    status: int, headers: httpx.Headers | dict[str, str], body: bytes, batch: Sequence[StowObject]
) -> list[StowOutcome]:
    shown = f"HTTP {status}"
    try:
        referenced, failed = _parse_answer(body)
    except ValueError as error:
        reason = f"STOW-RS: {shown} without a DICOM JSON answer naming what was stored"
        return _all(batch, stored=False, reason=reason, detail=str(error))
    header_warning = httpx.Headers(headers).get("Warning")
    outcomes = []
    for item in batch:
        uid = item.sop_instance_uid
        if uid in failed:
            reason = f"STOW-RS: {shown}, refused: {_failure_words(failed[uid])}"
            outcomes.append(StowOutcome(item.key, False, reason, status=shown))
        elif uid not in referenced or status == 409:
            reason = f"STOW-RS: {shown}, but the answer does not list it as stored"
            outcomes.append(StowOutcome(item.key, False, reason, status=shown))
        else:
            warning = _warning_words(status, referenced[uid], header_warning)
            outcomes.append(StowOutcome(item.key, True, warning=warning, status=shown))
    return outcomes


def _parse_answer(body: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(stored UID -> Warning Reason, failed UID -> Failure Reason) of a DICOM JSON answer;
    ValueError if it is none."""
    if not body.strip():
        raise ValueError("empty answer")
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from error
    if isinstance(answer, list) and len(answer) == 1:  # some servers wrap the one dataset
        answer = answer[0]
    if not isinstance(answer, dict):
        raise ValueError("not a DICOM JSON dataset")
    return _items(answer, REFERENCED_SOP_SEQUENCE, WARNING_REASON), _items(
        answer, FAILED_SOP_SEQUENCE, FAILURE_REASON
    )


def _items(answer: dict[str, Any], sequence: str, reason_tag: str) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for item in _values(answer, sequence):
        if isinstance(item, dict) and (uids := _values(item, REFERENCED_SOP_INSTANCE_UID)):
            reasons = _values(item, reason_tag)
            found[str(uids[0])] = (
                int(reasons[0]) if reasons and isinstance(reasons[0], int) else None
            )
    return found


def _values(dataset: dict[str, Any], tag: str) -> list[Any]:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values if isinstance(values, list) else []


def _failure_words(code: int | None) -> str:
    if code is None:
        return "no Failure Reason given"
    words = FAILURE_REASONS.get(code) or FAILURE_RANGES.get(code & 0xFF00) or "unknown reason"
    return f"Failure Reason 0x{code:04X} ({words})"


def _warning_words(status: int, code: int | None, header: str | None) -> str | None:
    parts = []
    if code is not None:
        parts.append(f"Warning Reason 0x{code:04X} ({WARNING_REASONS.get(code, 'unknown')})")
    if header:
        parts.append(f"Warning: {header[:200]}")
    if status == 202 and not parts:
        parts.append("accepted with warnings, none named")
    return f"STOW-RS HTTP {status}: {'; '.join(parts)}" if parts else None


def _all(
    batch: Sequence[StowObject], *, stored: bool, reason: str, **more: Any
) -> list[StowOutcome]:
    return [StowOutcome(item.key, stored, reason, **more) for item in batch]


def _text(body: bytes) -> str:
    """The start of an error answer's body, for the delivery's row."""
    return body[:300].decode("utf-8", errors="replace").strip()
