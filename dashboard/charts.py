"""Plotly figure builders for the pages: data frames in, `go.Figure` out, no Streamlit calls and no queries.

Conventions: rates are fractions shown as percentages; every interval is the 95% interval that
db/queries.py computed (Wilson for rates, bootstrap for log-prob drops), drawn as a shaded band.
A variant's x position is its k, labelled with the latents it ablates as its rows say (db migration 3).
Every name that came from a file (a method, a run's model, a logit-lens token) goes through safe.html:
Plotly renders an HTML subset, links included, in legends, ticks and hover text.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.safe import html as plain
from db.figures import ablated_label
from runner.ablation import METHODS

COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"]
MEASURE_LABELS = {"flip": "Flip rate", "harm": "Harm rate (right → wrong)", "help": "Help rate (wrong → right)",
                  "changed": "Answer changed", "logprob_drop": "Drop in gold log-prob (nats)"}
MEASURE_HELP = {
    "flip": "baseline correctness differs from the variant's: the old script's importance_score",
    "harm": "baseline right and the variant wrong",
    "help": "baseline wrong and the variant right",
    "changed": "the variant's answer differs from the baseline's answer, right or wrong",
    "logprob_drop": "baseline log-prob of the gold answer minus the variant's (teacher forced; higher = more damage)",
}
SCHEME_TITLES = {"prefix": "Prefix (cumulative)", "single": "Single position", "suffix": "Suffix",
                 "exit": "Early exit"}
SCHEME_AXES = {"prefix": "Latents ablated (prefix k: latents 0…k−1)", "single": "Ablated latent (one at a time)",
               "suffix": "Latents ablated (suffix k: latents k…T−1)", "exit": "Latents fed before the answer"}


def ticks(curve: pd.DataFrame, num_latent: int) -> dict[int, str]:
    """{k: what the variant ablated} as the rows say themselves (db migration 3), for tick labels."""
    rows = curve.drop_duplicates("k").sort_values("k")
    return {int(r.k): ablated_label(r.ablated_positions, int(r.latents_fed), num_latent, short=True)
            if r.ablated_positions is not None else str(r.k) for r in rows.itertuples()}  # None: an undescribed row


def lens_marks(ablated, latents_fed: int, num_latent: int) -> set[int]:
    """The latents a row replaced or never fed (early exit), as it says itself: framed in the lens."""
    return {int(p) for p in ablated} | set(range(int(latents_fed), num_latent))


def is_rate(measure: str) -> bool:
    return measure != "logprob_drop"


def _layout(fig: go.Figure, height: int, x_title: str = "", y_title: str = "", title: str | None = None):
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40 if title else 10, b=10), title=title,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, title=None),
                      hoverlabel=dict(namelength=-1))
    fig.update_xaxes(title=x_title, showgrid=False)
    fig.update_yaxes(title=y_title, zeroline=True)
    return fig


def _band(fig, x, lo, hi, color: str, name: str, **where):
    """A filled 95% interval: hi left to right, then lo back."""
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=list(hi) + list(lo)[::-1], fill="toself", mode="lines",
                             fillcolor=color, opacity=0.18, line=dict(width=0), hoverinfo="skip",
                             showlegend=False, legendgroup=name), **where)


def value_range(frames: list[pd.DataFrame], measure: str) -> list[float]:
    """One y range for several charts, so that schemes can be compared by eye."""
    highs = [f["value_hi"].max() for f in frames if len(f)] + [f["value"].max() for f in frames if len(f)]
    lows = [f["value_lo"].min() for f in frames if len(f)] + [f["value"].min() for f in frames if len(f)]
    high = max([h for h in highs if not pd.isna(h)], default=1.0)
    low = min([v for v in lows if not pd.isna(v)], default=0.0)
    if is_rate(measure):
        return [0, min(1.0, max(0.1, high * 1.1))]
    pad = 0.1 * max(high - min(low, 0), 1e-3)
    return [min(low, 0) - pad, high + pad]


def method_rank(method: str) -> int:
    """A method's place in runner/ablation.py's order; one we do not know (an imported run's) comes last."""
    return METHODS.index(method) if method in METHODS else len(METHODS)


def method_color(method: str) -> str:
    """One colour per ablation method on every page and in every scheme's chart (zero blue, mean red, ...),
    whatever order a query returns the methods in; a method we do not know is grey."""
    return COLORS[method_rank(method)] if method in METHODS else COLORS[-1]


def position_figure(curve: pd.DataFrame, scheme: str, measure: str, num_latent: int,
                    y_range: list[float] | None = None, height: int = 320) -> go.Figure:
    """One scheme's per-k curve for each (method, site, mode), with its 95% band; the methods in
    runner/ablation.py's order, each in its colour (more sites or modes than one: a colour per curve)."""
    fig = go.Figure()
    part = curve[curve["scheme"] == scheme]
    several = part[["site", "mode"]].drop_duplicates().shape[0] > 1
    groups = sorted(part.groupby(["method", "site", "mode"], sort=False), key=lambda item: method_rank(item[0][0]))
    for i, ((method, site, mode), group) in enumerate(groups):
        color = COLORS[i % len(COLORS)] if several else method_color(method)
        name = plain(f"{method} · {site} · {mode}" if several else method)
        group = group.sort_values("k")
        _band(fig, group["k"], group["value_lo"], group["value_hi"], color, name)
        labels = [ticks(group, num_latent)[int(k)] for k in group["k"]]
        fig.add_trace(go.Scatter(
            x=group["k"], y=group["value"], mode="lines+markers", name=name, legendgroup=name,
            line=dict(color=color, width=2.5), marker=dict(size=7),
            customdata=list(zip(labels, group["value_lo"], group["value_hi"], group["n"])),
            hovertemplate=(f"<b>{name}</b><br>ablated %{{customdata[0]}}<br>value %{{y:{_fmt(measure)}}} "
                           f"[%{{customdata[1]:{_fmt(measure)}}}, %{{customdata[2]:{_fmt(measure)}}}]"
                           "<br>n = %{customdata[3]}<extra></extra>")))
    labels = ticks(part, num_latent)
    fig.update_xaxes(tickmode="array", tickvals=list(labels), ticktext=list(labels.values()))
    _layout(fig, height, SCHEME_AXES.get(scheme, "k"), MEASURE_LABELS[measure])
    fig.update_yaxes(tickformat=".0%" if is_rate(measure) else ".2f", range=y_range)
    fig.update_layout(showlegend=True)
    return fig


def _fmt(measure: str) -> str:
    return ".1%" if is_rate(measure) else ".3f"


def difficulty_heatmap(matrix: pd.DataFrame, counts: dict[int, int], scheme: str, measure: str,
                       num_latent: int) -> go.Figure:
    """Step count (rows) x k (columns), colour = the measure, each cell labelled with its value.

    `matrix.attrs['ablated']` (db.figures.difficulty_heatmap): {k: (ablated positions, latents fed)}.
    """
    rows = [f"{d} step{'s' if d != 1 else ''} (n={counts.get(int(d), '?')})" for d in matrix.index]
    what = matrix.attrs.get("ablated", {})
    columns = [ablated_label(*what[int(k)], num_latent, short=True) if int(k) in what else str(k)
               for k in matrix.columns]
    rate = is_rate(measure)
    z = matrix.to_numpy(dtype=float)
    n = np.array(matrix.attrs.get("n", np.full(z.shape, np.nan)), dtype=float)
    lo, hi = (np.array(matrix.attrs.get(end, np.full(z.shape, np.nan)), dtype=float) for end in ("lo", "hi"))
    spread = " [%{customdata[1]:.1%}, %{customdata[2]:.1%}] (95% Wilson)" if rate else " (mean)"
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=rows, colorscale="Reds" if rate else "Purples",
        zmin=0, zmax=max(0.05, float(np.nanmax(z))) if rate else None,
        texttemplate="%{z:.0%}" if rate else "%{z:.2f}", customdata=np.dstack([n, lo, hi]),  # (rows, cols, 3)
        colorbar=dict(title=dict(text="rate" if rate else "nats", side="right"), tickformat=".0%" if rate else ".2f"),
        hovertemplate="%{y}<br>ablated %{x}<br>%{z:" + _fmt(measure) + "}" + spread
                      + " over %{customdata[0]} problems<extra></extra>", xgap=2, ygap=2))
    fig.update_yaxes(autorange="reversed", title="Difficulty (reasoning steps)")
    _layout(fig, max(260, 60 + 36 * len(rows)), SCHEME_AXES.get(scheme, "k"))
    fig.update_yaxes(title="Difficulty (reasoning steps)")
    return fig


