"""`xfer plan`'s cost model (xfer.cost): FLOPs of real timm networks, the work a spec asks for counted by
hand, the calibration cache, the command, and the shipped single-GPU study's header."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from xfer import cost
from xfer.cli import main
from xfer.layout import StorageLayout
from xfer.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def test_flops_are_counted_on_the_real_network_and_scale_with_pixels():
    small, size, dim = cost.forward_flops("test_resnet", 32)
    big, _, _ = cost.forward_flops("test_resnet", 64)
    assert size == 32 and dim > 0
    assert 1e6 < small < 1e8  # a network of a few thousand parameters at 32 px
    assert big / small == pytest.approx(4.0, rel=0.1)  # convolutions: proportional to input area
    r50, size, dim = cost.forward_flops("resnet50.tv_in1k")
    assert size == 224 and dim == 2048
    assert r50 == pytest.approx(8.2e9, rel=0.05)  # ResNet-50: 4.1 G multiply-adds per 224 px image


def _hand_spec(tmp_path: Path):
    return parse_spec({
        "name": "hand", "seeds": [0, 1], "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data"),
        "models": [{"name": "a", "arch": "test_resnet", "weights": "random", "input_size": 32},
                   {"name": "b", "arch": "test_resnet", "weights": "random", "input_size": 32}],
        "datasets": ["synthetic_near"],
        "regimes": {
            "linear_probe": {"grid": {"l2": [0.1, 1.0, 10.0]}, "max_iter": 50},
            "finetune": {"grid": {"lr": [0.1, 0.01], "wd": [0], "schedule": [1, 2], "train_size": [0, 5]},
                         "steps": 10, "batch_size": 64},
            "scratch": {"grid": {"lr": [0.1], "wd": [0]}, "steps": 20, "batch_size": 32},
        },
    })


def test_work_model_equals_a_hand_worked_count(tmp_path):
    spec = _hand_spec(tmp_path)
    sizes = cost.Sizes(classes=10, train=800, val=200, trainval=1000, test=500, source="test")
    rows = {(w.stage, w.model, w.regime): w for w in cost.work_rows(spec, lambda ref: sizes, lambda m: 100)}
    # finetune keys hash the entry: a and b each pay. Per trial (steps × schedule × min(batch, images)):
    # schedule 1: 10 × 64 = 640; schedule 2: 1280; train_size 5 → 50 images, a batch of 50: 500 and 1000
    ft = rows[("grid", "a", "finetune")]
    assert ft.tasks == 2 * 2 * 4  # seeds × lr × (schedule × train_size cells)
    assert ft.train_images == 2 * 2 * (640 + 1280 + 500 + 1000)
    assert ft.forward_images == 16 * 200  # each trial evaluates val once
    assert rows[("grid", "b", "finetune")].train_images == ft.train_images
    final = rows[("final", "a", "finetune")]
    assert (final.tasks, final.train_images, final.forward_images) == (8, 2 * 3420, 8 * 500)
    # scratch keys hash the architecture only: a and b share one trial per seed, charged to a
    sc = rows[("grid", "a", "scratch")]
    assert ("grid", "b", "scratch") not in rows and sc.shared_with == ["b"]
    assert (sc.tasks, sc.train_images, sc.forward_images) == (2, 2 * 20 * 32, 2 * 200)
    assert rows[("final", "a", "scratch")].train_images == 2 * 640
    # the probe: random weights differ per seed, so features per seed (train + val + trainval + test)
    feats = rows[("features", "a", "linear_probe")]
    assert (feats.tasks, feats.forward_images) == (2, 2 * 2500)
    # 3 λ × (50 iterations × 2 evaluations × 4·N·D·C + 2·N_val·D·C), N=800, D=100, C=10; two seeds
    assert rows[("grid", "a", "linear_probe")].solve_flops == pytest.approx(2 * 3 * (3.2e8 + 4e5))
    assert rows[("final", "a", "linear_probe")].solve_flops == pytest.approx(2 * (50 * 2 * 4 * 1000 * 1000 + 2 * 500 * 1000))
    assert {w.kind for w in rows.values()} == {"cpu"}  # no resources: one CPU each


def _tiny_spec_file(tmp_path: Path) -> Path:
    raw = {"name": "tiny-cost", "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data"),
           "models": [{"name": "r", "arch": "test_resnet", "weights": "random", "input_size": 32}],
           "datasets": [{"name": "synthetic_near", "num_classes": 4, "train_per_class": 10, "test_per_class": 5}],
           "regimes": {"linear_probe": {"grid": {"l2": [0.1, 1.0]}, "max_iter": 20, "batch_size": 16},
                       "finetune": {"grid": {"lr": [0.1], "wd": [0]}, "steps": 3, "batch_size": 8}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_calibration_is_cached_and_a_later_plan_reads_it(tmp_path):
    spec = load_spec(_tiny_spec_file(tmp_path))
    layout = StorageLayout(Path(spec.storage), Path(spec.data_root))
    before = cost.plan_cost(spec, layout=layout)
    assert all(r.throughput.source.startswith("FLOP model") for r in before.rows)
    written = cost.calibrate(spec, "cpu", layout=layout, log=lambda m: None)
    # train and forward at the finetune batch, forward at the probe's feature batch, the solver's matmul
    assert len(written) == 4 and all(p.parent == layout.calibration_dir for p in written)
    assert cost.calibrate(spec, "cpu", layout=layout, log=lambda m: None) == []  # cached: nothing timed again
    after = cost.plan_cost(spec, layout=layout)
    assert all(r.throughput.source.startswith("calibrated on ") for r in after.rows)
    # the plan's speeds are the cache's: a slower figure written into it shows up in the plan
    entry = next(p for p in written if json.loads(p.read_text())["key"]["what"] == "train")
    data = json.loads(entry.read_text())
    data["images_per_s"] = data["images_per_s"] / 1000
    entry.write_text(json.dumps(data))
    slower = cost.plan_cost(spec, layout=layout)
    row = lambda p: next(r for r in p.rows if r.work.stage == "grid" and r.work.regime == "finetune")  # noqa: E731
    assert row(slower).throughput.train_ips == pytest.approx(row(after).throughput.train_ips / 1000)


def test_plan_command_text_json_and_calibrate(tmp_path, capsys):
    path = str(_tiny_spec_file(tmp_path))
    assert main(["plan", path]) == 0
    out = capsys.readouterr().out
    assert "CPU-core-hours" in out and "FLOP model: cpu" in out and "total" in out and "wall" in out
    assert main(["plan", path, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["total"] == 3 and "cost" in p  # the counts stay; the cost comes with them
    assert {r["stage"] for r in p["cost"]["rows"]} == {"features", "grid", "final"}
    assert p["cost"]["totals"]["CPU-core-hours"] > 0
    assert main(["plan", path, "--calibrate", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert "calibrated test_resnet" in captured.err
    rows = json.loads(captured.out)["cost"]["rows"]
    assert all(r["throughput"]["source"].startswith("calibrated on") for r in rows)


def test_unknown_device_profile_lists_the_valid_ones(tmp_path, capsys):
    assert main(["plan", str(_tiny_spec_file(tmp_path)), "--device-profile", "v100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "v100" in err
    for name in ("a100", "h100", "h200", "l4", "cpu"):
        assert name in err


def test_single_gpu_study_plans_to_its_header():
    path = ROOT / "sweeps" / "single-gpu.yaml"
    header = path.read_text()
    hours = float(re.search(r"planned: ([\d.]+) GPU-hours", header).group(1))
    prof = re.search(r"--device-profile (\w+)", header).group(1)
    spec = load_spec(path)
    plan = cost.plan_cost(spec, device_profile=prof, use_cache=False)
    totals = plan.totals()
    assert set(totals) == {"GPU-hours"}  # every regime asks for a GPU
    assert f"{totals['GPU-hours']:.3g}" == f"{hours:.3g}"
    assert 8 <= hours <= 12  # overnight


def test_a_gpu_calibration_is_read_on_a_machine_without_one(tmp_path):
    """A plan made on a laptop or a head node uses the figures calibrated on the cluster's GPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's own GPU decides")
    raw = yaml.safe_load(_tiny_spec_file(tmp_path).read_text())
    raw["regimes"].pop("linear_probe")
    raw["resources"] = {"finetune": {"cpu": 4, "gpu": 1}}
    spec = parse_spec(raw)
    layout = StorageLayout(Path(spec.storage), Path(spec.data_root))
    cache = cost.CalibrationCache(layout)
    gpu = cost.Device("NVIDIA H200", "bf16-autocast")
    net = cost.work_rows(spec, lambda ref: cost.Sizes(4, 32, 8, 40, 20, "test"), lambda m: 1)[0].net
    for what, batch in (("train", net.train_batch), ("forward", net.forward_batch)):
        cache.put(cost.calibration_key(net, gpu, batch, what), {"images_per_s": 1000.0, "build_s": 1.0})
    plan = cost.plan_cost(spec, layout=layout, device_profile="h200")
    assert {r.throughput.source for r in plan.rows} == {"calibrated on NVIDIA H200"}
    assert set(plan.totals()) == {"GPU-hours"}
    grid = next(r for r in plan.rows if r.work.stage == "grid")
    assert grid.seconds == pytest.approx(3 * 8 / 1000 + 8 / 1000 + cost.TASK_OVERHEAD_S + 1.0)


def test_sweep_prints_the_plan_from_the_cache_before_it_starts(tmp_path):
    import io

    from xfer import sweep

    spec = load_spec(_tiny_spec_file(tmp_path))
    layout = StorageLayout(Path(spec.storage), Path(spec.data_root))
    out = io.StringIO()
    sweep._print_cost(spec, layout, out, {"CPU": 2.0})
    text = out.getvalue()
    assert text.startswith("plan (device-hours") and "CPU-core-hours" in text and "FLOP model: cpu" in text
    assert len(text.splitlines()) <= 8  # one short block
    assert not layout.calibration_dir.exists()  # never calibrates
    bad = tmp_path / "bad"  # a dataset it cannot size is a note, not a failed sweep
    raw = yaml.safe_load(_tiny_spec_file(tmp_path).read_text())
    raw["datasets"] = [{"name": "imagefolder", "path": str(bad)}]
    out = io.StringIO()
    sweep._print_cost(parse_spec(raw), layout, out, {"CPU": 2.0})
    assert out.getvalue().startswith("plan: no cost estimate (CostError")
