"""The command line (DESIGN.md section 6): round trips on a real database, and one-line errors."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from db.store import Store
from runner.__main__ import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_dir):
    """A finished sweep of 12 built-in problems (validation 6) by the real CLI code."""
    folder = tmp_path_factory.mktemp("cli")
    db = folder / "runs.duckdb"
    code = main(["sweep", "--model", str(tiny_model_dir), "--db", str(db), "--limit", "12", "--validation", "6",
                 "--batch-size", "4", "--run-name", "cli round trip", "--quiet"])
    assert code == 0
    return db


def test_sweep_then_status_json(swept, capsys):
    code, out, _ = cli(capsys, "status", "--db", swept, "--json")
    runs = json.loads(out)
    assert code == 0 and len(runs) == 1
    run = runs[0]
    assert {k: run[k] for k in ("name", "status", "phase", "done", "total")} == \
        {"name": "cli round trip", "status": "finished", "phase": "full", "done": 12, "total": 12}
    assert run["problems_per_hour"] > 0


def test_stats_json_has_the_seed_summary_keys_and_extras(swept, capsys):
    code, out, _ = cli(capsys, "stats", "--db", swept, "--json")
    stats = json.loads(out)
    assert code == 0
    assert {"n_problems", "baseline_accuracy", "position_importance", "by_difficulty", "extras"} <= set(stats)
    assert stats["n_problems"] == 12
    assert list(stats["position_importance"]) == [str(k) for k in range(7)]  # "0" = baseline, then prefix k
    assert stats["position_importance"]["0"] == 0.0


def test_plain_stats_give_every_rate_its_interval(swept, capsys):
    """The terminal summary carries the 95% Wilson interval of each position's flip rate and accuracy and the
    bootstrap interval of the old script's early/late, the same numbers as --json's extras (the positions' curve
    of the summary group, the accuracy by step count, the named figure)."""
    from db.stats import wilson
    code, out, _ = cli(capsys, "stats", "--db", swept, "--json")
    stats = json.loads(out)
    code, plain, _ = cli(capsys, "stats", "--db", swept)
    assert code == 0
    lines = plain.splitlines()
    accuracy = stats["extras"]["baseline_accuracy"]
    assert lines[0] == (f"problems 12, baseline accuracy {accuracy['accuracy']:.1%} [{100 * accuracy['lo']:.1f}, "
                        f"{100 * accuracy['hi']:.1f}] (intervals: 95% Wilson; early/late: 95% bootstrap over "
                        "problems)")
    group = next(g for g in stats["extras"]["groups"] if g["scheme"] == "prefix")
    shown = dict(re.findall(r"(\d): (\d\.\d{3}(?: \[\d\.\d{3}, \d\.\d{3}\])?)", lines[1]))
    assert lines[1].startswith("position importance (prefix · zero · latent · recompute, flip rate; 0 = the baseline)")
    assert shown["0"] == "0.000"  # the baseline flips nothing by definition: no interval
    for point in group["positions"]:  # prefix k is the old numbering's position k
        flip = point["flip"]
        lo, hi = wilson(round(flip["value"] * flip["n"]), flip["n"])
        assert shown[str(point["k"])] == f"{flip['value']:.3f} [{flip['lo']:.3f}, {flip['hi']:.3f}]"
        assert (flip["lo"], flip["hi"]) == pytest.approx((float(lo), float(hi)))
    by_steps = stats["extras"]["baseline_accuracy_by_steps"]
    spread = {str(r["difficulty"]): r["old_script_early_late"]
              for r in stats["extras"]["figures"]["old_script_early_late"]["steps"]}
    for line, (steps, row) in zip(lines[2:], stats["by_difficulty"].items()):
        bounds = by_steps[steps]
        assert f"acc={row['baseline_accuracy']:.1%} [{100 * bounds['lo']:.1f}, {100 * bounds['hi']:.1f}]" in line
        figure = spread[steps]  # the old script's early/late with the interval the Difficulty page shows
        assert line.endswith(f"old script's early={row['early_importance']:.3f} [{figure['early_importance_lo']:.3f}, "
                             f"{figure['early_importance_hi']:.3f}] late={row['late_importance']:.3f} "
                             f"[{figure['late_importance_lo']:.3f}, {figure['late_importance_hi']:.3f}]"), line


def test_export_import_round_trip_reproduces_the_statistics(swept, capsys, tmp_path):
    code, out, _ = cli(capsys, "export", "--db", swept, "--format", "seed-json", "--out", tmp_path / "seed")
    files = sorted(p.split("/")[-1] for p in out.split())
    assert code == 0 and files == ["step_importance_scores.json", "step_importance_summary_stats.json",
                                   "step_importance_validation.json"]
    summary = json.loads((tmp_path / "seed" / "step_importance_summary_stats.json").read_text())
    other = tmp_path / "imported.duckdb"
    code, out, _ = cli(capsys, "import-seed", "--db", other, tmp_path / "seed" / "step_importance_scores.json",
                       tmp_path / "seed" / "step_importance_validation.json")
    assert code == 0
    code, out, _ = cli(capsys, "stats", "--db", other, "--run", out.strip(), "--json")
    restated = json.loads(out)
    for key in ("n_problems", "baseline_accuracy", "position_importance"):
        assert restated[key] == pytest.approx(summary[key])


def test_csv_and_parquet_have_one_row_per_problem_and_variant(swept, capsys, tmp_path):
    n_variants = Store(swept).run_row(1)["n_variants"]
    assert cli(capsys, "export", "--db", swept, "--format", "csv", "--out", tmp_path)[0] == 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 * n_variants
    assert {"run_id", "problem_id", "difficulty", "phase", "scheme", "k", "method", "site", "mode", "answer_text",
            "answer_value", "correct", "changed", "flip", "harm", "help", "gold_logprob"} <= set(rows[0])
    assert {r["scheme"] for r in rows} == {"baseline", "prefix", "single", "suffix"}
    assert cli(capsys, "export", "--db", swept, "--format", "parquet", "--out", tmp_path)[0] == 0
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == len(rows)
    assert cli(capsys, "export", "--db", swept, "--format", "markdown", "--out", tmp_path)[0] == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Baseline accuracy" in report and "(95% Wilson)" in report and report.count("| model |") == 1


def test_status_markdown_names_the_resume_command(swept, capsys):
    code, out, _ = cli(capsys, "status", "--db", swept, "--markdown")
    assert code == 0 and "--resume" in out


def test_validate_data_json_on_the_builtin_set(capsys):
    code, out, _ = cli(capsys, "validate-data", "builtin", "--json")
    report = json.loads(out)
    assert code == 0
    assert report == {"n_problems": 1200, "difficulty": {str(s): 200 for s in range(1, 7)}, "rejected": []}


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--limit", "-3"], "--limit"),
    (["sweep", "--limit", "x"], "invalid int"),
    (["sweep", "--schemes", "prefix,sideways"], "sideways"),
    (["sweep", "--batch-size", "0"], "--batch-size"),
    (["sweep", "--workers", "0"], "argument --workers: expected a positive integer, got 0"),
    (["sweep", "--workers", "-2"], "argument --workers: expected a positive integer, got -2"),
    (["stats", "--method", "typo"], "stats --method typo: run 1 has no such prefix results; it has method 'zero'"),
    (["stats", "--method", "zero", "--mode", "frozen"], "it has method 'zero'; mode 'recompute'"),
    (["sweep", "--site", "resid:x"], "resid"),
    (["sweep", "--max-new-tokens", "200"], "--max-new-tokens 200 does not fit the model's 128 positions"),
    (["sweep", "--model", "/no/such/folder"], "/no/such/folder"),
    (["sweep", "--dataset", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["stats", "--run", "99"], "no run 99"),
    (["export", "--format", "pdf", "--out", "x"], "pdf"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_arguments_give_one_line_and_a_nonzero_exit(argv, message, capsys, swept, tmp_path):
    before = Store(swept).query("SELECT count(*) FROM results")[0][0]
    db = ["--db", str(swept)] if argv[0] in ("sweep", "stats", "export") else []
    code, out, err = cli(capsys, *argv, *db)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert Store(swept).query("SELECT count(*) FROM results")[0][0] == before


def test_a_sweep_reads_its_dataset_once(tmp_path, tiny_model_dir, capsys):
    """Checked before the model load (a bad file fails at once) and stored from that same read (issue 15)."""
    from runner import data
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"question": f"Ann has {n} apples. How many?", "answer": str(n)}) + "\n"
                            for n in range(3)))
    reads = []

    def profile(frame, event, arg):  # every call of the one function that reads a dataset source
        if event == "call" and frame.f_code is data._read.__code__:
            reads.append(frame.f_locals["source"])

    sys.setprofile(profile)
    try:
        code = main(["sweep", "--model", str(tiny_model_dir), "--dataset", str(path), "--db", str(tmp_path / "x.duckdb"),
                     "--schemes", "prefix", "--quiet"])
    finally:
        sys.setprofile(None)
    assert code == 0 and reads == [str(path)], capsys.readouterr().err
    assert Store(tmp_path / "x.duckdb").query("SELECT count(*) FROM problems") == [(3,)]


def test_stats_on_a_run_with_no_results_is_one_line(tmp_path, tiny_reasoner, tiny_model_dir, capsys):
    from runner.sweep import Sweep, SweepConfig
    store = Store(tmp_path / "empty.duckdb")
    run_id = Sweep.create(store, tiny_reasoner, SweepConfig(model=str(tiny_model_dir), limit=3))
    store.close()
    for extra in ([], ["--json"]):
        code, out, err = cli(capsys, "stats", "--db", tmp_path / "empty.duckdb", *extra)
        assert code == 2 and out == "" and err.splitlines() == [
            f"error: run {run_id} has no results yet (stopped, 0/3 problems): nothing to summarise; resume it with "
            f"python -m runner sweep --db {tmp_path / 'empty.duckdb'} --resume {run_id}"]


def test_resuming_a_finished_run_changes_nothing(swept, capsys, tiny_model_dir):
    _, before, _ = cli(capsys, "status", "--db", swept, "--json")
    code, out, err = cli(capsys, "sweep", "--db", swept, "--resume", 1, "--model", tiny_model_dir, "--limit", 12)
    assert code == 0 and out == ""  # the options given are the run's own: accepted
    assert err.splitlines() == ["run 1 is finished: every problem of validation, full is stored, nothing to resume"]
    _, after, _ = cli(capsys, "status", "--db", swept, "--json")
    assert json.loads(after) == json.loads(before) and json.loads(after)[0]["problems_per_hour"] > 0


def test_resume_refuses_options_that_differ_from_the_run(swept, capsys):
    before = Store(swept).query("SELECT * FROM runs")
    code, out, err = cli(capsys, "sweep", "--db", swept, "--resume", 1, "--limit", 5, "--schemes", "prefix",
                         "--batch-size", "auto", "--shuffle", "--quiet")
    assert code == 2 and err.splitlines() == [
        "error: --resume 1 continues the run as it was configured, but --limit 5 (run 1: 12); --schemes prefix "
        "(run 1: prefix,single,suffix); --batch-size auto (run 1: 4); --shuffle True (run 1: False) differ: drop "
        "them, or start a new run"]
    assert Store(swept).query("SELECT * FROM runs") == before


def test_a_second_process_on_a_held_database_gets_one_line_with_the_pid(swept):
    holder = Store(swept)  # this process holds the file
    done = subprocess.run([sys.executable, "-m", "runner", "stats", "--db", str(swept)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    holder.close()
    assert done.returncode != 0
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and str(swept) in line and "--db" in line
    assert f"process {__import__('os').getpid()}" in line


def test_status_works_while_another_process_holds_the_database(swept, capsys, tmp_path):
    """A second terminal beside the dashboard: the file is locked, `status` reads the holder's status file."""
    _, direct_json, _ = cli(capsys, "status", "--db", swept, "--json")
    _, direct_md, _ = cli(capsys, "status", "--db", swept, "--markdown")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from db.store import Store; s = Store(sys.argv[1]); "
                               "print('holding', flush=True); sys.stdin.read()", str(swept)],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(Exception, match="in use by process"):
            Store(swept, read_only=True)  # DuckDB refuses even a reader: the reason for the status file
        code, out, err = cli(capsys, "status", "--db", swept, "--json")
        assert code == 0 and f"held by process {holder.pid}" in err
        assert [{k: r[k] for k in ("id", "name", "status", "done", "total")} for r in json.loads(out)] == \
            [{k: r[k] for k in ("id", "name", "status", "done", "total")} for r in json.loads(direct_json)]
        code, out, _ = cli(capsys, "status", "--db", swept)
        assert code == 0 and "cli round trip" in out and "12/12" in out
        code, out, _ = cli(capsys, "status", "--db", swept, "--markdown")
        assert code == 0 and out.splitlines()[0] == direct_md.splitlines()[0]
        assert "## Phases" in out and "12/12 problems" in out
        code, _, err = cli(capsys, "status", "--db", swept, "--markdown", "--run", "99")
        assert code == 2 and "run 99: no such run" in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_cli_sweep_leaves_its_last_status_page_in_the_status_file(tmp_path):
    """Pages are built on a thread of their own; a `python -m runner sweep` that ends without closing its store
    still writes the page of its last status before the process exits."""
    from db import status_file
    db = tmp_path / "exit.duckdb"
    done = subprocess.run([sys.executable, "-m", "runner", "sweep", "--limit", "6", "--db", str(db), "--quiet"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    snapshot = status_file.read(db)
    assert snapshot["runs"][0]["status"] == "finished"
    assert snapshot["markdown"]["1"].startswith("# Run 1: ") and "— finished" in snapshot["markdown"]["1"]


def test_the_progress_bar_says_only_what_the_sweep_knows(tmp_path):
    """`python -m runner sweep` without --quiet: tqdm frames on stderr; before the first batch there is no phase
    or RSS to show (not 'None', not 'rss=0MB'), after it the phase, the batch size, the RSS and the sweep's PSS."""
    db = tmp_path / "bar.duckdb"
    done = subprocess.run([sys.executable, "-m", "runner", "sweep", "--limit", "6", "--batch-size", "3", "--db",
                           str(db)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    frames = [f for f in done.stderr.replace("\n", "\r").split("\r") if f.startswith("run 1:")]
    assert frames and not [f for f in frames if "None" in f or "rss=0MB" in f], frames
    assert re.search(r"6/6 .*, full batch=3 rss=\d+MB sweep_pss=\d+MB\]$", frames[-1]), frames[-1]


def test_the_status_file_follows_every_committed_batch(tmp_path, tiny_reasoner, tiny_model_dir, monkeypatch):
    from db import status_file, status_page
    from runner.sweep import Sweep, SweepConfig
    monkeypatch.setattr(status_file, "PAGE_EVERY_S", 0.0)  # the page too, every batch (else every 10 s)
    store = Store(tmp_path / "live.duckdb")
    config = SweepConfig(model=str(tiny_model_dir), limit=12, batch_size=4, schemes=("prefix",))
    run_id = Sweep.create(store, tiny_reasoner, config)
    seen = []

    def check(progress):
        store.pages.flush()  # the page is built on a thread of its own: here it is in
        snapshot = status_file.read(store.path)
        row = next(r for r in snapshot["runs"] if r["id"] == run_id)
        seen.append((progress.done, row["done"], row["status"], f"{row['done']}/12 problems" in
                     snapshot["markdown"][str(run_id)]))

    built_on = []
    build = status_page.status_markdown
    monkeypatch.setattr(status_page, "status_markdown", lambda *args: built_on.append(
        threading.current_thread().name) or build(*args))
    assert Sweep(store, tiny_reasoner, config, run_id, on_progress=check).run() == "finished"
    assert built_on and set(built_on) == {"status-pages"}  # never on the sweep's thread
    assert [s for s in seen if s[2] == "running" and s[0]] == [(4, 4, "running", True), (8, 8, "running", True),
                                                               (12, 12, "running", True)]
    assert seen[-1] == (12, 12, "finished", True)
    assert not list(tmp_path.glob("*.tmp"))  # replaced atomically, no leftovers

    monkeypatch.setattr(status_file, "PAGE_EVERY_S", 3600.0)  # throttled page: the run list still follows
    store.update_run(run_id, notes="checked")
    snapshot = status_file.read(store.path)  # the run list at once, before update_run returns
    assert snapshot["runs"][0]["notes"] == "checked" and "12/12 problems" in snapshot["markdown"][str(run_id)]
    store.update_run(run_id, status="stopped")  # a new status rebuilds the page
    assert status_file.read(store.path)["runs"][0]["status"] == "stopped"
    store.close()  # waits for the pages asked for
    assert "— stopped" in status_file.read(store.path)["markdown"][str(run_id)]


# --- every CLI error is one line on stderr, from a real `python -m runner` process ----------------------------

@pytest.fixture(scope="module")
def closed_db(tmp_path_factory, tiny_reasoner, tiny_model_dir):
    """A file no process holds: run 1 a finished 4-problem sweep, run 2 created with no results yet."""
    from runner.sweep import Sweep, SweepConfig
    path = tmp_path_factory.mktemp("real-cli") / "runs.duckdb"
    store = Store(path)
    config = SweepConfig(model=str(tiny_model_dir), limit=4, batch_size=4, schemes=("prefix",))
    assert Sweep(store, tiny_reasoner, config, Sweep.create(store, tiny_reasoner, config)).run() == "finished"
    Sweep.create(store, tiny_reasoner, config)
    store.close()
    return path


def _rows(path) -> list[tuple]:
    store = Store(path, read_only=True)
    try:
        return store.query("SELECT * FROM runs ORDER BY id")
    finally:
        store.close()  # the children need the file


OFFLINE = {"HF_HUB_OFFLINE": "1"}
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9: the Hub as seen offline
BROKEN_COPIES = {"six": "num_latent six", "zero": "num_latent 0", "tokenizer": "tokenizer.json random bytes",
                 "nan": "NaN in a weight"}  # placeholder -> a copy of models/default broken as test_checkpoint says
REAL_PROCESS_CASES = {  # name -> (argv with {db} {root} {six}..., extra environment, text of the one line)
    "--workers 0": (["sweep", "--workers", "0"], {}, "--workers: expected a positive integer, got 0"),
    "--workers -2": (["sweep", "--workers", "-2"], {}, "--workers: expected a positive integer, got -2"),
    "unknown scheme": (["sweep", "--schemes", "prefix,sideways"], {}, "sideways"),
    "missing dataset": (["sweep", "--dataset", "{root}/none.jsonl"], {}, "no such file"),
    "gsm8k, Hub unreachable": (["sweep", "--dataset", "gsm8k"], UNREACHABLE, "127.0.0.1 is unreachable"),
    "gsm8k, HF_HUB_OFFLINE": (["validate-data", "gsm8k"], OFFLINE, "cannot load openai/gsm8k"),
    "validate-data, every record rejected": (["validate-data", "{rejected}"], {}, "no usable problem (2 rejected"),
    "checkpoint num_latent six": (["sweep", "--model", "{six}"], {}, "got 'six'"),
    "checkpoint num_latent 0": (["sweep", "--model", "{zero}"], {}, "nothing to ablate"),
    "checkpoint garbage tokenizer": (["sweep", "--model", "{tokenizer}"], {}, "tokenizer.json: not a tokenizer file"),
    "checkpoint NaN weights": (["sweep", "--model", "{nan}"], {}, "every answer would be garbage"),
    "resume with another --limit": (["sweep", "--resume", "1", "--limit", "9"], {}, "--limit 9 (run 1: 4)"),
    "resume of a missing run": (["sweep", "--resume", "99"], {}, "no run 99"),
    "stats --method typo": (["stats", "--run", "1", "--method", "typo"], {}, "it has method 'zero'"),
    "stats of a run with no results": (["stats", "--run", "2"], {}, "run 2 has no results yet"),
    "stats of a missing run": (["stats", "--run", "99"], {}, "no run 99"),
    "export --format pdf": (["export", "--format", "pdf", "--out", "{root}/out"], {}, "invalid choice: 'pdf'"),
    "status of a missing database": (["status", "--db", "{root}/none.duckdb"], {}, "does not exist"),
    "unknown command": (["frobnicate"], {}, "invalid choice: 'frobnicate'"),
}


def test_every_cli_error_is_one_line_from_a_real_process(closed_db, tmp_path):
    """What a shell user sees: the exit status and the whole of stderr, import-time warnings included."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_checkpoint import broken_default
    import shutil
    before = (closed_db.read_bytes(), _rows(closed_db))
    (tmp_path / "rejected.jsonl").write_text('{"question": "How many?"}\n{"answer": "5"}\n')
    places = {"root": str(tmp_path), "rejected": str(tmp_path / "rejected.jsonl")}
    places |= {key: str(broken_default(tmp_path / key, name)) for key, name in BROKEN_COPIES.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "THOUGHTSWEEP_DEBUG")) and
           "PROXY" not in k.upper()} | {"HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}

    def run(numbered):
        number, (argv, extra, _) = numbered
        db = shutil.copy(closed_db, tmp_path / f"case{number}.duckdb")  # its own file: DuckDB's lock is per process
        argv = [part.format(**places) for part in argv]
        argv += ["--db", db] if argv[0] in ("sweep", "stats", "export") else []
        done = subprocess.run([sys.executable, "-m", "runner", *argv], cwd=REPO_ROOT, env=env | extra,
                              capture_output=True, text=True, timeout=600)
        return done, (Path(db).read_bytes(), _rows(db)) == before

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: a 2-core machine
        done = dict(zip(REAL_PROCESS_CASES, pool.map(run, enumerate(REAL_PROCESS_CASES.values()))))
    for name, (_, _, message) in REAL_PROCESS_CASES.items():
        process, unchanged = done[name]
        lines = process.stderr.splitlines()
        assert process.returncode != 0, f"{name}: exit 0 ({process.stdout}{process.stderr})"
        assert len(lines) == 1 and lines[0].strip() and lines[0].startswith("error: "), f"{name}: {lines}"
        assert message in lines[0] and "Traceback" not in process.stdout + process.stderr, f"{name}: {lines[0]}"
        assert unchanged, f"{name}: the database changed"


def test_a_configuration_that_cannot_fit_its_memory_budget_is_one_line_and_stores_nothing(capsys, tmp_path):
    """Issue 14 case 9 from the command line: num_latent 1000 (3,001 variants) on a 2 GB budget."""
    from db.store import Store
    db = tmp_path / "budget.duckdb"
    code, out, err = cli(capsys, "sweep", "--db", db, "--num-latent", "1000", "--limit", "4",
                         "--memory-budget-gb", "2", "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "3001 variants x 1000 latents" in lines[0] and "memory budget is 2.0 GB" in lines[0]
    assert Store(db).query("SELECT count(*) FROM runs")[0][0] == 0


def test_validate_data_with_a_model_lists_the_problems_a_sweep_would_skip(capsys, gsm8k_path):
    """Issue 14 case 8, before a sweep: GSM8K's 5th test question does not fit the embedded model's 128 positions."""
    code, out, _ = cli(capsys, "validate-data", gsm8k_path, "--model", "default", "--json")
    report = json.loads(out)
    assert code == 0 and report["n_problems"] == 1319
    unrunnable = {p["problem_id"]: p["reason"] for p in report["unrunnable"]}
    assert "gsm8k-test-0004" in unrunnable and "128 positions" in unrunnable["gsm8k-test-0004"]
    assert "gsm8k-test-0041" in unrunnable and len(unrunnable) == 54  # of 1,319; the sweep skips the same


def test_a_sweep_that_skipped_problems_says_so_where_it_ends(capsys, gsm8k_path, tmp_path):
    """GSM8K's 5th test question does not fit the embedded model: the run's last lines name it and the count."""
    db = tmp_path / "skips.duckdb"
    code, out, err = cli(capsys, "sweep", "--db", db, "--dataset", gsm8k_path, "--limit", "6", "--validation", "0",
                         "--schemes", "prefix", "--quiet")
    last = err.strip().splitlines()[-1]
    assert code == 0 and "run 1 finished" in err
    assert last.startswith("run 1: 1 problem(s) skipped, e.g. gsm8k-test-0004: too long for the model's 128 positions")
    assert last.endswith(f"(all of them: python -m runner status --db {db} --markdown --run 1)")
    code, out, _ = cli(capsys, "status", "--db", db, "--markdown", "--run", 1)
    assert code == 0 and "gsm8k\\-test\\-0004: too long" in out  # Markdown-escaped: file text is data


def test_a_validation_subset_bigger_than_the_run_is_a_warning_and_the_run_holds_what_was_drawn(capsys, gsm8k_path,
                                                                                                 tmp_path):
    """--validation 30 of 20 GSM8K problems: equal shares realise 19 (only 5 have 1-2 steps); stderr says so in
    one line before the sweep, and the stored phases are that sample, as the dashboard would have warned."""
    db = tmp_path / "short.duckdb"
    code, _, err = cli(capsys, "sweep", "--db", db, "--dataset", gsm8k_path, "--limit", "20", "--validation", "30",
                       "--schemes", "prefix", "--phase", "validation", "--quiet")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: a validation subset of 30 holds 19 problem(s) (by solution steps 1-2: 5, 3-4: 10, "
                        "5+: 4): each difficulty bucket gives at most an equal share (10), and some have fewer"]
    store = Store(db, read_only=True)
    phases = Counter(p["phase"] for p in store.run_problems(1))
    store.close()
    assert phases == {"validation": 19, "full": 1}
