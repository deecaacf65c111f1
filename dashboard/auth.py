"""Token check: with DASHBOARD_TOKEN set, the page, /api/* and /metrics need it.

The token may come as ``Authorization: Bearer <token>``, an ``X-Dashboard-Token``
header, a ``?token=`` query parameter, or the cookie the page sets when it is first
opened with ``?token=`` (so the browser's own requests and EventSource carry it). The
page answers that first request with a redirect to the same URL without the token, so
the token never stays in the address bar, the history or a Referer.
"""

from __future__ import annotations

import hmac
import ipaddress
import re

from flask import current_app, jsonify, request

COOKIE = "dashboard_token"
OPEN_PATHS = {"/health"}   # liveness probes; says nothing about the runs
TOKEN_PARAM_RE = re.compile(r"([?&;]token=)[^&;#\s\"]*", re.IGNORECASE)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redact_token(text: str) -> str:
    """'GET /?token=abc&run=x' -> 'GET /?token=***&run=x' (for access logs)."""
    return TOKEN_PARAM_RE.sub(r"\1***", text)


def presented_token() -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return (request.headers.get("X-Dashboard-Token") or request.args.get("token")
            or request.cookies.get(COOKIE) or "")


def check_token():
    """before_request hook: None lets the request through."""
    expected = current_app.config["DASHBOARD"].token
    if not expected or request.path in OPEN_PATHS:
        return None
    if hmac.compare_digest(presented_token().encode(), expected.encode()):
        return None
    response = jsonify(error="unauthorized", message="this dashboard needs its token (DASHBOARD_TOKEN)")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def set_token_cookie(response) -> None:
    """The page's own requests (fetch, EventSource) then carry the token. Lax, not Strict: a link to
    the dashboard opened from another site (chat, mail) must still arrive with it after the redirect."""
    expected = current_app.config["DASHBOARD"].token
    if expected:
        response.set_cookie(COOKIE, expected, httponly=True, samesite="Lax", path="/")
