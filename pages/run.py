"""Run: choose a model, dataset and variants; Start, Stop, Resume; the runs of this database (notes, tags, delete)."""
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.charts import difficulty_histogram
from dashboard.sweep_form import (SEED_PRESET, apply_seed_preset, load_model, model_spec, options_caption, saved_upload,
                                  sweep_form)
from db import queries, seed


def save_edits(svc, rows: list) -> None:
    """on_click (a callback, so the edits are read before anything reruns): notes, tags, names -> runs."""
    for run_id, new in rows:
        tags = ", ".join(t.strip() for t in str(new.tags or "").split(",") if t.strip())
        svc.store.update_run(run_id, name=str(new.name or f"run {run_id}"), notes=str(new.notes or ""), tags=tags)
    st.toast(f"Saved {len(rows)} run(s).", icon=":material/save:")


def import_seed_files(svc) -> None:
    """on_click of Import: the uploads (a scores file, maybe a validation file) become a run, all or nothing."""
    folder = Path(state.db_path()).parent
    paths = [Path(saved_upload(upload, folder)) for upload in st.session_state["seed_files"]]
    scores = [p for p in paths if "validation" not in p.name]
    validation = [p for p in paths if "validation" in p.name]
    try:
        if len(scores) != 1 or len(validation) > 1:
            raise seed.SeedFormatError("give one scores file and at most one validation file")
        run_id = seed.import_seed(svc.store, scores[0], validation[0] if validation else None)
    except (seed.SeedFormatError, *state.EXPLAINED) as error:
        st.session_state["sweep_feedback"] = ("error", f"Not imported: {error}")
    else:
        state.select(run_id)
        st.session_state["sweep_feedback"] = ("success", f"Imported as run #{run_id}.")


svc = state.open_page()
runs = queries.runs(svc.store)
st.title("Run a sweep")
st.caption("Each problem runs once as-is (the baseline) and once per ablation variant; every answer is stored as "
           "its batch completes, so a stopped or interrupted run resumes where it stopped.")
if runs.empty:
    state.empty_database(svc)

plan = sweep_form(Path(state.db_path()).parent)
with st.container(horizontal=True):
    st.button(SEED_PRESET + " preset", icon=":material/history:", on_click=apply_seed_preset,
              help="The old script's setting: prefix · zero · resid:8 on Llama (else the middle block) · recompute")
    if plan.model is None:
        st.button("Load model", icon=":material/memory:", on_click=load_model,
                  help="Load the checkpoint now to check it and its layer count (Start loads it anyway)")
if plan.model is not None:
    st.caption(f"Model loaded: {plan.model.hf.config.model_type}, {plan.model.n_layers} blocks, "
               f"{plan.model.num_latent} latents, width {plan.model.d_model}.")
    st.caption(f"Checkpoint options: {plan.model.options_line}", help="Each value with where it came from")

if plan.dataset is not None:
    with st.expander(f"Dataset check: {plan.dataset['n_problems']} usable problems, "
                     f"{len(plan.dataset['rejected'])} rejected", expanded=bool(plan.dataset["rejected"])):
        left, right = st.columns([3, 2])
        left.plotly_chart(difficulty_histogram(plan.dataset["difficulty"]), key="dataset_histogram")
        if plan.dataset["rejected"]:
            right.dataframe(pd.DataFrame(plan.dataset["rejected"]), hide_index=True, height=240,
                            column_config={"line": st.column_config.NumberColumn("line", width="small")})
        else:
            right.success("Every record is usable.")
for issue in plan.issues:
    st.error(issue, icon=":material/block:")
for warning in plan.warnings:
    st.warning(warning)

if plan.n_variants and plan.dataset and plan.dataset["n_problems"]:
    n = min(plan.config.limit or plan.dataset["n_problems"], plan.dataset["n_problems"])
    st.caption(f"{plan.n_variants} variants per problem (baseline included) × {n:,} problems = "
               f"{plan.n_variants * n:,} rollouts.")

running = svc.running
run = state.selected_run(svc)
with st.container(horizontal=True):
    st.button("Start", type="primary", icon=":material/play_arrow:", on_click=state.start_sweep, args=(plan.config,),
              disabled=bool(plan.issues) or running,
              help="Fix the problems listed above first" if plan.issues else
              "One sweep at a time: stop the running one first" if running else None)
    st.button("Stop", icon=":material/stop:", on_click=state.stop_sweep, disabled=not running)
    resumable = (run is not None and not running and run["source"] == "sweep"
                 and run["status"] in ("stopped", "interrupted", "failed"))
    st.button(f"Resume run #{run['id']}" if resumable else "Resume", icon=":material/replay:",
              on_click=state.resume_sweep, args=(int(run["id"]),) if run is not None else (), disabled=not resumable,
              help="Continues the run selected in the sidebar where it stopped")
state.show_feedback()
if run is not None and run["source"] == "sweep":
    st.caption(f"Run #{run['id']} checkpoint options: {options_caption(svc.store.run_row(int(run['id']))['config'])}")

st.subheader("Runs in this database")
if runs.empty:
    st.caption("None yet.")
else:
    table = runs.assign(progress=runs["done"] / runs["total"].where(runs["total"] > 0),
                        problems=[f"{d} / {t}" for d, t in zip(runs["done"], runs["total"])])
    columns = ["id", "name", "status", "progress", "problems", "created", "source", "notes", "tags"]
    edited = st.data_editor(
        table[columns], key="runs_editor", hide_index=True, disabled=[c for c in columns if c not in
                                                                      ("name", "notes", "tags")],
        column_config={"id": st.column_config.NumberColumn("run", format="#%d", width="small"),
                       "progress": st.column_config.ProgressColumn("progress", format="percent"),
                       "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
                       "notes": st.column_config.TextColumn("notes", width="medium"),
                       "tags": st.column_config.TextColumn("tags", help="comma separated"),
                       "name": st.column_config.TextColumn("name")})
    changes = [(int(new.id), new) for old, new in zip(table[columns].itertuples(), edited.itertuples())
               if (old.name, old.notes, old.tags) != (new.name, new.notes, new.tags)]

    actions = st.container(horizontal=True)
    actions.button(f"Save {len(changes)} change(s)" if changes else "No unsaved changes", disabled=not changes,
                   icon=":material/save:", key="save_runs", on_click=save_edits, args=(svc, changes))

    @st.dialog("Delete a run")
    def confirm_delete(run_id: int, name: str, done: int) -> None:
        st.write(f"Delete run **#{run_id} {name}** and its {done} problems' results from `{svc.store.path}`? "
                 "This cannot be undone.")
        if st.button("Delete", type="primary", icon=":material/delete:"):
            svc.store.delete_run(run_id)
            st.rerun()

    with actions.popover("Delete a run", icon=":material/delete:"):
        doomed = st.selectbox("Run to delete", runs.to_dict("records"), index=None, placeholder="choose a run",
                              format_func=lambda r: f"#{r['id']} · {r['name']} · {r['status']}")
        busy = doomed is not None and running and svc.status() and svc.status().run_id == doomed["id"]
        if st.button("Delete…", disabled=doomed is None or bool(busy),
                     help="Stop the sweep first" if busy else None):
            confirm_delete(int(doomed["id"]), doomed["name"], int(doomed["done"]))


with st.expander("Import the old script's results", icon=":material/upload_file:"):
    files = st.file_uploader("step_importance_scores.json (and optionally step_importance_validation.json)",
                             type="json", accept_multiple_files=True, key="seed_files")
    st.button("Import", disabled=not files, on_click=import_seed_files, args=(svc,))
