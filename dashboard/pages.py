"""The HTML page. It is a shell: everything on it comes from /api/* and updates live."""

from urllib.parse import urlencode

from flask import Blueprint, Response, redirect, render_template, request

from . import plots
from .auth import set_token_cookie

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    if "token" in request.args:
        # the token already passed check_token: keep it in a cookie, and answer with the URL
        # without it, before the page makes any request that could carry it in a Referer
        rest = [(k, v) for k, values in request.args.lists() if k != "token" for v in values]
        response = redirect(f"{request.script_root}/" + (f"?{urlencode(rest)}" if rest else ""), code=303)
        set_token_cookie(response)
        return response
    # the task metrics the page draws come from plots.METRIC_COLUMNS, the list the API and the PNGs use
    return render_template("dashboard.html", metric_columns=",".join(plots.METRIC_COLUMNS))


FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#121a29"/>'
           '<polyline points="4,24 11,15 17,19 28,6" fill="none" stroke="#4ea1ff" stroke-width="3.5"/></svg>')


@bp.get("/favicon.ico")
def favicon():
    return Response(FAVICON, mimetype="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
