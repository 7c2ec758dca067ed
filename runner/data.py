"""Datasets: reading problems from every source ThoughtSweep accepts, their gold answers and
difficulty (DESIGN.md section 4), dataset validation (section 6) and stratified sampling.

Sources: "builtin" (runner/toy/builtin.jsonl), the Hugging Face sets CODI's test.py evaluates
("gsm8k", "gsm-hard", "svamp", "multi-arith": runner/hub.py, with test.py's names, splits and fields) or a
path: .jsonl (GSM8K as OpenAI ships it), .json (the old script's list of problems), .csv,
.parquet. A file in the shape of one of the hub sets (its question and answer fields) reads as
that set does. Each reader turns its format into numbered records (plain dicts); every record then
goes through the same `_problem` so gold, difficulty and id rules are identical everywhere.
`load_problems` stops at the first bad record, `validate_dataset` collects them all.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from runner.answers import canonical, parse_number
from runner.errors import DatasetError  # noqa: F401  (raised here; listed in runner/errors.py)
from runner.hub import HUB, load_hub

MAX_FIELD_CHARS = 20_000  # GSM8K's longest question is 848 characters; far beyond is a broken record
DIFFICULTY_BUCKETS = ("1-2", "3-4", "5+", "unknown")
UNKNOWN_DIFFICULTY = -1  # no solution and no step count: nothing to derive a difficulty from
# The (question, answer) fields a file may use when it has no "question" + "answer": the hub sets' shapes.
SHAPES = tuple(dict.fromkeys((q, a) for *_, q, a in HUB.values()))
SOURCES_HELP = (f"builtin, {', '.join(HUB)}, or a path to a .jsonl (GSM8K), .json (old script), .csv or "
                f".parquet file")
_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class Problem:
    problem_id: str  # stable across runs, e.g. "gsm8k-test-0017"
    question: str
    gold: str  # canonical text of the gold number: "18", "2.5", "-3", "1000"
    difficulty: int  # reasoning steps, >= 1; UNKNOWN_DIFFICULTY (-1) where none can be derived
    solution: str = ""  # GSM8K-format worked solution when the source has one


class _RecordError(Exception):
    """Why one record is unusable; the caller adds the file and the record number."""


@dataclass(frozen=True)
class _Record:
    number: int  # 1-based line (JSONL, CSV), row (Parquet, Hugging Face) or item (JSON list)
    default_id: str  # the problem_id when the record names none
    fields: dict | None  # None when the record could not even be read...
    error: str = ""  # ...and this says why


@dataclass(frozen=True)
class _Source:
    name: str  # how messages name it: the path as given, or the Hub dataset
    unit: str  # "line" | "row" | "item"
    records: list[_Record]
    fields: tuple[str, str] | None = None  # (question, answer) fields of its shape; None: as asked


def _fields_for(columns, question_field: str, answer_field: str) -> tuple[str, str]:
    """The fields to read: as asked, unless those are the defaults and a hub set's shape fits instead."""
    columns = set(columns)
    if (question_field, answer_field) != ("question", "answer") or {"question", "answer"} <= columns:
        return question_field, answer_field
    return next((shape for shape in SHAPES if set(shape) <= columns), (question_field, answer_field))


@dataclass(frozen=True)
class DatasetReport:
    n_problems: int  # usable problems
    difficulty: dict[int, int]  # steps -> count, over the usable problems
    rejected: list[dict]  # [{"line": L, "reason": "..."}], in file order

    def to_json(self) -> dict:
        """The `validate-data --json` object of DESIGN.md section 6."""
        return {"n_problems": self.n_problems,
                "difficulty": {str(steps): n for steps, n in sorted(self.difficulty.items())},
                "rejected": [dict(entry) for entry in self.rejected]}


def solution_steps(solution: str) -> int:
    """Reasoning steps of a GSM8K-format solution: its `<<…>>` annotations, else its lines before `####`."""
    annotations = len(_ANNOTATION_RE.findall(solution))
    if annotations:
        return annotations
    work = solution.split("####")[0]
    # A solution that is only "#### 18" (or none at all) still took at least one step.
    return max(1, sum(1 for line in work.splitlines() if line.strip()))


def difficulty_bucket(steps: int) -> str:
    """The display bucket of a step count: "1-2", "3-4", "5+", or "unknown" for UNKNOWN_DIFFICULTY."""
    if steps == UNKNOWN_DIFFICULTY:
        return "unknown"
    if steps < 1:
        raise ValueError(f"difficulty is a number of reasoning steps >= 1, got {steps}")
    return "1-2" if steps <= 2 else "3-4" if steps <= 4 else "5+"


# ---- one record -> one Problem -------------------------------------------------------------

