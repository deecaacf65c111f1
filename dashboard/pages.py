"""The HTML page. It is a shell: everything on it comes from /api/* and updates live."""

from flask import Blueprint, Response, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return render_template("dashboard.html")


FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#121a29"/>'
           '<polyline points="4,24 11,15 17,19 28,6" fill="none" stroke="#4ea1ff" stroke-width="3.5"/></svg>')


@bp.get("/favicon.ico")
def favicon():
    return Response(FAVICON, mimetype="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
