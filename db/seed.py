"""The seed script's JSON files, exported and imported as-is (DESIGN.md section 7).

The seed (a per-problem loop over prefix zeroing at one layer) wrote three files:
- step_importance_scores.json: a list of per-problem records with `position_results`, position 0
  being the unablated baseline and position p >= 1 the prefix variant k = p (latents 0..p-1 ablated);
- step_importance_summary_stats.json: `seed_summary` of that list;
- step_importance_validation.json: {validation_status, n_samples, results, statistics} for the
  validation subset.

Mapping to the database: position 0 <-> the baseline row, position p <-> variant
`prefix:p/<method>/<site>/<mode>` (an import uses method zero, mode recompute, site 'latent' unless told;
the seed itself zeroed the residual stream at block 8, `resid:8`). Exports write positions 0..T when
the run has prefix k = 1..T (the seed stopped at 5; readers of the old files index positions by key).
The old script numbered its positions its own way (runner.ablation.POSITIONS['old-script']: BOT fed as
its first "latent", the zeroing hook also on the last question token): an imported run is stored with
`positions = 'old-script'`, and figures that overlay it on a sweep of ours say so.
Round trip caveats: problem ids are stored as text, and an expected_answer given as numeric text
("18") is exported as a number (18), the type the seed itself wrote.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from db import files, queries
from db.scope import GROUP, PROBLEMS, Scope, bind
from db.stats import old_script_early_late
from runner.errors import ThoughtSweepError

SCORES = "step_importance_scores.json"
SUMMARY = "step_importance_summary_stats.json"
VALIDATION = "step_importance_validation.json"
ARROW = "\u2192"  # the seed's baseline_to_ablated: "1 → 0"
RECORD_KEYS = ("problem_id", "question", "expected_answer", "baseline_answer", "baseline_correct", "difficulty",
               "position_results")
POSITION_KEYS = ("position", "ablated_answer", "ablated_correct", "importance_score")
# The seed's answer extraction, kept to fill answer_value of imported rows (answer text is what it stored).
ANSWER_PATTERNS = (r"answer is:?\s*(-?\d+(?:\.\d+)?)", r"####\s*(-?\d+(?:\.\d+)?)",
                   r"(?:answer|total|result)(?:\s+is)?\s*[:=]?\s*\$?\s*(-?\d+(?:\.\d+)?)")


class SeedFormatError(ThoughtSweepError, ValueError):
    """A seed file that cannot be imported; the message names the file and what is wrong."""


def seed_summary(scores: list[dict]) -> dict:
    """The summary dict exactly as the seed's `compute_statistics` built it from a scores list.

    Read literally (DESIGN.md section 7): position "0" is the baseline, so its importance is 0, and
    by_difficulty holds the old script's early/late (db.stats.old_script_early_late: positions 0-2,
    the baseline's included, vs 3-5). Positions beyond 5 appear in position_importance only. An empty list (which made the seed
    divide by zero) gives n_problems 0 and nulls.
    """
    if not scores:
        return {"n_problems": 0, "baseline_accuracy": None, "position_importance": {}, "by_difficulty": {}}
    per_position = defaultdict(list)
    for record in scores:
        for result in record["position_results"]:
            per_position[result["position"]].append(result["importance_score"])
    by_difficulty = defaultdict(list)
    for record in scores:
        by_difficulty[record["difficulty"]].append(record)
    difficulty_stats = {}
    for difficulty, records in by_difficulty.items():
        positions = defaultdict(list)
        for record in records:
            for result in record["position_results"]:
                positions[result["position"]].append(result["importance_score"])
        difficulty_stats[str(difficulty)] = {
            "n_problems": len(records),
            "baseline_accuracy": float(sum(r["baseline_correct"] for r in records) / len(records)),
            **old_script_early_late({p: float(np.mean(v)) for p, v in positions.items()})}
    return {"n_problems": len(scores),
            "baseline_accuracy": float(sum(r["baseline_correct"] for r in scores) / len(scores)),
            "position_importance": {str(p): float(np.mean(v)) for p, v in per_position.items()},
            "by_difficulty": difficulty_stats}


# --- export ----------------------------------------------------------------------------------------
def _expected_answer(gold: str):
    """The seed stored the dataset's answer as a JSON number: give numbers back as int or float."""
    if re.fullmatch(r"-?\d+", gold):
        return int(gold)
    try:
        value = float(gold)
    except ValueError:
        return gold
    return value if math.isfinite(value) else gold