def _text_field(fields: dict, key: str) -> str:
    value = fields.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        present = ", ".join(sorted(str(k) for k in fields)) or "none"
        raise _RecordError(f"missing or empty field {key!r} (fields present: {present})")
    if not isinstance(value, str):
        raise _RecordError(f"field {key!r} should be text, got {type(value).__name__} {value!r}")
    if len(value) > MAX_FIELD_CHARS:
        raise _RecordError(f"field {key!r} is {len(value):,} characters, over the {MAX_FIELD_CHARS:,} "
                           f"limit (two records run together, or not a question?)")
    return value.strip()


def _gold(fields: dict, key: str) -> tuple[str, str]:
    """(canonical gold, solution) from a number, a number as text, or a solution ending '#### N'."""
    value = fields.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _RecordError(f"gold answer {key!r} is {value!r}, not a number")
        return canonical(float(value)), ""
    answer = _text_field(fields, key)
    if "####" in answer:
        written = answer.rsplit("####", 1)[1].strip()
        number = parse_number(written)
        if number is None:
            raise _RecordError(f"gold answer {written[:40]!r} after '####' is not a number")
        return canonical(number), answer
    number = parse_number(answer)
    if number is None:
        raise _RecordError(f"gold answer {answer[:40]!r} in {key!r} is neither a number nor a "
                           f"solution ending in '#### N'")
    return canonical(number), ""


def _given_steps(fields: dict, key: str) -> int | None:
    """A record's own step count under `key`, or None when it has none."""
    value = fields.get(key)
    if isinstance(value, str):  # CSV cells are text
        if not value.strip():
            return None
        number = parse_number(value)
        if number is None and key == "difficulty":
            return None  # the old script's display labels ("5+step") are buckets, not counts
        value = value if number is None else number
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    whole = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value == int(value) and value >= 1
    if not whole:
        raise _RecordError(f"{key} should be a whole number of steps >= 1, got {value!r}")
    return int(value)


def _problem_id(fields: dict, default: str) -> str:
    for key in ("id", "problem_id", "gsm8k_id"):
        value = fields.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # Parquet/pandas turn an int id column with gaps into floats
        if value is not None and str(value).strip() and value == value:  # value == value: not NaN
            return str(value).strip()
    return default


def _problem(record: _Record, question_field: str, answer_field: str) -> Problem:
    if record.fields is None:
        raise _RecordError(record.error)
    fields = record.fields
    question = _text_field(fields, question_field)
    gold, solution = _gold(fields, answer_field)
    steps = _given_steps(fields, "reasoning_steps") or _given_steps(fields, "difficulty")
    steps = steps or (solution_steps(solution) if solution else UNKNOWN_DIFFICULTY)
    return Problem(_problem_id(fields, record.default_id), question, gold, steps, solution)


def _screen(source: _Source, question_field: str, answer_field: str, duplicate_questions: bool):
    """Yield (record number, Problem or None, reason) for every record, in order."""
    question_field, answer_field = source.fields or (question_field, answer_field)
    first_with_id: dict[str, int] = {}
    first_with_question: dict[str, int] = {}
    for record in source.records:
        try:
            problem = _problem(record, question_field, answer_field)
            if problem.problem_id in first_with_id:
                raise _RecordError(f"duplicate id {problem.problem_id!r} "
                                   f"(first at {source.unit} {first_with_id[problem.problem_id]})")
            if duplicate_questions and problem.question in first_with_question:
                raise _RecordError(f"duplicate question (same text as {source.unit} "
                                   f"{first_with_question[problem.question]})")
        except _RecordError as error:
            yield record.number, None, str(error)
            continue
        first_with_id[problem.problem_id] = record.number
        first_with_question.setdefault(problem.question, record.number)
        yield record.number, problem, ""


# ---- readers: a source -> numbered records -------------------------------------------------

def _utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheets often start CSV files with a BOM
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line}: bytes that are not UTF-8 ({data[error.start:error.start + 1]!r}); "
                           f"re-save the file as UTF-8") from None


def _cut_off(error: json.JSONDecodeError) -> bool:
    """Whether JSON failed because its text stops early (an interrupted download or copy)."""
    return error.msg.startswith("Unterminated string") or error.pos >= len(error.doc.rstrip())


def _jsonl_records(data: bytes, id_prefix: str) -> list[_Record]:
    lines = data.split(b"\n")
    records = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        default_id = f"{id_prefix}-{index:04d}"
        fields, error = None, ""
        try:
            fields = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as bad:
            error = f"bytes that are not UTF-8 ({raw[bad.start:bad.start + 1]!r}); re-save the file as UTF-8"
        except json.JSONDecodeError as bad:
            truncated = index == len(lines) - 1 and _cut_off(bad)  # the last line, with no newline
            error = ("truncated: the file ends in the middle of this record" if truncated
                     else f"malformed JSON ({bad.msg}, column {bad.colno})")
        except RecursionError:  # json's C decoder recurses per nesting level: '[[[[…' exhausts the stack
            error = "malformed JSON (nested too deeply to be a problem record)"
        if fields is not None and not isinstance(fields, dict):
            fields, error = None, f"expected one JSON object per line, got {type(fields).__name__}"
        records.append(_Record(index + 1, default_id, fields, error))
    return records


