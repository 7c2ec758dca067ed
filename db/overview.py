"""The Run page's table of runs and a comparison's legend: each run with the settings that tell runs apart."""
from __future__ import annotations

import json

import pandas as pd

from db.queries import _df
from db.stats import wilson_sql

RUN_SETTINGS = ("model", "dataset", "positions", "schemes", "methods", "site", "mode", "limit", "validation",
                "batch_size", "device", "dtype", "seed")


def runs_overview(store) -> pd.DataFrame:
    """Every run (newest first) with the settings that tell runs apart and its key results.

    Results: baseline accuracy (95% Wilson), and the flip rate of the variant that ablates the most
    positions (as its rows say; prefix first on a tie) in the run's first method, site and mode;
    `all_ablated` names it. Duration is the time spent sweeping, throughput the run's problems per hour.
    """
    frame = store.query_df(
        "WITH base AS (SELECT run_id, count(*) AS n, count(*) FILTER (WHERE correct) AS x FROM results "
        "  WHERE scheme = 'baseline' GROUP BY run_id), "
        "first_group AS (SELECT run_id, arg_min(method, rowid) AS method, arg_min(site, rowid) AS site, "
        "  arg_min(mode, rowid) AS mode FROM results WHERE scheme <> 'baseline' GROUP BY run_id), "
        "widest AS (SELECT r.run_id, arg_max(r.variant, [len(r.ablated_positions), -list_position(['prefix', "
        "  'suffix'], r.scheme)]) AS variant FROM results r JOIN first_group g USING (run_id) "
        "  WHERE r.method = g.method AND r.site = g.site AND r.mode = g.mode AND r.scheme IN ('prefix', 'suffix') "
        "  GROUP BY r.run_id), "
        "everything AS (SELECT r.run_id, any_value(r.variant) AS variant, count(*) AS n, "
        "  count(*) FILTER (WHERE r.flip) AS x FROM results r JOIN widest w USING (run_id, variant) GROUP BY r.run_id) "
        "SELECT u.id, u.name, u.status, u.phase, u.done, u.total, u.created, u.source, u.notes, u.tags, u.model, "
        "u.dataset, u.config, u.num_latent, u.positions, u.device, u.batch_size AS batch_in_use, u.elapsed_s, "
        f"u.problems_per_hour, {wilson_sql('base.x', 'base.n', 'accuracy')}, "
        f"e.variant AS all_ablated, {wilson_sql('e.x', 'e.n', 'flip_all')} "
        "FROM runs u LEFT JOIN base ON base.run_id = u.id LEFT JOIN everything e ON e.run_id = u.id "
        "ORDER BY u.created DESC, u.id DESC", {})
    configs = [json.loads(c) if isinstance(c, str) else dict(c or {}) for c in frame.pop("config")]
    for name in RUN_SETTINGS[3:]:
        values = [c.get(name) for c in configs]
        frame[name] = [", ".join(v) if isinstance(v, list) else v for v in values]
    frame["device"] = [c.get("device") or d for c, d in zip(configs, frame["device"])]
    frame["batch_size"] = [c.get("batch_size") for c in configs]
    return frame


def run_settings(store, run_ids: list[int]) -> dict[int, dict]:
    """{run id: its settings (RUN_SETTINGS)} for the legend of a comparison."""
    frame = _df(store, "SELECT id, model, dataset, positions, config FROM runs WHERE list_contains($ids, id)",
                ids=[int(i) for i in run_ids])
    out = {}
    for row in frame.itertuples():
        config = json.loads(row.config) if isinstance(row.config, str) else dict(row.config or {})
        out[int(row.id)] = {"model": row.model, "dataset": row.dataset, "positions": row.positions,
                            **{k: config.get(k) for k in RUN_SETTINGS[3:]}}
    return out
