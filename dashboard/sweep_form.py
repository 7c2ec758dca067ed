"""The Run page's sweep options: widgets -> a SweepConfig, and every reason it cannot start yet.

Problems are found before Start is possible: SweepConfig.check(), the dataset's validation report,
the model folder, and (once the model is loaded) the residual-stream layer against its depth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from dashboard import data, state, uploads
from runner.ablation import METHODS, MODES, SCHEMES, expand, parse_site
from runner.errors import AblationError, ThoughtSweepError
from runner.model import ModelSpec
from runner.sweep import SweepConfig

MODEL_CHOICES = ("Embedded default", "Local CODI checkpoint")
DATASET_CHOICES = ("Built-in problems", "GSM8K .jsonl file", "Old script's .json file", "Upload a file")
PATH_HINTS = {"GSM8K .jsonl file": "../shared/data/gsm8k/test.jsonl", "Old script's .json file": "problems.json"}
SEED_PRESET = "Old script's setup"
SEED_PRESET_HELP = ("Reproduces the configuration of the old step-importance script (the seed, MECH-02): the prefix "
                    "scheme (k = 1..T ablates latents 0..k-1), zeroing, at the residual stream after block 8 of "
                    "Llama-3.2-1B's 16 (the middle block of other models), recompute mode (later latents follow "
                    "the ablated state). Loads the model to know its depth.")
WIDGET = 160  # px: the narrow inputs sit in rows that wrap rather than squeeze
KEEP = dict(persist_state="session")  # the form survives a visit to another page
FROM_CHECKPOINT = "from the checkpoint"
# Checkpoint options with three states: None (what the checkpoint declares, runner/checkpoint.py), True, False.
TRI_STATE = {"merge_lora": ("Merge LoRA", "default: merged in float32 only; bf16/fp16 run the adapters unmerged"),
             "remove_eos": ("Remove EOS", "no: trained with EOS after the question and after EOT"),
             "use_prj": ("Use prj", "no: the latent is the last hidden state itself"),
             "prj_no_ln": ("prj without LayerNorm", "yes: trained with prj_no_ln")}
CHOICES = {FROM_CHECKPOINT: None, "yes": True, "no": False}


@dataclass
class Plan:
    """What the form produced: the config, what blocks Start, what only deserves a warning."""
    config: SweepConfig
    issues: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dataset: dict | None = None  # validate-data's report
    model: object | None = None  # the loaded LatentReasoner, once loaded
    n_variants: int | None = None  # rows per problem, baseline included


def _init() -> None:
    defaults = {"model_choice": MODEL_CHOICES[0], "model_path": "", "base_model": "", "dataset_choice":
                DATASET_CHOICES[0], "dataset_path": "", "limit": 0, "validation": 0, "shuffle": False, "seed": 0,
                "schemes": ["prefix", "single", "suffix"], "methods": ["zero"], "site_kind": "latent",
                "site_layer": 2, "mode": "recompute", "batch_auto": True, "batch_size": 16, "device": "cpu",
                "dtype": "float32", "run_name": "", "loaded_models": [], "num_latent": None, "lora_alpha": None,
                **{key: FROM_CHECKPOINT for key in TRI_STATE}}
    for key, value in defaults.items():
        if key not in st.session_state:
            st.session_state[key] = value


def model_spec() -> ModelSpec:
    local = st.session_state["model_choice"] == MODEL_CHOICES[1]
    alpha = st.session_state["lora_alpha"]
    return ModelSpec(model=st.session_state["model_path"].strip() if local else "default",
                     base_model=(st.session_state["base_model"].strip() or None) if local else None,
                     device=st.session_state["device"], dtype=st.session_state["dtype"],
                     num_latent=st.session_state["num_latent"], lora_alpha=None if alpha is None else float(alpha),
                     **{key: CHOICES[st.session_state[key]] for key in TRI_STATE})


def options_caption(run_config: str | dict) -> str:
    """A stored run's checkpoint options (runs.config) as one line: 'num_latent=6 (codi_config.json), ...'."""
    options = (json.loads(run_config) if isinstance(run_config, str) else run_config).get("checkpoint_options") or {}
    return ", ".join(f"{name}={o['value']} ({o['source']})" for name, o in options.items()) or "not recorded"


