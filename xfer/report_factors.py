"""The report's "Factors of transferability" view (Azizpour et al. 2014): which frozen features transfer.

The linear probe's cell axes ``layer`` (feature stage; 0 = the penultimate pooled features), ``pool``
(average, max, both) and ``pca`` (components of the training features; 0 = all) make one results row per
(model, dataset, layer, pool, pca). Azizpour et al.'s finding is that the best layer moves earlier the
further a target is from the source task; this view shows

* a table of test accuracy per (dataset, model, layer) × (pooling, PCA);
* the best layer per (model, dataset) — the layer of the best cell, whatever its pooling and PCA, ties
  going to the deeper layer — as a *relative depth* (stage / the model's number of stages; layer 0, the
  penultimate features, is depth 1), so models with different stage counts compare;
* a figure: accuracy against relative depth per dataset, and the best relative depth against the
  dataset's distance from the source task. Only families that control that distance have one (the
  synthetic family's ``distance`` option, ``DatasetEntry.distance_option``); other datasets are listed as
  of unknown distance and not plotted.

``with_factors`` adds the two facts the view needs and a results table lacks (``source_distance`` per
dataset, ``num_stages`` per model) from the sweep file's entries; a CSV may carry them itself. The
main analysis never sees these rows (``report_curves.main_cells`` keeps every cell axis at its default).
Everything but ``with_factors`` and the plotting is pure: DataFrames in, DataFrames out.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from xfer.regimes import REGIMES
from xfer.report_curves import DPI, CurveViews
from xfer.trial import DatasetRef, ModelSpec

AXES = ("layer", "pool", "pca")  # the probe's feature axes, in the order the table nests them
DISTANCE, STAGES, DEPTH = "source_distance", "num_stages", "relative_depth"
FIG = "fig_factors"


def _axis(regime: str, name: str) -> Any:
    return REGIMES.get(regime).axis(name)


def with_factors(results: pd.DataFrame, models: Iterable[ModelSpec], datasets: Iterable[DatasetRef]
                 ) -> pd.DataFrame:
    """``results`` with ``source_distance`` (per dataset; NaN where its family measures none) and, when
    some row reads a feature stage, ``num_stages`` (per model, from its architecture; no weights load)."""
    from xfer.data import source_distance

    out = results.copy()
    distance = {d.display: source_distance(d) for d in datasets}
    out[DISTANCE] = [np.nan if distance.get(d) is None else distance[d] for d in out["dataset"]]
    layer = pd.to_numeric(out.get("layer", pd.Series(np.nan, index=out.index)), errors="coerce")
    if (layer > 0).any():
        from xfer.features import stage_count

        used = set(out.loc[layer > 0, "model"])
        stages = {m.name: stage_count(m) for m in models if m.name in used}
        out[STAGES] = [stages.get(m, np.nan) for m in out["model"]]
    return out


def factor_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of regimes that declare the feature axes, the axes filled with their defaults (a row from
    before they existed ran the defaults), with their relative depth. Empty unless some axis has two or
    more values."""
    declares = np.array([r in REGIMES and all(a in REGIMES.get(r).axis_names for a in AXES)
                         for r in results["regime"]], dtype=bool)
    df = results[declares].copy()
    for a in AXES:
        col = pd.to_numeric(df[a], errors="coerce") if a in df.columns else pd.Series(np.nan, index=df.index)
        df[a] = [float(v) if np.isfinite(v) else _axis(r, a).default for v, r in zip(col, df["regime"])]
    if df.empty or all(df[a].nunique() < 2 for a in AXES):
        return df.iloc[0:0]
    stages = pd.to_numeric(df[STAGES], errors="coerce") if STAGES in df.columns else pd.Series(np.nan, index=df.index)
    df[DEPTH] = [1.0 if layer == 0 else layer / n if np.isfinite(n) and n > 0 else np.nan
                 for layer, n in zip(df["layer"], stages)]
    df[DISTANCE] = pd.to_numeric(df[DISTANCE], errors="coerce") if DISTANCE in df.columns else np.nan
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df.reset_index(drop=True)


def variant_label(regime: str, pool: float, pca: float) -> str:
    """``avg``, ``max · pca 16``: a table column."""
    return _axis(regime, "pool").label(pool) + (f" · pca {pca:g}" if pca else "")


def accuracy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy (%) per (dataset, distance, model, layer, relative depth) × (pooling, PCA), datasets
    by distance (unknown last), layers shallow to deep (layer 0, the penultimate features, last)."""
    df = rows.assign(variant=[variant_label(r, p, k) for r, p, k in zip(rows["regime"], rows["pool"], rows["pca"])],
                     _order=rows["layer"].replace(0.0, math.inf), acc=rows["value"] * 100)
    columns = list(dict.fromkeys(df.sort_values(["pca", "pool"], kind="mergesort")["variant"]))
    keys = ["dataset", DISTANCE, "model", "layer", DEPTH]
    wide = df.pivot_table(index=keys + ["_order"], columns="variant", values="acc", aggfunc="mean", dropna=False)
    wide = wide.reset_index().dropna(subset=columns, how="all")
    wide = wide.assign(_d=wide[DISTANCE].fillna(math.inf)).sort_values(["_d", "dataset", "model", "_order"],
                                                                      kind="mergesort")
    wide["layer"] = [f"{v:g}" if v else "0 (penultimate)" for v in wide["layer"]]
    wide.columns.name = None
    return wide[keys + columns].reset_index(drop=True)


def best_layers(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (model, dataset): the layer of its best cell (max test accuracy over layer × pooling × PCA; ties
    to the deeper layer), that cell's pooling, PCA and accuracy, the layer's relative depth and the
    dataset's distance from the source."""
    cols = ["dataset", DISTANCE, "model", "regime", "best_layer", DEPTH, "pool", "pca", "value"]
    ok = rows[np.isfinite(rows["value"])]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok = ok.assign(_deep=ok[DEPTH].fillna(-1.0))
    best = (ok.sort_values(["value", "_deep"], ascending=[False, False], kind="mergesort")
            .drop_duplicates(["model", "dataset"]).rename(columns={"layer": "best_layer"}))
    best = best.assign(_d=best[DISTANCE].fillna(math.inf)).sort_values(["_d", "dataset", "model"], kind="mergesort")
    return best[cols].reset_index(drop=True)


