"""Documents made of a run's figures: `stats --json` and the experiment report (Markdown).

Every number comes from db/figures.py, under the names FIGURES gives it, so the report, the
dashboard, `stats --json` and the exports never disagree.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from db import figures, queries
from db.figures import FIGURES, ablated_label
from db.markdown import text
from db.scope import QueryError, Scope
from db.stats import GROUP_KEYS, UNANIMOUS, drop_intervals, early_late_table


# --- formatting -------------------------------------------------------------------------------------
def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def ci(value, lo=None, hi=None, digits: int = 3) -> str:
    if missing(value):
        return "–"
    interval = "" if missing(lo) else f" [{lo:.{digits}f}, no upper bound]" if missing(hi) else \
        f" [{lo:.{digits}f}, {hi:.{digits}f}]"  # no upper bound: a ratio whose denominator's interval reaches 0
    return f"{value:.{digits}f}{interval}"


def ci_of(value, bounds: dict | None, digits: int = 3) -> str:
    """ci with the interval from a {lo, hi} dict (stats --json's extras), None for none."""
    return ci(value, *((bounds or {}).get(end) for end in ("lo", "hi")), digits=digits)


def duration(seconds) -> str:
    """'1h 05m', '3m 07s', '42s'; under ten seconds two significant digits ('0.38s' a problem on a fast machine)."""
    if missing(seconds):
        return "–"
    if seconds < 9.5:
        return "0s" if seconds <= 0 else "<0.001s" if seconds < 0.001 else f"{seconds:.2g}s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def run(store, run_id: int) -> dict:
    row = store.run_row(run_id)
    if row is None:
        raise QueryError(f"no run {run_id} in {store.path}")
    return {k: None if not isinstance(v, (dict, list)) and pd.isna(v) else v for k, v in row.items()}  # NaN -> None


def named_rows(named: dict, key: str) -> list[list]:
    """The two named early/late figures per stratum as table cells: the page and the report print these."""
    rows = []
    for r in named["rows"]:
        old, latent = r["old_script_early_late"], r["per_latent_early_late"]
        validated = old["pattern_validated"]
        rows.append(["unknown" if r[key] == -1 else r[key], r["n"],
                     *(ci(old[f"{side}_importance"], old.get(f"{side}_importance_lo"), old.get(f"{side}_importance_hi"))
                       for side in ("early", "late")), "–" if validated is None else "yes" if validated else "no",
                     ci(latent["early"], latent["early_lo"], latent["early_hi"]),
                     ci(latent["late"], latent["late_lo"], latent["late_hi"]),
                     ci(latent["ratio"], latent["ratio_lo"], latent["ratio_hi"], 2)])
    return rows


NAMED_HEADER = [f"{FIGURES[name][0]}: {part}" for name, parts in (("old_script_early_late", ("early", "late",
                "pattern_validated")), ("per_latent_early_late", ("early", "late", "early/late"))) for part in parts]


# --- stats --json ---------------------------------------------------------------------------------------
def stats_json(store, run_id: int, method=None, site=None, mode=None, seed: int = 0, n_boot: int = 1000) -> dict:
    """`stats --json`: the old script's summary keys for the run's prefix group, every other figure under 'extras'."""
    about = run(store, run_id)
    scope = Scope(run_id)
    chosen = scope.group("prefix", method, site, mode)
    result = figures.old_script_summary(store, chosen)
    group = queries.first_group(store, chosen)
    # Every group at once: one scan per figure instead of one per group.
    drops = drop_intervals(queries.drop_cells(store, scope), seed, n_boot).drop(columns=["ablated_positions",
                                                                                         "latents_fed"])
    curves = queries.rates(store, scope).merge(drops, on=[*GROUP_KEYS, "k", "position"], how="left")
    scores = queries.scores(store, scope)
    overall = early_late_table(scores, None, seed, n_boot)
    by_difficulty = {by: queries.accuracy_by(store, scope, by).drop(columns="correct").merge(
        early_late_table(scores, key, seed, n_boot), on=key, how="left")
        for by, key in (("steps", "difficulty"), ("bucket", "bucket"))}

    def point(row: dict, measure: str) -> dict:
        n = row["n_logprob"] if measure == "logprob_drop" else row["n"]
        return {"value": row[measure], "lo": row[f"{measure}_lo"], "hi": row[f"{measure}_hi"], "n": n}

    def by_group(frame: pd.DataFrame, drop=()) -> dict:
        """Records keyed by their (scheme, method, site, mode), in frame order."""
        parted = {}
        for record in frame.to_dict("records"):
            parted.setdefault(tuple(record.pop(k) for k in GROUP_KEYS), []).append(
                {k: v for k, v in record.items() if k not in drop})
        return parted

    positions = {key: [{"k": r["k"], "position": r["position"], "ablated_positions": r["ablated_positions"],
                        "latents_fed": r["latents_fed"], "n": r["n"],
                        **{measure: point(r, measure) for measure in queries.MEASURES}} for r in records]
                 for key, records in by_group(curves).items()}
    strata = {by: by_group(t.rename(columns={"n_x": "n"}), drop=("n_y",)) for by, t in by_difficulty.items()}
    summaries = by_group(overall)
    groups = []
    for g in queries.variant_groups(store, run_id).itertuples(index=False):
        key = (g.scheme, g.method, g.site, g.mode)
        groups.append({"scheme": g.scheme, "method": g.method, "site": g.site, "mode": g.mode,
                       "positions": positions.get(key, []),
                       "by_difficulty": {by: parted.get(key, []) for by, parted in strata.items()},
                       "early_late": summaries.get(key, [{"n": 0}])[0]})
    named = {by: figures.named_figures(store, chosen, by, seed, n_boot) for by in ("steps", "bucket")}
    result["extras"] = {
        "run": {k: about[k] for k in ("id", "name", "status", "model", "dataset", "source", "num_latent", "done",
                                      "total", "positions")},
        "summary_group": dict(zip(GROUP_KEYS, group.keys if group else ("prefix", None, None, None))),
        "baseline_accuracy": queries.baseline_accuracy(store, scope),
        "baseline_accuracy_validation": queries.baseline_accuracy(store, scope.replace(phase="validation")),
        # The top level's position_importance (the old numbering) with the 95% Wilson interval of each value.
        "position_importance_intervals": figures.old_script_position_intervals(store, chosen),
        "baseline_accuracy_by_steps": {str(r["difficulty"]): {"n": r["n"], "lo": r["accuracy_lo"],
                                                              "hi": r["accuracy_hi"]}
                                       for r in queries.accuracy_by(store, scope, "steps").to_dict("records")},
        "groups": groups,
        "figures": {name: {"name": title, "definition": definition, "group": named["steps"]["groups"][name],
                           **{by: [{k: v for k, v in r.items() if k not in FIGURES or k == name} for r in n["rows"]]
                              for by, n in named.items()}}
                    for name, (title, definition) in FIGURES.items()},
        "conventions": "top level: the old script's numbering and early/late (position 0 = baseline, p = prefix "
                       "k = p; figures.old_script_early_late); extras: position = the last latent a prefix "
                       "ablates (k - 1), k otherwise, as each row stores it; early = positions 0..T/2-1, late = "
                       "T/2..T-1; rates: 95% Wilson; means and early/late/ratio: 95% percentile bootstrap over "
                       f"problems ({n_boot} resamples, seed {seed}); {UNANIMOUS}",
    }
    return queries.plain(result)


# --- the experiment report ------------------------------------------------------------------------------
def _group(g: dict) -> str:
    return f"{g['scheme']} · {g['method']} · {g['site']} · {g['mode']}"


def markdown_report(store, run_id: int) -> str:
    """An experiment report to paste into a journal: setup, baseline, per-position effects, difficulty, early/late."""
    about = run(store, run_id)
    config = json.loads(about["config"]) if isinstance(about["config"], str) else dict(about["config"] or {})
    T = int(about["num_latent"])
    out = [f"# ThoughtSweep run {run_id}: {text(about['name'])}", "",
           f"{about['created']:%Y-%m-%d %H:%M} · status **{text(about['status'])}** · "
           f"{about['done']}/{about['total']} problems · source {text(about['source'])}", "", "## Setup", ""]
    setup = [["model", about["model"]], ["dataset", about["dataset"]], ["latents (T)", T],
             ["positions", about["positions"]], ["variants per problem", about["n_variants"]],
             ["device", about["device"] or "–"], ["batch size", about["batch_size"] or "–"],
             ["time sweeping", duration(about["elapsed_s"])]]
    shown = {"model", "dataset", "device", "batch_size"}  # already in the rows above
    setup += [[key, value if isinstance(value, (str, int, float)) else json.dumps(value)]
              for key, value in config.items() if key not in shown and value not in (None, [], ())]
    out += table(["setting", "value"], [[key, text(value)] for key, value in setup])  # the file's own text

    stats = stats_json(store, run_id)
    extras = stats["extras"]
    out += ["## Baseline accuracy", ""]
    for label, acc in (("all problems", extras["baseline_accuracy"]),
                       ("validation subset", extras["baseline_accuracy_validation"])):
        if acc["n"]:
            out.append(f"- {label}: {acc['correct']}/{acc['n']} = {ci(acc['accuracy'], acc['lo'], acc['hi'])} "
                       f"(95% Wilson)")
    out.append("")

    out += ["## Effect of ablating latent positions", ""]
    for g in extras["groups"]:
        out += [f"### {text(_group(g))}", ""]
        rows = [[p["k"], ablated_label(p["ablated_positions"] or [], p["latents_fed"] or T, T), p["n"],
                 *(ci(p[m]["value"], p[m]["lo"], p[m]["hi"]) for m in queries.MEASURES)] for p in g["positions"]]
        out += table(["k", "ablated", "n", "flip", "harm", "help", "changed", "Δ gold log-prob"], rows)

    if stats["position_importance"]:
        bounds = extras["position_importance_intervals"]  # the baseline's 0 has none: it flips nothing by definition
        out += ["Old-script summary (position 0 = baseline, position p = prefix k = p; flip rate, 95% Wilson): "
                + ", ".join(f"{p}: " + (ci(v) if p == "0" else ci_of(v, bounds.get(p)))
                            for p, v in stats["position_importance"].items()), ""]

    out += ["## Named early/late figures", ""]
    for name, figure in extras["figures"].items():
        where = text(" · ".join(str(v) for v in figure["group"].values())) if figure["group"] else "no such variants"
        out.append(f"- **{figure['name']}** ({where}): {figure['definition']}.")
    out.append("")
    for by, key in (("steps", "difficulty"), ("bucket", "bucket")):
        named = {"rows": [{**a, **b} for a, b in zip(*(extras["figures"][n][by] for n in FIGURES))]}
        out += table(["steps" if by == "steps" else "bucket", "n", *NAMED_HEADER], named_rows(named, key))

    wanted = extras["summary_group"]
    chosen = next((g for g in extras["groups"] if all(g[key] == wanted[key] for key in wanted)),
                  extras["groups"][0] if extras["groups"] else None)
    if chosen:
        out += [f"## By difficulty ({text(_group(chosen))})", ""]
        for by, key, label in (("steps", "difficulty", "steps"), ("bucket", "bucket", "bucket")):
            out += table([label, "n", "baseline accuracy", f"early (positions 0–{T // 2 - 1})",
                          f"late ({T // 2}–{T - 1})", "early/late"],
                         [["unknown" if r[key] == -1 else r[key], r["n"],
                           ci(r["accuracy"], r["accuracy_lo"], r["accuracy_hi"]),
                           *(ci(r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi"), 2 if m == "ratio" else 3)
                             for m in ("early", "late", "ratio"))] for r in chosen["by_difficulty"][by]])

    out += ["## Early vs late positions, per variant group", ""]
    rows = [[text(_group(g)), g["early_late"].get("n", 0),
             *(ci(g["early_late"].get(m), g["early_late"].get(f"{m}_lo"), g["early_late"].get(f"{m}_hi"),
                  2 if m == "ratio" else 3) for m in ("early", "late", "ratio"))] for g in extras["groups"]]
    out += table(["variant group", "problems", "early", "late", "early/late"], rows)

    out += ["## Notes", "",
            "- flip = baseline correctness differs from the variant's (the old script's importance_score); harm = "
            "baseline right and variant wrong, help = the reverse; rates are over all problems in scope.",
            "- The prefix curve is cumulative by construction: prefix k ablates latents 0..k-1, so it can only "
            "describe how much damage accumulates, not which single latent matters (see the single scheme).",
            f"- Per group, early = positions 0..{T // 2 - 1}, late = {T // 2}..{T - 1}; a prefix variant k sits at "
            "position k-1 (the last latent it removes), other schemes at position k. The named figures above are "
            "the two common definitions, each under its own name.",
            "- Intervals are 95%: Wilson score intervals for rates; percentile bootstrap over problems "
            f"(1,000 resamples, seed 0) for mean log-prob drops and for early, late and their ratio; {UNANIMOUS}.",
            "- Exit k = T feeds every latent and equals the baseline; a variant that ablates nothing must reproduce "
            "the baseline exactly.", ""]
    if about["source"] == "import":
        out.insert(-1, "- This run was imported from the seed's JSON files: there are no gold log-probs, and "
                       "answers were re-parsed from the stored text. Its positions are the old script's own: "
                       "it fed BOT as its first \"latent\" and five latents after it, and its zeroing hook also hit "
                       "the last question token, so its position k is not a sweep's latent k.")
    return "\n".join(out)
