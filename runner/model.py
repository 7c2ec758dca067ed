"""Load a CODI checkpoint into a LatentReasoner, and the only forward loop: `rollout`.

CODI (Continuous Chain-of-Thought via Self-Distillation) = a Hugging Face causal LM with three
tokens added (pad = V, BOT = V+1, EOT = V+2), optional LoRA on it, and a projection MLP `prj`.
One rollout (DESIGN.md section 2): encode `question + BOT`; T latent steps, each feeding
prj(last hidden state) back as an input embedding; EOT; greedy decode over the base vocabulary.
The official CODI test loop is the reference; unlike it, padded rows get an attention mask and
position ids from the mask, so a row in a batch computes what it computes alone.

Every baseline and every ablated rollout goes through `LatentReasoner.rollout`; the ablation
is data (`runner.ablation.Plan`), applied at the input embedding or by a block hook that lives
only inside `_block_hooks`.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from runner import ablation, checkpoint
from runner.ablation import Plan
from runner.checkpoint import CheckpointOptions
from runner.errors import ModelLoadError  # noqa: F401  (raised here; listed in runner/errors.py)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
CODI_PREFIX = "codi.base_model.model."
CODI_CONFIG = "codi_config.json"  # beside the weights: base_model, pad_question_to, runner/checkpoint.py's options
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A notice transformers prints while peft wraps the model, about transformers' own internals and not about
# the checkpoint: it would add lines to the CLI's one-line errors (DESIGN.md section 6).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# The spaces a tokenizer's `clean_up_tokenization_spaces` removes when decoding (transformers' list).
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def official_question(question: str) -> str:
    """The question text as CODI's test.py feeds it: stripped, one pass of double spaces -> one."""
    return question.strip().replace("  ", " ")


@dataclass(frozen=True)
class ModelSpec:
    model: str = "default"  # 'default' | local folder | hub id
    base_model: str | None = None  # config + tokenizer source; default: codi_config.json or the folder
    device: str = "cpu"
    dtype: str = "float32"
    # None: from the checkpoint (codi_config.json, training_args.bin), else the released models' value
    # (runner/checkpoint.py); a value here overrides both.
    num_latent: int | None = None  # released models: 6
    lora_alpha: float | None = None  # released models: 32
    use_prj: bool | None = None  # False: latent = last hidden state (no prj)
    prj_no_ln: bool | None = None  # True: prj has no LayerNorm
    remove_eos: bool | None = None  # False: EOS between question and BOT, and after EOT
    # Fold LoRA into the base weights (fewer matmuls). None: only in float32, where it is exact to
    # rounding; in bf16/fp16 the cast would round most of the LoRA update away (test.py runs unmerged).
    merge_lora: bool | None = None


# --- Loading ---------------------------------------------------------------------------------------

