"""Text from run files (names, config values, file names) written into other formats, so
that it stays text there: visible escapes for invisible characters in the report page,
no formulas in CSV cells, no table breaks or markup in Markdown cells.

(Figures draw text without mathtext: :data:`gradflow.plots.style.RC`. The report's
plots escape plotly's markup in ``report.js``.)
"""

from __future__ import annotations

import unicodedata
from typing import Any

# Control, format (bidi overrides and isolates, zero-width), surrogate, private-use,
# unassigned code points and line/paragraph separators: shown as escapes, never used.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# A spreadsheet reads a cell starting with one of these as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_MARKDOWN = str.maketrans({"\\": "\\\\", "|": "\\|", "&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with every invisible or reordering character (terminal escapes, bidi
    overrides such as U+202E, zero-width characters; not newlines) written as its escape
    (``\\x1b``, ``\\u202e``), so that a page shows what the text is."""
    if text.isprintable():
        return text
    return "".join(
        _escape(ch) if ch != "\n" and unicodedata.category(ch) in _HIDDEN else ch for ch in text
    )


def visible_all(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with :func:`visible` applied to
    every string in it, keys included."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {visible_all(k): visible_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [visible_all(v) for v in value]
    return value


def csv_cell(text: str) -> str:
    """``text`` for a CSV cell: prefixed with ``'`` where a spreadsheet would take it for
    a formula (``=``, ``+``, ``-``, ``@``, tab, carriage return first)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def markdown_cell(text: str) -> str:
    """``text`` for a Markdown table cell: ``|`` and ``\\`` escaped, HTML's ``< > &`` as
    entities (they show as themselves, never as markup)."""
    return text.translate(_MARKDOWN)
