"""The one way the dashboard shows text that came from a file: as the characters it is, never as markup.

Questions, gold answers, run names, notes, tags, model and dataset names, problem ids, phases,
statuses, stored error messages, an uploaded file's field names: all of it is read from a database
or dataset file somebody else may have written. Streamlit renders Markdown (images included, so a
`![x](http://host/?d=...)` makes the browser fetch that address) in st.markdown, st.caption, the
alerts, st.subheader, metric labels and values, widget labels and help, radio and segmented-control
options; Plotly renders an HTML subset (links) in legends, ticks and hover text. So such text goes
through here: `md` inside any Markdown body, `code` as an inline code span (both db/markdown.py,
which the Markdown report uses too), `text` as a block of its own (st.text: no Markdown at all),
`html` for Plotly. Plain-text renderers (st.text, st.code, st.dataframe cells and headers,
selectbox and multiselect options, input placeholders) need nothing.
"""
from __future__ import annotations

import html as _html

import streamlit as st

from db import markdown

md = markdown.text  # inside any Markdown body: every ASCII punctuation escaped, lines joined
code = markdown.code  # a file path as an inline code span, which the value cannot close


def html(value) -> str:
    """`value` as Plotly shows it (legend, tick and hover text): its tags escaped, never markup."""
    return _html.escape(str(value), quote=False)


def text(value) -> None:
    """A block of file text on its own line, with no Markdown at all (a question, a run's name)."""
    st.text(str(value))
