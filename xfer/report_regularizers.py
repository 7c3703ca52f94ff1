"""The paper's regulariser view (Kornblith et al. 2019, §4.1): one architecture source-trained under
several regulariser settings, its source top-1 beside its transfer accuracy per setting.

The paper's finding is that label smoothing, dropout, auxiliary heads and BN-scale removal barely move
ImageNet top-1 but change how well the penultimate features transfer with logistic regression, while
fine-tuning hardly cares. This module turns a results table whose models carry their source-training
settings (``pretrain_<setting>`` columns, added by ``with_settings`` from the sweep file's model
entries) into that table and figure. Pure functions plus one figure builder; ``xfer.report`` writes them.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from xfer import stats
from xfer.regimes import REGIMES
from xfer.trial import ModelSpec

SETTINGS = ("label_smoothing", "dropout", "bn_scale", "aux_head", "wd")  # the pretrain regime's switches
PREFIX = "pretrain_"
COLUMNS = tuple(PREFIX + s for s in SETTINGS)
TRANSFER = ("linear_probe", "finetune")  # the regimes the paper contrasts
FIG_CAPTION = ("Source-training regularisers: source top-1 (x) against mean log-odds transfer accuracy over "
               "datasets (y), one point per setting (labelled by model; the table names its setting), for "
               "logistic regression and fine-tuning.")
TEXT = ("One architecture source-trained under each regulariser setting (the paper's §4.1): the source "
        "top-1 of each setting beside its mean transfer accuracy over datasets (and the mean log-odds, the "
        "scale the correlations use) for logistic regression on frozen features and for fine-tuning.")


def settings_of(models: Iterable[ModelSpec]) -> pd.DataFrame:
    """One row per ``weights: pretrain`` model: ``model`` and its resolved regulariser settings
    (the pretrain regime's defaults filled in)."""
    regime = REGIMES.get("pretrain")
    rows = []
    for m in models:
        if m.weights != "pretrain" or m.pretrain is None:
            continue
        opts = regime.check_options(m.pretrain.options, f"model {m.name} pretrain")
        rows.append({"model": m.name, **{PREFIX + s: opts[s] for s in SETTINGS}})
    return pd.DataFrame(rows, columns=["model", *COLUMNS])


def with_settings(results: pd.DataFrame, models: Iterable[ModelSpec]) -> pd.DataFrame:
    """``results`` with the ``pretrain_*`` columns of its source-trained models (NaN elsewhere)."""
    table = settings_of(models)
    if table.empty:
        return results
    return results.drop(columns=[c for c in COLUMNS if c in results.columns]).merge(table, on="model", how="left")


def setting_label(row: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> str:
    """A short name of a setting: what differs from ``reference`` (e.g. ``no label smoothing``), or
    every switch when there is no reference."""
    def say(name: str, value: Any) -> str:
        if name == "bn_scale":
            return "BN scale learned" if value else "BN scale fixed at 1"
        if name == "aux_head":
            return "no aux head" if value == "off" else f"aux head ({value})"
        if name == "wd":
            return f"wd {float(value):g}"
        pretty = name.replace("_", " ")
        return f"no {pretty}" if not value else f"{pretty} {float(value):g}"

    names = [s for s in SETTINGS if reference is None or row[PREFIX + s] != reference[PREFIX + s]]
    if not names:  # the reference itself: say what it is
        return "reference: " + ", ".join(say(s, row[PREFIX + s]) for s in SETTINGS)
    return ", ".join(say(s, row[PREFIX + s]) for s in names)


def has_settings(results: pd.DataFrame) -> bool:
    """True when the table holds at least two source-trained models that differ in a setting."""
    if not set(COLUMNS) <= set(results.columns):
        return False
    rows = results.dropna(subset=list(COLUMNS)).drop_duplicates("model")
    return len(rows) >= 2 and len(rows[list(COLUMNS)].astype(str).drop_duplicates()) >= 2


def regularizer_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per source-trained model: its setting, source top-1, and per transfer regime the mean accuracy
    and mean log-odds over the datasets it has results on (NaN when it has none). Settings are named by
    what they change from the reference — each switch at the value most of the models share (a study
    that turns one switch off at a time has its baseline there) — and the reference comes first."""
    rows = results.dropna(subset=list(COLUMNS))
    models = rows.drop_duplicates("model").set_index("model")
    reference = {c: models[c].astype(object).mode().iloc[0] for c in COLUMNS}
    src = stats.source_top1_by_model(results)
    out = []
    for model, row in models.iterrows():
        rec: dict[str, Any] = {"model": model, "setting": setting_label(row, reference),
                               "source top-1": float(src.get(model, np.nan))}
        for regime in TRANSFER:
            cell = rows[(rows["model"] == model) & (rows["regime"] == regime)]
            values = pd.to_numeric(cell["value"], errors="coerce").to_numpy(dtype=float)
            n_test = cell["n_test"].to_numpy(dtype=float) if "n_test" in cell.columns else None
            ok = np.isfinite(values)
            rec[f"{regime} mean"] = float(values[ok].mean()) if ok.any() else np.nan
            odds = stats.logit(values[ok], None if n_test is None else n_test[ok]) if ok.any() else np.array([])
            rec[f"{regime} log-odds"] = float(np.mean(odds)) if len(odds) else np.nan
        out.append(rec)
    table = pd.DataFrame(out)
    first = table["setting"].str.startswith("reference")
    return table.sort_values("setting", key=lambda s: ~s.str.startswith("reference"), kind="stable"
                             ).reset_index(drop=True) if first.any() else table


PCT_COLUMNS = ("source top-1", *(f"{r} mean" for r in TRANSFER))


def plot_regularizers(table: pd.DataFrame) -> Any:
    """Two panels (logistic regression, fine-tuning): source top-1 vs mean transfer log-odds, one
    labelled point per setting — the paper's view of how regularisers move the two apart."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, len(TRANSFER))
    for ax, regime in zip(np.atleast_1d(axes), TRANSFER):
        x, y = table["source top-1"].to_numpy(float) * 100, table[f"{regime} log-odds"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], color="tab:blue" if regime == "linear_probe" else "tab:orange", zorder=3)
        for xi, yi, label in zip(x[ok], y[ok], table["model"][ok]):  # model names: the table spells settings out
            ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        annotation_clip=True, in_layout=False)
        if ok.any():
            pad_x, pad_y = max(np.ptp(x[ok]) * 0.15, 0.5), max(np.ptp(y[ok]) * 0.15, 0.05)
            ax.set_xlim(x[ok].min() - pad_x, x[ok].max() + 3 * pad_x)
            ax.set_ylim(y[ok].min() - pad_y, y[ok].max() + pad_y)
        ax.set_title(REGIMES.get(regime).label if regime in REGIMES else regime)
        ax.set_xlabel("source top-1 (%)")
        ax.set_ylabel("mean transfer log-odds")
        ax.grid(alpha=0.3)
    return fig