def _json_records(path: Path, data: bytes) -> list[_Record]:
    text = _utf8(path, data)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as bad:
        why = "truncated: the file ends mid-JSON" if _cut_off(bad) else f"malformed JSON ({bad.msg})"
        raise DatasetError(f"{path}: line {bad.lineno}: {why}") from None
    except RecursionError:
        raise DatasetError(f"{path}: malformed JSON (nested too deeply to be a list of problems)") from None
    if not isinstance(items, list):
        raise DatasetError(f"{path}: expected a JSON list of problems (the old script's format), got a JSON "
                           f"{type(items).__name__}; GSM8K's one-object-per-line files must end in .jsonl")
    return [_Record(i + 1, f"{path.stem}-{i:04d}", item if isinstance(item, dict) else None,
                    "" if isinstance(item, dict) else f"expected a JSON object, got {type(item).__name__}")
            for i, item in enumerate(items)]


def _require_columns(name: str, columns: list[str], question_field: str, answer_field: str) -> None:
    missing = [field for field in (question_field, answer_field) if field not in columns]
    if missing:
        raise DatasetError(f"{name}: no column {' or '.join(map(repr, missing))} (columns: "
                           f"{', '.join(map(str, columns)) or 'none'}); name yours with question_field/answer_field")


def _csv_records(path: Path, data: bytes, question_field: str, answer_field: str) -> list[_Record]:
    reader = csv.DictReader(io.StringIO(_utf8(path, data), newline=""))
    try:
        columns = list(reader.fieldnames or [])
        _require_columns(str(path), columns, *_fields_for(columns, question_field, answer_field))
        # line_num is the file line the row ends on, so the header is line 1 as in an editor.
        return [_Record(reader.line_num, f"{path.stem}-{index:04d}", row) for index, row in enumerate(reader)]
    except csv.Error as error:  # e.g. a field over csv's own 131,072-character limit
        raise DatasetError(f"{path}: line {reader.line_num}: unreadable CSV ({error})") from None