def _local_or_hub(name: str, what: str, files: list[str] | None = None) -> Path:
    """A local folder, or a hub id resolved through huggingface_hub's cache."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{what} {name!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=files))
    except Exception as error:  # offline, gated, unknown id: the hub raises many types
        raise ModelLoadError(
            f"{what} {name!r} could not be fetched from the Hugging Face hub ({type(error).__name__}). "
            f"Without network, download it elsewhere (`hf download {name} --local-dir DIR`), "
            f"copy DIR here and pass the folder instead of the id") from None


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file
        try:
            return load_file(folder / "model.safetensors")
        except Exception as error:  # SafetensorError, OSError: a truncated or foreign file
            raise ModelLoadError(f"{folder / 'model.safetensors'} is not a readable safetensors file "
                                 f"({str(error).splitlines()[0]}); download or copy it again") from None
    if (folder / "pytorch_model.bin").exists():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as error:
            # torch's text suggests loading it unsafely, with terminal escapes: keep only what it refused.
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
            why = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(error).__name__)
            why = why.split(" Please use")[0]  # torch's advice on allowing it is not ours to give
            raise ModelLoadError(f"{folder / 'pytorch_model.bin'} is not a plain weights file "
                                 f"(refused by weights_only=True: {why}); re-save it as a plain state dict "
                                 f"or model.safetensors") from None
    raise ModelLoadError(f"{folder}: not a CODI checkpoint (no model.safetensors or pytorch_model.bin)")


def _lora_layout(base_keys: list[str], state: dict) -> tuple[int, list[str]] | None:
    """(rank, target module names) inferred from the `lora_A` and `lora_B` keys; None when there is no LoRA.

    Both kinds count, so that a module with one of its two matrices missing is still wrapped and
    the strict load names the missing key.
    """
    lora = [k for k in base_keys if k.endswith((".lora_A.default.weight", ".lora_B.default.weight"))]
    if not lora:
        return None
    targets = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in lora})
    first = state[CODI_PREFIX + lora[0]]  # lora_A: (r, in); lora_B: (out, r)
    return (first.shape[0] if ".lora_A." in lora[0] else first.shape[1]), targets


def _build_prj(state: dict, d_model: int, options: CheckpointOptions, folder: Path) -> nn.Module:
    """CODI's projection: Dropout, Linear(d, prj_dim), GELU, Linear(prj_dim, d) [, LayerNorm(d)];
    the identity when the model was trained with use_prj false. What is declared must match the keys."""
    keys = {k for k in state if k.startswith("prj.")}
    if not options.use_prj:
        if keys:
            raise ModelLoadError(f"{folder}: use_prj is false but the checkpoint holds {sorted(keys)[:3]}...: "
                                 f"drop --no-use-prj / use_prj from codi_config.json, or check the checkpoint")
        return nn.Identity()
    missing = [k for k in ("prj.1.weight", "prj.3.weight") if k not in keys]
    if missing:
        hint = ("; a model trained with use_prj false (latent = last hidden state) must say so: --no-use-prj "
                "or \"use_prj\": false in codi_config.json") if not keys else ""
        raise ModelLoadError(f"{folder}: prj: missing {missing}{hint}")
    ln = [k for k in ("prj.ln.weight", "prj.ln.bias") if k in keys]
    if options.prj_no_ln and ln:
        raise ModelLoadError(f"{folder}: prj_no_ln is set but the checkpoint holds {ln}: its prj has a LayerNorm")
    if not options.prj_no_ln and len(ln) < 2:
        absent = [k for k in ("prj.ln.weight", "prj.ln.bias") if k not in keys]
        hint = ("; a prj trained without LayerNorm must say so: --prj-no-ln or \"prj_no_ln\": true in "
                "codi_config.json") if not ln else f" (its LayerNorm has {ln[0]} only)"
        raise ModelLoadError(f"{folder}: prj: missing {absent}{hint}")
    prj_dim = state["prj.1.weight"].shape[0]
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d_model, prj_dim), nn.GELU(), nn.Linear(prj_dim, d_model))
    if not options.prj_no_ln:
        prj.add_module("ln", nn.LayerNorm(d_model))
    _load_strict(prj, {k[len("prj."):]: v for k, v in state.items() if k in keys}, f"{folder} (prj.*)")
    return prj


def _load_strict(module: nn.Module, state: dict, what: str, tied: tuple[str, ...] = ()) -> None:
    """load_state_dict, but every missing or unexpected key is an error that names it."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state) - set(tied))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"{what}: checkpoint does not match the model: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, tensor in module.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{what}: {name} has shape {tuple(state[name].shape)}, "
                                 f"the model expects {tuple(tensor.shape)}")
    module.load_state_dict(state, strict=False, assign=True)


