"""Text from a file inside Markdown that ThoughtSweep writes (the report, `status --markdown`, the dashboard)
and on a terminal (`status`).

A run's name, model, dataset, status, error, config values and variant names came from a database
file somebody else may have written; in a Markdown document a `![x](http://host/?d=...)` among them
makes every viewer that renders it fetch that address. `text` escapes every ASCII punctuation
character (CommonMark 2.4: an escaped one is a literal character, so no image, link, emphasis, HTML,
table cell break, LaTeX or Streamlit directive is left to parse) and joins lines; `code` fences a
value (a file path) as an inline code span, which is literal, one backtick longer than any inside.
Both, and `printable` for plain terminal output, show control characters as `\\xNN`: an escape
sequence in a run's name must not retitle, recolour or rewrite the terminal that prints it.
"""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_BACKTICKS = re.compile(r"`+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but tab, newline) and C1, DEL


def printable(value) -> str:
    """`value` for a terminal: control characters as visible `\\xNN` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def text(value) -> str:
    """`value` as a literal inside a Markdown body: every ASCII punctuation escaped, lines joined."""
    return _PUNCTUATION.sub(r"\\\1", " ".join(printable(value).splitlines()))


def code(value) -> str:
    """`value` as an inline code span, which the value cannot close."""
    value = " ".join(printable(value).splitlines())
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(value)), default=0) + 1)
    return f"{fence} {value} {fence}"
