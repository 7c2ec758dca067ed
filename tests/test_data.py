"""runner.data: every dataset source on real files, the difficulty rule, bad input, sampling."""
import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.data import (DatasetError, Problem, difficulty_bucket, from_hf_dataset, load_problems,
                         solution_steps, stratified_sample, validate_dataset,
                         validation_shortfall)

REPO = Path(__file__).parents[1]
GSM8K_TEST = REPO / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
# Measured on OpenAI's GSM8K test split (1,319 problems) with DESIGN.md section 4's rule.
GSM8K_DIFFICULTY = {1: 65, 2: 362, 3: 367, 4: 295, 5: 139, 6: 60, 7: 22, 8: 9}
SOLUTION = "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540"


def gsm8k_test_file() -> Path:
    """The real GSM8K test file; skipped where it is absent, but a failure under CI=true."""
    if not GSM8K_TEST.is_file():
        message = f"GSM8K test file not found at {GSM8K_TEST.resolve()} (the shared data folder)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return GSM8K_TEST


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


# ---- GSM8K -------------------------------------------------------------------------------

def test_gsm8k_test_file_loads_whole():
    problems = load_problems(str(gsm8k_test_file()))
    assert len(problems) == 1319
    assert [p.problem_id for p in problems[:2]] == ["gsm8k-test-0000", "gsm8k-test-0001"]
    assert problems[17].problem_id == "gsm8k-test-0017"
    first = problems[0]
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert (first.gold, first.difficulty) == ("18", 2)
    assert first.solution.endswith("#### 18")
    # Thousands separators and signs in the gold answers are canonicalised.
    assert [problems[i].gold for i in (2, 146, 611, 489, 1113)] == ["70000", "2125", "1450000", "-10", "-3"]
    # Problem 24 has no <<...>> annotation: its three worked lines count.
    assert "<<" not in problems[24].solution and problems[24].difficulty == 3


def test_gsm8k_difficulty_histogram():
    problems = load_problems(str(gsm8k_test_file()))
    assert dict(Counter(p.difficulty for p in problems)) == GSM8K_DIFFICULTY


def test_gsm8k_validates_clean():
    report = validate_dataset(str(gsm8k_test_file()))
    assert report.to_json() == {"n_problems": 1319, "rejected": [],
                                "difficulty": {str(k): v for k, v in GSM8K_DIFFICULTY.items()}}


def test_seed_shuffles_deterministically_then_limit_keeps_the_first():
    path = str(gsm8k_test_file())
    in_order = load_problems(path)
    shuffled = load_problems(path, seed=7)
    assert load_problems(path, seed=7) == shuffled
    assert shuffled != in_order and sorted(shuffled, key=lambda p: p.problem_id) == in_order
    assert load_problems(path, seed=8) != shuffled
    assert load_problems(path, seed=7, limit=5) == shuffled[:5]
    assert load_problems(path, limit=3) == in_order[:3]
    assert load_problems(path, limit=0) == []


def test_hugging_face_path_matches_the_jsonl_path(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = gsm8k_test_file()
    dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path))
    assert from_hf_dataset(dataset) == load_problems(str(path))


def test_hugging_face_dataset_from_local_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"question": ["Q one?", "Q two?"], "answer": [SOLUTION, "1+1=<<1+1=2>>2\n#### 2"]}), path)
    dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert from_hf_dataset(dataset, split="train") == [
        Problem("gsm8k-train-0000", "Q one?", "540", 2, SOLUTION),
        Problem("gsm8k-train-0001", "Q two?", "2", 1, "1+1=<<1+1=2>>2\n#### 2")]
    with pytest.raises(DatasetError, match="no column 'problem'"):
        from_hf_dataset(dataset, question_field="problem")


def test_gsm8k_from_the_hub_offline_says_what_to_do(tmp_path):
    # A fresh process: the offline switches are read when `datasets` is imported.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "from runner.data import load_problems\nload_problems('gsm8k')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("runner.errors.DatasetError: gsm8k: cannot load openai/gsm8k (main, test) from the")
    assert "--dataset ../shared/data/gsm8k/test.jsonl" in last_line