def load(spec: ModelSpec = ModelSpec()) -> "LatentReasoner":
    """Load a released-format CODI checkpoint (or the embedded default) for inference."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = DEFAULT_MODEL if spec.model == "default" else _local_or_hub(spec.model, "model")
    if folder.is_file():
        raise ModelLoadError(f"model {spec.model!r} is a file: pass the checkpoint's folder")
    try:
        options = json.loads((folder / CODI_CONFIG).read_text()) if (folder / CODI_CONFIG).exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{folder / CODI_CONFIG} is not valid JSON ({error})") from None
    if not isinstance(options, dict):
        raise ModelLoadError(f"{folder / CODI_CONFIG} should hold a JSON object, got {type(options).__name__}")
    try:
        declared = checkpoint.resolve(folder, {"num_latent": spec.num_latent, "lora_alpha": spec.lora_alpha,
                                               "use_prj": spec.use_prj, "prj_no_ln": spec.prj_no_ln,
                                               "remove_eos": spec.remove_eos}, options)
    except checkpoint.OptionsError as error:
        raise ModelLoadError(str(error)) from None
    base_name = spec.base_model or options.get("base_model") or (str(folder) if (folder / "config.json").exists() else None)
    if base_name is None:
        raise ModelLoadError(f"{folder} has no config.json: pass --base-model (e.g. gpt2 or meta-llama/Llama-3.2-1B-Instruct)")
    base = folder if base_name == str(folder) else _local_or_hub(base_name, "base model")
    state = _read_state_dict(folder)

    strays = sorted(k for k in state if not k.startswith((CODI_PREFIX, "prj.")))
    if strays:
        raise ModelLoadError(f"{folder}: unexpected keys outside codi.* and prj.*: {strays[:5]}")
    base_keys = [k[len(CODI_PREFIX):] for k in state if k.startswith(CODI_PREFIX)]
    embed_key = next((k for k in base_keys if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if embed_key is None:
        raise ModelLoadError(f"{folder}: missing the input embedding ({CODI_PREFIX}transformer.wte.weight or "
                             f"{CODI_PREFIX}model.embed_tokens.weight)")
    vocab_rows = state[CODI_PREFIX + embed_key].shape[0]

    try:
        config = AutoConfig.from_pretrained(base)
    except Exception as error:
        raise ModelLoadError(f"base model {base_name!r}: cannot read its config ({error})") from None
    config.vocab_size = vocab_rows  # the grown vocabulary, read from the weights
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(config)
    tied = tuple(n for n in ("lm_head.weight",) if getattr(config, "tie_word_embeddings", False))
    lora = _lora_layout(base_keys, state)
    base_state = {k[len(CODI_PREFIX):]: v for k, v in state.items() if k.startswith(CODI_PREFIX)}
    if lora is not None:
        from peft import LoraConfig, get_peft_model
        rank, targets = lora
        lora_config = LoraConfig(r=rank, lora_alpha=declared.lora_alpha, target_modules=targets, lora_dropout=0.0,
                                 fan_in_fan_out=config.model_type == "gpt2")
        peft_model = get_peft_model(hf, lora_config, low_cpu_mem_usage=True)
        _load_strict(peft_model.base_model.model, base_state, f"{folder} (codi.*)", tied)
        with warnings.catch_warnings():  # peft warns that merging unties lm_head: we re-tie it below
            warnings.simplefilter("ignore")
            merged = spec.dtype == "float32" if spec.merge_lora is None else spec.merge_lora
            hf = peft_model.merge_and_unload() if merged else peft_model
        merge_source = "given" if spec.merge_lora is not None else f"default in {spec.dtype}"
    else:
        _load_strict(hf, base_state, f"{folder} (codi.*)", tied)
        merged, merge_source = None, "no LoRA in the checkpoint"
        declared = replace(declared, sources=tuple((n, "no LoRA in the checkpoint" if n == "lora_alpha" else s)
                                                   for n, s in declared.sources))
    if tied:
        hf.get_output_embeddings().weight = hf.get_input_embeddings().weight
    prj = _build_prj(state, config.hidden_size, declared, folder)

    tokenizer_source = folder if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")) else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    base_vocab = vocab_rows - 3
    if len(tokenizer) not in (base_vocab, base_vocab + 1, vocab_rows):  # + 1: CODI's saved '[PAD]' 
        raise ModelLoadError(f"tokenizer of {tokenizer_source} has {len(tokenizer)} tokens, but the checkpoint's "
                             f"embedding has {vocab_rows} rows (base {base_vocab} + pad, BOT, EOT)")
    if spec.dtype not in DTYPES:
        raise ModelLoadError(f"dtype {spec.dtype!r}: choose from {', '.join(DTYPES)}")
    dtype = DTYPES[spec.dtype]
    hf = hf.to(spec.device, dtype).eval()
    prj = prj.to(spec.device, dtype).eval()
    reasoner = LatentReasoner(hf, prj, tokenizer, declared.num_latent, base_vocab, name=str(spec.model),
                              pad_question_to=options.get("pad_question_to"), remove_eos=declared.remove_eos)
    reasoner.options = {**declared.to_json(), "merge_lora": {"value": merged, "source": merge_source}}
    reasoner.options_line = f"{declared.describe()}, merge_lora={merged} ({merge_source})"
    return reasoner


# --- The forward loop ---------------------------------------------------------------------------------

@dataclass
class Rollout:
    """Outputs of one rollout for R = B*V rows, problem-major (row = b*V + v)."""
    tokens: list[list[int]]  # generated ids, EOS excluded
    texts: list[str]
    gold_logprob: torch.Tensor | None  # (R,) float32: sum log p(answer prompt + gold)
    latents: torch.Tensor  # (R, T, d) float32 on CPU: the vectors fed (after any ablation)
    lens_ids: torch.Tensor  # (R, T, k): logit-lens top-k token ids of the state producing each latent
    lens_probs: torch.Tensor  # (R, T, k)
    captured: dict[int, torch.Tensor]  # layer -> (R, T, d) block output at each latent step


class LatentReasoner:
    """A CODI model ready for batched latent rollouts."""

    def __init__(self, hf, prj, tokenizer, num_latent: int, base_vocab: int, name: str = "",
                 pad_question_to: int | None = None, remove_eos: bool = True):
        self.hf, self.prj, self.tokenizer = hf, prj, tokenizer
        self.num_latent, self.base_vocab, self.name = num_latent, base_vocab, name
        self.pad_id, self.bot_id, self.eot_id = base_vocab, base_vocab + 1, base_vocab + 2
        # test.py decodes over logits[..., :vocab_size - 1] of the grown vocabulary: every id but EOT.
        self.decode_vocab = base_vocab + 2
        # CODI trained with remove_eos false has EOS between question and BOT, and after EOT.
        self.remove_eos = remove_eos
        self.answer_start = [self.eot_id] + ([] if remove_eos else [tokenizer.eos_token_id])
        self.clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.options, self.options_line = {}, ""  # what load() resolved, and from where (runner/checkpoint.py)
        # A prompt template of the embedded model (codi_config.json): attended pad tokens between the
        # question and BOT up to this length, so that BOT and every latent sit at fixed positions.
        self.pad_question_to = pad_question_to
        self.eos_ids = sorted({i for i in (tokenizer.eos_token_id,) if i is not None})
        self.blocks = next(m for m in hf.modules()
                           if isinstance(m, nn.ModuleList) and len(m) == hf.config.num_hidden_layers)
        from runner import attention  # imports transformers, as the model itself did
        # Variants share the prompt's KV cache (runner/attention.py) where the family supports it;
        # None = whenever a plan has more than one variant, False = always the plain repeated cache.
        self.shared_prefix = None if attention.install(hf) else False

    @property
    def d_model(self) -> int:
        return self.hf.config.hidden_size

    @property
    def n_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    def answer_prompt(self, gold: str) -> str:
        return f"The answer is: {gold}"

    def decode(self, tokens: list[int]) -> str:
        """Generated ids -> text as CODI's test.py reads it: special tokens skipped, the tokenizer's
        declared clean-up applied (transformers 5 skips it for BPE tokenizers: "1 ,000"), stripped."""
        text = self.tokenizer.decode([t for t in tokens if t < self.base_vocab], skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
        if self.clean_up:
            for spaced, joined in CLEAN_UP:
                text = text.replace(spaced, joined)
        return text.strip()

    def _forward(self, cache, attention_mask, position_ids, inputs_embeds=None, input_ids=None, keep=1):
        shared = {"shared_prefix": cache} if hasattr(cache, "share_prefix") else {}  # read by runner/attention.py
        out = self.hf(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=True,
                      attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, logits_to_keep=keep, **shared)
        return out.logits, out.hidden_states[-1], out.cache

    def prompt_ids(self, question: str | list[int]) -> list[int]:
        """The model's prompt template for one question, as CODI's test.py builds it: the normalised
        text with the tokenizer's default special tokens (Llama-3: BOS), EOS when the model was trained
        with it (`remove_eos` false), attended pad tokens up to `pad_question_to` (the embedded
        model's fixed-length layout; none for released CODI), BOT."""
        ids = self.tokenizer(official_question(question))["input_ids"] if isinstance(question, str) \
            else list(question)
        ids = ids + ([] if self.remove_eos else [self.tokenizer.eos_token_id])
        return ids + [self.pad_id] * ((self.pad_question_to or 0) - len(ids)) + [self.bot_id]

    def _encode(self, questions: list[str] | list[list[int]], shared: bool = False):
        """Left-padded `question + BOT`; positions from the mask so a padded row equals its row alone.

        A question may also be given as token ids (benchmarks with random ids, pre-tokenised data).
        """
        ids = [self.prompt_ids(q) for q in questions]
        width = max(map(len, ids))
        input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)  # (B, L)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, hidden, cache = self._forward(self._new_cache(shared), mask, position_ids, input_ids=input_ids)
        return logits[:, -1], hidden[:, -1:], cache, mask  # (B, V'), (B, 1, d), cache, (B, L)

    def _new_cache(self, shared: bool = False):
        """A prompt cache shared by the variants, or a growing cache where every layer attends over the
        full sequence; else the model's own (None)."""
        from runner.cache import GrowingCache, SharedPrefixCache  # transformers is imported on first use
        if shared:
            return SharedPrefixCache()
        layer_types = getattr(self.hf.config, "layer_types", None) or ["full_attention"]
        if getattr(self.hf.config, "sliding_window", None) or set(layer_types) != {"full_attention"}:
            return None
        return GrowingCache()

    @torch.inference_mode()
    def rollout(self, questions: list[str], plan: Plan, golds: list[str] | None = None,
                max_new_tokens: int = 24, top_k: int = 3, capture: tuple[int, ...] = ()) -> Rollout:
        """Baseline and ablated rollouts of every question under every variant of `plan`."""
        B, T, V = len(questions), self.num_latent, len(plan.variants)
        R = B * V
        assert plan.ablate.shape == (R, T), f"plan is {tuple(plan.ablate.shape)}, expected ({R}, {T})"
        plan = plan.to(self.device, self.dtype)

        shared = self.shared_prefix if self.shared_prefix is not None else V > 1
        bot_logits, hidden, cache, mask = self._encode(questions, shared)  # one prompt cache for the V variants
        if shared:
            cache.share_prefix(V, mask)  # (B, L) stored once; each row's later tokens apart
        else:
            cache.batch_repeat_interleave(V)
        mask = mask.repeat_interleave(V, dim=0)  # (R, L)
        hidden = hidden.repeat_interleave(V, dim=0)  # (R, 1, d)
        logits = bot_logits.repeat_interleave(V, dim=0)  # (R, V')
        latents = torch.zeros(R, T, self.d_model, device=self.device, dtype=self.dtype)
        lens_ids = torch.zeros(R, T, top_k, dtype=torch.long, device=self.device)
        lens_probs = torch.zeros(R, T, top_k, device=self.device)
        captured = {layer: torch.zeros(R, T, self.d_model, device=self.device) for layer in capture}

        with _block_hooks(self.blocks, plan, captured) as hooks:
            for step in range(T):
                probs = logits[:, : self.base_vocab].float().softmax(-1)
                lens_probs[:, step], lens_ids[:, step] = probs.topk(top_k, dim=-1)
                latent = self.prj(hidden)  # (R, 1, d)
                if step > 0:  # frozen rows keep the baseline's latent wherever they do not ablate
                    latent = torch.where(plan.frozen[:, None, None], latent[plan.baseline_row], latent)
                latent = ablation.apply(plan, step, latent, layer=-1)
                latents[:, step] = latent[:, 0]
                # Early exit: steps at or past `fed` are holes, masked out of all later attention.
                live = (step < plan.fed).long()[:, None]  # (R, 1)
                position_ids = mask.sum(-1, keepdim=True)  # (R, 1): attended tokens so far
                mask = torch.cat([mask, live], dim=-1)
                hooks.step = step
                logits, hidden, cache = self._forward(cache, mask, position_ids, inputs_embeds=latent)
                logits = logits[:, -1]

        # EOT (+ EOS when remove_eos is false) in a forward of its own, as test.py feeds it: a longer
        # forward would round differently in bf16.
        eot = torch.tensor([self.answer_start] * R, device=self.device)  # (R, P)
        position_ids = mask.sum(-1, keepdim=True) + torch.arange(eot.shape[1], device=self.device)
        mask = torch.cat([mask, torch.ones_like(eot)], dim=-1)
        logits, _, cache = self._forward(cache, mask, position_ids, input_ids=eot)
        logits = logits[:, -1]  # (R, V')
        gold_logprob, filled = None, torch.zeros(R, dtype=torch.long, device=self.device)
        out = torch.full((R, max_new_tokens), -1, dtype=torch.long, device=self.device)  # -1: no token
        if golds is not None:
            assert len(golds) == B, f"{len(golds)} golds for {B} questions"
            gold_logprob, logits, mask, filled = self._gold_logprob(golds, V, logits, cache, mask, out)
        tokens = self._greedy(logits, cache, mask, out, filled)
        return Rollout(tokens, [self.decode(t) for t in tokens], gold_logprob, latents.float().cpu(),
                       lens_ids.cpu(), lens_probs.cpu(), {k: v.cpu() for k, v in captured.items()})

    def _gold_logprob(self, golds: list[str], V: int, logits, cache, mask, out: torch.Tensor):
        """Sum of log p(`The answer is: {gold}`) after EOT, teacher-forced, (R,) on the CPU; and the
        forced answer as a draft of greedy decoding, accepted while greedy agrees with it (speculative
        decoding, the gold as the draft): the accepted tokens go into `out` without a forward of their
        own, the rest of the draft is masked out of later attention instead of cropped. Returns
        (log-probs, the logits after the accepted tokens (R, V'), the mask, accepted counts (R,))."""
        R, max_new_tokens = out.shape
        answers = [self.tokenizer(self.answer_prompt(g), add_special_tokens=False)["input_ids"] for g in golds]
        width = max(map(len, answers))
        answer_ids = torch.tensor([a + [self.pad_id] * (width - len(a)) for a in answers],
                                  device=self.device).repeat_interleave(V, dim=0)  # (R, A), right-padded
        answer_len = torch.tensor(list(map(len, answers)), device=self.device).repeat_interleave(V)  # (R,)
        valid = torch.arange(width, device=self.device)[None] < answer_len[:, None]  # (R, A)
        scores = logits[:, None]  # (R, 1, V'): predicts the first answer token
        # Only in float32: in bf16 a multi-token forward rounds differently from one-token steps
        # (test.py decodes one token at a time), so there the draft is scored, cropped, not accepted.
        draft, length = self.dtype == torch.float32, cache.get_seq_length()
        if width > 1:  # causal: the padding after a short answer changes none of its own logits
            fed = answer_ids[:, :-1]  # (R, A-1)
            position_ids = mask.sum(-1, keepdim=True) + torch.arange(width - 1, device=self.device)
            step_mask = torch.cat([mask, torch.ones_like(fed)], dim=-1)
            more, _, cache = self._forward(cache, step_mask, position_ids, input_ids=fed, keep=width - 1)
            scores = torch.cat([scores, more], dim=1)  # (R, A, V')
        logprobs = scores[..., : self.decode_vocab].float().log_softmax(-1)  # (R, A, V)
        # Padding positions are gathered at id 0 (a padding id need not lie in the slice); masked below.
        picked = logprobs.gather(-1, answer_ids.masked_fill(~valid, 0)[..., None])[..., 0]  # (R, A)
        gold_logprob = (picked * valid).sum(-1).cpu()
        if not draft:
            if width > 1:
                cache.crop(length - cache.get_seq_length())  # negative = tokens to drop: back to "... EOT"
            return gold_logprob, logits, mask, torch.zeros(R, dtype=torch.long, device=self.device)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        agree = (scores[..., : self.decode_vocab].argmax(-1) == answer_ids) & valid & ~torch.isin(answer_ids, eos)
        # The last answer token was not fed: a row that agrees throughout emits it from the loop.
        accepted = agree.long().cumprod(-1).sum(-1).clamp(max=min(width - 1, max_new_tokens))  # (R,)
        drafted = torch.arange(width - 1, device=self.device)[None] < accepted[:, None]  # (R, A-1)
        room = min(width - 1, max_new_tokens)
        out[:, :room] = torch.where(drafted, answer_ids[:, :-1], -1)[:, :room]
        mask = torch.cat([mask, drafted.long()], dim=-1)
        return gold_logprob, scores[torch.arange(R, device=self.device), accepted], mask, accepted

    def _greedy(self, logits, cache, mask, out: torch.Tensor, filled: torch.Tensor) -> list[list[int]]:
        """Batched greedy decoding over `decode_vocab` until EOS into out (R, max_new_tokens), after the
        `filled` (R,) tokens already there; finished rows leave the batch."""
        R, max_new_tokens = out.shape
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        active = torch.arange(R, device=self.device)  # (A,) rows still decoding
        while True:
            next_ids = logits[:, : self.decode_vocab].argmax(-1)  # (A,)
            done = torch.isin(next_ids, eos) | (filled >= max_new_tokens)
            write = (~done).nonzero()[:, 0]
            out[active[write], filled[write]] = next_ids[write]
            filled = filled + ~done
            done |= filled >= max_new_tokens
            if bool(done.all()):
                break
            if bool(done.any()):  # drop finished rows so later steps cost only what is left
                keep = (~done).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                active, mask, next_ids, filled = active[keep], mask[keep], next_ids[keep], filled[keep]
            position_ids = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            logits, _, cache = self._forward(cache, mask, position_ids, input_ids=next_ids[:, None])
            logits = logits[:, -1]
        return [[t for t in row if t >= 0] for row in out.tolist()]


class _BlockHooks:
    def __init__(self):
        self.step = 0


@contextlib.contextmanager
def _block_hooks(blocks: nn.ModuleList, plan: Plan, captured: dict[int, torch.Tensor]):
    """Forward hooks on the blocks a plan ablates or captures; always removed on exit."""
    state, handles = _BlockHooks(), []

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (R, 1, d)
            if layer in plan.layers:
                hidden = ablation.apply(plan, state.step, hidden, layer)
            if layer in captured:
                captured[layer][:, state.step] = hidden[:, -1].float()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    try:
        for layer in sorted(set(plan.layers) | set(captured)):
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield state
    finally:
        for handle in handles:
            handle.remove()
