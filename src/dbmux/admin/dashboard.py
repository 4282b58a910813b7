"""The live dashboard's page: one self-contained HTML file (dashboard.html, HTML, CSS and
vanilla JavaScript, nothing fetched from elsewhere) shipped in this package.

It is served with a Content-Security-Policy that allows exactly its own inline script and
style (by their SHA-256) and requests to this listener only: a proxy or target name, or a
database's error text shown on the page, cannot run as script, and the page cannot reach
the internet even if it tried.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class Page:
    body: bytes
    headers: tuple[tuple[str, str], ...]


def _source_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def content_security_policy(html: str) -> str:
    """Only the page's own inline <script> and <style> blocks run; fetches stay on this
    listener; it cannot be framed (clickjacking) nor submit forms anywhere."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, source in _INLINE.findall(html):
        hashes[tag].append(_source_hash(source))
    allowed = {tag: " ".join(found) or "'none'" for tag, found in hashes.items()}
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {allowed['script']}",
            f"style-src {allowed['style']}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@cache
def dashboard_page() -> Page:
    html = files("dbmux.admin").joinpath("dashboard.html").read_text(encoding="utf-8")
    headers = (
        ("Content-Security-Policy", content_security_policy(html)),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    )
    return Page(html.encode(), headers)
