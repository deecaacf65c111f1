"""Token check: with DASHBOARD_TOKEN set, the page, /api/* and /metrics need it.

The token may come as ``Authorization: Bearer <token>``, an ``X-Dashboard-Token``
header, a ``?token=`` query parameter, or the cookie the page sets when it is first
opened with ``?token=`` (so the browser's own requests and EventSource carry it).
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import current_app, jsonify, request

COOKIE = "dashboard_token"
OPEN_PATHS = {"/health"}   # liveness probes; says nothing about the runs


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


def remember_token(response):
    """after_request hook: a page opened with a valid ?token= sets the cookie."""
    expected = current_app.config["DASHBOARD"].token
    if expected and request.args.get("token") and response.status_code < 400 and request.path == "/":
        response.set_cookie(COOKIE, expected, httponly=True, samesite="Strict")
    return response