TRANSITIONS = {(b, c): f"{int(b)} {ARROW} {int(c)}" for b in (False, True) for c in (False, True)}


def seed_scores(store, scope: Scope) -> list[dict]:
    """The problems in `scope` as seed records (problem order), for its prefix group (the run's first unless named)."""
    group = queries.first_group(store, scope.group("prefix", scope.method, scope.site, scope.mode)) \
        or scope.group("prefix", "", "", "")  # no prefix group: baselines only
    # Problems (with their baseline row) and prefix rows come apart, column-wise: the question text is
    # fetched once per problem, not once per variant.
    problems_sql = (f"WITH {PROBLEMS} SELECT ord, problem_id, question, gold, baseline_answer, baseline_correct, "
                    f"difficulty FROM scope ORDER BY ord")
    problems = store.query_columns(problems_sql, bind(problems_sql, group))
    # The old script's position of a prefix row: how many positions it ablated, as the row says.
    variants_sql = (f"WITH {PROBLEMS} SELECT s.ord, len(r.ablated_positions) AS position, r.answer_text, r.correct, "
                    f"r.flip FROM results r JOIN scope s USING (problem_id) WHERE {GROUP} ORDER BY s.ord, position")
    variants = store.query_columns(variants_sql, bind(variants_sql, group))
    records, by_ord, expected = [], {}, functools.lru_cache(maxsize=None)(_expected_answer)
    with _collection_paused():
        for ord_, problem_id, question, gold, answer, correct, difficulty in zip(*problems.values()):
            baseline = {"position": 0, "ablated_answer": answer, "ablated_correct": correct, "importance_score": 0.0,
                        "baseline_to_ablated": TRANSITIONS[correct, correct]}
            by_ord[ord_] = {"problem_id": problem_id, "question": question, "expected_answer": expected(gold),
                            "baseline_answer": answer, "baseline_correct": correct, "difficulty": difficulty,
                            "position_results": [baseline]}
            records.append(by_ord[ord_])
        for ord_, position, answer, correct, flip in zip(*variants.values()):
            record = by_ord[ord_]
            record["position_results"].append({
                "position": position, "ablated_answer": answer, "ablated_correct": correct,
                "importance_score": 1.0 if flip else 0.0,
                "baseline_to_ablated": TRANSITIONS[record["baseline_correct"], correct]})
    return records


@contextlib.contextmanager
def _collection_paused():
    """No cyclic GC while ~100k dicts are built: each collection would walk every object the process holds."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def seed_documents(store, scope: Scope, names=(SCORES, SUMMARY, VALIDATION)) -> dict:
    """The seed's files named in `names` as JSON documents, keyed by file name, for the problems in `scope`.

    Only what the named files need is read: the dashboard builds one file per download click.
    """
    documents = {}
    if SCORES in names or SUMMARY in names:
        scores = seed_scores(store, scope)
        documents |= {SCORES: scores, SUMMARY: seed_summary(scores)}
    if VALIDATION in names:
        validation = seed_scores(store, scope.replace(phase="validation"))
        documents[VALIDATION] = {"validation_status": "COMPLETE", "n_samples": len(validation), "results": validation,
                                 "statistics": seed_summary(validation)}
    return {name: documents[name] for name in names}


def export_seed(store, run_id: int, out_dir, method=None, site=None, mode=None) -> list[Path]:
    """Write the seed's three files for a run into out_dir (created if missing); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    documents = seed_documents(store, Scope(run_id, scheme="prefix", method=method, site=site, mode=mode))
    paths = []
    for name, document in documents.items():
        # ASCII escapes (\u2192) as the seed's json.dump wrote; whole or not at all (db/files.py)
        paths.append(files.write_text(out / name, json.dumps(document, indent=2)))
    return paths


