"""Storage faults fail fast and clearly, and corrupt checkpoints are detected.

- preflight: a read-only or too-full storage stops ``xfer sweep`` before Ray or MLflow start, with one
  error naming the path, the free space and what is needed (CLI: ``error: …``, exit 2);
- mid-trial: a write that fills the filesystem (or meets a read-only one) fails the trial with a message
  naming the path and the reason, and leaves nothing half-written under a final name;
- checksums: a truncated or bit-flipped periodic checkpoint is detected on resume, and the run resumes
  from the previous checkpoint (or from scratch) to exactly the clean run's result; a corrupt pretrain
  checkpoint is refused by the transfer regimes and retrained by the pretrain regime.

Real filesystems: small tmpfs mounts (root only). Where mounting is impossible these tests *fail* with
the reason (set XFER_SKIP_FS_FAULTS=1 to skip them explicitly), so they can never pass without running.
"""
from __future__ import annotations

import io as _io
import json
import logging
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import Subset

from xfer import engine, io, models, sweep
from xfer.contract import RunContext
from xfer.data import build_dataset
from xfer.data.transforms import DataConfig
from xfer.layout import DEFAULT_MIN_FREE, StorageLayout
from xfer.regimes import run_trial
from xfer.spec import load_spec
from xfer.trial import DatasetRef, ModelSpec, PretrainSpec, TrialSpec

