"""Answer extraction and comparison: from a model's output text to a number, and number to number.

The answer value of a rollout is CODI's official rule (`official_answer`): commas removed, the
last number in the text. The patterns below parse what the output states (`extract_answer`);
the sweep keeps the "The answer is: N" one beside the official value, and imports use the rest.

Extraction tries the patterns a CODI model or a GSM8K solution actually writes, most specific
first, and records which one fired so that a result parsed by guessing can be told apart:

    codi      "The answer is: N"            (what CODI is trained to decode after EOT)
    hash      "#### N"                      (GSM8K's solution format, also the gold answers)
    explicit  "\\boxed{N}", "answer is N", the result of the last "<<a*b=c>>" annotation,
              a trailing "= N"
    fallback  the last number anywhere in the text
    none      no number at all

Gold answers go through the same `parse_number`, and `canonical` gives one text per value, so
"1,000", "$1000" and "1000.0" all compare and store alike.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# One number as people and GSM8K write it: an optional sign and/or "$", either comma-grouped
# thousands ("1,450,000") or plain digits, an optional decimal part, ".5" without a leading 0,
# an optional "%". The look-behind stops "x2" or "1.2.3" from yielding a number mid-token, and a
# "-" right after a digit ("16-3") is an operator, so it is not taken as the sign of the "3".
# A sentence-final period ("18.") is not part of the number because a decimal part needs digits.
_NUMBER = (
    r"(?:[-+]\$?|\$[-+]?)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"%?"
)
NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}")
_WHOLE_NUMBER_RE = re.compile(rf"\s*({_NUMBER})\.?\s*")

# Each pattern captures the number that follows its marker; only whitespace, "$" or "**"
# (markdown bold) may sit between the two.
_CODI_RE = re.compile(rf"the answer is:\s*(?:\*\*)?\s*({_NUMBER})", re.IGNORECASE)
_HASH_RE = re.compile(rf"####\s*({_NUMBER})")
_BOXED_RE = re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}")
# "answer" must be followed by a verb or ":"/"=", else "answer 5 questions" would count.
_ANSWER_IS_RE = re.compile(
    rf"\banswer\s*(?:(?:is|was|would be|will be)\s*[:=]?|[:=])\s*(?:\*\*)?\s*({_NUMBER})", re.IGNORECASE)
# GSM8K calculator annotation "<<16-3-4=9>>": its result follows the last "=".
_ANNOTATION_RE = re.compile(rf"<<[^<>]*=\s*({_NUMBER})\s*>>")
_TRAILING_EQUALS_RE = re.compile(rf"=\s*({_NUMBER})\s*\.?\s*$")


@dataclass(frozen=True)
class Answer:
    value: float | None  # the parsed number; None when nothing was found
    text: str | None  # the number as written in the output, e.g. "1,000" or "$18"
    extraction: str  # "codi" | "hash" | "explicit" | "fallback" | "none"


NO_ANSWER = Answer(None, None, "none")


# CODI test.py's number: an optional minus, digits, an optional point and digits (after commas are gone).
_OFFICIAL_NUMBER_RE = re.compile(r"-?\d+\.?\d*")


def official_answer(text: str) -> float | None:
    """CODI's official answer value: commas removed, the last number in `text`; None when there is none
    (test.py scores that as infinity, which matches no gold answer)."""
    numbers = _OFFICIAL_NUMBER_RE.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def parse_number(text: str) -> float | None:
    """The value of one written number ("1,000", "$2.50", "-3", "18.", "50%"), else None."""
    match = _WHOLE_NUMBER_RE.fullmatch(text)
    if match is None:
        return None
    digits = match.group(1).replace("$", "").replace(",", "").replace("%", "")
    return float(digits)


def _answer(match: re.Match, extraction: str) -> Answer:
    text = match.group(1)
    value = parse_number(text)
    assert value is not None, f"pattern for {extraction!r} captured {text!r}, which does not parse"
    return Answer(value, text, extraction)


def extract_answer(text: str) -> Answer:
    """The answer a model's output (or a GSM8K solution) states, and how it was found."""
    # The first "The answer is:" / "####" wins: a model that runs on past EOS tends to invent a
    # next question and answer it too, and that later answer is not the one it gave.
    for pattern, extraction in ((_CODI_RE, "codi"), (_HASH_RE, "hash"), (_BOXED_RE, "explicit"),
                                (_ANSWER_IS_RE, "explicit")):
        match = pattern.search(text)
        if match:
            return _answer(match, extraction)
    # A chain of annotations ends in its answer, so the last one counts, not the first.
    annotations = list(_ANNOTATION_RE.finditer(text))
    if annotations:
        return _answer(annotations[-1], "explicit")
    match = _TRAILING_EQUALS_RE.search(text)
    if match:
        return _answer(match, "explicit")
    numbers = list(NUMBER_RE.finditer(text))
    if numbers:
        last = numbers[-1]
        return Answer(parse_number(last.group(0)), last.group(0), "fallback")
    return NO_ANSWER


def same_number(a: float | None, b: float | None, rel_tol: float = 1e-6, abs_tol: float = 1e-4) -> bool:
    """Whether two parsed answers are the same number; a missing answer never matches anything."""
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def canonical(value: float) -> str:
    """One text per value, as gold answers are stored: 18.0 -> "18", 2.50 -> "2.5", -0.0 -> "0"."""
    assert math.isfinite(value), f"canonical() needs a finite number, got {value!r}"
    # 15 significant digits drop binary round-off (0.1 + 0.2 -> "0.3") and keep every GSM8K value.
    text = f"{value:.15g}"
    if "e" in text:  # very large or small: write it out, as a person would
        text = f"{value:.15f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.0f}"
    return "0" if text == "-0" else text
