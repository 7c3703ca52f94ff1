"""Sweep specs: validation errors name the key path and the valid choices; expansion and keys are stable."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xfer.spec import SpecError, load_spec, parse_spec, plan

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "models": [{"name": "a", "arch": "test_convnext", "weights": "random", "input_size": 32}],
    "datasets": ["digits"],
    "regimes": {
        "linear_probe": {"grid": {"l2": [1e-3, 1e-1]}},
        "finetune": {"grid": {"lr": {"logspace": [1e-3, 1e-1, 3]}, "wd": [0, 1e-4]}, "steps": 10, "batch_size": 16},
    },
}


def spec_with(**changes):
    raw = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = raw
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return raw


DELETE = object()

MALFORMED = [  # (changes, substrings the error must contain)
    (dict(nme="x"), ["spec.nme", "did you mean 'name'", "valid keys"]),
    (dict(name=DELETE), ["spec.name", "required"]),
    (dict(models=[]), ["spec.models", "non-empty list"]),
    (dict(models__0__arch="resnet5O"), ["spec.models[0].arch", "unknown timm architecture", "resnet50"]),
    (dict(models__0__weights="imagenet"), ["spec.models[0].weights", "valid: hub, random, pretrain, file"]),
    (dict(models__0__weights="pretrain"), ["spec.models[0].pretrain", "required when weights is 'pretrain'"]),
    (dict(models__0__source_top1=76.1), ["spec.models[0].source_top1", "fraction"]),
    (dict(datasets=["cifar11"]), ["spec.datasets[0].name", "unknown dataset", "cifar10"]),
    (dict(datasets=[{"name": "digits", "colour": True}]), ["spec.datasets[0].colour", "unknown key", "image_size"]),
    (dict(regimes__linear_probe__grid__l2=[]), ["spec.regimes.linear_probe.grid.l2", "empty"]),
    (dict(regimes__linear_probe__grid__l2=[-1.0]), ["spec.regimes.linear_probe.grid.l2", "> 0"]),
    (dict(regimes__finetune__grid__lr={"logspace": [1e-3, 1e-1]}), ["logspace takes [start, stop, num]"]),
    (dict(regimes__finetune__grid__wd=DELETE), ["spec.regimes.finetune.grid.wd", "missing"]),
    (dict(regimes__finetune__grid__momentum=[0.9]), ["spec.regimes.finetune.grid.momentum", "valid keys: lr, wd"]),
    (dict(regimes__finetune__steps="many"), ["spec.regimes.finetune.steps", "expected int"]),
    (dict(regimes__finetune__stpes=10), ["spec.regimes.finetune.stpes", "did you mean 'steps'"]),
    (dict(regimes__finetuen={"grid": {"lr": [0.1], "wd": [0]}}), ["spec.regimes.finetuen", "unknown regime", "finetune"]),
    (dict(regimes__pretrain={"grid": {}}), ["spec.regimes.pretrain", "weights: pretrain"]),
    (dict(seeds="0"), ["spec.seeds", "list of integers"]),
    (dict(resources={"finetune": {"gpus": 1}}), ["spec.resources.finetune.gpus", "valid keys: cpu, gpu"]),
    (dict(resources={"finetune": {"gpu": 1.5}}), ["spec.resources.finetune.gpu", "fractions"]),
    (dict(search={"type": "random"}), ["spec.search.type", "grid, optuna"]),
    (dict(models=[BASE["models"][0], BASE["models"][0]]), ["spec.models", "unique", "a"]),
]


@pytest.mark.parametrize("changes,expected", MALFORMED, ids=[next(iter(c)) for c, _ in MALFORMED])
def test_malformed_spec_names_key_and_choices(changes, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(**changes))
    msg = str(err.value)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_not_a_mapping_and_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping at the top level"):
        load_spec(lst)
    with pytest.raises(SpecError, match="no such sweep file"):
        load_spec(tmp_path / "missing.yaml")


def test_logspace_and_mixed_lists():
    spec = parse_spec(spec_with(regimes__finetune__grid__wd=[0, {"logspace": [1e-6, 1e-3, 4]}]))
    ft = next(r for r in spec.regimes if r.name == "finetune")
    assert ft.grid["lr"] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert ft.grid["wd"] == pytest.approx([0, 1e-6, 1e-5, 1e-4, 1e-3])


def test_expansion_counts_and_stable_keys():
    spec = parse_spec(copy.deepcopy(BASE))
    trials = spec.grid_trials()
    assert len(trials) == 2 + 3 * 2
    assert plan(spec)["total"] == 8
    again = parse_spec(copy.deepcopy(BASE)).grid_trials()
    assert [t.key for t in trials] == [t.key for t in again]
    assert len({t.key for t in trials}) == len(trials)


@pytest.mark.parametrize("change,regimes", [
    (dict(models__0__input_size=48), {"linear_probe", "finetune"}),
    (dict(models__0__arch="test_resnet"), {"linear_probe", "finetune"}),
    (dict(regimes__finetune__steps=11), {"finetune"}),
    (dict(regimes__finetune__batch_size=8), {"finetune"}),
    (dict(regimes__linear_probe__max_iter=7), {"linear_probe"}),
    (dict(seeds=[1]), {"linear_probe", "finetune"}),
    (dict(datasets=[{"name": "synthetic_near"}]), {"linear_probe", "finetune"}),
])
def test_any_result_changing_field_changes_the_key(change, regimes):
    def keys(raw):
        return {r: {t.key for t in parse_spec(raw).grid_trials() if t.regime == r} for r in ("linear_probe", "finetune")}

    base, changed = keys(copy.deepcopy(BASE)), keys(spec_with(**change))
    for r in ("linear_probe", "finetune"):
        if r in regimes:
            assert not base[r] & changed[r], r
        else:
            assert base[r] == changed[r], r  # a change to one regime leaves the others' keys alone


def test_tracking_resources_and_logging_do_not_change_keys():
    a = [t.key for t in parse_spec(copy.deepcopy(BASE)).grid_trials()]
    b = [t.key for t in parse_spec(spec_with(tracking_uri="http://x", storage="/elsewhere",
                                             resources={"finetune": {"cpu": 4, "gpu": 0.5}},
                                             regimes__finetune__log_every=1,
                                             regimes__finetune__checkpoint_every=2)).grid_trials()]
    assert a == b


def test_adding_a_model_keeps_existing_keys():
    raw = copy.deepcopy(BASE)
    before = {t.key for t in parse_spec(raw).grid_trials()}
    raw["models"].append({"name": "b", "arch": "test_resnet", "weights": "random", "input_size": 32})
    after = {t.key for t in parse_spec(raw).grid_trials()}
    assert before < after and len(after - before) == len(before)


def test_pretrain_models_expand_to_one_source_trial_each():
    raw = copy.deepcopy(BASE)
    raw["models"] = [{"name": f"m{i}", "arch": "test_convnext", "weights": "pretrain", "input_size": 32,
                      "pretrain": {"dataset": "synthetic_source", "steps": 10 * (i + 1)}} for i in range(2)]
    spec = parse_spec(raw)
    pre = spec.pretrain_trials()
    assert [t.regime for t in pre] == ["pretrain", "pretrain"] and len({t.key for t in pre}) == 2
    # downstream keys depend on which checkpoint they transfer from
    ids = {t.model.weights_id() for t in spec.grid_trials()}
    assert ids == {f"pretrain:{t.key}" for t in pre}


def test_trial_roundtrip_through_ray_config():
    from xfer.spec import TrialSpec

    t = parse_spec(copy.deepcopy(BASE)).grid_trials()[-1]
    assert TrialSpec.from_config({"trial": t.to_dict()}).key == t.key
    sampled = TrialSpec.from_config({"trial": t.to_dict(), "lr": 0.5})
    assert sampled.hparams["lr"] == 0.5 and sampled.key != t.key


def test_paper_spec_has_the_paper_counts():
    p = plan(load_spec(ROOT / "sweeps" / "kornblith2019.yaml"))
    assert p["models"] == 16 and p["datasets"] == 12
    assert p["per_cell_by_regime"] == {"linear_probe": 45, "finetune": 56, "scratch": 56}
    assert p["total"] == 16 * 12 * (45 + 56 + 56)


def _xfer(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_plan_json_and_bad_spec_exit_cleanly(tmp_path):
    r = _xfer("plan", "sweeps/kornblith2019.yaml", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] == 30144
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_with(datasets=["cifar11"])))
    r = _xfer("plan", str(bad))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr and "cifar10" in r.stderr


def test_yaml_exponent_strings_are_numbers():
    """PyYAML reads `1e-4` as a string (YAML 1.1); a researcher writes it anyway."""
    raw = copy.deepcopy(BASE)
    raw["regimes"]["linear_probe"]["grid"]["l2"] = ["1e-3", {"logspace": ["1e-2", "1.0e5", 2]}]
    spec = parse_spec(raw)
    lp = next(r for r in spec.regimes if r.name == "linear_probe")
    assert lp.grid["l2"] == pytest.approx([1e-3, 1e-2, 1e5])
    with pytest.raises(SpecError, match="expected a number"):
        raw["regimes"]["linear_probe"]["grid"]["l2"] = ["small"]
        parse_spec(raw)


# keys the previous release computed for sweeps/quickstart.yaml: a finished study must be reused.
# Changed once, deliberately, when the pretrain regime gained its regulariser options (dropout, bn_scale,
# aux_head, warmup_steps, ...): every option enters a pretrain key, so the quickstart's source training
# (same settings, same results) and the transfer trials of its pretrained models have new keys.
PREVIOUS_KEYS = {("resnet-long", "synthetic_near", "linear_probe"): "060a304175fc71af",
                 ("resnet-long", "synthetic_near", "finetune"): "027d08a7cb4ebb17"}
PREVIOUS_PRETRAIN_KEYS = ["840d58fab8b7fb1d", "5bfffe5d7041c105", "b29b7b19a11461e9", "76df51abdf43b277"]


def test_quickstart_keys_of_finished_regimes_are_unchanged():
    from xfer.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "sweeps" / "quickstart.yaml")
    first = {}
    for t in spec.grid_trials():
        first.setdefault(t.cell, t.key)
    for cell, key in PREVIOUS_KEYS.items():
        assert first[cell] == key, cell
    assert [t.key for t in spec.pretrain_trials()] == PREVIOUS_PRETRAIN_KEYS


def test_scratch_keys_follow_the_architecture_not_the_weights():
    """Identity is the regime's: scratch hashes architecture, input size, data, hyper-parameters and seed —
    model entries of one architecture share its trials, and a changed pretrain block re-runs no scratch trial."""
    raw = copy.deepcopy(BASE)
    raw["regimes"]["scratch"] = {"grid": {"lr": [0.1], "wd": [0.0]}, "steps": 5}
    raw["models"] = [{"name": "a", "arch": "test_resnet", "weights": "random"},
                     {"name": "b", "arch": "test_resnet", "weights": "pretrain",
                      "pretrain": {"dataset": "synthetic_source", "steps": 10}},
                     {"name": "c", "arch": "test_byobnet", "weights": "random"}]

    def keys(r):
        return {t.model.name: t.key for t in parse_spec(r).grid_trials() if t.regime == "scratch"}

    k = keys(raw)
    assert k["a"] == k["b"] != k["c"]
    raw["models"][1]["pretrain"]["steps"] = 20
    assert keys(raw) == k
    ft = {t.model.name: t.key for t in parse_spec(raw).grid_trials() if t.regime == "finetune"}
    assert len(set(ft.values())) == 3  # fine-tuning does load the weights: every entry is its own trial
    raw["models"][0]["input_size"] = 48
    assert keys(raw)["a"] != k["a"]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "two words"])
def test_sweep_names_never_leave_the_storage_root(name):
    with pytest.raises(SpecError, match="spec.name: sweep name .* cannot be used as a folder name"):
        parse_spec(spec_with(name=name))


@pytest.mark.parametrize("name", ["quickstart.yaml", "kornblith2019.yaml"])
def test_plan_counts_equal_the_enumerated_grid(name):
    """`xfer plan` counts without hashing every key; the counts must be the grid's."""
    from xfer.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "sweeps" / name)
    trials, p = spec.grid_trials(), plan(load_spec(Path(__file__).parents[1] / "sweeps" / name))
    keys: dict[str, set[str]] = {}
    for t in trials:
        keys.setdefault(t.regime, set()).add(t.key)
    assert p["total"] == len(trials) and p["distinct"] == len({t.key for t in trials})
    assert p["distinct_by_regime"] == {r: len(k) for r, k in keys.items()}
    assert sum(p["by_model_dataset"].values()) == len(trials)