def compare_figure(curves: list[tuple[str, pd.DataFrame]], pairs: list[tuple[str, pd.DataFrame]], scheme: str,
                   measure: str, num_latent: int) -> go.Figure:
    """Each curve with its band over its own k (top); each paired difference to the first curve (bottom).

    A curve is drawn only where it has values, so a run with fewer positions ends early instead of
    pulling a band into a sliver; a difference is drawn only where the two sides share problems.
    Ticks name what the first curve's k ablated; the page leaves out pairs whose positions differ in meaning
    and a subset's against its own run. No pair left: the curves alone, without an empty bottom panel.
    """
    bottom = 2 if pairs else 1
    fig = make_subplots(rows=bottom, cols=1, shared_xaxes=True, row_heights=[0.64, 0.36] if pairs else None,
                        vertical_spacing=0.1)
    for i, (label, curve) in enumerate(curves):
        color, curve, name = COLORS[i % len(COLORS)], curve.sort_values("k"), plain(label)
        curve = curve[curve["value"].notna()]
        _band(fig, curve["k"], curve["value_lo"], curve["value_hi"], color, name, row=1, col=1)
        fig.add_trace(go.Scatter(x=curve["k"], y=curve["value"], mode="lines+markers", name=name, legendgroup=name,
                                 line=dict(color=color, width=2.5),
                                 hovertemplate=f"{name}: %{{y:{_fmt(measure)}}}<extra></extra>"), row=1, col=1)
    for i, (label, pair) in enumerate(pairs, start=1):
        pair, name = pair[pair["shared"] > 0], plain(label)
        fig.add_trace(go.Scatter(
            x=pair["k"], y=pair["diff"], mode="markers", name=name, legendgroup=name, showlegend=False,
            marker=dict(color=COLORS[i % len(COLORS)], size=9, symbol="diamond"),
            error_y=dict(type="data", symmetric=False, array=pair["diff_hi"] - pair["diff"],
                         arrayminus=pair["diff"] - pair["diff_lo"]),
            customdata=pair["shared"], hovertemplate=(f"first − {name}: %{{y:{_fmt(measure)}}} "
                                                      "on %{customdata} shared problems<extra></extra>")),
            row=2, col=1)
    if pairs:
        fig.add_hline(y=0, line_color="#9ca3af", row=2, col=1)
    ks = sorted({int(k) for _, curve in curves for k in curve["k"]})
    labels = ticks(curves[0][1], num_latent) if len(curves[0][1]) else {}
    fig.update_xaxes(tickmode="array", tickvals=ks, ticktext=[labels.get(k, str(k)) for k in ks])
    _layout(fig, 500 if pairs else 340)
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, title=None))
    fig.update_xaxes(title=SCHEME_AXES.get(scheme, "k"), row=bottom, col=1)
    fig.update_yaxes(title=MEASURE_LABELS[measure], tickformat=".0%" if is_rate(measure) else ".2f", row=1, col=1)
    if pairs:
        fig.update_yaxes(title="first − other (paired)", tickformat="+.0%" if is_rate(measure) else "+.2f",
                         row=2, col=1)
    return fig


