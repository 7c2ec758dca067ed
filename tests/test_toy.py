"""The embedded default: problem generator, tokenizer, committed checkpoint, training script."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from runner import ablation, answers, data
from runner.toy import problems as toy
from runner.toy.train import NUM_LATENT, QUESTION_TOKENS, build_tokenizer, latent_plan, make_batch

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


def test_the_builtin_set_is_the_generators_output_and_balanced():
    shipped = [json.loads(line) for line in toy.BUILTIN_PATH.read_text().splitlines()]
    assert shipped == toy.builtin_problems() == toy.builtin_problems()
    steps = [row["reasoning_steps"] for row in shipped]
    assert {s: steps.count(s) for s in set(steps)} == {s: toy.BUILTIN_PER_DIFFICULTY for s in range(1, 7)}
    assert steps[:12] == [1, 2, 3, 4, 5, 6] * 2  # interleaved: any --limit prefix is balanced
    assert len({row["question"] for row in shipped}) == len(shipped)


def test_every_solution_is_true_arithmetic_in_gsm8k_format():
    for row in toy.builtin_problems():
        notes = ANNOTATION.findall(row["answer"])
        assert len(notes) == row["reasoning_steps"]
        value = None
        for a, op, b, c in notes:
            a, b, c = int(a), int(b), int(c)
            assert value is None or a == value, f"{row['id']}: step starts from {a}, previous result {value}"
            assert toy.apply_op(a, {"+": "+", "-": "-", "*": "*", "/": "/"}[op], b) == c
            assert 1 <= c <= toy.MAX_VALUE
            value = c
        assert row["answer"].endswith(f"#### {value}")


def test_the_builtin_set_loads_through_the_dataset_interface_with_its_difficulty():
    problems = data.load_problems("builtin")
    assert len(problems) == 6 * toy.BUILTIN_PER_DIFFICULTY
    for problem in problems[:60]:
        assert problem.difficulty == len(ANNOTATION.findall(problem.solution))
        assert answers.parse_number(problem.gold) == int(problem.solution.rsplit("####", 1)[1])


def test_train_and_test_chains_are_disjoint():
    test_chains = set()
    for row in toy.builtin_problems():
        notes = ANNOTATION.findall(row["answer"])
        chain = toy.Chain(int(notes[0][0]), tuple((op, int(b)) for _, op, b, _ in notes))
        assert chain.split() == "test"
        test_chains.add(chain)
    rng = random.Random(1)
    for steps in range(1, 7):
        for _ in range(500):
            assert toy.sample_problem(rng, steps, "train").chain not in test_chains


def test_the_tokenizer_has_one_token_per_word_and_decodes_exactly():
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    for steps in range(1, 7):
        problem = toy.sample_problem(rng, steps, "train")
        ids = tokenizer(problem.question, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert len(ids) == 5 * (steps + 1) + 8 <= QUESTION_TOKENS  # five tokens a sentence
        for text in (problem.question, " " + problem.cot, f"The answer is: {problem.chain.answer}"):
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_the_committed_checkpoint_answers_builtin_problems(default_reasoner):
    problems = data.load_problems("builtin", limit=24)
    plan = ablation.make_plan([ablation.BASELINE], [p.problem_id for p in problems], 6, default_reasoner.d_model)
    out = default_reasoner.rollout([p.question for p in problems], plan, golds=[p.gold for p in problems])
    right = [answers.same_number(answers.extract_answer(t).value, float(p.gold)) for t, p in zip(out.texts, problems)]
    assert all(t.startswith("The answer is: ") for t in out.texts)
    assert sum(right) >= 20, list(zip(out.texts, [p.gold for p in problems]))
    # The logit lens of the first latent reads the first intermediate result on most problems.
    first = [p.solution.split("=<<")[1].split("=")[1].split(">>")[0] for p in problems]
    lens = [default_reasoner.tokenizer.decode([int(out.lens_ids[i, 0, 0])]).strip() for i in range(len(problems))]
    assert sum(a == b for a, b in zip(lens, first)) >= len(problems) // 2


def test_the_committed_checkpoints_latents_matter_by_position_and_by_difficulty(default_reasoner):
    """The second-generation default has graded structure (models/README.md): zeroing latent 0 is
    mostly recovered, zeroing a middle or late latent is not, late latents matter to long problems
    far more than to short ones, and the prefix curve rises. Orderings with wide margins, not figures."""
    problems = data.load_problems("builtin", limit=48)  # interleaved: 8 per step count
    variants = [ablation.BASELINE] + [ablation.Variant("single", j, "zero") for j in range(6)] \
        + [ablation.Variant("prefix", k, "zero") for k in (1, 6)]
    plan = ablation.make_plan(variants, [p.problem_id for p in problems], 6, default_reasoner.d_model)
    out = default_reasoner.rollout([p.question for p in problems], plan, golds=[p.gold for p in problems])
    V = len(variants)
    right = [[answers.same_number(answers.extract_answer(out.texts[b * V + v]).value, float(p.gold))
              for v in range(V)] for b, p in enumerate(problems)]
    flip = lambda rows, v: sum(r[0] != r[v] for r in rows)
    single = [flip(right, 1 + j) for j in range(6)]
    quarter = len(problems) // 4
    assert single[3] + single[4] > single[0] + single[5] + quarter, single
    short = [r for r, p in zip(right, problems) if p.difficulty <= 2]
    long = [r for r, p in zip(right, problems) if p.difficulty >= 5]
    late_short, late_long = (sum(flip(rows, 1 + j) for j in (3, 4, 5)) for rows in (short, long))
    assert late_long > late_short + len(long), (late_short, late_long)  # out of 3 * 16 each
    prefix_1, prefix_6 = flip(right, 7), flip(right, 8)
    assert prefix_1 + quarter < prefix_6 and sum(r[8] for r in right) < len(problems) // 2, (prefix_1, prefix_6)


def test_a_zeroed_latent_restarts_the_chain_and_the_answer_is_read_from_the_last_kept_latent():
    clean = [False] * NUM_LATENT
    assert latent_plan(clean, 6) == ([1, 2, 3, 4, 5, 6], True)
    single = [j == 2 for j in range(NUM_LATENT)]  # position 2 is fed zeros: it computes step 1 again
    assert [latent_plan(single, d)[1] for d in range(1, 7)] == [True, True, True, False, False, False]
    assert latent_plan(single, 3)[0] == [1, 2, 3, 1, 2, 3]
    last = [j == 5 for j in range(NUM_LATENT)]  # the answer is read from latent 4: 5 steps done
    assert [latent_plan(last, d)[1] for d in range(1, 7)] == [True] * 5 + [False]
    for k in range(1, NUM_LATENT + 1):  # prefix k: a d-step chain survives while d <= 6 - k
        prefix = [j < k for j in range(NUM_LATENT)]
        assert [latent_plan(prefix, d)[1] for d in range(1, 7)] == [d <= 6 - k for d in range(1, 7)]


def test_a_training_batch_feeds_zeros_where_planned_and_targets_the_values_the_plan_says():
    tokenizer = build_tokenizer()
    question, cot, answer, aux, zero, reachable = make_batch(random.Random(3), tokenizer, 32, steps=4, corrupt=1.0)
    assert zero.shape == aux.shape == (32, NUM_LATENT) and bool(zero.any(dim=1).all())
    _, _, _, _, zero_clean, reachable_clean = make_batch(random.Random(3), tokenizer, 32, steps=4, corrupt=0.0)
    assert not zero_clean.any() and bool(reachable_clean.all())
    for b in range(32):
        notes = ANNOTATION.findall(tokenizer.decode(cot[b].tolist()))
        values = [int(notes[0][0])] + [int(c) for *_, c in notes]  # start, then the value after each step
        done, ok = latent_plan(zero[b].tolist(), 4)
        assert bool(reachable[b]) == ok
        targets = [int(tokenizer.decode([int(t)])) for t in aux[b]]
        assert targets == [values[min(d, 4)] for d in done]


@pytest.mark.slow
def test_a_short_training_run_makes_the_loss_fall(tmp_path):
    log = tmp_path / "losses.jsonl"
    subprocess.run([sys.executable, "-m", "runner.toy.train", "--steps", "24", "--extra-steps", "0", "--batch-size", "16",
                    "--eval-every", "1000", "--eval-problems", "12", "--save-every", "1000", "--out", str(tmp_path / "model"),
                    "--work", str(tmp_path / "work"), "--fresh", "--log", str(log)],
                   check=True, capture_output=True, timeout=300)
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4
    assert (tmp_path / "model" / "model.safetensors").exists()  # saved in the released layout


def test_the_model_cards_figures_come_from_the_sweeps_own_rows(tmp_path, tiny_reasoner, tiny_model_dir):
    import threading

    from db.store import Store
    from runner.sweep import Sweep, SweepConfig
    from runner.toy import figures

    store = Store(tmp_path / "fig.duckdb")
    cfg = SweepConfig(model=str(tiny_model_dir), dataset="builtin", limit=12, batch_size=6, validation=6,
                      schemes=("prefix", "single"), methods=("zero",))
    run_id = Sweep.create(store, tiny_reasoner, cfg)
    assert Sweep(store, tiny_reasoner, cfg, run_id, stop=threading.Event()).run() == "finished"
    found = figures.figures(store, run_id)
    ((correct,),) = store.query("SELECT count(*) FILTER (WHERE correct) FROM results WHERE run_id = ? AND "
                                "variant = 'prefix:6/zero/latent/recompute'", [run_id])
    assert found["n_problems"] == 12 and found["all_zero_accuracy"]["correct"] == correct
    flips = dict(store.query("SELECT k, avg(flip::DOUBLE) FROM results WHERE run_id = ? AND scheme = 'single' "
                             "GROUP BY k", [run_id]))
    assert [c["flip"] for c in found["single"]] == pytest.approx([flips[k] for k in range(6)])
    assert found["single_spread"] == pytest.approx(max(flips.values()) - min(flips.values()))
    assert set(found["single_by_bucket"]) == {"1-2", "3-4", "5+"} and found["lens"]["n"] == 12
    assert all(c["lo"] - 1e-9 <= c["flip"] <= c["hi"] + 1e-9 for c in found["prefix"] + found["single"])
    assert "| baseline accuracy" in figures.markdown(found)
