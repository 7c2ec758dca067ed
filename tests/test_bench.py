"""The benchmarks still run and print what they promise (tiny sizes: this checks that they work, not speed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, f"bench/{script}", *args, "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_throughput_engine_and_old_loop_agree_on_every_answer():
    report = bench("throughput.py", "--problems", "12", "--reference-problems", "3", "--rounds", "1")
    assert report["answers_identical"] is True
    assert report["seed"]["answers_compared"] == (12 + 3) * 7 and report["default"]["answers_compared"] == (12 + 3) * 19
    assert report["speedup"] > 1 and report["peak_rss_mb"] > 0
    assert report["engine_vs_peer"] > 0 and 0 < report["engine_fraction_of_matmul_peak"] < 1


@pytest.mark.slow
def test_breakdown_splits_one_batch_into_operator_groups():
    report = bench("breakdown.py", "--batch", "4", "--repeats", "1")
    assert report["rows"] == 4 * 7 and 0 < report["fraction_of_matmul_peak"] < 1
    assert sum(report["profile_shares"].values()) == pytest.approx(1) and report["profile_shares"]["matmul"] > 0
    # The rest is small ops and Python: no matmul, copy or indexing operator is left out of its group.
    assert not [name for name in report["rest_operators_ms"] if name.startswith(("aten::addmm", "aten::mm",
                "aten::bmm", "aten::copy", "aten::index", "aten::mul", "aten::add"))], report["rest_operators_ms"]
    forwards = report["forwards_ms"]  # every forward of the loop in its part, the parts summing to the rollout
    assert forwards["prompt"] > 0 and forwards["6 latent steps"] > 0 and forwards["EOT"] > 0 and forwards["gold answer"] > 0
    assert sum(ms for name, ms in forwards.items() if name != "rollout") == pytest.approx(forwards["rollout"])
    assert report["around_the_rollout_ms"]["rows"] > 0 and report["around_the_rollout_ms"]["store"] > 0


@pytest.mark.slow
def test_side_by_side_times_two_batches_as_threads_as_processes_and_one_on_two_threads():
    report = bench("side_by_side.py", "--batch", "4", "--repeats", "1")
    assert report["rows"] == 4 * 7
    for arrangement in ("threads_side_by_side", "processes_side_by_side", "one_batch_on_2_threads"):
        assert report[f"speedup_{arrangement}"] > 0


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_with_a_tiny_shape():
    report = bench("gpu.py", "--tiny", "--problems", "16", "--reference-problems", "2")
    assert report["device"] == "cpu (tiny shape)" and report["variants"] == 7 and report["static_shapes"] is True
    assert report["engine_problems_per_hour"] > report["reference_problems_per_hour"] > 0
    assert 0 < report["model_flop_utilisation"] < 1 and report["matmul_peak_tflops"] > 0


@pytest.mark.slow
def test_query_benchmark_times_every_page_query():
    report = bench("queries.py", "--runs", "2", "--problems", "300", "--repeats", "1")
    assert report["rows"] == 2 * 300 * 8
    assert {"importance.flip_curve", "problems.table", "compare.two_runs"} <= set(report["queries"])
    assert report["max_median_ms"] == max(report["queries"].values())
    assert {"download.results_csv", "download.stats_json"} <= set(report["downloads"])