def time_series(metrics: pd.DataFrame, column: str, title: str, unit: str, color: str = COLORS[0],
                height: int = 220) -> go.Figure:
    """One resource or throughput series against time sweeping (minutes once it passes two)."""
    minutes = len(metrics) and metrics["elapsed_s"].max() > 120
    x = metrics["elapsed_s"] / 60 if minutes else metrics["elapsed_s"]
    fig = go.Figure(go.Scatter(x=x, y=metrics[column], mode="lines+markers", line=dict(color=color, width=2),
                               marker=dict(size=5), name=title, fill="tozeroy", fillcolor=_fade(color),
                               connectgaps=True,  # a batch without the measure (the sweep's memory) is no gap
                               hovertemplate=f"%{{y:,.0f}} {unit}<br>at %{{x:.1f}} {'min' if minutes else 's'}"
                                             "<extra></extra>"))
    _layout(fig, height, f"time sweeping ({'min' if minutes else 's'})", unit, title)
    # From the sweep's start (a first lone batch is not centred on nothing), with room for the last marker and
    # the highest: a filled trace gets no autorange padding, so they were drawn half outside the plot.
    x_end, y_top = x.max() if len(x) else np.nan, metrics[column].max() if len(metrics) else np.nan
    fig.update_xaxes(range=[0, 1.03 * x_end] if x_end > 0 else None, rangemode="tozero")
    fig.update_yaxes(range=[0, 1.1 * y_top] if y_top > 0 else None, rangemode="tozero")
    fig.update_layout(showlegend=False, title=dict(font=dict(size=14)))
    return fig


