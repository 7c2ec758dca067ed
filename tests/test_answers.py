"""runner.answers: extraction from real-looking model outputs, number parsing, comparison."""
import math

import pytest

from runner.answers import Answer, canonical, extract_answer, parse_number, same_number

# (model output, expected value, expected text as written, expected extraction)
EXTRACTION_CASES = [
    # CODI's own format, and what a model does around it
    ("The answer is: 18", 18.0, "18", "codi"),
    ("The answer is: 18<|endoftext|>", 18.0, "18", "codi"),
    ("The answer is: -3", -3.0, "-3", "codi"),
    ("The answer is: 2.5", 2.5, "2.5", "codi"),
    ("The answer is: 1,000", 1000.0, "1,000", "codi"),
    ("The answer is: 18.", 18.0, "18", "codi"),
    ("The answer is: $18", 18.0, "$18", "codi"),
    ("The answer is: .5", 0.5, ".5", "codi"),
    ("The answer is: +4", 4.0, "+4", "codi"),
    ("The answer is: 1,450,000.50", 1450000.5, "1,450,000.50", "codi"),
    ("the answer is:7", 7.0, "7", "codi"),
    ("The answer is: 12 The answer is: 13", 12.0, "12", "codi"),  # ran past EOS: the first counts
    ("The answer is: 20\n\nQuestion: Tom has 3 apples.", 20.0, "20", "codi"),
    ("The answer is: 50%", 50.0, "50%", "codi"),
    ("The answer is: -$3", -3.0, "-$3", "codi"),
    ("The answer is: 007", 7.0, "007", "codi"),
    # GSM8K solutions
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18", 18.0, "18", "hash"),
    ("#### 70,000", 70000.0, "70,000", "hash"),
    ("####-10", -10.0, "-10", "hash"),
    ("#### 3\n#### 4", 3.0, "3", "hash"),
    # other explicit statements
    ("So the final answer is 42.", 42.0, "42", "explicit"),
    ("Answer: 6", 6.0, "6", "explicit"),
    ("The answer is $1,234.", 1234.0, "$1,234", "explicit"),
    ("the answer would be 5 apples", 5.0, "5", "explicit"),
    ("answer = 9", 9.0, "9", "explicit"),
    ("Therefore \\boxed{12}", 12.0, "12", "explicit"),
    ("\\boxed{ -0.25 } is what we get, not 3", -0.25, "-0.25", "explicit"),
    # explicit chain-of-thought annotations: the last annotation's result
    ("<<16-3-4=9>> <<9*2=18>>", 18.0, "18", "explicit"),
    ("<<600*30/100=180>><<600*10/100=60>><<180+60=240>><<600-240=360>>", 360.0, "360", "explicit"),
    ("<<2/2=1>>1 bolt, then <<2+1=3>>3 bolts in total", 3.0, "3", "explicit"),
    ("<<5-8=-3>>", -3.0, "-3", "explicit"),
    ("<<80000*1.5=120000>> and then", 120000.0, "120000", "explicit"),
    ("<<0.5*4=2.0>>", 2.0, "2.0", "explicit"),
    ("She makes 9 * 2 = 18", 18.0, "18", "explicit"),
    ("16-3-4 = 9.", 9.0, "9", "explicit"),
    # nothing explicit: the last number, flagged as a guess
    ("She has 3 apples and buys 4 more", 4.0, "4", "fallback"),
    ("16-3", 3.0, "3", "fallback"),  # "-" after a digit is an operator, not a sign
    ("It costs $2.50 each.", 2.5, "$2.50", "fallback"),
    ("He answered 5 questions", 5.0, "5", "fallback"),  # "answer" with no "is"/":" is not a statement
    ("x2 and 1,000 people", 1000.0, "1,000", "fallback"),
    ("12 13 14", 14.0, "14", "fallback"),
    ("The answer is: about 7 or so", 7.0, "7", "fallback"),
    ("<<a*b=c>> gives 11", 11.0, "11", "fallback"),  # an annotation without a number result
    # no number at all
    ("", None, None, "none"),
    ("The answer is:", None, None, "none"),
    ("I don't know.", None, None, "none"),
    ("<<a*b=c>>", None, None, "none"),
    ("#### ", None, None, "none"),
    ("x2y3", None, None, "none"),
]


@pytest.mark.parametrize("output, value, text, extraction", EXTRACTION_CASES)
def test_extract_answer(output, value, text, extraction):
    assert extract_answer(output) == Answer(value, text, extraction)


@pytest.mark.parametrize("text, value", [
    ("18", 18.0), ("1,000", 1000.0), ("$2.50", 2.5), ("-3", -3.0), ("+4", 4.0), (".5", 0.5),
    ("18.", 18.0), (" 70,000 \n", 70000.0), ("50%", 50.0), ("-$3", -3.0), ("$-3", -3.0),
    ("1,450,000", 1450000.0), ("0", 0.0),
    ("", None), ("abc", None), ("1,00", None), ("18 dollars", None), ("1e5", None), ("--3", None),
    ("3/4", None), ("1.2.3", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("value, text", [
    (18.0, "18"), (2.50, "2.5"), (-3.0, "-3"), (1000.0, "1000"), (0.1 + 0.2, "0.3"), (-0.0, "0"),
    (1450000.0, "1450000"), (0.125, "0.125"), (1e20, "100000000000000000000"), (1e-7, "0.0000001"),
])
def test_canonical(value, text):
    assert canonical(value) == text


def test_canonical_round_trips_through_parse_number():
    for value in (18.0, 2.5, -3.0, 0.125, 123456.789, 1e-7):
        assert parse_number(canonical(value)) == value


def test_canonical_rejects_non_finite():
    with pytest.raises(AssertionError, match="nan"):
        canonical(math.nan)


@pytest.mark.parametrize("a, b, same", [
    (18.0, 18.0, True), (18.0, 18.00001, True), (1e9, 1e9 + 1, True), (18.0, 18.01, False),
    (0.0, 0.00005, True), (-3.0, 3.0, False),
    (None, None, False), (None, 0.0, False), (0.0, None, False),
])
def test_same_number(a, b, same):
    assert same_number(a, b) is same


def test_gold_and_prediction_meet_through_the_same_parser():
    gold = parse_number("1,000")  # as GSM8K writes it after ####
    assert same_number(extract_answer("The answer is: 1000").value, gold)
    assert canonical(gold) == "1000"