def _parquet_records(path: Path, question_field: str, answer_field: str) -> list[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{path}: not a readable Parquet file ({error})") from None
    _require_columns(str(path), table.column_names, *_fields_for(table.column_names, question_field, answer_field))
    return [_Record(index + 1, f"{path.stem}-{index:04d}", row) for index, row in enumerate(table.to_pylist())]


def _hf_records(dataset, id_prefix: str) -> list[_Record]:
    return [_Record(index + 1, f"{id_prefix}-{index:04d}", dict(row)) for index, row in enumerate(dataset)]


def _read(source: str, question_field: str, answer_field: str) -> _Source:
    if source in HUB:
        dataset = load_hub(source)
        fields = HUB[source][3:] if (question_field, answer_field) == ("question", "answer") \
            else (question_field, answer_field)
        _require_columns(source, dataset.column_names, *fields)
        return _Source(source, "row", _hf_records(dataset, f"{source}-{'-'.join(HUB[source][2])}"), fields)
    if source == "builtin":
        from runner.toy.problems import BUILTIN_PATH, write_builtin

        if not BUILTIN_PATH.exists():
            write_builtin()  # deterministic, so generating it on first use gives everyone the same set
        path = BUILTIN_PATH
    else:
        path = Path(source)
    if not path.is_file():
        raise DatasetError(f"{source}: {'is a directory' if path.is_dir() else 'no such file'}; "
                           f"the dataset is {SOURCES_HELP}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise DatasetError(f"{source}: unknown format {suffix or '(no extension)'!r}; the dataset is {SOURCES_HELP}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{source}: cannot read it ({error.strerror})") from None
    if not data.strip():
        raise DatasetError(f"{source}: the file is empty")
    if suffix == ".jsonl":
        records, unit = _jsonl_records(data, f"gsm8k-{path.stem}"), "line"
    elif suffix == ".json":
        records, unit = _json_records(path, data), "item"
    elif suffix == ".csv":
        records, unit = _csv_records(path, data, question_field, answer_field), "line"
    else:
        records, unit = _parquet_records(path, question_field, answer_field), "row"
    if not records:
        raise DatasetError(f"{source}: no problems in it")
    first = next((r.fields for r in records if r.fields is not None), {})
    return _Source(source, unit, records, _fields_for(first, question_field, answer_field))


# ---- public entry points -------------------------------------------------------------------

def _accept_all(source: _Source, question_field: str, answer_field: str) -> list[Problem]:
    problems = []
    for number, problem, reason in _screen(source, question_field, answer_field, duplicate_questions=False):
        if problem is None:
            raise DatasetError(f"{source.name}: {source.unit} {number}: {reason}")
        problems.append(problem)
    return problems


def load_problems(source: str, *, limit: int | None = None, seed: int | None = None,
                  question_field: str = "question", answer_field: str = "answer") -> list[Problem]:
    """Every problem of `source`, shuffled by `seed` when given, then the first `limit`."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    problems = _accept_all(_read(source, question_field, answer_field), question_field, answer_field)
    if seed is not None:
        random.Random(seed).shuffle(problems)
    return problems if limit is None else problems[:limit]


def from_hf_dataset(dataset, *, split: str = "test", question_field: str = "question",
                    answer_field: str = "answer") -> list[Problem]:
    """Problems of a loaded Hugging Face `datasets.Dataset` in GSM8K's format, ids "gsm8k-{split}-NNNN"."""
    _require_columns("Hugging Face dataset", dataset.column_names, question_field, answer_field)
    source = _Source("Hugging Face dataset", "row", _hf_records(dataset, f"gsm8k-{split}"))
    return _accept_all(source, question_field, answer_field)


def validate_dataset(source: str, *, question_field: str = "question",
                     answer_field: str = "answer") -> DatasetReport:
    """Counts, difficulty histogram and every rejected record (duplicates included) of `source`."""
    read = _read(source, question_field, answer_field)
    steps, rejected = Counter(), []
    for number, problem, reason in _screen(read, question_field, answer_field, duplicate_questions=True):
        if problem is None:
            rejected.append({"line": number, "reason": reason})
        else:
            steps[problem.difficulty] += 1
    return DatasetReport(sum(steps.values()), dict(sorted(steps.items())), rejected)


def stratified_sample(problems: list[Problem], n: int, seed: int,
                      allocation: str = "equal") -> tuple[list[Problem], dict[str, int]]:
    """`n` problems stratified by difficulty bucket, in input order, and the count realised per bucket.

    "equal" asks n / (buckets present) of each; "proportional" follows each bucket's share.
    A stratum smaller than its quota gives all it has and no other stratum makes up the
    difference, so the realised counts say honestly what the sample holds.
    """
    if n < 0:
        raise ValueError(f"sample size must be >= 0, got {n}")
    strata = {bucket: [i for i, p in enumerate(problems) if difficulty_bucket(p.difficulty) == bucket]
              for bucket in DIFFICULTY_BUCKETS}
    present = [bucket for bucket in DIFFICULTY_BUCKETS if strata[bucket]]
    if allocation == "equal":
        quota = {b: n // len(present) + (i < n % len(present)) for i, b in enumerate(present)} if present else {}
    elif allocation == "proportional":
        # Largest remainder: floors first, then one more to the biggest fractional parts.
        n = min(n, len(problems))
        shares = {b: n * len(strata[b]) / len(problems) for b in present}
        quota = {b: math.floor(share) for b, share in shares.items()}
        by_remainder = sorted(present, key=lambda b: quota[b] - shares[b])
        for b in by_remainder[:n - sum(quota.values())]:
            quota[b] += 1
    else:
        raise ValueError(f"allocation is 'equal' or 'proportional', got {allocation!r}")
    realised = {b: min(quota.get(b, 0), len(strata[b])) for b in DIFFICULTY_BUCKETS
                if b != "unknown" or strata[b]}  # "unknown" only where a data set has such problems
    rng = random.Random(seed)
    chosen = sorted(i for b in present for i in rng.sample(strata[b], realised[b]))
    return [problems[i] for i in chosen], realised


def validation_shortfall(problems: list[Problem], n: int, seed: int) -> str | None:
    """Why a validation subset of `n` holds fewer problems than asked, in one line; None when it holds `n`.

    The run still starts (its subset is what the sample realised); the CLI warns on stderr and the
    Run page before Start, with this one text.
    """
    if n <= 0:
        return None
    chosen, realised = stratified_sample(problems, n, seed)
    if len(chosen) >= n:
        return None
    held = f"a validation subset of {n} holds {len(chosen)} problem(s)"
    if len(chosen) == len(problems):
        return f"{held}: every problem of the run, none left for the full phase"
    present = [b for b, count in realised.items() if count]
    share = n // len(present) + (n % len(present) > 0)
    counts = ", ".join(f"{bucket}: {count}" for bucket, count in realised.items() if count)
    return (f"{held} (by solution steps {counts}): each difficulty bucket gives at most an equal share ({share}), "
            f"and some have fewer")