def _fade(hex_color: str) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},0.12)"


def difficulty_histogram(counts: dict[str, int]) -> go.Figure:
    """Problems per step count (the dataset validation panel)."""
    steps = sorted(counts, key=int)
    fig = go.Figure(go.Bar(x=[int(s) for s in steps], y=[counts[s] for s in steps], marker_color=COLORS[0],
                           text=[counts[s] for s in steps], textposition="outside",
                           hovertemplate="%{x} steps: %{y} problems<extra></extra>"))
    _layout(fig, 240, "reasoning steps (difficulty)", "problems")
    fig.update_xaxes(tickmode="linear", dtick=1)
    fig.update_layout(showlegend=False)
    return fig


def logprob_figure(variants: pd.DataFrame, labels: list[str]) -> go.Figure:
    """Gold log-prob of every variant as dots (the differences matter, not the distance to 0), flips in red."""
    base = variants.loc[variants["scheme"] == "baseline", "gold_logprob"]
    colors = ["#4b5563" if s == "baseline" else ("#dc2626" if f else COLORS[0])
              for s, f in zip(variants["scheme"], variants["flip"])]
    fig = go.Figure(go.Scatter(x=[plain(label) for label in labels], y=variants["gold_logprob"], mode="markers",
                               marker=dict(color=colors, size=10, line=dict(width=1, color="white")),
                               hovertemplate="%{x}<br>log p(gold) = %{y:.3f}<extra></extra>"))
    if len(base) and not pd.isna(base.iloc[0]):
        fig.add_hline(y=float(base.iloc[0]), line_dash="dash", line_color="#4b5563")
    _layout(fig, 320, "", "log p(gold answer), nats")
    fig.update_layout(showlegend=False)
    fig.update_xaxes(tickangle=-45, showgrid=True)
    return fig


def lens_figure(lens: list[list[list]], ablated: set[int] = frozenset(), how: str = "ablated") -> go.Figure:
    """Logit lens: one row per latent, its top-k tokens left to right, colour = probability.

    The latents the variant replaced (`ablated`) are labelled `how` ("ablated", "not fed") and framed in red.
    """
    depth = max((len(row) for row in lens), default=0)
    probs = [[row[j][1] if j < len(row) else math.nan for j in range(depth)] for row in lens]
    tokens = [[plain(repr(row[j][0])[1:-1]) if j < len(row) else "" for j in range(depth)] for row in lens]
    text = [[f"{t}<br>{p:.0%}" if t else "" for t, p in zip(tr, pr)] for tr, pr in zip(tokens, probs)]
    fig = go.Figure(go.Heatmap(
        z=probs, x=[f"top {j + 1}" for j in range(depth)],
        y=[f"latent {i} · {plain(how)}" if i in ablated else f"latent {i}" for i in range(len(lens))],
        text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, xgap=2, ygap=2,
        zmax=max(0.05, max((p for row in probs for p in row if not math.isnan(p)), default=1.0)),
        colorbar=dict(title=dict(text="prob", side="right"), tickformat=".0%"),
        customdata=tokens, hovertemplate="%{y}, %{x}: '%{customdata}' %{z:.1%}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    for i in sorted(ablated):
        if i < len(lens):
            fig.add_shape(type="rect", x0=-0.5, x1=depth - 0.5, y0=i - 0.5, y1=i + 0.5, xref="x", yref="y",
                          line=dict(color="#dc2626", width=2.5))
    _layout(fig, 60 + 44 * max(len(lens), 1))
    return fig
