"""Estimate runs: one MLflow run per (model, dataset) holding its transferability estimates.

They live in the sweep's experiment beside the trial runs, tagged ``xfer.kind=estimate`` and keyed by
``xfer.estimate_key`` — not ``xfer.trial_key``, so the runs table, selection and finished-key look-ups
never see them. A rerun finds a key's run and adds only the estimators it lacks (never a second run).

Metrics: ``estimate.<name>`` (the score) and ``estimate.<name>.seconds`` (its compute time on the
cached features), ``estimate.source_seconds`` (source-head predictions, shared by the estimators that
read them) and ``estimate.features_seconds`` (the feature extraction, shared with the linear probe).
An estimator that cannot score the pair (multi-label target, no source head) leaves its reason in the
tag ``xfer.estimate.<name>`` instead of a metric.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from xfer.tracking.schema import (MAX_PARAM_LEN, MAX_TAG_LEN, TAG_KIND, TAG_PARENT, TAG_STATUS, chunks,
                                  provenance_tags)
from xfer.tracking.uri import client as _client, experiment_id as _experiment_id, require_experiment

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

KIND = "estimate"
TAG_ESTIMATE_KEY = "xfer.estimate_key"
TAG_SKIPPED = "xfer.estimate."  # + estimator name: why it has no score
PREFIX = "estimate."
SOURCE_SECONDS = "estimate.source_seconds"
FEATURES_SECONDS = "estimate.features_seconds"
COLUMNS = ["model", "dataset", "estimator", "score", "seconds", "source_seconds", "features_seconds", "needs_source",
           "n", "run_id"]
_PAGE = 1000


def iter_estimate_runs(client: "MlflowClient", experiment_id: str) -> Iterator["Run"]:
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{KIND}'",
                                  max_results=_PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            break


def by_key(client: "MlflowClient", experiment_id: str) -> dict[str, "Run"]:
    """key → run (the newest, should an older tool have left two)."""
    out: dict[str, Run] = {}
    for r in sorted(iter_estimate_runs(client, experiment_id), key=lambda r: r.info.start_time or 0):
        key = r.data.tags.get(TAG_ESTIMATE_KEY)
        if key:
            out[key] = r
    return out


def names_done(run: "Run | None") -> set[str]:
    """Estimators a run already answered: a score, or a recorded reason why there is none."""
    if run is None:
        return set()
    done = {k[len(PREFIX):] for k in run.data.metrics if k.startswith(PREFIX) and k.count(".") == 1}
    done |= {k[len(TAG_SKIPPED):] for k in run.data.tags if k.startswith(TAG_SKIPPED)}
    return done - {"source_seconds", "features_seconds"}


def log_estimate(client: "MlflowClient", experiment_id: str, *, key: str, run_id: str | None,
                 parent_run_id: str | None, tags: Mapping[str, str], params: Mapping[str, Any],
                 result: Mapping[str, Any]) -> str:
    """Create the key's run (or reopen ``run_id``) and log ``result``: ``scores`` / ``seconds`` /
    ``skipped`` per estimator name, ``source_seconds``, ``features_seconds``. Returns the run id."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    all_tags = {TAG_KIND: KIND, TAG_ESTIMATE_KEY: key, **tags, **provenance_tags()}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=f"{tags.get('xfer.model')}/{tags.get('xfer.dataset')} "
                                                           "[estimate]", tags=all_tags).info.run_id
        for chunk in chunks([Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if v is not None]):
            client.log_batch(run_id, params=chunk)
    else:
        client.update_run(run_id, status="RUNNING")
    now = int(time.time() * 1000)
    values: dict[str, float] = {}
    for name, v in result.get("scores", {}).items():
        values[f"{PREFIX}{name}"] = v
        values[f"{PREFIX}{name}.seconds"] = result["seconds"][name]
    for k, metric in (("source_seconds", SOURCE_SECONDS), ("features_seconds", FEATURES_SECONDS)):
        if result.get(k) is not None and math.isfinite(result[k]):
            values[metric] = result[k]
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if math.isfinite(float(v))]
    run_tags = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in all_tags.items()]  # a reused run joins this invocation
    run_tags += [RunTag(f"{TAG_SKIPPED}{name}", why[:MAX_TAG_LEN]) for name, why in result.get("skipped", {}).items()]
    run_tags.append(RunTag(TAG_STATUS, "finished"))
    for chunk in chunks(metrics, 1000):
        client.log_batch(run_id, metrics=chunk)
    for chunk in chunks(run_tags):
        client.log_batch(run_id, tags=chunk)
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def rows(run: "Run") -> list[dict[str, Any]]:
    """One row per estimator score of an estimate run (see ``COLUMNS``)."""
    from xfer.estimators import ESTIMATORS

    m, tags = run.data.metrics, run.data.tags
    n = run.data.params.get("n")
    out = []
    for k, v in m.items():
        if not k.startswith(PREFIX) or k.count(".") != 1 or k in (SOURCE_SECONDS, FEATURES_SECONDS):
            continue
        name = k[len(PREFIX):]
        out.append({"model": tags.get("xfer.model"), "dataset": tags.get("xfer.dataset"), "estimator": name,
                    "score": float(v), "seconds": float(m.get(f"{k}.seconds", math.nan)),
                    "source_seconds": float(m.get(SOURCE_SECONDS, math.nan)),
                    "features_seconds": float(m.get(FEATURES_SECONDS, math.nan)),
                    "needs_source": name in ESTIMATORS and "source_probs" in ESTIMATORS.get(name).needs,
                    "n": int(float(n)) if n is not None else None, "run_id": run.info.run_id})
    return out


def load_estimates(uri: str, experiment: str, *, must_exist: bool = True) -> "pd.DataFrame":
    """The estimates table of an experiment (columns ``COLUMNS``; empty when the sweep ran no estimators)."""
    import pandas as pd

    client = _client(uri)
    exp_id = require_experiment(client, uri, experiment) if must_exist else _experiment_id(client, experiment)
    runs = by_key(client, exp_id).values() if exp_id is not None else []
    df = pd.DataFrame([row for r in runs for row in rows(r)], columns=COLUMNS)
    return df.sort_values(["dataset", "model", "estimator"], kind="stable").reset_index(drop=True)
