"""Who may read the web app: the access token (from the environment or a mounted file), the
login session cookie, the loopback-only open mode, and the ASGI guard that enforces them and sets
the security headers on every response.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scanner.core.errors import ConfigError
from scanner.web.pages import render_page
from scanner.web.state import ascii_number, base_context, json_response, text_response

log = logging.getLogger(__name__)

MIN_TOKEN = 16
SESSION_COOKIE = "felixscan_session"
SESSION_SECONDS = 12 * 3600
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/assets/web.css"})
_HEALTH_PATHS = frozenset({"/healthz", "/readyz"})  # never read the token
METRICS_PATH = "/metrics"  # the web token, or FELIXSCAN_METRICS_TOKEN (this path only)
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
_MAX_TOKEN_FILE = 4096  # bytes
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")


class Auth:
    """The access token, from the environment or a mounted file.

    The file is read on each request that needs the token, so a rotated Secret takes effect
    at once. A file that cannot be read or holds no good token (empty, shorter than
    MIN_TOKEN, spaces) is refused at start; later, the last good token stays in use and the
    problem is logged once per change of the file, not per request.
    """

    def __init__(self, *, token: str | None = None, token_file: Path | None = None,
                 name: str = "FELIXSCAN_WEB_TOKEN") -> None:
        """`name`: the variable the token comes from (`name` or `name`_FILE), for messages."""
        self._token = token  # with a file: the last good token read from it
        self._file = token_file
        self._name = name
        self._seen: bytes | str | None = None  # the file's last content, or why it was unread
        self._file_bad = False  # its last change was refused (and logged)
        if token is not None:
            _check_token(token, name)
        if token_file is not None:
            self.token()  # fail at start, not at the first request

    @classmethod
    def from_environ(cls, env: Mapping[str, str], *,
                     name: str = "FELIXSCAN_WEB_TOKEN") -> Auth:
        """The token of `name` or of the file named by `name`_FILE (e.g. the optional
        FELIXSCAN_METRICS_TOKEN, which opens /metrics only)."""
        token, file = env.get(name), env.get(f"{name}_FILE")
        if token and file:
            raise ConfigError(f"set {name} or {name}_FILE, not both", key=name)
        return cls(token=token or None, token_file=Path(file) if file else None, name=name)

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._file is not None

    def token(self) -> str | None:
        if self._file is None:
            return self._token
        seen: bytes | str
        try:
            with self._file.open("rb") as f:
                seen = f.read(_MAX_TOKEN_FILE + 1)
        except OSError as exc:
            seen = f"cannot be read ({exc.strerror or exc})"
        if seen != self._seen:
            self._seen = seen
            self._take(seen)
        return self._token

    def _take(self, seen: bytes | str) -> None:
        """Use the file's new content if it is a good token; else say why, once."""
        text = ""
        if isinstance(seen, str):
            problem: str | None = seen
        elif len(seen) > _MAX_TOKEN_FILE:
            problem = f"is longer than {_MAX_TOKEN_FILE} bytes"
        else:
            try:
                text = seen.decode("utf-8").strip()
            except UnicodeDecodeError:
                problem = "is not UTF-8 text"
            else:
                problem = _token_problem(text)
        if problem is None:
            if self._token is not None and (self._token != text or self._file_bad):
                log.info("token file %s holds a good token again%s", self._file,
                         ": a new one, now in use" if self._token != text else "")
            self._token = text
            self._file_bad = False
            return
        if self._token is None:
            raise ConfigError(f"the token file {self._file} {problem}",
                              key=f"{self._name}_FILE")
        # A Secret being rotated may be empty or gone for a moment: keep serving.
        self._file_bad = True
        log.warning("token file %s %s; the last good token stays in use", self._file, problem)

    def check(self, headers: Headers) -> tuple[bool, bool]:
        """(allowed, by session cookie) for a request's headers."""
        token = self.token()
        if token is None:
            return True, False
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return _same(value, token), False
        if scheme.lower() == "basic" and value:
            try:
                _user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
                return False, False
            return _same(password, token), False
        cookie = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
        if cookie is not None and self._session_valid(cookie, token):
            return True, True
        return False, False

    def new_session(self, now: float | None = None) -> str:
        token = self.token()
        assert token is not None
        expires = int((now or time.time()) + SESSION_SECONDS)
        return f"{expires}.{_session_mac(token, expires)}"

    def _session_valid(self, cookie: str, token: str) -> bool:
        expires_text, _, mac = cookie.partition(".")
        # ASCII digits only (`isdigit` takes `²`, which `int` refuses), and few of them
        # (`int` refuses more than 4,300): anything else is no session, not an error.
        if not ascii_number(expires_text, 12) or int(expires_text) < time.time():
            return False
        return hmac.compare_digest(mac.encode("utf-8"),
                                   _session_mac(token, int(expires_text)).encode("ascii"))

    def login(self, candidate: str) -> bool:
        token = self.token()
        return token is not None and _same(candidate, token)


