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
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("gpt2", "llama")
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


def base_config(family: str, vocab_size: int, hidden: int = 32, layers: int = 2):
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
                          bos_token_id=0, eos_token_id=0)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=True, initializer_range=INIT_STD,
                       bos_token_id=0, eos_token_id=0)


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

    @property
    def base_vocab(self) -> int:
        return len(self.tokenizer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The released layout: `codi.` + the peft model's keys, then `prj.*`; tied lm_head dropped."""
        state = {f"codi.{k}" if self.lora_alpha else f"codi.base_model.model.{k}": v.detach().clone().contiguous()
                 for k, v in self.model.state_dict().items() if not k.endswith("lm_head.weight")}
        state |= {f"prj.{k}": v.detach().clone().contiguous() for k, v in self.prj.state_dict().items()}
        return state


def build_codi(family: str = "gpt2", lora: bool = True, num_latent: int = 6, vocab: list[str] | None = None,
               hidden: int = 32, layers: int = 2, rank: int = 4, lora_alpha: float = 32, seed: int = 0) -> TinyCodi:
    """A seeded random CODI model built as CODI's trainer builds it (resize, get_peft_model, prj)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocab)
    config = base_config(family, len(tokenizer), hidden, layers)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.resize_token_embeddings(len(tokenizer) + 3, mean_resizing=False)  # pad = V, BOT = V+1, EOT = V+2
    config.vocab_size = len(tokenizer)  # config.json stays the base model's
    with torch.no_grad():
        hf.get_input_embeddings().weight.normal_(0.0, INIT_STD)
        hf.get_input_embeddings().weight[0] *= EOS_SCALE  # rows finish at different steps
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
    prj.add_module("ln", nn.LayerNorm(hidden))
    return TinyCodi(family, hf.eval(), prj.eval(), tokenizer, config, num_latent, lora_alpha if lora else None)


def save_checkpoint(codi: TinyCodi, folder: str | Path, weights: str = "safetensors",
                    codi_config: bool = True, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `codi` (or an edited `state` in its place) as a released CODI checkpoint folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    codi.config.save_pretrained(folder)
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
        (folder / "codi_config.json").write_text(json.dumps(options))
    return folder


def make_checkpoint(folder: str | Path, family: str = "gpt2", lora: bool = True, num_latent: int = 6,
                    vocab: list[str] | None = None, weights: str = "safetensors", codi_config: bool = True,
                    **build) -> Path:
    """Build (`build_codi`, extra keywords passed on) and save a tiny CODI checkpoint; returns the folder."""
    codi = build_codi(family, lora=lora, num_latent=num_latent, vocab=vocab, **build)
    return save_checkpoint(codi, folder, weights=weights, codi_config=codi_config)
