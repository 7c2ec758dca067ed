"""What a CODI checkpoint says about how it was trained, and what is assumed where it says nothing.

CODI's `test.py` takes these from its command line, not from the checkpoint: the number of
latents, LoRA alpha, `use_prj` (latent = prj(last hidden state), else the state itself),
`prj_no_ln` (prj without its LayerNorm) and `remove_eos` (false: EOS between question and BOT,
and after EOT). Each value comes from the first of: the user (CLI flag or Run page),
`codi_config.json` beside the weights, `training_args.bin` (the TrainingArguments CODI's Trainer
saves; LoRA alpha is a model argument and is not in it), else the released models' value
(zen-E/CODI-*), marked "assumed". Every value and its source is printed when a sweep starts and
stored in the run's config, so a wrong assumption is visible, never silent.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The released models' values (scripts/test_*.sh of zhenyi4/codi): what is assumed when nothing says otherwise.
RELEASED = {"num_latent": 6, "lora_alpha": 32.0, "use_prj": True, "prj_no_ln": False, "remove_eos": True}
TRAINING_ARGS = "training_args.bin"
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


def resolve(folder: Path, given: dict, codi_config: dict) -> CheckpointOptions:
    """Each option from `given` (non-None), codi_config.json, training_args.bin, else RELEASED."""
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
