"""A self-contained HTML page, and a screenshot of it in headless Chromium.

What ``segpipe report`` writes as ``reports/index.html`` is assembled here from plain pieces:
:class:`Table` (also rendered as Markdown for ``reports/summary.md``), paragraphs, figures (PNG
bytes, embedded as ``data:`` URIs) and nested JSON (:func:`json_html`). The page loads nothing:
no script, stylesheet, font or image from anywhere else, so it opens offline, attached to a
mail or from a site office without internet, and looks the same there.

:func:`screenshot` renders a page with Debian's ``chromium`` (``--headless --screenshot``): the
browser test of the report and the screenshot in docs/ use it.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.errors import UserError

CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_CHROMIUM = "apt-get install -y chromium"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; color: #1b1f24; background: #fff; }
header { background: #1f4e79; color: #fff; margin: 0 -24px 16px; padding: 18px 24px; }
header h1 { margin: 0; font-size: 28px; }
header p { margin: 6px 0 0; color: #d6e4f0; font-size: 14px; }
h2 { border-bottom: 2px solid #d0d7de; padding-bottom: 4px; margin-top: 32px; }
h3 { margin-bottom: 6px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #e6f4ea; }
.outcome { background: #f6f8fa; border-left: 4px solid #1f4e79; padding: 8px 16px; white-space: pre-wrap;
           font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
.pass { color: #1a7f37; font-weight: 600; }
.fail { color: #cf222e; font-weight: 600; }
ul.gates { margin: 0; padding-left: 16px; }
figure { margin: 8px 0 20px; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
img.pixels { image-rendering: pixelated; height: auto; }
figcaption { font-size: 13px; color: #57606a; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.note { color: #57606a; font-size: 13px; }
"""


class PageError(UserError, ValueError):
    """A page cannot be rendered or shot (no browser, a browser that failed); the message says why."""


@dataclass(frozen=True)
class Table:
    """A table of text cells: ``head`` and ``rows`` (each as long as ``head``). ``numeric`` names
    the columns aligned right; ``highlight`` the row indices marked (e.g. the champion's)."""

    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: frozenset[int] = field(default_factory=frozenset)
    highlight: frozenset[int] = field(default_factory=frozenset)

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "/").replace("\n", " ")

        lines = ["| " + " | ".join(map(cell, self.head)) + " |", "|" + "---|" * len(self.head)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self, cell: Callable[[int, str], str] | None = None) -> str:
        """The table as HTML; ``cell(column, text)``, when given, makes the inner HTML of each cell
        (default: the text, escaped)."""
        inner = cell or (lambda _j, text: html.escape(text))
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.head)
        body = []
        for i, row in enumerate(self.rows):
            cells = "".join(f'<td class="num">{inner(j, c)}</td>' if j in self.numeric else f"<td>{inner(j, c)}</td>"
                            for j, c in enumerate(row))
            body.append(f'<tr class="best">{cells}</tr>' if i in self.highlight else f"<tr>{cells}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_img(data: bytes, alt: str) -> str:
    """An ``<img>`` holding the PNG ``data`` itself (a ``data:`` URI)."""
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(alt)}">'


def figure(data: bytes, caption: str) -> str:
    return f"<figure>{png_img(data, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def paragraph(text: str, cls: str | None = None) -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>' if cls else f"<p>{html.escape(text)}</p>"


def json_html(value: Any, depth: int = 0) -> str:
    """Nested JSON as nested tables: an object as key | value rows, a list of objects as one row
    each (the union of their keys as columns), other lists as comma-separated text."""
    if isinstance(value, Mapping) and depth < 6:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{json_html(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f"<table><tbody>{rows}</tbody></table>"
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value) and depth < 6:
        keys = list(dict.fromkeys(k for v in value for k in v))
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{json_html(v.get(k, ''), depth + 1)}</td>" for k in keys) + "</tr>"
                       for v in value)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(value, list):
        return html.escape(", ".join(_scalar(v) for v in value))
    return html.escape(_scalar(value))


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


@dataclass(frozen=True)
class Section:
    """A titled part of the page; ``body`` is HTML made by this module's functions."""

    id: str
    title: str
    body: str


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole page: a header with ``title`` (also the document title), then ``sections``."""
    parts = [f'<section id="{html.escape(s.id)}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) on PATH, or None."""
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page_path: Path | str, png: Path | str, width: int = 1280, height: int = 2400,
               timeout_s: float = 120.0, browser: str | None = None, stable: bool = False) -> Path:
    """Render the page at ``page_path`` in headless Chromium, ``width`` x ``height`` CSS pixels,
    into ``png``; PageError naming the browser's complaint when it fails, or how to install one.

    Headless Chromium now and then shoots before the last tiles of a long page are painted (a
    band at the bottom stays white); ``stable`` shoots again until two shots agree (at most four),
    for a picture that is kept (docs/)."""
    if not stable:
        return _shoot(page_path, png, width, height, timeout_s, browser)
    previous = None
    for _ in range(4):
        current = _shoot(page_path, png, width, height, timeout_s, browser).read_bytes()
        if current == previous:
            break
        previous = current
    return Path(png).resolve()


def _shoot(page_path: Path | str, png: Path | str, width: int, height: int, timeout_s: float,
           browser: str | None) -> Path:
    browser = browser or find_chromium()
    if browser is None:
        raise PageError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM)}); install it: {INSTALL_CHROMIUM}")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segpipe-chromium-") as profile:
        cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
               # shoot once everything is laid out, decoded and painted (not at the load event)
               "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
               f"--window-size={width},{height}", f"--screenshot={png}", Path(page_path).resolve().as_uri()]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PageError(f"{browser}: no screenshot of {page_path} within {timeout_s:g} s") from None
    if done.returncode != 0 or not png.is_file():
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise PageError(f"{browser} could not shoot {page_path} (exit {done.returncode}): {last}")
    return png


__all__ = ["CHROMIUM", "INSTALL_CHROMIUM", "PageError", "Section", "Table", "figure", "find_chromium",
           "json_html", "page", "paragraph", "png_img", "screenshot"]
