"""The few HTML pieces the web monitors (a node's ``/ui``, an app's ``/ui``) share: a page, a
table, escaping. Server-rendered; the small script on each page refreshes its ``<main>`` every
few seconds by fetching the page again, so the pages work without it too. No build step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Final

__all__ = ["REFRESH_SCRIPT", "page", "table"]

_STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00}.ok{color:#070}.muted{color:#777}
"""
REFRESH_SCRIPT: Final = """
async function refresh() {
  try {
    const r = await fetch(location.pathname, {headers: {"Accept": "text/html"}});
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    const fresh = doc.querySelector("main");
    if (fresh) document.querySelector("main").replaceWith(fresh);
  } catch (e) { /* the server is away: try again later */ }
}
setInterval(refresh, 5000);
"""


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, css_id: str = "",
          empty: str = "none") -> str:
    """An HTML table; numbers are right-aligned; ``empty`` is shown when there is no row."""
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{escape(str(c))}</td>' if isinstance(c, int | float)
            else f"<td>{escape(str(c))}</td>" for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return f'<p class="muted" id="{escape(css_id)}">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    ident = f' id="{escape(css_id)}"' if css_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, main: str, *, extra_script: str = "", before_main: str = "") -> bytes:
    """A whole page: ``before_main`` (not refreshed: a form) then ``main`` (refreshed)."""
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{before_main}<main>{main}</main>"
        f"<script>{REFRESH_SCRIPT}{extra_script}</script></body></html>"
    ).encode()
