"""Run: choose a model, dataset and variants; Start, Stop, Resume; the runs of this database, live."""
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import data, runs_table, safe, state, uploads
from dashboard.charts import difficulty_histogram
from dashboard.sweep_form import (SEED_PRESET, SEED_PRESET_HELP, apply_seed_preset, load_model, options_caption,
                                  sweep_form)
from db import queries, seed


def save_edits(svc, rows: list) -> None:
    """on_click (a callback, so the edits are read before anything reruns): notes, tags, names -> runs."""
    for run_id, new in rows:
        tags = ", ".join(runs_table.tags_of(new.tags))
        svc.store.update_run(run_id, name=str(new.name or f"run {run_id}"), notes=str(new.notes or ""), tags=tags)
    st.toast(f"Saved {len(rows)} run(s).", icon=":material/save:")


def import_seed_files(svc) -> None:
    """on_click of Import: the uploads (a scores file, maybe a validation file) become a run, all or nothing.

    Read from a temporary folder under the names the user chose; the run keeps everything, the files go.
    """
    files = st.session_state["seed_files"]
    scores = [f for f in files if "validation" not in f.name]
    validation = [f for f in files if "validation" in f.name]
    with tempfile.TemporaryDirectory() as folder:
        try:
            if len(scores) != 1 or len(validation) > 1:
                raise seed.SeedFormatError("give one scores file and at most one validation file")
            paths = [Path(folder, str(i), uploads.safe_name(f.name)) for i, f in enumerate([scores[0], *validation])]
            for path, upload in zip(paths, [scores[0], *validation]):
                path.parent.mkdir()
                path.write_bytes(upload.getvalue())
            run_id = seed.import_seed(svc.store, paths[0], paths[1] if validation else None,
                                      name=st.session_state.get("seed_name", "").strip() or None,
                                      file_names=(scores[0].name, validation[0].name if validation else None))
        except (seed.SeedFormatError, *state.EXPLAINED) as error:
            message = str(error).replace(f"{folder}/0/", "").replace(f"{folder}/1/", "")  # the user's file names
            st.session_state["sweep_feedback"] = ("error", f"Not imported: {message}")
            return
    state.select(run_id)
    st.session_state["seed_name"] = ""
    st.session_state["sweep_feedback"] = ("success", f"Imported as run #{run_id}.")


svc = state.open_page()
runs = queries.runs(svc.store)
st.title("Run a sweep")
st.caption("Each problem runs once as-is (the baseline) and once per ablation variant; every answer is stored as "
           "its batch completes, so a stopped or interrupted run resumes where it stopped.")
if runs.empty:
    state.empty_database(svc)

plan = sweep_form()
with st.container(horizontal=True, vertical_alignment="center"):
    st.button(SEED_PRESET, icon=":material/history:", on_click=apply_seed_preset, help=SEED_PRESET_HELP)
    if plan.model is None:
        st.button("Load model", icon=":material/memory:", on_click=load_model,
                  help="Load the checkpoint now to check it and its layer count (Start loads it anyway)")
st.caption(f"*{SEED_PRESET}*: the old script's configuration — prefix scheme, zeroing, residual stream after "
           "block 8 of Llama's 16 (mid-depth otherwise), recompute.")
if plan.model is not None:
    st.caption(f"Model loaded: {safe.md(plan.model.hf.config.model_type)}, {plan.model.n_layers} blocks, "
               f"{plan.model.num_latent} latents, width {plan.model.d_model}.")
    st.caption(f"Checkpoint options: {safe.md(plan.model.options_line)}", help="Each value with where it came from")

if plan.dataset is not None:
    with st.expander(f"Dataset check: {plan.dataset['n_problems']} usable problems, "
                     f"{len(plan.dataset['rejected'])} rejected", expanded=bool(plan.dataset["rejected"])):
        st.plotly_chart(difficulty_histogram(plan.dataset["difficulty"]), key="dataset_histogram")
        if plan.dataset["rejected"]:
            st.dataframe(pd.DataFrame(plan.dataset["rejected"]), hide_index=True, height=240,
                         column_config={"line": st.column_config.NumberColumn("line", width="small")})
        else:
            st.success("Every record is usable.")
for issue in plan.issues:
    st.error(safe.md(issue), icon=":material/block:")  # issues quote file and field names
for warning in plan.warnings:
    st.warning(safe.md(warning))

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
    st.caption(f"Run #{run['id']} checkpoint options: "
               f"{safe.md(options_caption(svc.store.run_row(int(run['id']))['config']))}")

st.subheader("Runs in this database")
if runs.empty:
    st.caption("None yet.")
