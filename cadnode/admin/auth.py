"""Who may use the admin port: a logged-in admin (session cookie) or a bearer token.

The password and the token are configured as Argon2 hashes (`cadnode hash-password`), never
in clear. A login starts a session: a signed cookie (HttpOnly, SameSite=Strict, Secure over
TLS) naming a random session id that the server keeps while it is live, so logging out ends
it for good, not only in that browser. Each session carries a CSRF token that every form
posts back; a POST without the session's token is refused. Sessions live in memory: a
restart logs everyone out (its signing key is made afresh at each start too).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request

from cadnode.config import HttpSettings

SESSION_COOKIE = "cadnode_session"


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


@dataclass
class Gate:
    settings: HttpSettings
    _sessions: set[str] = field(default_factory=set)
    # SHA-256 of bearer tokens already verified, so each scrape is not another Argon2 run.
    _tokens: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.admin_password_hash or self.settings.admin_token_hash)

    @property
    def secure_cookie(self) -> bool:
        configured = self.settings.secure_cookie
        return self.settings.tls is not None if configured is None else configured

    def log_in(self, request: Request, password: str) -> bool:
        if not verify(self.settings.admin_password_hash, password):
            return False
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions.add(session_id)
        request.session.clear()  # a fresh session, not one a visitor before the login knew
        request.session.update({"id": session_id, "csrf": secrets.token_urlsafe(32)})
        return True

    def log_out(self, request: Request) -> None:
        with self._lock:
            self._sessions.discard(request.session.get("id", ""))
        request.session.clear()

    def logged_in(self, request: Request) -> bool:
        with self._lock:
            return request.session.get("id") in self._sessions

    def bearer_ok(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            if digest in self._tokens:
                return True
        if not verify(self.settings.admin_token_hash, token):
            return False
        with self._lock:
            self._tokens.add(digest)
        return True

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
        """For HTML pages: logged in, or off to the login page."""
        if not self.logged_in(request):
            raise NotLoggedIn()

    def api(self, request: Request) -> None:
        """For machine endpoints (/metrics): a bearer token or a logged-in browser."""
        if not (self.bearer_ok(request) or self.logged_in(request)):
            raise HTTPException(
                401, "authentication required", headers={"WWW-Authenticate": "Bearer"}
            )