# --- import ----------------------------------------------------------------------------------------
def _answer_value(text) -> tuple[float | None, str]:
    if not isinstance(text, str):
        return None, "none"
    for i, pattern in enumerate(ANSWER_PATTERNS):
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            return float(match.group(1)), "codi" if i == 0 else "explicit"
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return (float(numbers[-1]), "fallback") if numbers else (None, "none")


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _check_record(path: Path, index: int, record) -> None:
    """Raise SeedFormatError naming the file, the record and the field that is wrong."""
    where = f"{path}: problem #{index}"
    if not isinstance(record, dict):
        raise SeedFormatError(f"{where}: expected an object, got {type(record).__name__}")
    where += f" ({record.get('problem_id')!r})"
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise SeedFormatError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(record["problem_id"], (str, int)) or isinstance(record["problem_id"], bool):
        raise SeedFormatError(f"{where}: problem_id must be text")
    if not isinstance(record["question"], str):
        raise SeedFormatError(f"{where}: question must be text")
    answer = record["expected_answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise SeedFormatError(f"{where}: expected_answer must be a number or text, got {answer!r}")
    if not isinstance(record["difficulty"], int) or isinstance(record["difficulty"], bool):
        raise SeedFormatError(f"{where}: difficulty must be an integer step count, got {record['difficulty']!r}")
    if not isinstance(record["baseline_correct"], bool):
        raise SeedFormatError(f"{where}: baseline_correct must be true or false")
    if record["baseline_answer"] is not None and not isinstance(record["baseline_answer"], str):
        raise SeedFormatError(f"{where}: baseline_answer must be text")
    results = record["position_results"]
    if not isinstance(results, list) or not results:
        raise SeedFormatError(f"{where}: position_results must be a non-empty list")
    seen = set()
    for result in results:
        if not isinstance(result, dict) or any(key not in result for key in POSITION_KEYS):
            raise SeedFormatError(f"{where}: each position result needs {', '.join(POSITION_KEYS)}")
        position = result["position"]
        if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position <= 64 or position in seen:
            raise SeedFormatError(f"{where}: position {position!r} is not a new integer in 0..64")
        seen.add(position)
        if result["importance_score"] not in (0, 1) or not isinstance(result["ablated_correct"], bool):
            raise SeedFormatError(f"{where}, position {position}: importance_score must be 0.0 or 1.0 and "
                                  f"ablated_correct true or false")
        if bool(result["importance_score"]) != (result["ablated_correct"] != record["baseline_correct"]):
            raise SeedFormatError(f"{where}, position {position}: importance_score {result['importance_score']} "
                                  f"disagrees with baseline_correct -> ablated_correct")
    if 0 not in seen:
        raise SeedFormatError(f"{where}: no position 0 (the baseline)")
    zero = next(r for r in results if r["position"] == 0)
    if zero["ablated_answer"] != record["baseline_answer"] or zero["importance_score"] != 0:
        raise SeedFormatError(f"{where}: position 0 must repeat the baseline answer with importance 0")


def _load(path: Path, validation: bool) -> list[dict]:
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise SeedFormatError(f"{path}: cannot read: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SeedFormatError(f"{path}: not JSON: {error}") from None
    except RecursionError:
        raise SeedFormatError(f"{path}: JSON nested too deeply to be a scores file") from None
    if validation:
        if not isinstance(document, dict) or not isinstance(document.get("results"), list):
            raise SeedFormatError(f"{path}: expected a validation object with a 'results' list")
        document = document["results"]
    elif not isinstance(document, list):
        hint = " (a validation file? pass it as the validation file)" if isinstance(document, dict) else ""
        raise SeedFormatError(f"{path}: expected a JSON list of problem records{hint}")
    for index, record in enumerate(document):
        _check_record(path, index, record)
    ids = [str(r["problem_id"]) for r in document]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise SeedFormatError(f"{path}: problem_id {duplicate!r} appears more than once")
    return document


def _rows(record: dict, site: str) -> list[dict]:
    """The baseline row and one prefix row per position p >= 1 of a seed record."""
    from runner.ablation import BASELINE, Variant  # torch: only an import needs it
    baseline_correct = record["baseline_correct"]
    baseline_value, _ = _answer_value(record["baseline_answer"])
    rows = []
    for result in sorted(record["position_results"], key=lambda r: r["position"]):
        p, correct = result["position"], result["ablated_correct"]
        value, extraction = _answer_value(result["ablated_answer"])
        variant = BASELINE if p == 0 else Variant("prefix", p, "zero", site, "recompute")
        changed = (value != baseline_value) if value is not None and baseline_value is not None \
            else result["ablated_answer"] != record["baseline_answer"]
        rows.append({"problem_id": str(record["problem_id"]), "variant": variant.key, "scheme": variant.scheme,
                     "k": variant.k, "method": variant.method, "site": variant.site, "mode": variant.mode,
                     "answer_text": result["ablated_answer"], "answer_value": value, "extraction": extraction,
                     "correct": correct, "changed": bool(changed and p > 0), "flip": correct != baseline_correct,
                     "harm": baseline_correct and not correct, "help": correct and not baseline_correct,
                     "gold_logprob": None, "logprob_drop": None, "lens": None})
    return rows


IMPORTED_MODEL = "not recorded (old script)"  # the old files do not say which checkpoint produced them


def import_seed(store, scores_path, validation_path=None, name: str | None = None, site: str = "latent",
                file_names: tuple[str, str | None] | None = None) -> int:
    """Load the seed's scores file (and validation file: its problems get phase 'validation') into a new run.

    `file_names`: the names the user gave the files (an upload is read from a temporary copy); the
    run is named after the scores file unless `name` is given.
    """
    if not re.fullmatch(r"latent|resid:\d+", site):
        raise SeedFormatError(f"site must be 'latent' or 'resid:L' (the seed zeroed resid:8), got {site!r}")
    scores_path = Path(scores_path)
    records = _load(scores_path, validation=False)
    validation_ids: set[str] = set()
    if validation_path is not None:
        extra = _load(Path(validation_path), validation=True)
        validation_ids = {str(r["problem_id"]) for r in extra}
        known = {str(r["problem_id"]) for r in records}
        records = records + [r for r in extra if str(r["problem_id"]) not in known]  # validation-only problems
    if not records:
        raise SeedFormatError(f"{scores_path}: no problems")
    positions = sorted({r["position"] for rec in records for r in rec["position_results"]})
    problems, results = [], []
    for ord_, record in enumerate(records):
        answer = record["expected_answer"]
        gold = answer if isinstance(answer, str) else str(answer)  # int 18 -> "18", float 18.5 -> "18.5"
        problems.append({"problem_id": str(record["problem_id"]), "ord": ord_, "question": record["question"],
                         "gold": gold, "gold_value": _number(gold),
                         "difficulty": record["difficulty"], "solution": "",
                         "phase": "validation" if str(record["problem_id"]) in validation_ids else "full"})
        results += _rows(record, site)
    scores_name, validation_name = file_names or (str(scores_path), validation_path and str(validation_path))
    config = {"source": "seed import", "scores_file": scores_name, "schemes": ["prefix"], "methods": ["zero"],
              "site": site, "mode": "recompute", "validation_file": validation_name}
    # One transaction: a crash mid-import leaves no run at all, never a 'finished' one without its rows.
    with store.transaction(f"importing {Path(scores_name).name}"):
        run_id = store.create_run(name=name or f"old script: {Path(scores_name).name}", model=IMPORTED_MODEL,
                                  dataset=Path(scores_name).name, config=config, num_latent=max(6, positions[-1]),
                                  n_variants=len(positions), total=len(problems), status="finished",
                                  source="import", positions="old-script", problems=problems)
        store.write_batch(run_id, results, done=len(problems), phase="full", finished=True)
    store.publish_status(run_id)
    return run_id