else:
    with st.container(horizontal=True):
        text = st.text_input("Search names and notes", key="runs_search", width=240, placeholder="e.g. frozen")
        statuses = st.multiselect("Status", sorted(set(runs["status"])), key="runs_status", width=220,
                                  placeholder="any")
        models = st.multiselect("Model", sorted(set(runs["model"])), key="runs_model", width=260, placeholder="any")
        datasets = st.multiselect("Dataset", sorted(set(runs["dataset"])), key="runs_dataset", width=260,
                                  placeholder="any")
        tags = st.multiselect("Tag", sorted({t for v in runs["tags"] for t in runs_table.tags_of(v)}),
                              key="runs_tags", width=220, placeholder="any")
    chosen = runs_table.RunFilter(tuple(statuses), tuple(models), tuple(datasets), tuple(tags), text)

    @st.fragment(run_every=2 if (runs["status"] == "running").any() else None)
    def live_table() -> None:
        """Polls while a run sweeps, like the sidebar; the selection drives the other pages."""
        current = queries.runs(svc.store)
        overview = runs_table.apply(data.runs_overview(state.db_path(), data.runs_version(current)), chosen)
        sweeping = overview[overview["status"] == "running"]
        live = "".join(f" · sweeping: run #{r.id}, {r.done:,} / {r.total:,} problems" for r in sweeping.itertuples())
        st.caption(f"{len(overview)} of {len(current)} runs · select rows to show one on every page "
                   f"(the first) and compare them (all){live}")
        event = st.dataframe(
            runs_table.shown(overview), key="runs_table", hide_index=True, on_select="rerun",
            selection_mode="multi-row",
            column_config={"id": st.column_config.NumberColumn("run", format="#%d", width="small"),
                           "progress": st.column_config.ProgressColumn("progress", format="percent"),
                           "baseline acc.": st.column_config.NumberColumn(format="percent",
                                                                          help="Baseline accuracy, 95% Wilson"),
                           "flip, all ablated": st.column_config.NumberColumn(
                               format="percent", help="Flip rate with every latent ablated (prefix k = T, first "
                                                      "method), 95% Wilson interval beside it"),
                           "minutes": st.column_config.NumberColumn("minutes", format="%.1f",
                                                                    help="Time spent sweeping, over resumes"),
                           "problems/h": st.column_config.NumberColumn(format="%.0f"),
                           "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
                           "notes": st.column_config.TextColumn("notes", width="medium")})
        picked = [int(overview["id"].iloc[r]) for r in event.selection.rows if r < len(overview)]
        if picked and picked != st.session_state.get("compare_runs"):
            state.select_runs(picked)
            state.rerun_app()  # the sidebar's run selector shows the new choice
        state.rerun_if_stale(svc)

    live_table()

    with st.expander("Edit names, notes and tags", icon=":material/edit:"):
        columns = ["id", "name", "notes", "tags"]
        table = runs[columns]
        edited = st.data_editor(
            table, key="runs_editor", hide_index=True, disabled=["id"],
            column_config={"id": st.column_config.NumberColumn("run", format="#%d", width="small"),
                           "notes": st.column_config.TextColumn("notes", width="large"),
                           "tags": st.column_config.TextColumn("tags", help="comma separated")})
        changes = [(int(new.id), new) for old, new in zip(table.itertuples(), edited.itertuples())
                   if (old.name, old.notes, old.tags) != (new.name, new.notes, new.tags)]
        st.button(f"Save {len(changes)} change(s)" if changes else "No unsaved changes", disabled=not changes,
                  icon=":material/save:", key="save_runs", on_click=save_edits, args=(svc, changes))

    @st.dialog("Delete a run")
    def confirm_delete(run_id: int, name: str, done: int) -> None:
        st.text(f"Delete run #{run_id} {name} and its {done} problems' results from {svc.store.path}? "
                "This cannot be undone.")
        if st.button("Delete", type="primary", icon=":material/delete:"):
            svc.store.delete_run(run_id)
            state.rerun_app()

    with st.popover("Delete a run", icon=":material/delete:"):
        doomed = st.selectbox("Run to delete", runs.to_dict("records"), index=None, placeholder="choose a run",
                              format_func=lambda r: f"#{r['id']} · {r['name']} · {r['status']}")
        busy = doomed is not None and running and svc.status() and svc.status().run_id == doomed["id"]
        if st.button("Delete…", disabled=doomed is None or bool(busy),
                     help="Stop the sweep first" if busy else None):
            confirm_delete(int(doomed["id"]), doomed["name"], int(doomed["done"]))


with st.expander("Import the old script's results", icon=":material/upload_file:"):
    files = st.file_uploader("step_importance_scores.json (and optionally step_importance_validation.json)",
                             type="json", accept_multiple_files=True, key="seed_files")
    st.text_input("Name of the imported run", key="seed_name", placeholder=(
        f"old script: {next((f.name for f in files if 'validation' not in f.name), 'the scores file')}"
        if files else "old script: the scores file's name"))
    st.button("Import", disabled=not files, on_click=import_seed_files, args=(svc,))
