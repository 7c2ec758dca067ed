"""What a reader sees of a Markdown body that dashboard/safe.py escaped: tests compare that, not the source.

safe.md backslash-escapes every ASCII punctuation character of a file's text and safe.code fences a
path as an inline code span; the browser shows neither the backslashes nor the fences.
"""
from __future__ import annotations

import re

_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_CODE_SPAN = re.compile(r"(`+) (.*?) \1")


def displayed(body) -> str:
    """`body` as displayed: code spans unfenced, escaped characters as themselves."""
    return _ESCAPE.sub(r"\1", _CODE_SPAN.sub(r"\2", str(body)))