def test_gsm8k_with_the_hub_unreachable_is_one_line(tmp_path):
    """The real offline case (no HF_HUB_OFFLINE): the host does not answer; one line at once, not 5 retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "PROXY" not in k.upper()}
    env |= {"HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # port 9: nothing listens
    done = subprocess.run([sys.executable, "-m", "runner", "sweep", "--dataset", "gsm8k", "--db",
                           str(tmp_path / "x.duckdb"), "--quiet"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: gsm8k: cannot load openai/gsm8k (main, test) from the Hugging Face Hub or "
                                  "its cache (127.0.0.1 is unreachable: Connection refused)"), done.stderr


def test_data_module_does_not_import_torch():
    code = "import sys, runner.data\nassert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---- the other sources ---------------------------------------------------------------------

def test_builtin_set():
    problems = load_problems("builtin")
    assert len(problems) == 1200
    assert Counter(p.difficulty for p in problems) == {steps: 200 for steps in range(1, 7)}
    assert problems[0].problem_id == "builtin-1-000"
    for p in problems:
        assert p.solution.endswith(f"#### {p.gold}") and solution_steps(p.solution) == p.difficulty


def test_jsonl_ids_follow_the_file_stem_and_line(tmp_path):
    rows = [{"question": "A?", "answer": "#### 1"}, {"question": "B?", "answer": "#### 2"}]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]))  # a blank line, no final newline
    assert [p.problem_id for p in load_problems(str(path))] == ["gsm8k-train-0000", "gsm8k-train-0002"]


def test_old_script_json_list(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(json.dumps([
        {"question": "Q1?", "answer": 18, "reasoning_steps": 5, "gsm8k_id": 17, "difficulty": "5+step"},
        {"question": "Q2?", "answer": 2.5, "reasoning_steps": 1, "gsm8k_id": "gsm8k-test-0003"},
        {"question": "Q3?", "answer": "1,000", "reasoning_steps": 3},
        {"question": "Q4?", "answer": SOLUTION, "reasoning_steps": 4},  # its own count beats 2 annotations
    ]))
    assert load_problems(str(path)) == [
        Problem("17", "Q1?", "18", 5), Problem("gsm8k-test-0003", "Q2?", "2.5", 1),
        Problem("problems-0002", "Q3?", "1000", 3), Problem("problems-0003", "Q4?", "540", 4, SOLUTION)]


def test_csv_with_named_columns_steps_and_ids(tmp_path):
    path = write_csv(tmp_path / "mine.csv", ["id", "prompt", "target", "difficulty"],
                     [["a", "Q1?", "18", "3"], ["b", "Q2, with a comma?", "$1,250.50", ""], ["c", "Q3?", SOLUTION, ""]])
    assert load_problems(str(path), question_field="prompt", answer_field="target") == [
        Problem("a", "Q1?", "18", 3), Problem("b", "Q2, with a comma?", "1250.5", -1),
        Problem("c", "Q3?", "540", 2, SOLUTION)]


def test_csv_without_ids_and_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "sheet.csv"
    path.write_bytes("\ufeffquestion,answer,reasoning_steps\nQ1?,4,2\nQ2?,-3,\n".encode())
    assert load_problems(str(path)) == [Problem("sheet-0000", "Q1?", "4", 2), Problem("sheet-0001", "Q2?", "-3", -1)]


def test_parquet_with_ids_steps_and_nulls(tmp_path):
    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"id": [10, 11], "question": ["Q1?", "Q2?"], "answer": [SOLUTION, "7"],
                             "reasoning_steps": [None, 6]}), path)
    assert load_problems(str(path)) == [Problem("10", "Q1?", "540", 2, SOLUTION), Problem("11", "Q2?", "7", 6)]


# ---- the difficulty rule -------------------------------------------------------------------

@pytest.mark.parametrize("solution, steps", [
    (SOLUTION, 2),
    ("<<1+1=2>><<2+2=4>><<4+4=8>>\n#### 8", 3),
    ("First line.\n\nSecond line.\nThird.\n#### 3", 3),  # no annotations: non-empty lines before ####
    ("Only a line\n#### 3\n", 1),
    ("#### 3", 1),
    ("", 1),
])
def test_solution_steps(solution, steps):
    assert solution_steps(solution) == steps


@pytest.mark.parametrize("steps, bucket", [(1, "1-2"), (2, "1-2"), (3, "3-4"), (4, "3-4"), (5, "5+"), (8, "5+")])
def test_difficulty_bucket(steps, bucket):
    assert difficulty_bucket(steps) == bucket


def test_difficulty_bucket_rejects_zero():
    with pytest.raises(ValueError, match="got 0"):
        difficulty_bucket(0)


# ---- bad input: one clear line each ---------------------------------------------------------

def bad_file(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


GOOD = b'{"question": "Q?", "answer": "#### 1"}\n'
BAD_INPUT = [
    ("empty.jsonl", b"", r"empty\.jsonl: the file is empty"),
    ("blank.jsonl", b"\n \n", r"blank\.jsonl: the file is empty"),
    ("broken.jsonl", GOOD + b'{"question": "Q?" "answer": "#### 2"}\n',
     r"broken\.jsonl: line 2: malformed JSON \(Expecting ',' delimiter, column 19\)"),
    ("missing.jsonl", GOOD + GOOD.replace(b'"question"', b'"prompt"'),
     r"missing\.jsonl: line 2: missing or empty field 'question' \(fields present: answer, prompt\)"),
    ("gold.jsonl", b'{"question": "Q?", "answer": "It is <<2+2=4>>4.\\n#### four"}\n',
     r"gold\.jsonl: line 1: gold answer 'four' after '####' is not a number"),
    ("nohash.jsonl", b'{"question": "Q?", "answer": "eighteen"}\n',
     r"nohash\.jsonl: line 1: gold answer 'eighteen' in 'answer' is neither a number nor a solution"),
    ("dup.jsonl", b'{"id": "a", "question": "Q1?", "answer": "1"}\n{"id": "a", "question": "Q2?", "answer": "2"}\n',
     r"dup\.jsonl: line 2: duplicate id 'a' \(first at line 1\)"),
    ("latin1.jsonl", GOOD + '{"question": "Caf\u00e9?", "answer": "#### 1"}\n'.encode("latin-1"),
     r"latin1\.jsonl: line 2: bytes that are not UTF-8 \(b'\\xe9'\); re-save the file as UTF-8"),
    ("cut.jsonl", GOOD + b'{"question": "Q?", "answ',
     r"cut\.jsonl: line 2: truncated: the file ends in the middle of this record"),
    ("array.jsonl", b"[1, 2]\n", r"array\.jsonl: line 1: expected one JSON object per line, got list"),
    ("huge.jsonl", json.dumps({"question": "x" * 20_001, "answer": "#### 1"}).encode(),
     r"huge\.jsonl: line 1: field 'question' is 20,001 characters, over the 20,000 limit"),
    ("steps.jsonl", b'{"question": "Q?", "answer": "#### 1", "reasoning_steps": 0}\n',
     r"steps\.jsonl: line 1: reasoning_steps should be a whole number of steps >= 1, got 0"),
    ("dict.json", b'{"question": "Q?", "answer": 1}',
     r"dict\.json: expected a JSON list of problems \(the old script's format\), got a JSON dict"),
    ("cut.json", b'[{"question": "Q?", "answer": 1},\n {"question": "Q2?", "ans',
     r"cut\.json: line 2: truncated: the file ends mid-JSON"),
    ("nan.json", b'[{"question": "Q?", "answer": NaN}]', r"nan\.json: item 1: gold answer 'answer' is nan, not a number"),
    ("flag.json", b'[{"question": "Q?", "answer": true}]', r"flag\.json: item 1: field 'answer' should be text, got bool"),
    ("columns.csv", b"prompt,target\nQ?,1\n",
     r"columns\.csv: no column 'question' or 'answer' \(columns: prompt, target\); name yours with"),
    ("latin1.csv", "question,answer\nQ?,1\nCaf\u00e9?,2\n".encode("latin-1"),
     r"latin1\.csv: line 3: bytes that are not UTF-8"),
    ("gold.csv", b"question,answer\nQ1?,1\nQ2?,n/a\n",
     r"gold\.csv: line 3: gold answer 'n/a' in 'answer' is neither a number"),
    ("header.csv", b"question,answer\n", r"header\.csv: no problems in it"),
    ("notparquet.parquet", b"question,answer\n", r"notparquet\.parquet: not a readable Parquet file"),
    ("problems.txt", b"Q? 1\n", r"problems\.txt: unknown format '\.txt'; the dataset is builtin, gsm8k, gsm-hard, svamp, multi-arith, or a path"),
]


@pytest.mark.parametrize("name, content, message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_clear_error(tmp_path, name, content, message):
    with pytest.raises(DatasetError, match=message) as raised:
        load_problems(bad_file(tmp_path, name, content))
    assert "\n" not in str(raised.value)


def test_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere\.jsonl: no such file; the dataset is builtin, gsm8k"):
        load_problems(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(DatasetError, match="is a directory"):
        load_problems(str(tmp_path))


# ---- validate_dataset ------------------------------------------------------------------------

def test_validate_collects_every_bad_line_and_duplicates(tmp_path):
    rows = [json.dumps({"question": "Q1?", "answer": SOLUTION}),
            "{not json",
            json.dumps({"question": "Q2?", "answer": "#### 7"}),
            json.dumps({"question": "Q1?", "answer": "#### 540"}),  # same text as line 1
            json.dumps({"question": "Q3?"}),
            json.dumps({"id": "gsm8k-dup-0000", "question": "Q4?", "answer": "#### 1"}),  # line 1's id
            json.dumps({"question": "Q5?", "answer": "#### 3", "reasoning_steps": 5})]
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(rows) + "\n")
    report = validate_dataset(str(path))
    assert report.to_json() == {
        "n_problems": 3,
        "difficulty": {"1": 1, "2": 1, "5": 1},
        "rejected": [
            {"line": 2, "reason": "malformed JSON (Expecting property name enclosed in double quotes, column 2)"},
            {"line": 4, "reason": "duplicate question (same text as line 1)"},
            {"line": 5, "reason": "missing or empty field 'answer' (fields present: question)"},
            {"line": 6, "reason": "duplicate id 'gsm8k-dup-0000' (first at line 1)"},
        ]}
    assert report.difficulty == {1: 1, 2: 1, 5: 1} and report.n_problems == 3
    json.dumps(report.to_json())  # the CLI prints it as is
    with pytest.raises(DatasetError, match=r"dup\.jsonl: line 2: malformed JSON"):
        load_problems(str(path))  # loading stops at the first bad line


def test_validate_still_raises_for_an_unreadable_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        validate_dataset(str(tmp_path / "absent.csv"))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        validate_dataset(bad_file(tmp_path, "x.json", b"{}"))


# ---- stratified sampling ---------------------------------------------------------------------

def problems_with(steps: list[int]) -> list[Problem]:
    return [Problem(f"p{i:03d}", f"Q{i}?", "1", s) for i, s in enumerate(steps)]


def test_equal_allocation_does_not_top_up_a_small_stratum():
    problems = problems_with([1] * 20 + [3] * 20 + [6] * 2)
    sample, counts = stratified_sample(problems, 30, seed=0)
    assert counts == {"1-2": 10, "3-4": 10, "5+": 2}
    assert len(sample) == 22
    assert sample == [p for p in problems if p in sample], "the sample keeps the input order"


def test_equal_allocation_spreads_the_remainder_and_skips_absent_buckets():
    sample, counts = stratified_sample(problems_with([1] * 10 + [5] * 10), 7, seed=0)
    assert counts == {"1-2": 4, "3-4": 0, "5+": 3}


def test_proportional_allocation_follows_bucket_shares():
    problems = problems_with([1] * 50 + [3] * 30 + [7] * 20)
    sample, counts = stratified_sample(problems, 10, seed=3, allocation="proportional")
    assert counts == {"1-2": 5, "3-4": 3, "5+": 2} and len(sample) == 10
    _, counts = stratified_sample(problems, 11, seed=3, allocation="proportional")
    assert counts == {"1-2": 6, "3-4": 3, "5+": 2}  # 5.5, 3.3, 2.2: the largest remainder gets the spare
    _, counts = stratified_sample(problems, 500, seed=3, allocation="proportional")
    assert counts == {"1-2": 50, "3-4": 30, "5+": 20}


def test_stratified_sample_is_deterministic_per_seed():
    problems = load_problems("builtin")
    first, counts = stratified_sample(problems, 60, seed=1)
    assert counts == {"1-2": 20, "3-4": 20, "5+": 20}
    assert stratified_sample(problems, 60, seed=1)[0] == first
    assert stratified_sample(problems, 60, seed=2)[0] != first


def test_a_validation_subset_that_holds_fewer_than_asked_says_why_in_one_line():
    """GSM8K has 230 problems of 5+ steps: an equal share of 1,000 (334 a bucket) realises 897, and the line
    gives the sample's own counts; more than the run's problems makes every problem validation."""
    problems = load_problems(str(gsm8k_test_file()))
    assert validation_shortfall(problems, 600, seed=0) is None and validation_shortfall(problems, 0, seed=0) is None
    chosen, counts = stratified_sample(problems, 1000, seed=0)
    assert (len(chosen), counts) == (897, {"1-2": 334, "3-4": 333, "5+": 230})
    assert validation_shortfall(problems, 1000, seed=0) == (
        "a validation subset of 1000 holds 897 problem(s) (by solution steps 1-2: 334, 3-4: 333, 5+: 230): each "
        "difficulty bucket gives at most an equal share (334), and some have fewer")
    assert validation_shortfall(problems, 2000, seed=0) == \
        "a validation subset of 2000 holds 1319 problem(s): every problem of the run, none left for the full phase"
    assert validation_shortfall(problems[:20], 30, seed=0) == (  # 5 of the first 20 have 1-2 steps, 4 have 5+
        "a validation subset of 30 holds 19 problem(s) (by solution steps 1-2: 5, 3-4: 10, 5+: 4): each "
        "difficulty bucket gives at most an equal share (10), and some have fewer")


def test_stratified_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'equal' or 'proportional'"):
        stratified_sample(problems_with([1]), 1, seed=0, allocation="random")
    with pytest.raises(ValueError, match=">= 0"):
        stratified_sample(problems_with([1]), -1, seed=0)


# ---- the other data sets of CODI's test.py --------------------------------------------------

def test_files_in_the_shapes_of_gsm_hard_svamp_and_multi_arith(tmp_path):
    """Their fields as test.py reads them; difficulty unknown (-1) where no solution gives one."""
    from runner.data import stratified_sample
    hard = tmp_path / "gsm-hard.jsonl"
    hard.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Janet has 1234567 ducks.  Each lays 3 eggs. How many eggs?",
         "response": "1234567*3 = <<1234567*3=3703701>>3703701\n#### 3703701"},
        {"instruction": "A train goes 12.5 km in 0.5 h. How fast?", "response": "25"}]) + "\n")
    svamp = tmp_path / "svamp.parquet"
    pq.write_table(pa.table({"ID": ["chal-1", "chal-2"], "Body": ["Each pack has 5 pens.", "Dan had 8 cards."],
                             "Question": ["How many pens in 3 packs?", "He gave 3 away. How many left?"],
                             "question_concat": ["Each pack has 5 pens. How many pens in 3 packs?",
                                                 "Dan had 8 cards. He gave 3 away. How many left?"],
                             "Equation": ["( 5.0 * 3.0 )", "( 8.0 - 3.0 )"], "Answer": [15.0, 5.0],
                             "Type": ["Multiplication", "Subtraction"]}), svamp)
    arith = write_csv(tmp_path / "multi-arith.csv", ["question", "final_ans"],
                      [["Sam had 9 balloons and bought 1,000 more. How many?", "1009"]])
    assert load_problems(str(hard)) == [
        Problem("gsm8k-gsm-hard-0000", "Janet has 1234567 ducks.  Each lays 3 eggs. How many eggs?", "3703701", 1,
                "1234567*3 = <<1234567*3=3703701>>3703701\n#### 3703701"),
        Problem("gsm8k-gsm-hard-0001", "A train goes 12.5 km in 0.5 h. How fast?", "25", -1)]
    assert load_problems(str(svamp)) == [
        Problem("svamp-0000", "Each pack has 5 pens. How many pens in 3 packs?", "15", -1),
        Problem("svamp-0001", "Dan had 8 cards. He gave 3 away. How many left?", "5", -1)]
    assert load_problems(str(arith)) == [
        Problem("multi-arith-0000", "Sam had 9 balloons and bought 1,000 more. How many?", "1009", -1)]
    assert validate_dataset(str(svamp)).to_json()["difficulty"] == {"-1": 2}
    chosen, realised = stratified_sample(load_problems(str(hard)), 2, seed=0)
    assert len(chosen) == 2 and realised == {"1-2": 1, "3-4": 0, "5+": 0, "unknown": 1}
    assert difficulty_bucket(-1) == "unknown"


def test_hub_data_sets_offline_are_one_clear_line_each(tmp_path):
    """gsm-hard, svamp, multi-arith by test.py's hub names: offline, the CLI says so in one line."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    expected = {"gsm-hard": "juyoung-trl/gsm-hard (train)", "svamp": "ChilleD/SVAMP (train, test)",
                "multi-arith": "ChilleD/MultiArith (test)"}
    for name, where in expected.items():
        done = subprocess.run([sys.executable, "-m", "runner", "validate-data", name], cwd=REPO, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith(f"error: {name}: cannot load {where} from the Hugging Face Hub"), done.stderr
        assert "pass a file instead" in done.stderr
