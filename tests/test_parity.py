"""Official-CODI parity: the CLI's answers equal CODI's own test loop, token for token.

Checkpoints that look like the real thing (tests/checkpoints.py): byte-level BPE tokenizers
trained on the real GSM8K questions (numbers in several tokens, gold answers of different
lengths), a GPT-2 one (EOS the last id, LoRA alpha 32) and a Llama-3.2-style one (BOS added by
the tokenizer, `<|eot_id|>` EOS, llama3 rope scaling, tied embeddings, LoRA alpha 16), LoRA with
non-zero B, `prj` with its LayerNorm. The reference is tests/official_loop.py, written from
reading CODI's test.py; it never calls runner/.
"""
from __future__ import annotations

import json

import duckdb
import pytest
import torch

from runner import answers
from runner.__main__ import main
from runner.model import ModelSpec, load, official_question
from tests.checkpoints import build_codi, gsm8k_records, save_checkpoint, train_tokenizer
from tests.official_loop import INF, official_answers, official_tokenizer

N_QUESTIONS = 40
MAX_NEW = 24  # the CLI's default --max-new-tokens; the reference stops at the same length
STYLE = {"gpt2": "gpt2", "llama": "llama3"}
ALPHA = {"gpt2": 32, "llama": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def records(gsm8k_path):
    return gsm8k_records(gsm8k_path)


@pytest.fixture(scope="module")
def questions_file(records, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "q40.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:N_QUESTIONS]))
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, records, tmp_path_factory):
    """(family, in-memory CODI, its checkpoint folder, tokenizer folder, official fp32 answers at batch 1)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    tokenizer_dir = train_tokenizer(STYLE[name], root / "tokenizer", records)
    codi = build_codi(name, tokenizer_dir=tokenizer_dir, lora_alpha=ALPHA[name])
    folder = save_checkpoint(codi, root / "checkpoint")
    questions = [r["question"] for r in records[:N_QUESTIONS]]
    official = official_answers(codi, official_tokenizer(tokenizer_dir), questions, max_new_tokens=MAX_NEW)
    return name, codi, folder, tokenizer_dir, official


def sweep_baseline(tmp_path, folder, dataset, *options) -> list[tuple[list[int], float | None, str]]:
    """Run the CLI; the baseline rows' (tokens, answer value, answer text) in problem order."""
    db = tmp_path / "parity.duckdb"
    db.unlink(missing_ok=True)
    assert main(["sweep", "--model", str(folder), "--dataset", str(dataset), "--db", str(db),
                 "--schemes", "prefix", "--quiet", "--max-new-tokens", str(MAX_NEW), *options]) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        return [(list(t), v, a) for t, v, a in con.execute(
            "SELECT r.tokens, r.answer_value, r.answer_text FROM results r JOIN problems p USING (run_id, problem_id) "
            "WHERE r.scheme = 'baseline' ORDER BY p.ord").fetchall()]


def identical(ours, official, eos: int) -> int:
    """How many rows generate the same ids (test.py keeps the final EOS; we store ids before it)."""
    return sum(mine[0] == [t for t in theirs[0] if t != eos] for mine, theirs in zip(ours, official))


@pytest.mark.parametrize("batch_size", ["1", "8", "auto"])
def test_cli_equals_the_official_loop_token_for_token_in_float32(family, questions_file, tmp_path, batch_size):
    name, codi, folder, _, official = family
    ours = sweep_baseline(tmp_path, folder, questions_file, "--batch-size", batch_size)
    eos = codi.tokenizer.eos_token_id
    count = identical(ours, official, eos)
    print(f"\n{name} float32 batch {batch_size}: {count}/{N_QUESTIONS} identical to the official loop")
    for i, (mine, theirs) in enumerate(zip(ours, official)):
        assert mine[0] == [t for t in theirs[0] if t != eos], f"question {i}: {mine[0]} != official {theirs[0]}"
        assert (INF if mine[1] is None else mine[1]) == theirs[2], f"question {i}: {mine[1]} != official {theirs[2]}"
        assert mine[2] == theirs[1].strip()
    assert len({len(o[0]) for o in official}) > 1, "every row decodes the same length: stopping at EOS untested"
    assert sum(o[2] != INF for o in official) >= 5, "hardly any answer holds a number: the answer rule is untested"


def test_bfloat16_unmerged_agrees_with_the_official_bf16_loop(family, questions_file, tmp_path):
    """test.py runs the unmerged adapters in bf16; so does the CLI by default. Agreement is a count:
    bf16 rounding differs between batched and one-at-a-time kernels, and a random network amplifies it."""
    name, codi, folder, tokenizer_dir, _ = family
    questions = [json.loads(line)["question"] for line in questions_file.read_text().splitlines()]
    official = official_answers(codi, official_tokenizer(tokenizer_dir), questions, max_new_tokens=MAX_NEW,
                                dtype=torch.bfloat16)
    ours = sweep_baseline(tmp_path, folder, questions_file, "--dtype", "bfloat16")
    count = identical(ours, official, codi.tokenizer.eos_token_id)
    print(f"\n{name} bfloat16 (unmerged LoRA, batch auto): {count}/{N_QUESTIONS} identical to the official bf16 loop")
    assert count >= 30, f"only {count}/{N_QUESTIONS} bf16 answers identical to the official loop"


def test_prompt_is_the_official_text_with_the_tokenizers_default_special_tokens(family):
    name, codi, folder, _, _ = family
    reasoner = load(ModelSpec(str(folder)))
    question = "  Janet’s ducks lay 16 eggs per day.  She eats three.\n"
    ids = reasoner.prompt_ids(question)
    expected = codi.tokenizer("Janet’s ducks lay 16 eggs per day. She eats three.")["input_ids"]
    assert ids == expected + [reasoner.bot_id]
    bos = codi.tokenizer.bos_token_id
    assert (ids[0] == bos) == (name == "llama"), "Llama-3 adds BOS by default, GPT-2 does not"
    assert official_question(" a  b   c ") == "a b  c"  # one pass, as str.replace does it


def test_gold_answers_of_different_token_lengths_score_like_one_at_a_time(family):
    """The crash: golds right-padded with pad_id (= V) were gathered from a V-wide slice."""
    from runner import ablation
    _, codi, folder, _, _ = family
    reasoner = load(ModelSpec(str(folder)))
    questions = ["Tom has 3 apples. How many?", "A farm sells 1,250 eggs a day. How many in 7 days?",
                 "What is 18 + 4?"]
    golds = ["8750", "3", "1234567"]
    lengths = {len(codi.tokenizer(reasoner.answer_prompt(g), add_special_tokens=False)["input_ids"]) for g in golds}
    assert len(lengths) == 3, f"golds must tokenise to different lengths, got {lengths}"
    plan = ablation.make_plan([ablation.BASELINE], ["a", "b", "c"], reasoner.num_latent, reasoner.d_model)
    together = reasoner.rollout(questions, plan, golds, max_new_tokens=4)
    for i, (question, gold) in enumerate(zip(questions, golds)):
        one = ablation.make_plan([ablation.BASELINE], ["a"], reasoner.num_latent, reasoner.d_model)
        alone = reasoner.rollout([question], one, [gold], max_new_tokens=4)
        assert together.gold_logprob[i].item() == pytest.approx(alone.gold_logprob[0].item(), abs=1e-4)
        assert together.tokens[i] == alone.tokens[0]
    assert torch.isfinite(together.gold_logprob).all()


@pytest.mark.parametrize("text, value", [
    ("The answer is: 1,000", 1000.0), ("The answer is: 1 ,000", 0.0),  # the second: why clean-up matters
    ("The answer is: 18.", 18.0), ("It costs -3.5 then 2", 2.0), ("no number", None), ("5 and 7", 7.0),
    ("The answer is: 12 apples, 4 pears", 4.0), ("3.", 3.0)])
def test_official_answer_rule(text, value):
    assert answers.official_answer(text) == value


def test_decoding_applies_the_declared_clean_up_whatever_transformers_does(family):
    """Llama-3 declares clean_up_tokenization_spaces; transformers 5 skips it for BPE ("1 ,000")."""
    name, codi, folder, _, _ = family
    reasoner = load(ModelSpec(str(folder)))
    tokenizer = codi.tokenizer
    spaced = tokenizer("The answer is: 1", add_special_tokens=False)["input_ids"] + \
        tokenizer(" ,000 .", add_special_tokens=False)["input_ids"]
    text = reasoner.decode(spaced + [tokenizer.eos_token_id, reasoner.bot_id])
    if name == "llama":
        assert text == "The answer is: 1,000." and answers.official_answer(text) == 1000
    else:  # GPT-2 declares no clean-up, and test.py's transformers 4.52 defaults it to off
        assert text == "The answer is: 1 ,000 ."


def test_the_official_batched_loop_depends_on_the_batch(family, records):
    """Why batch size 1 is the reference: test.py's batched loop passes no attention mask or position ids
    after the question, so left-padded rows attend to their padding (README figure)."""
    name, codi, _, tokenizer_dir, official = family
    questions = [r["question"] for r in records[:N_QUESTIONS]]
    batched = official_answers(codi, official_tokenizer(tokenizer_dir), questions, batch_size=8,
                               max_new_tokens=MAX_NEW)
    same = sum(a[0] == b[0] for a, b in zip(official, batched))
    print(f"\n{name}: the official loop at batch 8 equals itself at batch 1 on {same}/{N_QUESTIONS}")
    assert same < N_QUESTIONS
