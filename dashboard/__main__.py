"""python -m dashboard --logdir OUTPUT_ROOT [--host 127.0.0.1] [--port 5000]

Flask's own threaded server: fine for one person on one machine. For several viewers
or a shared node use ./start_dashboard.sh, which runs gunicorn.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from werkzeug.serving import WSGIRequestHandler

from .auth import is_loopback, redact_token

TOKEN_PLACEHOLDER = "<DASHBOARD_TOKEN>"


class RedactingRequestHandler(WSGIRequestHandler):
    """Werkzeug's log lines (access lines and errors such as a bad request line), with any
    ?token= value replaced by ***."""

    def log(self, type: str, message: str, *args) -> None:
        super().log(type, "%s", redact_token(message % args if args else message))


def lan_address() -> str | None:
    """The address other machines reach this one at (no packet is sent: UDP connect only routes)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return None


def check_bind(host: str, insecure: bool, token: str) -> None:
    if is_loopback(host) or token or insecure:
        return
    sys.exit(f"refusing to bind {host}: anyone on the network could read your runs. "
             "Set DASHBOARD_TOKEN (the page and API then need ?token=... or a Bearer header), "
             "or pass --insecure to bind without one.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dashboard", description="Live training dashboard.")
    parser.add_argument("--logdir", default=os.environ.get("DASHBOARD_LOGDIR", "outputs"),
                        help="directory whose subdirectories are run directories (default: outputs)")
    parser.add_argument("--host", default=os.environ.get("DASHBOARD_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DASHBOARD_PORT", "5000")))
    parser.add_argument("--insecure", action="store_true", default=os.environ.get("DASHBOARD_INSECURE") == "1",
                        help="allow a non-loopback --host without DASHBOARD_TOKEN")
    parser.add_argument("--stall-seconds", type=float, default=None,
                        help="show a running run as stalled after this many seconds without log writes")
    args = parser.parse_args(argv)

    token = os.environ.get("DASHBOARD_TOKEN", "")
    check_bind(args.host, args.insecure, token)
    if not os.path.isdir(args.logdir):
        print(f"note: {args.logdir} does not exist yet; runs appear when it does", file=sys.stderr)

    from . import create_app
    app = create_app(args.logdir, stall_seconds=args.stall_seconds, host=args.host)
    # the token is never printed: banners end up in terminals, tmux scrollback and job logs
    suffix = f"/?token={TOKEN_PLACEHOLDER}" if token else "/"
    print(f"dashboard for {os.path.abspath(args.logdir)}", flush=True)
    print(f"  local: http://127.0.0.1:{args.port}{suffix}" if args.host in ("0.0.0.0", "::") or is_loopback(args.host)
          else f"  local: http://{args.host}:{args.port}{suffix}", flush=True)
    if not is_loopback(args.host):
        lan = lan_address() if args.host in ("0.0.0.0", "::") else args.host
        if lan:
            print(f"  LAN:   http://{lan}:{args.port}{suffix}", flush=True)
    if token:
        print(f"  (open it once with your token in place of {TOKEN_PLACEHOLDER}; the page keeps it in a cookie)",
              flush=True)
    # never debug=True: Werkzeug's debugger runs code for whoever reaches the port
    app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False,
            request_handler=RedactingRequestHandler)


if __name__ == "__main__":
    main()