def _token_problem(token: str) -> str | None:
    if not token:
        return "is empty"
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        return (f"holds a bad token: the token must be at least {MIN_TOKEN} characters "
                "without spaces")
    return None


def _check_token(token: str, where: str) -> None:
    if _token_problem(token) is not None:
        raise ConfigError(f"the token must be at least {MIN_TOKEN} characters without spaces "
                          "(e.g. `openssl rand -hex 24`)", key=where)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _session_mac(token: str, expires: int) -> str:
    # Keyed by the token itself: rotating the token ends every session.
    key = hashlib.sha256(b"felixscan-web-session\0" + token.encode()).digest()
    return hmac.new(key, str(expires).encode(), hashlib.sha256).hexdigest()


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _loopback_host(host_header: str | None) -> bool:
    """The Host names a loopback address (DNS rebinding guard for the open, token-less mode).

    Only `localhost`, an IPv4 literal in 127.0.0.0/8 or `[::1]`, each with an optional port:
    a name that merely starts with `127.` is anyone's DNS name.
    """
    host = (host_header or "").lower()
    if host.startswith("["):
        literal, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and ascii_number(port[1:], 5))):
            return False
        return literal == "::1"  # also refuses zones (`::1%lo`) and mapped IPv4
    name, colon, port = host.partition(":")
    if colon and not ascii_number(port, 5):
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(name) in _LOOPBACK_V4
    except ValueError:
        return False


class Guard:
    """ASGI middleware: access control and the security headers on every response.

    `metrics_auth`: a token that opens METRICS_PATH and nothing else (Prometheus's), besides
    the web token, which opens everything.
    """

    def __init__(self, app: ASGIApp, auth: Auth, metrics_auth: Auth | None = None) -> None:
        self.app = app
        self.auth = auth
        # An Auth without a token allows everyone: only one that has a token counts here.
        self.metrics_auth = metrics_auth if metrics_auth is not None and metrics_auth.enabled \
            else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h.setdefault("content-security-policy", PAGE_CSP)
                h.setdefault("x-content-type-options", "nosniff")
                h.setdefault("x-frame-options", "DENY")
                h.setdefault("referrer-policy", "no-referrer")
                h.setdefault("cross-origin-opener-policy", "same-origin")
                h.setdefault("cross-origin-resource-policy", "same-origin")
                h.setdefault("cache-control", "no-store")
            await send(message)

        if not self.auth.enabled and not _loopback_host(headers.get("host")):
            response: Response = text_response(421, "open access is for loopback addresses "
                                                "only; set FELIXSCAN_WEB_TOKEN")
            await response(scope, receive, send_with_headers)
            return
        if path in _HEALTH_PATHS:
            # Probes never depend on the token (nor on its file being readable).
            await self.app(scope, receive, send_with_headers)
            return
        allowed, by_session = self.auth.check(headers)
        if not allowed and path == METRICS_PATH and self.metrics_auth is not None:
            allowed = self.metrics_auth.check(headers)[0]
        scope.setdefault("state", {})["session"] = by_session
        if not allowed and path not in _OPEN_PATHS:
            response = _unauthorized(path, scope)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def _unauthorized(path: str, scope: Scope) -> Response:
    response: Response
    if path.startswith("/api/") or path == METRICS_PATH:  # machines: no login form
        response = json_response({"error": "unauthorized",
                          "detail": "send Authorization: Bearer TOKEN"}, 401)
    else:
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "")
        body = render_page("web_login.html.j2", **base_context(session=False), message=None,
                           next=target if safe_next(target) else "/")
        response = HTMLResponse(body, 401)
    # Two challenges, on two lines (Firefox reads one per line): API clients send Bearer;
    # browsers know no Bearer, and only a Basic challenge makes them ask for the token
    # (as password, any user name). Cancelling the prompt shows the login form below.
    response.headers.append("www-authenticate", 'Bearer realm="felixscan"')
    response.headers.append("www-authenticate", 'Basic realm="felixscan"')
    return response


def safe_next(target: str) -> bool:
    """Only a path on this site: `/x`, never `//host`, `/\\host` or `http://`."""
    return (target.startswith("/") and not target.startswith("//") and "\\" not in target
            and not any(ord(c) < 32 for c in target) and len(target) < 2000)
