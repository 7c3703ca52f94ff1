"""Contract tests parametrised over the registries: every registered regime, dataset and metric keeps
the promises the rest of xfer relies on (a new entry is checked without editing this file)."""
from __future__ import annotations

import numpy as np
import pytest

from xfer.data import DATASETS, resolve_options
from xfer.metrics import METRICS, compute_metric
from xfer.options import OptionError
from xfer.regimes import REGIMES
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

MODEL = ModelSpec(name="m", arch="test_resnet", weights="random")


@pytest.mark.parametrize("name", REGIMES.names())
def test_regime_declaration(name):
    r = REGIMES.get(name)
    assert r.name == name and r.label, "a regime names itself and says how reports call it"
    axes, options = r.axis_names, [o.name for o in r.options]
    assert len(set(axes)) == len(axes) and len(set(options)) == len(options)
    assert not set(axes) & set(options), "an axis is not also an option"
    assert (len(axes) > 0) == r.grid, "grid regimes have axes; the others take options only"
    assert r.check_options({}, "x") == r.defaults  # its defaults pass its own validation
    with pytest.raises(OptionError, match="unknown key"):
        r.check_options({"no_such_option": 1}, "x")
    with pytest.raises(OptionError, match="takes the hyper-parameters"):
        r.check_hparams({**{a: 1.0 for a in axes}, "no_such_axis": 1.0}, "x")
    rule = r.key_rule
    MODEL.key_fields(rule.model)  # every identity field is one a model has
    assert set(rule.ignore_options) == {o.name for o in r.options if not o.affects_result}
    # what a key hashes: a result-changing option changes it, an observation-only one does not
    hp = {a.name: 1.0 for a in r.axes}
    base = TrialSpec(MODEL, DatasetRef("digits"), name, hp, r.defaults, key_rule=rule)
    for o in r.options:
        changed = TrialSpec(MODEL, DatasetRef("digits"), name, hp, {**r.defaults, o.name: _other(o.default)},
                            key_rule=rule)
        assert (changed.key != base.key) == o.affects_result, o.name


def _other(v):
    return (not v) if isinstance(v, bool) else v + 1 if isinstance(v, (int, float)) else f"{v}-other"


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_declaration(name):
    e = DATASETS.get(name)
    assert e.info.name == name and (e.info.num_classes >= 2 or e.info.num_classes == 0)  # 0: known once built
    assert e.info.metric in METRICS, f"{name}: metric {e.info.metric!r} is not registered"
    assert e.info.val_rule in ("heldout", "official", "per_class_30")
    assert resolve_options(name, {}) == dict(e.options)  # the defaults are valid options
    with pytest.raises(OptionError, match="unknown key"):
        resolve_options(name, {"no_such_option": 1})


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_contract(name):
    """Perfect predictions score 1, reversed ones less; values are fractions."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 5)
    if name == "map11":
        targets = np.eye(4)[y]
        perfect, worst = targets.astype(float), 1.0 - targets
    else:
        targets, perfect, worst = y, np.eye(4)[y], 1.0 - np.eye(4)[y]
    assert compute_metric(name, perfect + 1e-3 * rng.normal(size=perfect.shape), targets) == pytest.approx(1.0)
    low = compute_metric(name, worst, targets)
    assert 0.0 <= low < 1.0
