"""The HTML page. It is a shell: everything on it comes from /api/* and updates live."""

from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return render_template("dashboard.html")
