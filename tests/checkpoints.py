"""Tiny random CODI checkpoints in the released layout (DESIGN.md section 2), for tests.

`build_codi` makes the in-memory model the way CODI's training code does (base causal LM with
the vocabulary grown by pad, BOT, EOT; `peft.get_peft_model` with LoRA; the `prj` MLP), and
`save_checkpoint` writes it as zen-E/CODI-* ship it: the base model's `config.json`, a tokenizer,
one state dict of `codi.base_model.model.*` + `prj.*` with the tied `lm_head` left out, and
`codi_config.json`. `make_checkpoint` does both. Everything is seeded, so the same arguments give
the same weights, and small enough (2 blocks, width 32) that a rollout takes milliseconds.

    from tests.checkpoints import make_checkpoint
    folder = make_checkpoint(tmp_path / "gpt2")               # LoRA, 6 latents, toy vocabulary
    reasoner = runner.model.load(ModelSpec(str(folder)))

`train_tokenizer` makes what real CODI checkpoints tokenise with: a byte-level BPE trained (in
about a second) on real GSM8K questions, so numbers split into several tokens and gold answers
differ in length. Style "gpt2": EOS `<|endoftext|>` is the last id, and vocab.json + merges.txt
sit beside tokenizer.json so the slow GPT2Tokenizer loads too. Style "llama3": Llama-3's digit
split (1-3 digits a piece), `<|begin_of_text|>` added by the tokenizer, `<|eot_id|>` as EOS and
the clean-up of tokenization spaces declared, as Llama-3.2-1B-Instruct ships it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("gpt2", "llama")
GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
# Llama-3's pre-tokenizer split (tokenizer.json of meta-llama/Llama-3.2-1B): numbers in 1-3 digit pieces.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
# Llama-3.2's rope scaling (config.json of meta-llama/Llama-3.2-1B).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# CODI's LoRA targets (zen-E/CODI train.py): every attention and MLP projection.
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
INIT_STD = 0.15  # weights and embeddings; see base_config
EOS_SCALE = 2.0  # the EOS embedding row is this much longer: greedy decoding ends now and then
LORA_B_STD = 0.05
QUESTIONS = [  # mixed lengths over the toy vocabulary
    "Ann has 7 apples . She buys 3 more . How many apples does Ann have now ?",
    "Ben has 12 coins . How many coins does Ben have now ?",
    "Cara owns 4 shells . She doubles her shells . She loses 2 . She buys 5 more . "
    "How many shells does Cara have now ?",
    "Dev keeps 30 cards . He sells 1 . How many cards does Dev have now ?",
]
GOLDS = ["10", "12", "11", "29"]


def build_tokenizer(words: list[str] | None = None):
    """A word-level tokenizer over byte-level pieces, EOS '<|endoftext|>' = id 0; default: the toy vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if words is None:
        from runner.toy.problems import vocabulary
        words = vocabulary()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = {p for w in words for text in (w, " " + w) for p, _ in byte_level.pre_tokenize_str(text)}
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {p: i + 2 for i, p in enumerate(sorted(pieces))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   unk_token="[UNK]", clean_up_tokenization_spaces=False)


def gsm8k_records(path: Path = GSM8K_TEST) -> list[dict]:
    """The GSM8K test set's records ({"question", "answer"}), in file order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_tokenizer(style: str, folder: str | Path, records: list[dict], vocab_size: int = 600) -> Path:
    """A byte-level BPE trained on `records`' questions and answer lines, saved in `style`'s files."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    assert style in ("gpt2", "llama3"), f"style must be gpt2 or llama3, got {style!r}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [r["question"] for r in records] + [f"The answer is: {r['answer'].split('####')[-1].strip()}"
                                                for r in records]
    tokenizer = Tokenizer(models.BPE())
    if style == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    if style == "gpt2":  # special tokens after the merges: EOS is the last id, as GPT-2's 50256
        tokenizer.add_special_tokens(["<|endoftext|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=1024)
        fast.save_pretrained(folder)
        vocab = tokenizer.get_vocab()
        (folder / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
        merges = json.loads(tokenizer.to_str())["model"]["merges"]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(
            (" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "GPT2Tokenizer"}))
    else:
        tokenizer.add_special_tokens(list(LLAMA3_SPECIALS))
        bos = tokenizer.token_to_id(LLAMA3_SPECIALS[0])
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{LLAMA3_SPECIALS[0]} $A",
                                          pair=f"{LLAMA3_SPECIALS[0]} $A {LLAMA3_SPECIALS[0]} $B",
                                          special_tokens=[(LLAMA3_SPECIALS[0], bos)])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=LLAMA3_SPECIALS[0],
                                       eos_token=LLAMA3_SPECIALS[2], clean_up_tokenization_spaces=True,
                                       model_max_length=131072)
        fast.save_pretrained(folder)
    return folder


def base_config(family: str, vocab_size: int, hidden: int = 32, layers: int = 2, bos: int = 0, eos: int = 0):
    """The *base* model's config (vocabulary not yet grown), as a hub base model would ship it.

    initializer_range INIT_STD (not 0.02): at width 32 a near-identity random network with a tied
    head just repeats its input token, and every ablation would leave the answer unchanged; much
    larger and six recurrent latent steps amplify float32 rounding past the tests' tolerances.
    """
    from transformers import GPT2Config, LlamaConfig
    assert family in FAMILIES, f"family must be one of {FAMILIES}, got {family!r}"
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=hidden, n_layer=layers, n_head=2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_STD,
                          bos_token_id=bos, eos_token_id=eos)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=131072, tie_word_embeddings=True, initializer_range=INIT_STD,
                       bos_token_id=bos, eos_token_id=eos, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))


