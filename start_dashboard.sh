#!/usr/bin/env bash
# Start the training dashboard: gunicorn when installed, else Flask's server (with a warning).
#
#   ./start_dashboard.sh [--logdir DIR] [--host 127.0.0.1] [--port 5000] [--insecure]
#
# Binds 127.0.0.1 unless told otherwise. Any other address needs DASHBOARD_TOKEN (the page
# and every /api/* request must then carry it) or --insecure. The token is never printed.
# Environment: DASHBOARD_LOGDIR, DASHBOARD_HOST, DASHBOARD_PORT, DASHBOARD_TOKEN,
# DASHBOARD_ALLOWED_HOSTS, DASHBOARD_THREADS, DASHBOARD_ACCESS_LOG, DASHBOARD_STALL_SECONDS,
# DASHBOARD_POLL_INTERVAL, DASHBOARD_MAX_STREAMS, DASHBOARD_STREAM_SECONDS, DASHBOARD_WEBHOOK_URL,
# DASHBOARD_METRICS_WINDOW, PYTHON (README, "Dashboard").
set -euo pipefail
cd "$(dirname "$0")"

LOGDIR="${DASHBOARD_LOGDIR:-outputs}"
HOST="${DASHBOARD_HOST:-127.0.0.1}"
PORT="${DASHBOARD_PORT:-5000}"
INSECURE="${DASHBOARD_INSECURE:-0}"
THREADS="${DASHBOARD_THREADS:-32}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --logdir) LOGDIR="$2"; shift 2 ;;
    --logdir=*) LOGDIR="${1#*=}"; shift ;;
    --host) HOST="$2"; shift 2 ;;
    --host=*) HOST="${1#*=}"; shift ;;
    --port) PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    --insecure) INSECURE=1; shift ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "start_dashboard.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

is_loopback() {
  case "$1" in
    127.*|localhost|::1|"[::1]") return 0 ;;
    *) return 1 ;;
  esac
}

if ! is_loopback "$HOST" && [[ -z "${DASHBOARD_TOKEN:-}" && "$INSECURE" != "1" ]]; then
  echo "refusing to bind $HOST without DASHBOARD_TOKEN: anyone on the network could read your runs." >&2
  echo "  set DASHBOARD_TOKEN=<secret> (open the page with ?token=<secret>), or pass --insecure" >&2
  exit 2
fi
if ! is_loopback "$HOST" && [[ -z "${DASHBOARD_TOKEN:-}" ]]; then
  echo "WARNING: --insecure: serving $HOST without a token" >&2
fi

# The token itself is never printed: banners end up in terminals, tmux scrollback and job logs.
SUFFIX="/"
[[ -n "${DASHBOARD_TOKEN:-}" ]] && SUFFIX="/?token=<DASHBOARD_TOKEN>"
echo "dashboard for $(cd "$LOGDIR" 2>/dev/null && pwd || echo "$LOGDIR (not created yet)")"
if is_loopback "$HOST" || [[ "$HOST" == "0.0.0.0" || "$HOST" == "::" ]]; then
  echo "  local: http://127.0.0.1:${PORT}${SUFFIX}"
else
  echo "  local: http://${HOST}:${PORT}${SUFFIX}"
fi
if ! is_loopback "$HOST"; then
  LAN="$HOST"
  if [[ "$HOST" == "0.0.0.0" || "$HOST" == "::" ]]; then
    LAN="$("$PYTHON" -c 'from dashboard.__main__ import lan_address; print(lan_address() or "")')"
  fi
  [[ -n "$LAN" ]] && echo "  LAN:   http://${LAN}:${PORT}${SUFFIX}"
fi
if [[ -n "${DASHBOARD_TOKEN:-}" ]]; then
  echo "  (open it once with your token in place of <DASHBOARD_TOKEN>; the page keeps it in a cookie)"
fi

export DASHBOARD_LOGDIR="$LOGDIR"
export DASHBOARD_HOST="$HOST"   # the Host-header allow-list accepts the bound address
# glibc gives each server thread its own malloc arena; two keep the RSS of 32 threads small
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
BIND="${HOST}:${PORT}"
[[ "$HOST" == *:* && "$HOST" != \[* ]] && BIND="[${HOST}]:${PORT}"   # IPv6 literal
ACCESS_LOG=()
if [[ "${DASHBOARD_ACCESS_LOG:-0}" == "1" ]]; then
  # %(U)s is the path without the query string, so a ?token= never reaches the log
  ACCESS_LOG=(--access-logfile - --access-logformat '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms')
fi
if "$PYTHON" -c 'import gunicorn' 2>/dev/null; then
  # one worker: the log index lives in its memory; threads serve concurrent viewers
  exec "$PYTHON" -m gunicorn --workers 1 --worker-class gthread --threads "$THREADS" \
       --bind "$BIND" --timeout 120 --graceful-timeout 5 --log-level warning ${ACCESS_LOG[@]+"${ACCESS_LOG[@]}"} \
       'dashboard:create_app()'
fi
echo "WARNING: gunicorn is not installed; using Flask's development server (pip install gunicorn)" >&2
ARGS=(--logdir "$LOGDIR" --host "$HOST" --port "$PORT")
[[ "$INSECURE" == "1" ]] && ARGS+=(--insecure)
exec "$PYTHON" -m dashboard "${ARGS[@]}"
