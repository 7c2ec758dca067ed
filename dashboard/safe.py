"""The one way the dashboard shows text that came from a file: as the characters it is, never as markup.

Questions, gold answers, run names, notes, tags, model and dataset names, problem ids, phases,
statuses, stored error messages, an uploaded file's field names: all of it is read from a database
or dataset file somebody else may have written. Streamlit renders Markdown (images included, so a
`![x](http://host/?d=...)` makes the browser fetch that address) in st.markdown, st.caption, the
alerts, st.subheader, metric labels and values, widget labels and help, radio and segmented-control
options; Plotly renders an HTML subset (links) in legends, ticks and hover text. So such text goes
through here: `md` inside any Markdown body, `code` as an inline code span, `text` as a block of its
own (st.text: no Markdown at all), `html` for Plotly. Plain-text renderers (st.text, st.code,
st.dataframe cells and headers, selectbox and multiselect options, input placeholders) need nothing.
"""
from __future__ import annotations

import html as _html
import re

import streamlit as st

# CommonMark 2.4: any ASCII punctuation character may be backslash-escaped, and an escaped one is a
# literal character. Escaping all of them leaves no image, link, emphasis, HTML tag, autolink, LaTeX
# ($) or Streamlit directive (:red[...], :material/x:) to parse.
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_BACKTICKS = re.compile(r"`+")


def md(value) -> str:
    """`value` as a literal inside a Markdown body: every ASCII punctuation escaped, lines joined."""
    return _PUNCTUATION.sub(r"\\\1", " ".join(str(value).splitlines()))


def code(value) -> str:
    """`value` as an inline code span (a file path, say): code spans are literal in CommonMark; the fence
    is one backtick longer than any run of backticks inside, so the value cannot close it."""
    value = " ".join(str(value).splitlines())
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(value)), default=0) + 1)
    return f"{fence} {value} {fence}"


def html(value) -> str:
    """`value` as Plotly shows it (legend, tick and hover text): its tags escaped, never markup."""
    return _html.escape(str(value), quote=False)


def text(value) -> None:
    """A block of file text on its own line, with no Markdown at all (a question, a run's name)."""
    st.text(str(value))
