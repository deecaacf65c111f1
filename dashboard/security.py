"""Host-header allow-list (against DNS rebinding) and the security headers of every answer.

DNS rebinding: a page on evil.example re-points its own name at 127.0.0.1 and then reads
the tokenless dashboard as if it were same-origin. Its requests still say
``Host: evil.example``, so only Host names we know are accepted: localhost names, any IP
literal (a rebinding attack needs a name; a page whose origin is the IP itself was served
by this server), the bound address, this machine's hostname when bound to all interfaces,
and DASHBOARD_ALLOWED_HOSTS.
"""

from __future__ import annotations

import ipaddress
import socket

from flask import current_app, jsonify, request

WILDCARD_BINDS = ("0.0.0.0", "::", "")

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "connect-src 'self'", "object-src 'none'", "base-uri 'none'", "form-action 'none'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",   # other sites cannot embed the JSON as no-cors loads
}


def host_name(host_header: str) -> str:
    """'Example.org:5000' -> 'example.org', '[::1]:5000' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(host_header: str, bound: str, allowed: tuple) -> bool:
    name = host_name(host_header)
    if not name or "*" in allowed:
        return True   # no Host header (HTTP/1.0) cannot come from a browser page
    if name == "localhost" or name.endswith(".localhost") or _is_ip(name):
        return True
    if name == host_name(bound):
        return True
    if bound in WILDCARD_BINDS and name == socket.gethostname().lower():
        return True
    return any(name == entry or (entry.startswith(".") and (name.endswith(entry) or name == entry[1:]))
               for entry in allowed)


def check_host():
    """before_request hook: None lets the request through."""
    settings = current_app.config["DASHBOARD"]
    host = request.headers.get("Host", "")
    if host_allowed(host, settings.host, settings.allowed_hosts):
        return None
    response = jsonify(error="host_not_allowed",
                       message=f"Host {host_name(host)!r} is not allowed; add it to DASHBOARD_ALLOWED_HOSTS "
                               "(comma-separated) if this dashboard is reached by that name")
    response.status_code = 400
    return response


def add_security_headers(response):
    """after_request hook."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
