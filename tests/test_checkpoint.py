"""runner/checkpoint.py and the options a CODI user has: each from the CLI against the official loop.

GPT-2 checkpoints with a byte-level BPE tokenizer trained on real GSM8K questions
(tests/checkpoints.py); the reference is tests/official_loop.py (CODI's test.py, rewritten).
Each option is set the way a user sets it (a CLI flag, codi_config.json or CODI's own
training_args.bin) and the CLI's answers must then equal the official loop run with that option.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import pytest
import torch

from runner.__main__ import main
from runner.model import ModelLoadError, ModelSpec, load
from tests.checkpoints import build_codi, gsm8k_records, save_checkpoint, train_tokenizer
from tests.official_loop import official_answers, official_tokenizer

N = 12  # questions per option: enough rows to differ when the option is wrong
MAX_NEW = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setting(gsm8k_path, tmp_path_factory):
    """(tokenizer folder, questions file, questions) shared by the module's checkpoints."""
    records = gsm8k_records(gsm8k_path)
    root = tmp_path_factory.mktemp("options")
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:N]))
    return train_tokenizer("gpt2", root / "tokenizer", records), path, [r["question"] for r in records[:N]]


def cli(tmp_path, folder, questions_file, *options, name="run"):
    """The CLI's baseline tokens in problem order, and the run's stored config."""
    db = tmp_path / f"{name}.duckdb"
    assert main(["sweep", "--model", str(folder), "--dataset", str(questions_file), "--db", str(db), "--quiet",
                 "--schemes", "exit", "--max-new-tokens", str(MAX_NEW), *options]) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        tokens = [list(t) for (t,) in con.execute(
            "SELECT r.tokens FROM results r JOIN problems p USING (run_id, problem_id) "
            "WHERE r.scheme = 'baseline' ORDER BY p.ord").fetchall()]
        config = json.loads(con.execute("SELECT config FROM runs").fetchone()[0])
    return tokens, config


def official(codi, tokenizer_dir, questions, **options):
    eos = codi.tokenizer.eos_token_id
    rows = official_answers(codi, official_tokenizer(tokenizer_dir), questions, max_new_tokens=MAX_NEW, **options)
    return [[t for t in row if t != eos] for row, _, _ in rows]


@dataclass(frozen=True)
class Case:
    name: str
    build: dict  # build_codi keywords
    flags: tuple[str, ...]  # CLI flags
    reference: dict  # official_answers keywords
    declare: bool = True  # write the options into codi_config.json


