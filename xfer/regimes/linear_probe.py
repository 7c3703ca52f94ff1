"""Logistic regression on frozen features (Kornblith et al. 2019, §3 "logistic regression").

The frozen network's penultimate, globally pooled features (``xfer.features``: eval-mode BN, centre
crop, no augmentation) are fitted with an L2-regularised multinomial (or, for multi-label data,
one-vs-rest) logistic regression by L-BFGS — the solver and the exact λ ↔ loss mapping are in
``xfer.logistic``. The grid has one axis, ``l2`` = λ (the paper and SimCLR/BYOL: 45 values log-spaced in
[1e-6, 1e5]); grid trials fit on ``train`` and report ``val_<metric>``, the final stage fits on
``trainval`` and reports ``test_<metric>``.

Three *cell* axes make Azizpour et al. 2014's factors of transferability (each value a cell of its own,
never selected away; at their defaults a trial is, and keys as, one without them): ``layer`` — which
features: 0 the penultimate pooled ones, k >= 1 timm feature stage k (``feature_info`` order); ``pool`` —
global average, max, or both concatenated (``avgmax``); ``pca`` — the number of principal components of
the training split's features the regression sees (0: all features). Layer and pooling change what is
extracted, so the feature store keys each (``contract.FeatureVariant``); PCA is fitted here, on the
training features only, and applied to the evaluated split (``logistic.PCA``).

``train_size`` (shared with fine-tune and scratch, ``regimes.base.TRAIN_SIZE``) fits on a class-balanced
subset of the training split's stored features — the same images a fine-tune trial of that seed trains on
(one draw per split's labels and seed), so accuracy against size compares the regimes on the same data.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xfer.contract import POOLINGS, Diverged, FeatureVariant, RunContext, TrialRecord, splits_for
from xfer.regimes.base import REGIMES, TRAIN_SIZE, Axis, Option, Regime, positive


def _whole(v: float) -> bool:
    return v >= 0 and float(v).is_integer()


LAYER = Axis("layer", "feature stage: 0 = the penultimate pooled features; k >= 1 = timm feature stage k "
             "(feature_info order)", valid=_whole, rule="an integer >= 0 (0: penultimate; k: timm feature stage k)",
             prefer="larger", fmt="g", cell=True, default=0.0)
POOL = Axis.named("pool", "global pooling of the feature map: avg, max, or avgmax (both, concatenated)",
                  POOLINGS, default="avg", prefer="smaller", cell=True)
PCA_AXIS = Axis("pca", "principal components of the training features the regression sees (0: no PCA)",
                valid=_whole, rule="an integer >= 0 (components; 0: no PCA)", prefer="larger", fmt="g", cell=True,
                default=0.0)

if TYPE_CHECKING:
    from xfer.trial import TrialSpec

log = logging.getLogger(__name__)


class LinearProbe(Regime):
    """Multinomial (or one-vs-rest) L2 logistic regression on cached frozen features."""

    name = "linear_probe"
    label = "Logistic regression (frozen features)"
    axes = (Axis("l2", "L2 penalty λ: mean loss + λ/2 ‖W‖² (sklearn's C = 1/(λ n))", valid=positive, rule="> 0",
                 prefer="larger"),  # ties go to the stronger penalty, the simpler model
            LAYER, POOL, PCA_AXIS, TRAIN_SIZE)
    options = (
        Option("max_iter", 1000, "L-BFGS iterations", minimum=1),
        Option("tol", 1e-6, "stop when every gradient component of the (mean) objective is below this"),
        Option("standardize", True, "z-score features with train statistics (L-BFGS conditioning)"),
        Option("batch_size", 256, "feature extraction batch", minimum=1),
    )
    uses_features = True
    new_head = False  # a logistic regression on features, no network head
    path_axis = "l2"  # a sweep solves a cell's λ grid as one warm-started path (xfer.lambda_path)

    def feature_variant(self, trial: "TrialSpec") -> FeatureVariant:
        hp = self.check_hparams(trial.hparams, f"regime {self.name}")
        return FeatureVariant(layer=int(hp["layer"]), pool=POOL.label(hp["pool"]))

    def run(self, trial: "TrialSpec", ctx: RunContext) -> TrialRecord:
        return self._fit([trial], ctx, path=False)[0]

    def run_path(self, trials: "list[TrialSpec]", ctx: RunContext) -> list[TrialRecord]:
        """Every λ of one (model, dataset, split) with one feature load and the warm-started path solver
        (``xfer.lambda_path``); each λ keeps its own record (and trial key, and MLflow run)."""
        return self._fit(trials, ctx, path=True)

    def _fit(self, trials: "list[TrialSpec]", ctx: RunContext, path: bool) -> list[TrialRecord]:
        import torch

        from xfer import features
        from xfer.hashing import stable_hash
        from xfer.lambda_path import fit_logistic_path
        from xfer.logistic import PCA, LinearProbeError, Standardizer, fit_logistic
        from xfer.metrics import compute_metric

        trial = trials[0]
        opts = self.check_options(trial.options, f"regime {self.name} option")
        if not opts["tol"] > 0:
            raise LinearProbeError(f"linear_probe option tol: expected a number > 0, got {opts['tol']!r}")
        l2s = [self.check_hparams(t.hparams, f"regime {self.name}")["l2"] for t in trials]
        hp = self.check_hparams(trial.hparams, f"regime {self.name}")
        variant, n_pca = self.feature_variant(trial), int(hp["pca"])
        cell = self.describe({k: v for k, v in hp.items() if k != self.path_axis})  # "layer=2 pool=max", or ""
        cell = f" {cell}" if cell else ""
        if any(self.path_group(t) != self.path_group(trial) for t in trials):
            raise LinearProbeError("a λ path takes trials that differ only in l2")
        splits = splits_for(trial.stage)
        sets = features.get_feature_sets(trial.model, trial.dataset, [splits.train, splits.eval], ctx,
                                         batch_size=opts["batch_size"], variant=variant)  # one build on a miss
        train, held = sets[splits.train], sets[splits.eval]
        fingerprints = {"data": str(train.meta.get("dataset_fingerprint", "")),
                        "weights": str(train.meta.get("backbone_fingerprint", "")), "features": train.key}
        x_train, y_train, x_eval = train.features, train.targets, held.features
        extra: dict[str, float] = {}
        if hp["train_size"]:  # the rows of the stored split a fine-tune trial of this seed trains on
            from xfer.data.subset import class_balanced_indices

            try:
                idx = class_balanced_indices(y_train.cpu().numpy(), int(hp["train_size"]), seed=trial.seed)
            except ValueError as e:
                raise LinearProbeError(f"regime {self.name}: train_size: {e}") from None
            x_train, y_train = x_train[torch.from_numpy(idx)], y_train[torch.from_numpy(idx)]
            fingerprints["train_subset"] = stable_hash({"per_class": int(hp["train_size"]), "seed": int(trial.seed),
                                                        "indices": idx.tolist()})
            extra["train_examples"] = float(len(idx))
        if n_pca:  # fitted on the training split alone; the evaluated split is only projected
            pca = PCA.fit(x_train, n_pca)
            x_train, x_eval = pca(x_train), pca(x_eval)
            extra = {"pca_components": float(pca.components.shape[1]),
                     "pca_explained": float(pca.explained.sum())}
        if opts["standardize"]:
            st = Standardizer.fit(x_train)
            x_train, x_eval = st(x_train), st(x_eval)
        kw = dict(num_classes=train.num_classes, multilabel=train.multilabel, max_iter=opts["max_iter"],
                  tol=float(opts["tol"]), device=ctx.resolved_device())
        try:
            fits = fit_logistic_path(x_train, y_train, l2s, **kw) if path else \
                [fit_logistic(x_train, y_train, l2s[0], **kw)]
        except Diverged as e:
            return [TrialRecord(status="diverged", message=str(e), metric=train.metric, fingerprints=fingerprints)
                    for _ in trials]
        targets = held.targets.cpu().numpy()
        out = []
        for l2, fit in zip(l2s, fits):
            scores = fit.decision_function(x_eval).cpu().numpy()
            value = compute_metric(train.metric, scores, targets)
            if not path:
                ctx.report(fit.n_iter, {"train_loss": fit.objective})
            log.info("linear_probe %s/%s%s λ=%g: %s_%s=%.4f (train loss %.4g, %d L-BFGS iterations%s)",
                     trial.model.name, trial.dataset.display, cell, l2, splits.prefix, train.metric, value,
                     fit.objective, fit.n_iter, "" if fit.converged else f", {fit.status}: not converged")
            # solver_converged (1/0) tags the run, so selection and the report can count stalled fits
            out.append(TrialRecord(status="finished", metric=train.metric, steps_done=fit.n_iter,
                                   metrics={f"{splits.prefix}_{train.metric}": value, "train_loss": fit.objective,
                                            "solver_converged": float(fit.converged), **extra},
                                   message=fit.note(opts["tol"]),
                                   scores=scores, targets=targets, fingerprints=dict(fingerprints)))
        return out


REGIMES.add(LinearProbe.name, LinearProbe())
