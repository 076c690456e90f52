"""Who may use the admin port: a logged-in admin (session cookie) or a bearer token.

The password and the token are configured as Argon2 hashes (`cadnode hash-password`), never
in clear. A login starts a session: a signed cookie (HttpOnly, SameSite=Strict, Secure over
TLS) naming a random session id that the server keeps while it is live, so logging out ends
it for good, not only in that browser. Each session carries a CSRF token that every form
posts back; a POST without the session's token is refused. Sessions live in memory: a
restart logs everyone out (its signing key is made afresh at each start too).

Password and token checks are bounded (cadnode.admin.throttle): a few at once in their own
threads, and a limited number of failures a minute per source address, past which the
address is locked out. Every failed check and every lockout is audited.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from cadnode.admin.throttle import Busy, CheckPool, FailureLimiter, Lockout
from cadnode.core import audit
from cadnode.core.config import ADMIN_CLIENT, DicomwebSettings, HttpSettings
from cadnode.core.db import AuditKind, AuditOutcome, Database

log = structlog.get_logger("cadnode.admin")

SESSION_COOKIE = "cadnode_session"
# Set in the request's state by the guard (cadnode.admin.guard): how the request got in,
# and on /dicomweb who: the client's name (`dicomweb.clients`, ADMIN or DASHBOARD).
AUTHENTICATED_BY = "authenticated_by"
DICOMWEB_CLIENT = "dicomweb_client"
# On /api/feedback: the RIS client's name (`feedback.api_clients`, or ADMIN).
API_CLIENT = "api_client"


def hash_password(password: str) -> str:
    """The Argon2id hash to put in `http.admin_password_hash` (or `admin_token_hash`)."""
    return PasswordHasher().hash(password)


def verify(hashed: str | None, secret: str) -> bool:
    if not hashed or not secret:
        return False
    try:
        return PasswordHasher().verify(hashed, secret)
    except (VerificationError, InvalidHashError):
        return False


class NotLoggedIn(Exception):
    """A page asked for without a session: the browser is sent to the login page."""


class Outcome(StrEnum):
    ok = "ok"
    wrong = "wrong"
    locked_out = "locked out"  # too many failures from the address: 429
    busy = "busy"  # every check worker busy, the queue full: 503


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    retry_after_s: int = 0
    client: str = ""  # whose token it was, when it was right

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.ok


BUSY = Verdict(Outcome.busy, retry_after_s=1)


class Gate:
    def __init__(
        self,
        settings: HttpSettings,
        database: Database | None = None,
        dicomweb: DicomwebSettings | None = None,
        feedback_clients: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.database = database  # for the audit trail; None in the odd unit test
        self.limiter = FailureLimiter(settings.auth_failures_per_minute)
        self.pool = CheckPool(settings.auth_workers)
        self._sessions: set[str] = set()
        # Bearer tokens: the admin's (metrics, DICOMweb) and DICOMweb clients' (DICOMweb only).
        self._admin_token = {ADMIN_CLIENT: settings.admin_token_hash}
        self._dicomweb_tokens = {**self._admin_token, **(dicomweb or DicomwebSettings()).clients}
        # RIS clients of /api/feedback (cadnode.feedback.api), and the admin's.
        self._feedback_tokens = {**self._admin_token, **(feedback_clients or {})}
        # SHA-256 of a bearer token once verified -> whose it is and the hash it matched (a
        # name may be a DICOMweb client's and a feedback client's, with different tokens), so
        # each scrape or DICOMweb request is not another Argon2 run.
        self._tokens: dict[str, tuple[str, str | None]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.settings.admin_password_hash or self.settings.admin_token_hash)

    @property
    def secure_cookie(self) -> bool:
        configured = self.settings.secure_cookie
        return self.settings.tls is not None if configured is None else configured

    # -- sessions -------------------------------------------------------------------------

    def start_session(self, request: Request) -> None:
        """After a right password: a fresh session, not one a visitor before the login knew."""
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions.add(session_id)
        request.session.clear()
        request.session.update({"id": session_id, "csrf": secrets.token_urlsafe(32)})

    def log_out(self, request: Request) -> None:
        with self._lock:
            self._sessions.discard(request.session.get("id", ""))
        request.session.clear()

    def session_live(self, session: Mapping[str, Any]) -> bool:
        with self._lock:
            return session.get("id") in self._sessions

    def logged_in(self, request: Request) -> bool:
        return self.session_live(request.session)

    # -- password and token checks --------------------------------------------------------

    async def check_password(self, address: str, password: str) -> Verdict:
        hashed = {ADMIN_CLIENT: self.settings.admin_password_hash}
        return await self._check(AuditKind.admin_login, address, hashed, password)

    async def check_token(
        self, address: str, token: str, *, dicomweb: bool = False, feedback: bool = False
    ) -> Verdict:
        """The admin token; with `dicomweb`, a DICOMweb client's too (the verdict names whose);
        with `feedback`, a feedback API client's. Each client's hash is tried in turn: a wrong
        token costs one Argon2 run per client."""
        lockout = await self.lockout(address)
        if lockout is not None:  # the right token too: the address is locked out
            return lockout
        accepted = (
            self._dicomweb_tokens if dicomweb
            else self._feedback_tokens if feedback
            else self._admin_token
        )
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            known = self._tokens.get(digest)
        if known is not None:
            name, hashed = known
            right = name in accepted and accepted[name] == hashed
            return Verdict(Outcome.ok if right else Outcome.wrong, client=name)
        verdict = await self._check(AuditKind.admin_token, address, accepted, token)
        if verdict.ok:
            with self._lock:
                self._tokens[digest] = (verdict.client, accepted[verdict.client])
        return verdict

    async def lockout(self, address: str) -> Verdict | None:
        """A 429 verdict while `address` is locked out (checked before a body is read)."""
        return await self._locked_out(address, self.limiter.check(address))

    async def _check(
        self, kind: AuditKind, address: str, hashes: Mapping[str, str | None], secret: str
    ) -> Verdict:
        locked = await self._locked_out(address, self.limiter.admit(address))
        if locked is not None:
            return locked
        failed = True  # unless the check says otherwise: a cancelled one counts as a failure
        try:
            owner = await self.pool.run(
                lambda: self._verify_audited(kind, address, hashes, secret)
            )
            failed = owner is None
        except Busy:
            failed = False  # never checked
            log.warning("admin.auth_busy", kind=kind.value)
            return BUSY
        finally:
            self.limiter.settle(address, failed=failed)
        return Verdict(Outcome.wrong) if owner is None else Verdict(Outcome.ok, client=owner)

    def _verify_audited(
        self, kind: AuditKind, address: str, hashes: Mapping[str, str | None], secret: str
    ) -> str | None:
        """In a check worker: whose hash `secret` matches and, if none, the audit event."""
        owner = next((name for name, hashed in hashes.items() if verify(hashed, secret)), None)
        if owner is None:
            self._audit(kind, address, AuditOutcome.refused)
        return owner

    async def _locked_out(self, address: str, lockout: Lockout | None) -> Verdict | None:
        if lockout is None:
            return None
        if lockout.new:
            log.warning(
                "admin.lockout", failures=lockout.failures, retry_after_s=lockout.retry_after_s
            )
            await run_in_threadpool(
                self._audit,
                AuditKind.admin_lockout,
                address,
                AuditOutcome.refused,
                failures=lockout.failures,
                retry_after_s=lockout.retry_after_s,
            )
        return Verdict(Outcome.locked_out, lockout.retry_after_s)

    def _audit(self, kind: AuditKind, address: str, outcome: AuditOutcome, **details: Any) -> None:
        if self.database is not None:
            audit.record(
                self.database, kind, actor="admin", address=address, outcome=outcome, **details
            )

    def close(self) -> None:
        self.pool.close()

    # -- forms and dependencies -----------------------------------------------------------

    def csrf_token(self, request: Request) -> str:
        """The token forms carry; a visitor not yet logged in gets one for the login form."""
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = secrets.token_urlsafe(32)
            request.session["csrf"] = token
        return token

    def check_csrf(self, request: Request, posted: Any) -> None:
        expected = request.session.get("csrf")
        if not (
            isinstance(posted, str)
            and isinstance(expected, str)
            and secrets.compare_digest(posted, expected)
        ):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")

    def page(self, request: Request) -> None:
        """For HTML pages: logged in, or off to the login page. The guard has already
        refused anyone else; this holds should a route ever be mounted outside it."""
        if not self.logged_in(request):
            raise NotLoggedIn()

    def api(self, request: Request) -> None:
        """For machine endpoints (/metrics): let in by the guard, on a token or a session."""
        if not (getattr(request.state, AUTHENTICATED_BY, None) or self.logged_in(request)):
            raise HTTPException(
                401, "authentication required", headers={"WWW-Authenticate": "Bearer"}
            )


def client_address(scope: Mapping[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