CASES = [
    Case("remove_eos false, declared", dict(remove_eos=False), (), dict(remove_eos=False)),
    Case("remove_eos false, by flag", dict(remove_eos=False), ("--no-remove-eos",), dict(remove_eos=False), False),
    Case("use_prj false, declared", dict(use_prj=False), (), dict(use_prj=False)),
    Case("use_prj false, by flag", dict(use_prj=False), ("--no-use-prj",), dict(use_prj=False), False),
    Case("prj_no_ln, declared", dict(prj_ln=False), (), {}),
    Case("prj_no_ln, by flag", dict(prj_ln=False), ("--prj-no-ln",), {}, False),
    Case("lora alpha 16 by flag", dict(lora_alpha=16), ("--lora-alpha", "16"), {}, False),
    Case("num_latent 3 by flag", {}, ("--num-latent", "3"), dict(num_latent=3)),
    Case("unmerged in float32", {}, ("--no-merge-lora",), {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_option_from_the_cli_equals_the_official_loop_with_it(case, setting, tmp_path):
    tokenizer_dir, questions_file, questions = setting
    codi = build_codi("gpt2", tokenizer_dir=tokenizer_dir, **case.build)
    folder = save_checkpoint(codi, tmp_path / "ckpt")
    if not case.declare:  # only the weights say how it was trained: codi_config.json without the option
        (folder / "codi_config.json").write_text(json.dumps({"num_latent": 6}))
    ours, config = cli(tmp_path, folder, questions_file, *case.flags)
    assert ours == official(codi, tokenizer_dir, questions, **case.reference), case.name
    stored = config["checkpoint_options"]
    assert set(stored) == {"num_latent", "lora_alpha", "use_prj", "prj_no_ln", "remove_eos", "merge_lora"}
    if case.flags:
        option = case.flags[0].removeprefix("--").removeprefix("no-").replace("-", "_")
        assert stored[option]["source"] == "given", stored


def test_options_are_needed_where_the_checkpoint_is_silent(setting, tmp_path, capfd):
    """Without the flag, each case above gives other answers or a refusal that says what to pass."""
    tokenizer_dir, questions_file, questions = setting
    codi = build_codi("gpt2", tokenizer_dir=tokenizer_dir, lora_alpha=16)
    folder = save_checkpoint(codi, tmp_path / "alpha16")
    (folder / "codi_config.json").write_text("{}")
    ours, config = cli(tmp_path, folder, questions_file, name="assumed")
    assert config["checkpoint_options"]["lora_alpha"] == {"value": 32.0, "source": "assumed: released CODI models"}
    assert ours != official(codi, tokenizer_dir, questions), "alpha 32 assumed for an alpha 16 model changed nothing"
    printed = capfd.readouterr().out
    assert "model options: num_latent=6 (assumed: released CODI models), lora_alpha=32.0 (assumed" in printed
    assert "merge_lora=True (default in float32)" in printed

    no_prj = save_checkpoint(build_codi("gpt2", tokenizer_dir=tokenizer_dir, use_prj=False), tmp_path / "no-prj",
                             codi_config=False)
    with pytest.raises(ModelLoadError, match=r"prj: missing \['prj.1.weight', 'prj.3.weight'\].*--no-use-prj"):
        load(ModelSpec(str(no_prj)))
    no_ln = save_checkpoint(build_codi("gpt2", tokenizer_dir=tokenizer_dir, prj_ln=False), tmp_path / "no-ln",
                            codi_config=False)
    with pytest.raises(ModelLoadError, match=r"prj: missing \['prj.ln.weight', 'prj.ln.bias'\].*--prj-no-ln"):
        load(ModelSpec(str(no_ln)))
    with pytest.raises(ModelLoadError, match=r"prj_no_ln is set but the checkpoint holds \['prj.ln.weight'"):
        load(ModelSpec(str(save_checkpoint(codi, tmp_path / "ln")), prj_no_ln=True))


@pytest.mark.parametrize("kept", ["prj.ln.weight", "prj.ln.bias"])
def test_a_layernorm_with_one_key_missing_names_the_missing_key(setting, tmp_path, kept):
    codi = build_codi("gpt2", tokenizer_dir=setting[0])
    state = codi.state_dict()
    missing = ({"prj.ln.weight", "prj.ln.bias"} - {kept}).pop()
    del state[missing]
    with pytest.raises(ModelLoadError, match=rf"prj: missing \['{missing}'\] \(its LayerNorm has {kept} only\)"):
        load(ModelSpec(str(save_checkpoint(codi, tmp_path, state=state))))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_key_removed_in_turn_is_refused_by_name(family, tmp_path):
    codi = build_codi(family, layers=1)
    full = codi.state_dict()
    for key in full:
        folder = save_checkpoint(codi, tmp_path / "ckpt", state={k: v for k, v in full.items() if k != key})
        with pytest.raises(ModelLoadError) as error:
            load(ModelSpec(str(folder)))
        assert key.removeprefix("codi.base_model.model.").removeprefix("prj.") in str(error.value), (key, error.value)


def test_merge_default_is_float32_only(setting, tmp_path):
    from peft import PeftModel
    folder = save_checkpoint(build_codi("gpt2", tokenizer_dir=setting[0]), tmp_path / "ckpt")
    kinds = {(dtype, merge): isinstance(load(ModelSpec(str(folder), dtype=dtype, merge_lora=merge)).hf, PeftModel)
             for dtype in ("float32", "bfloat16") for merge in (None, True, False)}
    assert kinds == {("float32", None): False, ("float32", True): False, ("float32", False): True,
                     ("bfloat16", None): True, ("bfloat16", True): False, ("bfloat16", False): True}


class Payload:
    """Unpickling this for real would create `path`."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_codis_training_args_bin_is_read_without_running_its_pickle(setting, tmp_path):
    """CODI's Trainer saves its TrainingArguments (num_latent, use_prj, prj_no_ln, remove_eos) as a pickle."""
    from tests.checkpoints import codi_training_arguments
    tokenizer_dir, questions_file, questions = setting
    codi = build_codi("gpt2", tokenizer_dir=tokenizer_dir, prj_ln=False, remove_eos=False, num_latent=4)
    folder = save_checkpoint(codi, tmp_path / "ckpt", codi_config=False)
    marker = tmp_path / "code-ran"
    args = codi_training_arguments(output_dir=str(tmp_path / "out"), num_latent=4, use_prj=True, prj_no_ln=True,
                                   remove_eos=False)
    args.marker = Payload(marker)  # a pickle that would run code if it were unpickled for real
    torch.save(args, folder / "training_args.bin")
    reasoner = load(ModelSpec(str(folder)))
    assert not marker.exists(), "the pickle's code ran"
    assert (reasoner.num_latent, reasoner.remove_eos) == (4, False)
    assert reasoner.options["prj_no_ln"] == {"value": True, "source": "training_args.bin"}
    assert reasoner.options["lora_alpha"]["source"] == "assumed: released CODI models"  # not in training args
    ours, _ = cli(tmp_path, folder, questions_file)
    assert ours == official(codi, tokenizer_dir, questions, remove_eos=False, num_latent=4)
    (folder / "training_args.bin").write_bytes(b"not a zip")
    unread = load(ModelSpec(str(folder), prj_no_ln=True)).options_line
    assert "training_args.bin not read (BadZipFile)" in unread and "remove_eos=True (assumed" in unread


def test_bad_declared_options_are_one_clear_error(tmp_path):
    folder = save_checkpoint(build_codi("gpt2"), tmp_path / "ckpt")
    (folder / "codi_config.json").write_text(json.dumps({"num_latent": "six"}))
    with pytest.raises(ModelLoadError, match=r"codi_config.json: num_latent should be a whole number >= 0, got 'six'"):
        load(ModelSpec(str(folder)))
    assert main(["sweep", "--model", str(folder), "--db", str(tmp_path / "x.duckdb"), "--lora-alpha", "-1"]) == 2


# --- a copy of models/default, broken one way at a time: one line in the CLI, the same in the dashboard ---

def _set_option(folder, **values) -> None:
    path = folder / "codi_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | values))


def _poison(folder, key: str, value: float) -> None:
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    state = load_file(path)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, path)


def _write(name: str, content: bytes | None = None, cut: int | None = None):
    def write(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[:cut] if cut is not None else content)
    return write


BROKEN = {  # name -> (how a copy of models/default is broken, text its one line must hold)
    "num_latent -1": (lambda f: _set_option(f, num_latent=-1),
                      "codi_config.json: num_latent should be a whole number >= 0, got -1"),
    "num_latent six": (lambda f: _set_option(f, num_latent="six"),
                       "codi_config.json: num_latent should be a whole number >= 0, got 'six'"),
    "num_latent 0": (lambda f: _set_option(f, num_latent=0),
                     "num_latent is 0 (codi_config.json), which means no latent thoughts (BOT, then EOT at once): "
                     "a sweep has nothing to ablate"),
    "tokenizer.json random bytes": (_write("tokenizer.json", bytes(range(256)) * 4),
                                    "tokenizer.json: not a tokenizer file: not JSON"),
    "tokenizer.json truncated": (_write("tokenizer.json", cut=2000), "tokenizer.json: not a tokenizer file: truncated"),
    "tokenizer.json not a tokenizer": (_write("tokenizer.json", b'{"version": "1.0"}'),
                                       "tokenizer.json: not a tokenizer file (Model missing"),
    "tokenizer_config.json garbage": (_write("tokenizer_config.json", b"garbage\n"),
                                      "tokenizer_config.json: not a tokenizer file: not JSON"),
    "NaN in a weight": (lambda f: _poison(f, "codi.base_model.model.transformer.h.0.attn.c_attn.weight", float("nan")),
                        "1 of 58 weight tensors hold NaN or infinite values (transformer.h.0.attn.c_attn.weight): "
                        "every answer would be garbage"),
    "inf in prj": (lambda f: _poison(f, "prj.1.weight", float("inf")),
                   "hold NaN or infinite values (prj.1.weight): every answer would be garbage"),
}


def broken_default(folder, name: str):
    """A copy of the embedded default checkpoint at `folder`, broken as BROKEN[name] says."""
    import shutil

    from runner.model import DEFAULT_MODEL
    shutil.copytree(DEFAULT_MODEL, folder)
    BROKEN[name][0](folder)
    return folder


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_default_checkpoint_is_one_line_in_the_cli_and_on_the_run_page(name, tmp_path, capsys):
    from db.store import Store
    from runner.service import SweepService
    from runner.sweep import SweepConfig
    folder = broken_default(tmp_path / "model", name)
    code = main(["sweep", "--model", str(folder), "--db", str(tmp_path / "cli.duckdb"), "--limit", "2", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and BROKEN[name][1] in lines[0], lines
    store = Store(tmp_path / "dashboard.duckdb")
    with pytest.raises(Exception) as refused:  # what the Run page's Start shows: "Not started: {error}"
        SweepService(store).start(SweepConfig(model=str(folder), limit=2))
    assert lines[0].startswith(f"error: {refused.value}"), (lines[0], str(refused.value))
    assert store.query("SELECT count(*) FROM runs") == [(0,)]
    assert Store(tmp_path / "cli.duckdb").query("SELECT count(*) FROM runs") == [(0,)]


def test_nonfinite_weights_are_swept_only_when_allowed_and_then_with_a_warning(tmp_path, capsys):
    folder = broken_default(tmp_path / "model", "NaN in a weight")
    db = tmp_path / "x.duckdb"
    code = main(["sweep", "--model", str(folder), "--db", str(db), "--limit", "2", "--schemes", "prefix", "--quiet",
                 "--allow-nonfinite-weights"])
    err = capsys.readouterr().err
    assert code == 0 and err.startswith("warning: ") and BROKEN["NaN in a weight"][1] in err.splitlines()[0]
    assert "run 1 finished" in err.splitlines()[-1]


def test_a_zero_latent_checkpoint_loads_as_no_latent_thoughts(tmp_path):
    """num_latent 0 is legal for the loader: BOT, then EOT at once, the exit scheme's k = 0 variant."""
    from runner import ablation
    from runner.checkpoint import unusable
    zero = load(ModelSpec(str(broken_default(tmp_path / "model", "num_latent 0"))))
    six = load(ModelSpec())
    question = ["Tom has 3 apples and gets 4 more. How many apples does he have?"]
    exit_0 = ablation.Variant("exit", 0, "none", "latent", "recompute")
    ran = zero.rollout(question, ablation.make_plan([ablation.BASELINE], ["q"], 0, zero.d_model), max_new_tokens=12)
    early = six.rollout(question, ablation.make_plan([ablation.BASELINE, exit_0], ["q"], 6, six.d_model),
                        max_new_tokens=12)
    assert zero.num_latent == 0 and ran.tokens == early.tokens[1:]
    assert "nothing to ablate" in unusable(zero)