@dataclass
class TinyCodi:
    """An in-memory CODI model: `model` is the peft-wrapped LM (plain HF model without LoRA)."""
    family: str
    model: nn.Module
    prj: nn.Sequential
    tokenizer: object
    config: object  # the base config (vocabulary V, not V + 3)
    num_latent: int
    lora_alpha: float | None  # None = no LoRA
    tokenizer_dir: Path | None = None  # the tokenizer's own files (vocab.json, merges.txt), copied on save
    options: dict | None = None  # codi_config.json entries that differ from the released models

    @property
    def base_vocab(self) -> int:
        return len(self.tokenizer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The released layout: `codi.` + the peft model's keys, then `prj.*`; tied lm_head dropped."""
        state = {f"codi.{k}" if self.lora_alpha else f"codi.base_model.model.{k}": v.detach().clone().contiguous()
                 for k, v in self.model.state_dict().items() if not k.endswith("lm_head.weight")}
        if (self.options or {}).get("use_prj", True):
            state |= {f"prj.{k}": v.detach().clone().contiguous() for k, v in self.prj.state_dict().items()}
        return state


def build_codi(family: str = "gpt2", lora: bool = True, num_latent: int = 6, vocab: list[str] | None = None,
               hidden: int = 32, layers: int = 2, rank: int = 4, lora_alpha: float = 32, seed: int = 0,
               tokenizer_dir: str | Path | None = None, prj_ln: bool = True, use_prj: bool = True,
               remove_eos: bool = True) -> TinyCodi:
    """A seeded random CODI model built as CODI's trainer builds it (resize, get_peft_model, prj).

    `tokenizer_dir`: a tokenizer folder (`train_tokenizer`) instead of the toy word-level one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocab) if tokenizer_dir is None else AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    config = base_config(family, len(tokenizer), hidden, layers, bos=bos, eos=eos)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.resize_token_embeddings(len(tokenizer) + 3, mean_resizing=False)  # pad = V, BOT = V+1, EOT = V+2
    config.vocab_size = len(tokenizer)  # config.json stays the base model's
    with torch.no_grad():
        hf.get_input_embeddings().weight.normal_(0.0, INIT_STD)
        hf.get_input_embeddings().weight[eos] *= EOS_SCALE  # rows finish at different steps
    if lora:
        from peft import LoraConfig, get_peft_model
        lora_config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=LORA_TARGETS[family],
                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                 fan_in_fan_out=family == "gpt2")
        hf = get_peft_model(hf, lora_config)
        with torch.no_grad():  # peft initialises B = 0 (LoRA = identity); trained adapters are not
            for name, param in hf.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, LORA_B_STD)
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    if prj_ln:
        prj.add_module("ln", nn.LayerNorm(hidden))
    options = {k: v for k, v in (("prj_no_ln", not prj_ln), ("use_prj", use_prj), ("remove_eos", remove_eos))
               if v != (k != "prj_no_ln")}  # only what differs from the released models
    return TinyCodi(family, hf.eval(), prj.eval(), tokenizer, config, num_latent, lora_alpha if lora else None,
                    None if tokenizer_dir is None else Path(tokenizer_dir), options)


def save_checkpoint(codi: TinyCodi, folder: str | Path, weights: str = "safetensors",
                    codi_config: bool = True, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `codi` (or an edited `state` in its place) as a released CODI checkpoint folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    codi.config.save_pretrained(folder)
    if codi.tokenizer_dir is not None:
        for file in codi.tokenizer_dir.iterdir():
            shutil.copy(file, folder / file.name)
    else:
        codi.tokenizer.save_pretrained(folder)
    state = codi.state_dict() if state is None else state
    if weights == "safetensors":
        from safetensors.torch import save_file
        save_file(state, folder / "model.safetensors")
    elif weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    if codi_config:
        options = {"num_latent": codi.num_latent} | ({"lora_alpha": codi.lora_alpha} if codi.lora_alpha else {})
        options |= codi.options or {}
        (folder / "codi_config.json").write_text(json.dumps(options))
    return folder


def make_checkpoint(folder: str | Path, family: str = "gpt2", lora: bool = True, num_latent: int = 6,
                    vocab: list[str] | None = None, weights: str = "safetensors", codi_config: bool = True,
                    **build) -> Path:
    """Build (`build_codi`, extra keywords passed on) and save a tiny CODI checkpoint; returns the folder."""
    codi = build_codi(family, lora=lora, num_latent=num_latent, vocab=vocab, **build)
    return save_checkpoint(codi, folder, weights=weights, codi_config=codi_config)
