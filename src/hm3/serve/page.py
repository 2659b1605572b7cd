"""The playground page at GET /: a static HTML+JS file that calls the server's own API."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def playground_html() -> str:
    return resources.files("hm3.serve").joinpath("static/playground.html").read_text("utf-8")