def plot_factors(rows: pd.DataFrame, best: pd.DataFrame) -> Any:
    """Left: test accuracy (best pooling and PCA per layer) against relative depth, a line per dataset
    and model (colour: distance). Right: the best layer's relative depth against the dataset's distance
    from the source, a line per model (datasets of unknown distance are not plotted)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    markers = "osD^vP*X"
    models = list(dict.fromkeys(rows["model"]))
    per_layer = rows.groupby(["dataset", "model", "layer"], sort=False).agg(
        depth=(DEPTH, "first"), value=("value", "max"), distance=(DISTANCE, "first")).reset_index()
    for (ds, model), g in per_layer.groupby(["dataset", "model"], sort=False):
        g = g[np.isfinite(g["depth"])].sort_values("depth")
        d = g["distance"].iloc[0] if len(g) else np.nan
        left.plot(g["depth"], g["value"] * 100, marker=markers[models.index(model) % len(markers)], lw=1.2,
                  color=cmap(0.9 * d) if np.isfinite(d) else "#888", ms=5,
                  label=f"{ds} · {model}" if len(models) > 1 else ds)
    left.set_xlabel("relative depth (stage / stages; 1 = penultimate)")
    left.set_ylabel("test accuracy (%)")
    left.set_title("accuracy by layer (best pooling and PCA)", fontsize=10)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    known = best[np.isfinite(pd.to_numeric(best[DISTANCE], errors="coerce"))]
    for model, g in known.groupby("model", sort=False):
        g = g.sort_values(DISTANCE)
        right.plot(g[DISTANCE], g[DEPTH], marker=markers[models.index(model) % len(markers)], lw=1.2, ms=7,
                   label=model)
    right.set_xlabel("distance of the target from the source task")
    right.set_ylabel("best layer's relative depth")
    right.set_ylim(0, 1.08)
    right.set_title("best layer against distance", fontsize=10)
    right.grid(True, alpha=0.3)
    if len(known):
        right.legend(fontsize=7)
    return fig


def views(results: pd.DataFrame, out_dir: str | Path) -> CurveViews:
    """The report's "Factors of transferability" section (see the module docstring): nothing unless the
    table has rows along the probe's feature axes."""
    made = CurveViews()
    rows = factor_rows(results)
    if rows.empty:
        return made
    best = best_layers(rows)
    unknown = sorted(set(rows.loc[~np.isfinite(rows[DISTANCE]), "dataset"]))
    made.blocks.append(("h2", "Factors of transferability"))
    made.blocks.append(("p", "Logistic regression on frozen features from several depths of each network (layer k: "
                             "timm feature stage k; 0: the penultimate pooled features), pooled by average, max or "
                             "both (concatenated), optionally reduced to the leading principal components of the "
                             "training split's features (Azizpour et al. 2014). Each (layer, pooling, PCA) is a "
                             "cell with its own λ chosen on validation; values are test accuracy (%). Relative "
                             "depth: stage / the model's number of stages (the penultimate features: 1)."))
    made.blocks.append(("table", accuracy_table(rows)))
    made.blocks.append(("p", "Best layer per model and dataset: the layer of the best cell over layer × pooling × "
                             "PCA (ties: the deeper layer). Azizpour et al. find it moves earlier as the target "
                             "moves away from the source task."))
    shown = best.assign(pool=[_axis(r, "pool").label(v) for r, v in zip(best["regime"], best["pool"])],
                        pca=[f"{v:g}" for v in best["pca"]], value=best["value"] * 100,
                        best_layer=[f"{v:g}" for v in best["best_layer"]])
    made.blocks.append(("table", shown.rename(columns={"value": "test accuracy (%)"})))
    if unknown:
        made.blocks.append(("p", f"Unknown distance from the source (not plotted): {', '.join(unknown)}. Only a "
                                 "dataset family that controls its distance (the synthetic family's `distance` "
                                 "option) gives one, read from the sweep file (`xfer report --experiment` needs "
                                 "`--spec`) or a `source_distance` column."))
    path = Path(out_dir) / f"{FIG}.png"
    plot_factors(rows, best).savefig(path, dpi=DPI)
    made.files[FIG] = path
    made.blocks.append(("img", (path, "Left: test accuracy against relative depth (best pooling and PCA at each "
                                      "layer), a line per dataset, coloured by distance from the source (grey: "
                                      "unknown). Right: the best layer's relative depth against the distance.")))
    return made