CFG32 = DataConfig(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
SPEC = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


# ------------------------------------------------------------------ small real filesystems
class SmallFS:
    """A tmpfs of a few MiB at ``path``; ``fill(leave)`` leaves about ``leave`` bytes free,
    ``read_only()`` remounts it read-only."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        if os.environ.get("XFER_SKIP_FS_FAULTS") == "1":
            pytest.skip("XFER_SKIP_FS_FAULTS=1: storage-fault tests skipped on request")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.fail(f"cannot mount a {size} tmpfs at {path} to test a full/read-only filesystem "
                        f"({res.stderr.strip() or res.returncode}); these tests need root (mount). Run them "
                        "as root, or set XFER_SKIP_FS_FAULTS=1 to skip them explicitly.")

    def fill(self, leave: int) -> int:
        free = shutil.disk_usage(self.path).free
        with open(self.path / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - leave))
        return shutil.disk_usage(self.path).free

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_fs(tmp_path):
    made: list[SmallFS] = []

    def make(name: str = "fs", size: str = "8m", at: Path | None = None) -> SmallFS:
        fs = SmallFS(at or tmp_path / name, size)
        made.append(fs)
        return fs

    yield make
    for fs in reversed(made):
        fs.close()


def _leftovers(root: Path) -> list[str]:
    """Temporary files an atomic write could have left behind."""
    return sorted(p.name for p in root.rglob(".*.tmp"))


# ------------------------------------------------------------------ preflight
@pytest.fixture
def nothing_starts(monkeypatch):
    """Ray and the MLflow parent run must not start: fail loudly if the sweep gets that far."""
    def no(*a, **kw):
        raise AssertionError("the sweep started Ray / MLflow despite a storage fault")

    monkeypatch.setattr(sweep, "connect_ray", no)
    monkeypatch.setattr("xfer.tracking.writer.SweepTracker", no)


def test_read_only_storage_stops_the_sweep_before_anything_starts(tmp_path, small_fs, nothing_starts):
    fs = small_fs("ro", "2m")
    fs.read_only()
    with pytest.raises(io.StorageError) as err:
        sweep.run_sweep(load_spec(SPEC), storage=str(fs.path), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                        stream=_io.StringIO())
    msg = str(err.value)
    assert msg.startswith("read-only file system at storage folder ") and str(fs.path) in msg, msg
    assert "free 2.0 MiB" in msg and "--storage" in msg, msg  # the free space of the mount, not its parent
    assert not (tmp_path / "mlflow.db").exists()


def test_too_little_free_space_is_one_clear_cli_error(tmp_path, small_fs, nothing_starts, capsys):
    from xfer.cli import main

    fs = small_fs("small", "2m")
    db = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["sweep", str(SPEC), "--storage", str(fs.path / "results"), "--tracking-uri", db])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: not enough free space for the sweep's storage at {fs.path / 'results'}: "
                             "free 2.0 MiB, needed 256.0 MiB (min_free_space)"), err
    assert "--min-free" in err[0]
    assert not list((fs.path / "results").rglob(".xfer-probe*"))  # probes are removed
    # a threshold the filesystem meets passes the preflight (the sweep then gets as far as Ray)
    with pytest.raises(AssertionError, match="started Ray"):
        main(["sweep", str(SPEC), "--storage", str(fs.path / "results"), "--tracking-uri", db, "--min-free", "1MB"])
    with pytest.raises(SystemExit) as ex:
        main(["sweep", str(SPEC), "--min-free", "lots"])
    assert ex.value.code == 2 and "expected a size like 500MB" in capsys.readouterr().err


def test_preflight_probes_every_folder_the_layout_names(tmp_path, small_fs):
    layout = StorageLayout(tmp_path / "storage", tmp_path / "data")
    assert layout.preflight(min_free=0) > 0  # a healthy storage: every folder made and probed
    assert all(f.is_dir() for f in layout.folders())
    assert {f.name for f in layout.folders()} == {"checkpoints", "trials", "predictions", "features", "image_cache",
                                                   "ray", "reports", "journal"}
    fs = small_fs(size="1m", at=layout.features_dir)  # one folder on a read-only mount
    fs.read_only()
    with pytest.raises(io.StorageError, match=f"read-only file system at storage folder {layout.features_dir}:"):
        layout.preflight(min_free=0)
    assert DEFAULT_MIN_FREE == 256 << 20


def test_min_free_space_in_the_spec(tmp_path):
    from xfer.spec import SpecError, parse_spec

    raw = {"name": "s", "models": [{"name": "m", "arch": "test_resnet", "weights": "random"}],
           "datasets": ["digits"], "regimes": {"linear_probe": {"grid": {"l2": [1.0]}}}}
    assert parse_spec(dict(raw)).min_free_space == DEFAULT_MIN_FREE
    assert parse_spec({**raw, "min_free_space": "2GB"}).min_free_space == 2 << 30
    assert parse_spec({**raw, "min_free_space": 0}).min_free_space == 0
    with pytest.raises(SpecError, match="spec.min_free_space: expected a size like 500MB"):
        parse_spec({**raw, "min_free_space": "big"})


# ------------------------------------------------------------------ full or read-only mid-sweep
WRITERS = {
    "torch": lambda p: io.save_torch({"x": torch.zeros(1 << 20)}, p),  # 4 MiB
    "npz": lambda p: io.save_npz(p, scores=np.random.default_rng(0).random((1 << 19,))),  # 4 MiB, incompressible
    "text": lambda p: io.write_text(p, "x" * (4 << 20)),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_write_that_fills_the_disk_names_path_and_space_and_leaves_no_partial_file(small_fs, kind):
    fs = small_fs(size="8m")
    target = fs.path / "store" / f"out.{kind}"
    io.write_text(target, "the old complete file")
    fs.fill(leave=1 << 20)
    with pytest.raises(io.StorageError) as err:
        WRITERS[kind](target)
    msg = str(err.value)
    assert msg.startswith(f"no space left on device writing {target}: free "), msg
    assert "needed more than the" in msg and "--storage" in msg, msg
    assert err.value.errno == 28 and err.value.filename == str(target)
    assert target.read_text() == "the old complete file"  # readers still see the old, complete file
    assert _leftovers(fs.path) == []


def test_a_read_only_filesystem_mid_sweep_is_named(small_fs):
    fs = small_fs(size="2m")
    (fs.path / "features").mkdir()
    fs.read_only()
    with pytest.raises(io.StorageError, match=r"^read-only file system writing .*/features/k\.pt: free "):
        io.save_torch({"x": torch.zeros(4)}, fs.path / "features" / "k.pt")


def test_a_trial_whose_checkpoint_fills_the_disk_fails_with_the_message(tmp_path, small_fs):
    fs = small_fs(size="8m")
    ctx = RunContext.local(storage=fs.path / "storage", data_root=tmp_path / "data", work_dir=fs.path / "work")
    fs.fill(leave=1 << 20)  # a test_resnet checkpoint (model + momentum) is about 3 MiB
    spec = ModelSpec(name="r", arch="test_resnet", weights="random", input_size=32)
    trial = TrialSpec(model=spec, dataset=DatasetRef("synthetic_near"), regime="scratch",
                      hparams={"lr": 0.05, "wd": 1e-5},
                      options={"steps": 4, "batch_size": 16, "log_every": 2, "checkpoint_every": 2}, seed=0)
    r = run_trial(trial, ctx)
    assert r.status == "failed"
    ckpt = fs.path / "work" / engine.CHECKPOINT_NAME
    assert r.message.startswith(f"StorageError: no space left on device writing {ckpt}: free "), r.message
    assert not ckpt.exists() and not io.checksum_path(ckpt).exists()
    assert _leftovers(fs.path) == []


# ------------------------------------------------------------------ corrupt periodic checkpoints
class _Stop(Exception):
    pass


def _train(split, work_dir: Path, report=lambda s, m: None, steps: int = 12):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, drop_rate=0.2)
    ctx = RunContext.local(storage=work_dir, data_root=work_dir, work_dir=work_dir, report=report)
    cfg = engine.TrainConfig(steps=steps, batch_size=16, lr=0.05, wd=1e-4, checkpoint_every=4, log_every=3, seed=1)
    return model, engine.train(model, split, CFG32, cfg, ctx, run_id="trial-a")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return Subset(build_dataset("synthetic_near", root=tmp_path_factory.mktemp("data")).split("train"), range(80))


@pytest.fixture(scope="module")
def clean(split, tmp_path_factory):
    """The uninterrupted run's final weights."""
    model, _ = _train(split, tmp_path_factory.mktemp("clean"))
    return model.state_dict()


def _interrupted(split, work: Path) -> Path:
    """Run until step 9 (checkpoints at steps 4 and 8 written), then stop as a killed trial would."""
    def stop_at_9(step, metrics):
        if step == 9:
            raise _Stop

    with pytest.raises(_Stop):
        _train(split, work, stop_at_9)
    ckpt = work / engine.CHECKPOINT_NAME
    assert torch.load(ckpt, weights_only=False)["step"] == 8
    assert torch.load(work / engine.PREVIOUS_NAME, weights_only=False)["step"] == 4
    assert io.read_checksum(ckpt) == io.sha256_file(ckpt)
    return ckpt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor's data: torch.load still succeeds (no CRC check), so
    only the checksum can tell."""
    data = bytearray(path.read_bytes())
    big = max(zipfile.ZipFile(_io.BytesIO(bytes(data))).infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[big.header_offset + 26:big.header_offset + 30])
    data[big.header_offset + 30 + name_len + extra_len + big.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=False)  # loads fine: the corruption is silent without the checksum


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("corrupt", [_truncate, _flip_tensor_byte], ids=["truncated", "bit-flip"])
def test_a_corrupt_checkpoint_resumes_from_the_previous_one_exactly(split, clean, tmp_path, caplog, corrupt):
    ckpt = _interrupted(split, tmp_path / "cut")
    corrupt(ckpt)
    with caplog.at_level(logging.WARNING, logger="xfer.engine"):
        model, outcome = _train(split, tmp_path / "cut")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"corrupt checkpoint {ckpt}") for w in warnings), warnings
    assert any(f"from the previous checkpoint {ckpt.with_name(engine.PREVIOUS_NAME)} (step 4)" in w
               for w in warnings), warnings
    assert outcome.resumed_from == 4 and outcome.steps_done == 12
    assert _same(model.state_dict(), clean)


def test_both_checkpoints_corrupt_restarts_from_scratch_exactly(split, clean, tmp_path, caplog):
    ckpt = _interrupted(split, tmp_path / "cut")
    _flip_tensor_byte(ckpt)
    _truncate(ckpt.with_name(engine.PREVIOUS_NAME))
    with caplog.at_level(logging.WARNING, logger="xfer.engine"):
        model, outcome = _train(split, tmp_path / "cut")
    corrupt = [r.getMessage() for r in caplog.records if r.getMessage().startswith("corrupt checkpoint")]
    assert len(corrupt) == 2 and str(ckpt.with_name(engine.PREVIOUS_NAME)) in corrupt[1], corrupt
    assert outcome.resumed_from == 0
    assert _same(model.state_dict(), clean)


def test_an_intact_checkpoint_resumes_at_the_latest_step_and_clearing_removes_all(split, clean, tmp_path):
    ckpt = _interrupted(split, tmp_path / "cut")
    model, outcome = _train(split, tmp_path / "cut")
    assert outcome.resumed_from == 8 and _same(model.state_dict(), clean)
    engine.clear_checkpoint(RunContext.local(storage=tmp_path, data_root=tmp_path, work_dir=tmp_path / "cut"))
    assert list(ckpt.parent.iterdir()) == []


# ------------------------------------------------------------------ corrupt pretrain checkpoints
def test_a_corrupt_pretrain_checkpoint_is_refused_then_retrained(tmp_path, caplog):
    source = DatasetRef("synthetic_source", {"num_classes": 4, "train_per_class": 20, "test_per_class": 5})
    spec = ModelSpec(name="src", arch="test_resnet", weights="pretrain", input_size=32,
                     pretrain=PretrainSpec(dataset=source, options={"steps": 6, "batch_size": 16, "lr": 0.1}))
    ctx = RunContext.local(storage=tmp_path / "s", data_root=tmp_path / "d", work_dir=tmp_path / "w")
    trial = spec.pretrain_trial()
    first = run_trial(trial, ctx)
    assert first.status == "finished", first.message
    folder = ctx.layout.checkpoint_dir(trial.key)
    pth = folder / models.CHECKPOINT_FILE
    meta = json.loads((folder / models.META_FILE).read_text())
    assert meta["sha256"] == io.sha256_file(pth)
    assert models.pretrain_checkpoint_problem(folder) is None
    models.load_backbone(spec, num_classes=3, ctx=ctx)  # intact: loads

    _flip_tensor_byte(pth)
    problem = models.pretrain_checkpoint_problem(folder)  # what the sweep driver checks to rerun pretrain
    assert problem is not None and str(pth) in problem and "truncated or corrupted" in problem
    with pytest.raises(models.ModelLoadError, match="truncated or corrupted. Refusing to load it"):
        models.load_backbone(spec, num_classes=3, ctx=ctx)

    with caplog.at_level(logging.WARNING, logger="xfer.regimes.pretrain"):
        again = run_trial(trial, ctx)
    assert again.status == "finished", again.message
    assert any(r.getMessage().startswith(f"pretrain checkpoint {pth}") and "retraining" in r.getMessage()
               for r in caplog.records)
    assert io.sha256_file(pth) == meta["sha256"]  # the retrain is exact on CPU: the same file again
    assert again.metrics == first.metrics
    models.load_backbone(spec, num_classes=3, ctx=ctx)