def load_model() -> None:
    """on_click of Load model: load it once (the service caches it per spec) or say why not."""
    spec = model_spec()
    try:
        state.service().model(spec)
    except Exception as error:  # ModelLoadError, or whatever a broken checkpoint makes transformers raise
        st.session_state["sweep_feedback"] = ("error", f"Model not loaded: {error}")
        return
    st.session_state["loaded_models"] = [*st.session_state["loaded_models"], spec]


def apply_seed_preset() -> None:
    """The old script's setting: prefix zeroing of the residual stream at block 8 of Llama's 16, else mid-depth."""
    load_model()
    spec = model_spec()
    if spec not in st.session_state["loaded_models"]:
        return
    reasoner = state.service().model(spec)
    llama = reasoner.hf.config.model_type == "llama" and reasoner.n_layers > 8
    st.session_state.update(schemes=["prefix"], methods=["zero"], site_kind="residual stream", mode="recompute",
                            site_layer=8 if llama else reasoner.n_layers // 2)
    layer = st.session_state["site_layer"]
    st.session_state["sweep_feedback"] = ("info", f"{SEED_PRESET}: prefix · zero · resid:{layer} · recompute "
                                                  f"({reasoner.n_layers} blocks), as the old script swept.")


def _model_widgets(plan_issues: list[str]) -> None:
    st.radio("Model", MODEL_CHOICES, key="model_choice", **KEEP, horizontal=True,
             help="The embedded default is a small CODI model shipped in models/default")
    if st.session_state["model_choice"] == MODEL_CHOICES[1]:
        st.text_input("Checkpoint folder", key="model_path", **KEEP, placeholder="/models/CODI-llama3.2-1b-Instruct",
                      help="A released-format CODI checkpoint: model.safetensors or pytorch_model.bin")
        st.text_input("Base model (config + tokenizer)", key="base_model", **KEEP,
                      placeholder="/models/Llama-3.2-1B-Instruct, or empty to use the checkpoint's own")
        _checkpoint_option_widgets()
        path = st.session_state["model_path"].strip()
        if not path:
            plan_issues.append("Model: give the checkpoint folder.")
        elif not Path(path).expanduser().is_dir():
            plan_issues.append(f"Model: {path} is not a folder.")


def _checkpoint_option_widgets() -> None:
    with st.expander("Checkpoint options (default: what the checkpoint declares)"):
        with st.container(horizontal=True):  # wraps at 800 px instead of squeezing the labels
            st.number_input("Latent steps", min_value=0, step=1, key="num_latent", **KEEP, width=WIDGET,
                            placeholder=FROM_CHECKPOINT, help="T; released models: 6")
            st.number_input("LoRA alpha", min_value=0.0, step=8.0, key="lora_alpha", **KEEP, width=WIDGET,
                            placeholder=FROM_CHECKPOINT, help="released models: 32")
            for key, (label, why) in TRI_STATE.items():
                st.selectbox(label, list(CHOICES), key=key, **KEEP, help=why, width=WIDGET)


def _dataset_widgets(plan_issues: list[str]) -> str | None:
    choice = st.radio("Dataset", DATASET_CHOICES, key="dataset_choice", **KEEP, horizontal=True)
    if choice == DATASET_CHOICES[0]:
        return "builtin"
    if choice == DATASET_CHOICES[3]:
        upload = st.file_uploader("Dataset file", type=["jsonl", "json", "csv", "parquet"],
                                  help="GSM8K .jsonl, the old script's .json, or .csv / .parquet with question and "
                                       "answer columns; at most 20 MB (give a path for bigger files)")
        if upload is None:
            plan_issues.append("Dataset: upload a file.")
            return None
        staged = uploads.stage(upload.name, upload.getvalue())
        st.session_state["upload_names"] = {**st.session_state.get("upload_names", {}), str(staged): upload.name}
        fields = uploads.columns(staged)
        if not fields:
            return str(staged)  # unreadable: validation says why
        with st.container(horizontal=True):
            for key, standard, label in (("question_field", "question", "Question field"),
                                         ("answer_field", "answer", "Answer field")):
                if st.session_state.get(key) not in fields:  # another file's choice; no guess beyond the name
                    st.session_state[key] = standard if standard in fields else None
                st.selectbox(label, fields, key=key, width=220, placeholder="choose a field",
                             help="The file's field holding the " + standard + ("" if standard == "question" else
                                  " (a GSM8K solution ending in '#### N', or the number)"))
        unnamed = [f"'{k}'" for k in ("question", "answer") if st.session_state[f"{k}_field"] is None]
        if unnamed:
            plan_issues.append(f"Dataset: {upload.name} has no field named {' or '.join(unnamed)} (its fields: "
                               f"{', '.join(fields)}): choose under Question field / Answer field.")
            return None
        target = uploads.mapped(staged, st.session_state["question_field"], st.session_state["answer_field"])
        st.session_state["upload_names"][str(target)] = upload.name
        return str(target)
    st.text_input("Dataset path", key="dataset_path", **KEEP, placeholder=PATH_HINTS[choice])
    path = st.session_state["dataset_path"].strip()
    if not path:
        plan_issues.append("Dataset: give the file's path.")
        return None
    return path


def sweep_form() -> Plan:
    """Every option of a sweep; returns the plan with its config and what blocks Start."""
    _init()
    issues: list[str] = []
    left, right = st.columns(2, gap="large")
    with left.container(border=True):
        st.markdown("**Model and data**")
        _model_widgets(issues)
        dataset = _dataset_widgets(issues)
        with st.container(horizontal=True):  # wraps: at 800 px a label never breaks mid-word
            st.number_input("Limit (0 = all)", min_value=0, step=10, key="limit", **KEEP, help="First N problems",
                            width=WIDGET)
            st.number_input("Validation subset", min_value=0, step=10, key="validation", **KEEP, width=WIDGET,
                            help="A stratified subset swept first, to check the pattern before the full run")
            st.number_input("Seed", min_value=0, step=1, key="seed", **KEEP, width=WIDGET,
                            help="Validation sampling, shuffle, noise, resample")
        st.checkbox("Shuffle before the limit", key="shuffle", **KEEP)
        st.text_input("Run name", key="run_name", **KEEP, placeholder="model on dataset")
    with right.container(border=True):
        st.markdown("**Variants and compute**")
        st.multiselect("Schemes", SCHEMES, key="schemes", **KEEP, help="prefix: latents 0..k-1; single: latent k; "
                       "suffix: latents k..T-1; exit: answer after k latents")
        st.multiselect("Methods", METHODS, key="methods", **KEEP, help="What replaces an ablated latent")
        with st.container(horizontal=True):
            st.radio("Site", ["latent", "residual stream"], key="site_kind", **KEEP, horizontal=True, width="content",
                     help="latent: the vector fed back as input; residual stream: block L's output at that position")
            st.number_input("Block L", min_value=0, step=1, key="site_layer", **KEEP, width=WIDGET,
                            disabled=st.session_state["site_kind"] == "latent")
        st.radio("Mode", MODES, key="mode", **KEEP, horizontal=True,
                 help="recompute: later latents follow the ablated state; frozen: they keep their baseline values")
        with st.container(horizontal=True):
            st.selectbox("Device", ["cpu", "cuda"], key="device", **KEEP, width=WIDGET)
            st.selectbox("Dtype", ["float32", "bfloat16", "float16"], key="dtype", **KEEP, width=WIDGET)
            st.number_input("Batch size", min_value=1, step=8, key="batch_size", **KEEP, width=WIDGET,
                            disabled=st.session_state["batch_auto"], help="Problems per batch")
        st.toggle("Automatic batch size", key="batch_auto", **KEEP,
                  help="Chosen once for the run from the model's size and the free memory (at most 256 rows of "
                       "problems x variants on a CPU, up to 1,024 for a small model), kept on resume so the run's "
                       "numbers do not depend on it")

    site = "latent" if st.session_state["site_kind"] == "latent" else f"resid:{st.session_state['site_layer']}"
    config = SweepConfig(
        model=model_spec().model, base_model=model_spec().base_model, dataset=dataset or "",
        run_name=st.session_state["run_name"].strip() or None, limit=st.session_state["limit"] or None,
        shuffle=st.session_state["shuffle"], validation=st.session_state["validation"],
        schemes=tuple(st.session_state["schemes"]), methods=tuple(st.session_state["methods"]), site=site,
        mode=st.session_state["mode"], batch_size="auto" if st.session_state["batch_auto"] else
        int(st.session_state["batch_size"]), device=st.session_state["device"], dtype=st.session_state["dtype"],
        seed=int(st.session_state["seed"]), **{k: getattr(model_spec(), k) for k in (
            "num_latent", "lora_alpha", "merge_lora", "remove_eos", "use_prj", "prj_no_ln")})
    return _check(Plan(config, issues))


def _as_uploaded(message: str, dataset: str) -> str:
    """An upload's error names the file the user chose, not where it was staged; fields are picked above."""
    name = st.session_state.get("upload_names", {}).get(dataset)
    if name is None:
        return message
    message = uploads.shown(message.replace(dataset, name))
    if "; name yours with question_field/answer_field" in message:
        message = message.split("; name yours")[0] + ": choose them under Question field / Answer field"
    return message


def _check(plan: Plan) -> Plan:
    config = plan.config
    try:
        config.check()
    except ThoughtSweepError as error:
        plan.issues.append(f"Options: {error}")
    spec = config.model_spec()
    if spec in st.session_state["loaded_models"]:  # loading takes seconds: only once asked (Load, preset, Start)
        try:
            plan.model = state.service().model(spec)
        except Exception as error:
            plan.issues.append(f"Model: {error}")
    if plan.model is not None:
        try:
            parse_site(config.site, plan.model.n_layers)
        except AblationError as error:
            plan.issues.append(f"Site: {error}")
    T = plan.model.num_latent if plan.model is not None else config.num_latent  # the model's own, once loaded
    if T is not None:
        try:
            plan.n_variants = len(expand(config.schemes, config.methods, config.site, config.mode, T))
        except AblationError:
            pass  # already an issue
    if config.dataset:
        path = Path(config.dataset)
        checked = data.validate_dataset(config.dataset, path.stat().st_mtime if path.is_file() else None)
        if "error" in checked:
            plan.issues.append(f"Dataset: {_as_uploaded(checked['error'], config.dataset)}")
        else:
            plan.dataset = checked["report"]
            n = plan.dataset["n_problems"]
            if n == 0:
                plan.issues.append("Dataset: no usable problem in it (see the rejected lines below).")
            elif plan.dataset["rejected"]:  # a sweep reads every record: it would stop at the first bad one
                plan.issues.append(f"Dataset: {len(plan.dataset['rejected'])} record(s) rejected (listed below): "
                                   "fix or remove them, then upload the file again.")
            if config.limit and config.limit > n:
                plan.warnings.append(f"Limit {config.limit} is more than the {n} usable problems: all will run.")
            if config.validation and n and not plan.dataset["rejected"] and (short := data.validation_shortfall(
                    config.dataset, path.stat().st_mtime if path.is_file() else None, config.limit,
                    config.seed if config.shuffle else None, config.validation, config.seed)):
                plan.warnings.append(f"Validation: {short}.")
    return plan
