"""Load a CODI checkpoint (released layout, or the embedded default) into a LatentReasoner.

CODI (Continuous Chain-of-Thought via Self-Distillation) = a Hugging Face causal LM with three
tokens added (pad = V, BOT = V+1, EOT = V+2), optional LoRA on it, and a projection MLP `prj`.
The rollout loop itself, the only forward loop, is runner/rollout.py's `LatentReasoner.rollout`
(imported here, so `from runner.model import LatentReasoner` is the one entry point).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from runner import checkpoint, forward
from runner.checkpoint import CheckpointOptions
from runner.errors import ModelLoadError  # noqa: F401  (raised here; listed in runner/errors.py)
from runner.rollout import LatentReasoner, Rollout, official_question  # noqa: F401 (the entry point's names)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
CODI_PREFIX = "codi.base_model.model."
CODI_CONFIG = "codi_config.json"  # beside the weights: base_model, pad_question_to, runner/checkpoint.py's options
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A notice transformers prints while peft wraps the model, about transformers' own internals and not about
# the checkpoint: it would add lines to the CLI's one-line errors (DESIGN.md section 6).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


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
    if not forward.supported(config):
        raise ModelLoadError(f"base model {base_name!r} is a {config.model_type!r} model: ThoughtSweep runs CODI's "
                             f"two families, GPT-2 and Llama (full attention)")
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
