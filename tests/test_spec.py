"""Sweep specs: validation errors name the key path and the valid choices; expansion and keys are stable."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace
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
    (dict(regimes__finetune__trials_per_task=0), ["spec.regimes.finetune.trials_per_task", "integer >= 1"]),
    (dict(resources={"finetune": {"gpus": 1}}), ["spec.resources.finetune.gpus", "valid keys: cpu, gpu, models"]),
    (dict(resources={"finetune": {"gpu": 1, "models": {"zz": {"gpu": 0.5}}}}),
     ["spec.resources.finetune.models.zz", "not a model of this sweep", "a"]),
    (dict(resources={"finetune": {"models": {"a": {"gpu": 2.5}}}}), ["spec.resources.finetune.models.a.gpu", "fractions"]),
    (dict(resources={"finetune": {"models": {"a": {"memory": 2}}}}), ["spec.resources.finetune.models.a.memory", "cpu, gpu"]),
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


def test_trials_per_task_changes_no_key():
    plain = parse_spec(spec_with())
    packed = parse_spec(spec_with(regimes__finetune__trials_per_task=4))
    assert packed.trials_per_task["finetune"] == 4 and plain.trials_per_task["finetune"] == 1
    assert [t.key for t in packed.grid_trials()] == [t.key for t in plain.grid_trials()]


def test_small_models_pack_onto_a_gpu():
    """resources.<regime>.models gives one model's trials their own share: four MobileNet-size fine-tunes
    on one GPU while the others take a whole one; features and probes follow the same rule."""
    spec = parse_spec(spec_with(resources={"finetune": {"cpu": 4, "gpu": 1, "models": {"a": {"gpu": 0.25, "cpu": 2}}},
                                           "linear_probe": {"gpu": 0.5}}))
    assert spec.resources_for("finetune", "a") == {"cpu": 2.0, "gpu": 0.25}
    assert spec.resources_for("finetune", "other") == {"cpu": 4.0, "gpu": 1.0}
    assert spec.resources_for("finetune") == {"cpu": 4.0, "gpu": 1.0}
    assert spec.resources_for("linear_probe", "a") == {"cpu": 1.0, "gpu": 0.5}
    assert spec.resources_for("scratch", "a") == {"cpu": 1.0, "gpu": 0.0}


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
    p = plan(load_spec(ROOT / "sweeps" / "kornblith2019-public.yaml"))
    assert p["models"] == 16 and p["datasets"] == 12
    assert p["per_cell_by_regime"] == {"linear_probe": 45, "finetune": 56, "scratch": 56}
    assert p["total"] == 16 * 12 * (45 + 56 + 56)


def _xfer(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_plan_json_and_bad_spec_exit_cleanly(tmp_path):
    r = _xfer("plan", "sweeps/kornblith2019-public.yaml", "--json")
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


# keys of sweeps/quickstart.yaml: a finished study must be reused. They changed once, on purpose, when
# every new head became zero-initialised (trial.HEAD_INIT): the pretrain checkpoints are other weights
# now, and so is everything transferred from them (previously 2c5fdbef1f64bf5f, 4a225e0634f5069c, and
# pretrain a3d66d98278216a8 87ceb39a898a3db0 8b93d6f9acd84181 cf21025231ee0adf); fine-tune's also took the
# `pipeline` option (images decoded once and augmented on the device: other pixels, other results), and
# pretrain's keys its new regulariser options (dropout, bn_scale, aux_head, warmup_steps, ...; the quickstart
# pins their old values: same settings, same results).
PREVIOUS_KEYS = {("resnet-long", "synthetic_near", "linear_probe"): "cbccfcca63298ed5",
                 ("resnet-long", "synthetic_near", "finetune"): "1992629b469587a5"}
PREVIOUS_PRETRAIN_KEYS = ["e95112ef452ee154", "7a7ca071202491c8", "e9d0b95ac684a950", "672e70d2fac5ea26"]


def test_only_regimes_that_train_a_head_hash_the_head_rule():
    """A probe on hub weights trains no head: its keys did not change with the head rule."""
    spec = parse_spec(spec_with(models__0={"name": "r", "arch": "resnet50.tv_in1k"}))
    by_regime = {t.regime: t for t in spec.grid_trials()}
    lp, ft = by_regime["linear_probe"], by_regime["finetune"]
    assert lp.key_rule.head_init is None and ft.key_rule.head_init == "zeros"
    other = lambda t: replace(t, key_rule=replace(t.key_rule, head_init="timm-default"))  # noqa: E731
    assert other(ft).key != ft.key
    assert replace(lp, key_rule=replace(lp.key_rule, head_init=None)).key == lp.key


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


@pytest.mark.parametrize("name", ["quickstart.yaml", "kornblith2019-public.yaml"])
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


# ------------------------------------------------------------------ stand-ins
@pytest.mark.parametrize("entry,match", [
    ({"stand_in": "yes"}, r"models\[0\]\.stand_in: true or false"),
    ({"stand_in": True}, r"models\[0\]\.stand_in: a stand-in needs paper_name"),
])
def test_stand_in_is_validated(entry, match):
    raw = copy.deepcopy(BASE)
    raw["models"][0].update(entry)
    with pytest.raises(SpecError, match=match):
        parse_spec(raw)


def test_public_sweep_declares_its_stand_ins_and_shares_random_init():
    from xfer.source_accuracy import is_stand_in, model_facts

    spec = load_spec(ROOT / "sweeps" / "kornblith2019-public.yaml")
    assert spec.name == "kornblith2019-public"
    declared = {m.name for m in spec.models if m.stand_in}
    assert declared == {"inception_v1", "bn_inception", "nasnet_mobile"}
    # the shipped table agrees with what the file declares
    assert all(is_stand_in(replace(m, stand_in=None)) == (m.name in declared) for m in spec.models)
    assert all(model_facts(m)["input_size"] == model_facts(m)["source_input_size"] for m in spec.models)
    scratch = {}
    for t in spec.grid_trials():
        if t.regime == "scratch" and t.dataset.name == "cifar10":
            scratch.setdefault(t.key, set()).add(t.model.name)
    shared = [names for names in scratch.values() if len(names) > 1]
    assert {"inception_v1", "bn_inception", "inception_v3"} in shared
