"""A regime no xfer module knows: k-nearest neighbours on raw pixels, with the grid axis ``neighbours``.

``tests/test_new_regime.py`` loads it as a plugin (``plugins: [knn_regime]`` in a sweep file) to show
that a regime is one module: spec validation, ``xfer trial`` flags, the Ray trainable, MLflow params,
selection and the report all read this declaration, and no other file names it.
"""
from __future__ import annotations

import numpy as np

from xfer.contract import RunContext, TrialRecord, splits_for
from xfer.regimes import REGIMES, Axis, Option, Regime


class KNearest(Regime):
    name = "knn"
    label = "k-nearest neighbours (pixels)"
    axes = (Axis("neighbours", "how many neighbours vote", valid=lambda k: k >= 1 and float(k).is_integer(),
                 rule="a whole number >= 1", prefer="larger", fmt=".0f"),)
    options = (Option("max_train", 600, "training examples kept (a cheap plugin)", minimum=1),)
    model_identity = ()  # uses no model: every model entry shares one trial per grid point

    def run(self, trial, ctx: RunContext) -> TrialRecord:
        from xfer.data import build_from_ref
        from xfer.metrics import compute_metric

        opts = self.check_options(trial.options, f"regime {self.name} option")
        k = int(self.check_hparams(trial.hparams, f"regime {self.name}")["neighbours"])
        splits = splits_for(trial.stage)
        ds = build_from_ref(trial.dataset, data_root=ctx.data_root, download=ctx.download)

        def arrays(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
            items = [ds.split(split)[i] for i in range(min(len(ds.split(split)), limit or 10**9))]
            return (np.stack([np.asarray(x, dtype=np.float32).ravel() for x, _ in items]),
                    np.asarray([int(y) for _, y in items]))

        xtr, ytr = arrays(splits.train, opts["max_train"])
        xev, yev = arrays(splits.eval)
        d = ((xev[:, None, :] - xtr[None, :, :]) ** 2).sum(-1)
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(xev), ds.info.num_classes), dtype=np.float32)
        for c in range(ds.info.num_classes):
            votes[:, c] = (ytr[nearest] == c).sum(1) - 1e-3 * c  # ties go to the smaller class id
        value = compute_metric(ds.info.metric, votes, yev)
        return TrialRecord(status="finished", metric=ds.info.metric,
                           metrics={f"{splits.prefix}_{ds.info.metric}": value}, scores=votes, targets=yev,
                           fingerprints={"data": ds.fingerprint()})


REGIMES.add(KNearest.name, KNearest())
