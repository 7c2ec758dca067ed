"""What a CODI checkpoint says about how it was trained, and what is assumed where it says nothing.

CODI's `test.py` takes these from its command line, not from the checkpoint: the number of
latents, LoRA alpha, `use_prj` (latent = prj(last hidden state), else the state itself),
`prj_no_ln` (prj without its LayerNorm) and `remove_eos` (false: EOS between question and BOT,
and after EOT). Each value comes from the first of: the user (CLI flag or Run page),
`codi_config.json` beside the weights, `training_args.bin` (the TrainingArguments CODI's Trainer
saves; LoRA alpha is a model argument and is not in it), else the released models' value
(zen-E/CODI-*), marked "assumed". Every value and its source is printed when a sweep starts and
stored in the run's config, so a wrong assumption is visible, never silent.

`num_latent` 0 is a legal checkpoint option and means "no latent thoughts": the question, BOT, then
EOT at once (what the exit scheme's k = 0 variant measures). A sweep refuses such a model because it
has nothing to ablate (`unusable`). Checks that need the files or the loaded weights live here too,
so that the CLI and the dashboard refuse a broken checkpoint with the same one line: tokenizer files
that are not what their names say (`resolve` screens them: it is where loading first reads the
folder), and weights holding NaN or inf (`unusable`: every answer would be garbage).
"""
from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The released models' values (scripts/test_*.sh of zhenyi4/codi): what is assumed when nothing says otherwise.
RELEASED = {"num_latent": 6, "lora_alpha": 32.0, "use_prj": True, "prj_no_ln": False, "remove_eos": True}
TRAINING_ARGS = "training_args.bin"
# The tokenizer files transformers reads as JSON objects; tokenizer.json must also parse as a tokenizer.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")
ASSUMED = "assumed: released CODI models"


class OptionsError(ValueError):
    """A declared option has the wrong type or value; the message names the file and the key."""


@dataclass(frozen=True)
class CheckpointOptions:
    num_latent: int = 6  # latent steps T
    lora_alpha: float = 32.0  # LoRA scale alpha / r (unused without LoRA)
    use_prj: bool = True  # latent = prj(last hidden state); False: the hidden state itself
    prj_no_ln: bool = False  # prj without its final LayerNorm
    remove_eos: bool = True  # False: EOS after the question (before BOT) and after EOT
    sources: tuple[tuple[str, str], ...] = ()  # (option, where its value came from)
    notes: tuple[str, ...] = ()  # files that were there but could not be read

    def to_json(self) -> dict:
        return {name: {"value": getattr(self, name), "source": source} for name, source in self.sources}

    def describe(self) -> str:
        """One line: every option with its value and source, e.g. 'num_latent=6 (codi_config.json), ...'."""
        return "; ".join([", ".join(f"{name}={getattr(self, name)} ({source})" for name, source in self.sources),
                          *self.notes])


def _check(name: str, value, where: str):
    if name == "num_latent":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OptionsError(f"{where}: num_latent should be a whole number >= 0, got {value!r}")
    elif name == "lora_alpha":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise OptionsError(f"{where}: lora_alpha should be a positive number, got {value!r}")
        value = float(value)
    elif not isinstance(value, bool):
        raise OptionsError(f"{where}: {name} should be true or false, got {value!r}")
    return value


class _StandIn:
    """Whatever class a pickle names: records its arguments and state; nothing is imported or run."""

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, {}

    def __setstate__(self, state):
        state = state[0] if isinstance(state, tuple) and state else state  # (dict, slots)
        self.state = state if isinstance(state, dict) else {}


class _RecordingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return type(name, (_StandIn,), {})

    def persistent_load(self, pid):  # tensors: none of the options we read
        return None


def read_training_args(path: Path) -> dict:
    """The options CODI's TrainingArguments hold, read from torch.save's zip without unpickling code."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        saved = _RecordingUnpickler(archive.open(name)).load()
    state = getattr(saved, "state", {})
    return {k: state[k] for k in ("num_latent", "use_prj", "prj_no_ln", "remove_eos") if k in state}


def screen_tokenizer(folder: Path) -> None:
    """Refuse, in one line naming the file, tokenizer files in `folder` that transformers could not read."""
    for name in TOKENIZER_JSON:
        path = folder / name
        if not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
            value = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            cut = isinstance(error, json.JSONDecodeError) and error.pos >= len(error.doc.rstrip())
            raise OptionsError(f"{path}: not a tokenizer file: {'truncated' if cut else 'not JSON'} ({error})") from None
        if not isinstance(value, dict):
            raise OptionsError(f"{path}: not a tokenizer file: a JSON {type(value).__name__}, not an object")
        if name == "tokenizer.json":
            from tokenizers import Tokenizer
            try:
                Tokenizer.from_str(text)
            except Exception as error:  # the Rust library's own message, e.g. "missing field `model`"
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise OptionsError(f"{path}: not a tokenizer file ({reason})") from None


def nonfinite_weights(reasoner) -> str | None:
    """Which weight tensors of a loaded model hold NaN or inf (one line), or None when all are finite."""
    seen, bad, total = set(), [], 0
    for prefix, module in (("", reasoner.hf), ("prj.", reasoner.prj)):
        for name, weight in module.named_parameters():
            if id(weight) in seen:  # tied embeddings: one tensor, counted once
                continue
            seen.add(id(weight))
            total += 1
            if weight.is_floating_point() and not bool(weight.isfinite().all()):
                bad.append(prefix + name)
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return (f"{reasoner.name}: {len(bad)} of {total} weight tensors hold NaN or infinite values ({shown}): every "
            f"answer would be garbage")


def unusable(reasoner, allow_nonfinite: bool = False, override: str = "") -> str | None:
    """Why a loaded model cannot be swept (one line), or None. `override`: how to sweep NaN weights anyway."""
    if reasoner.num_latent == 0:
        source = (getattr(reasoner, "options", {}).get("num_latent") or {}).get("source", "given")
        return (f"{reasoner.name}: num_latent is 0 ({source}), which means no latent thoughts (BOT, then EOT at "
                f"once): a sweep has nothing to ablate; give 1 or more (the released models use 6)")
    nonfinite = None if allow_nonfinite else nonfinite_weights(reasoner)
    return None if nonfinite is None else nonfinite + override


def resolve(folder: Path, given: dict, codi_config: dict) -> CheckpointOptions:
    """Each option from `given` (non-None), codi_config.json, training_args.bin, else RELEASED."""
    screen_tokenizer(folder)
    layers = [("given", {k: v for k, v in given.items() if v is not None}),
              ("codi_config.json", {k: v for k, v in codi_config.items() if k in RELEASED})]
    notes = ()
    if (folder / TRAINING_ARGS).is_file():
        try:
            layers.append((TRAINING_ARGS, read_training_args(folder / TRAINING_ARGS)))
        except Exception as error:  # a legacy (non-zip) torch.save, a truncated file: anything but code
            notes = (f"{TRAINING_ARGS} not read ({type(error).__name__})",)
    values, sources = {}, []
    for name, default in RELEASED.items():
        source, value = next(((s, layer[name]) for s, layer in layers if name in layer), (ASSUMED, default))
        where = "--" + name.replace("_", "-") if source == "given" else folder / source if source != ASSUMED else source
        values[name] = _check(name, value, str(where))
        sources.append((name, source))
    return CheckpointOptions(**values, sources=tuple(sources), notes=notes)
