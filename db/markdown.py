"""Text from a file inside Markdown that ThoughtSweep writes: the report, `status --markdown`, the dashboard.

A run's name, model, dataset, status, error, config values and variant names came from a database
file somebody else may have written; in a Markdown document a `![x](http://host/?d=...)` among them
makes every viewer that renders it fetch that address. `text` escapes every ASCII punctuation
character (CommonMark 2.4: an escaped one is a literal character, so no image, link, emphasis, HTML,
table cell break, LaTeX or Streamlit directive is left to parse) and joins lines; `code` fences a
value (a file path) as an inline code span, which is literal, one backtick longer than any inside.
"""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_BACKTICKS = re.compile(r"`+")


def text(value) -> str:
    """`value` as a literal inside a Markdown body: every ASCII punctuation escaped, lines joined."""
    return _PUNCTUATION.sub(r"\\\1", " ".join(str(value).splitlines()))


def code(value) -> str:
    """`value` as an inline code span, which the value cannot close."""
    value = " ".join(str(value).splitlines())
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(value)), default=0) + 1)
    return f"{fence} {value} {fence}"
