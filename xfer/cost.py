"""What a sweep will cost before it runs: device-hours per stage and per model (`xfer plan`).

Cost = **work** / **throughput**, kept apart because they come from different places:

- **Work** (``work_rows``, pure counting over the spec): per stage and model, the images a trial trains on
  (forward + backward: ``steps × schedule × min(batch, training images)``), the images it only runs forward
  (evaluation passes; the frozen-feature store's four splits at the model's input size), and the probe's
  L-BFGS solves in FLOPs. Model entries that share a trial key (``spec.plan``'s "distinct") share its cost:
  the row goes to the first entry, the others are named on it.
- **Throughput** of one trial, per architecture × input size × batch × device, from one of two sources:
  a **calibration** (``calibrate``: a few real, timed training and forward steps of the timm model, random
  weights — speed does not depend on them — cached under ``<storage>/calibration/``), or, when there is
  none, the **FLOP model**: FLOPs per image counted with ``torch.utils.flop_counter`` on the real model
  built on the meta device (no weights, no memory), divided by a named device profile's peak × an assumed
  utilisation. Every row says which source it used. Planning never calibrates by itself.

Assumptions, stated in the output too: a training image costs 3× its forward FLOPs (backward ≈ 2×
forward; FLOP counts of backward passes are not used because the counter overcounts grouped convolutions'
backward); a device shared by fractional trials gives no more compute than one trial alone gets; CPU trials
run one torch thread (``RunContext.threads``), so a CPU calibration times one thread; every task also pays a
fixed ``TASK_OVERHEAD_S`` of Ray and MLflow bookkeeping; image decoding and dataset building are not counted.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from xfer.hashing import canonical, stable_hash
from xfer.layout import StorageLayout
from xfer.registry import Registry
from xfer.regimes import REGIMES
from xfer.trial import DatasetRef, ModelSpec

STAGES = ("pretrain", "features", "estimate", "grid", "final")
TRAIN_FLOPS_PER_FORWARD = 3.0  # forward + backward (≈ 2× forward) per training image
TASK_OVERHEAD_S = 0.3  # Ray + MLflow bookkeeping per task with actor reuse (benchmarks/RESULTS.md)
# the probe's L-BFGS on a warm-started λ path: iterations per λ (capped by max_iter), two function+gradient
# evaluations each (line search), one evaluation = 4·N·D·C FLOPs (logits and gradient, two matmuls each)
PROBE_ITERS = 100
PROBE_EVALS_PER_ITER = 2
CPU_TIMED_BATCH = 32  # CPU calibrations time at most this batch (throughput per image is flat beyond it)
SOLVE_SHAPE = (4096, 1024, 256)  # N × D × C of the float32 matmul a calibration times for the solver
CALIBRATION_VERSION = "1"
# datasets without published Table A1 sizes whose size is known anyway (ILSVRC-2012: train, val)
KNOWN_SIZES = {"imagenet": (1000, 1_281_167, 50_000)}


class CostError(ValueError):
    """A plan that cannot be costed (an unknown profile, a dataset whose size cannot be found); the message
    says what is valid."""


# ------------------------------------------------------------------ device profiles
@dataclass(frozen=True)
class DeviceProfile:
    """A device for the FLOP model: dense peaks from the vendor's data sheet (bf16 for the training and
    forward passes GPUs run under autocast, fp32 for the probe's solver and for CPUs) and the assumed share
    of peak an eager PyTorch trial reaches."""

    kind: str  # gpu | cpu
    bf16_tflops: float
    fp32_tflops: float
    utilisation: float
    source: str

    @property
    def unit(self) -> str:
        return "GPU-hours" if self.kind == "gpu" else "CPU-core-hours"

    def flops_per_s(self, precision: str) -> float:
        peak = self.bf16_tflops if precision == "bf16" and self.kind == "gpu" else self.fp32_tflops
        return peak * 1e12 * self.utilisation


DEVICE_PROFILES: "Registry[DeviceProfile]" = Registry("device profile")
GPU_UTILISATION = 0.2  # eager-mode convnets under bf16 autocast reach roughly 10–30 % of tensor-core peak
DEVICE_PROFILES.add("a100", DeviceProfile("gpu", 312, 19.5, GPU_UTILISATION, "NVIDIA A100 SXM data sheet (dense)"))
DEVICE_PROFILES.add("h100", DeviceProfile("gpu", 989, 67, GPU_UTILISATION, "NVIDIA H100 SXM data sheet (dense)"))
DEVICE_PROFILES.add("h200", DeviceProfile("gpu", 989, 67, GPU_UTILISATION, "NVIDIA H200 SXM data sheet (dense)"))
DEVICE_PROFILES.add("l4", DeviceProfile("gpu", 121, 30.3, GPU_UTILISATION, "NVIDIA L4 data sheet (dense)"))
# one core: AVX2, two FMA units × 8 float32 lanes × 2 FLOPs at ~3 GHz; trials on CPU run fp32, one thread
DEVICE_PROFILES.add("cpu", DeviceProfile("cpu", 0.096, 0.096, 0.25, "one AVX2 core at ~3 GHz (32 FLOP/cycle)"))
DEFAULT_GPU_PROFILE = "a100"


def profile(name: str) -> DeviceProfile:
    if name not in DEVICE_PROFILES:
        raise CostError(f"--device-profile: {DEVICE_PROFILES.unknown_message(name)}")
    return DEVICE_PROFILES.get(name)


# ------------------------------------------------------------------ dataset sizes
@dataclass(frozen=True)
class Sizes:
    classes: int
    train: int
    val: int
    trainval: int
    test: int
    source: str  # published | built | known


def dataset_sizes(ref: DatasetRef, data_root: str | Path) -> Sizes:
    """Split sizes of a dataset: the published ones (Table A1; held-out validation by its ``val_fraction``)
    where there are some — planning needs no files, and options that only say where files are keep the
    size (one that draws a subset, SUN397's ``random_split``, is not modelled) — else the sizes of the
    built dataset (offline ones build in seconds), else a ``CostError`` saying what is missing."""
    from xfer.data import DATASETS, build_from_ref, resolve_options

    entry = DATASETS.get(ref.name)
    opts = {k: v for k, v in resolve_options(ref.name, ref.options).items() if k != "download"}
    published = (entry.paper.classes, entry.paper.trainval, entry.paper.test) if entry.paper else \
        KNOWN_SIZES.get(ref.name)
    if published and (entry.paper or opts == dict(entry.options)):
        classes, trainval, test = published
        val = entry.paper.val if entry.paper and entry.paper.val else round(trainval * float(opts.get("val_fraction", 0.2)))
        return Sizes(classes, trainval - val, val, trainval, test, "published")
    try:
        ds = build_from_ref(ref, data_root=data_root, download=False)
    except Exception as e:  # noqa: BLE001 - any reason it cannot be built is the same answer for planning
        raise CostError(f"dataset {ref.display}: cannot size it for the plan ({type(e).__name__}: {e}); only "
                        "the paper's datasets at their default options have published sizes") from None
    c = ds.counts()
    return Sizes(ds.info.num_classes, c["train"], c["val"], c["trainval"], c["test"], "built")


# ------------------------------------------------------------------ the work model
@dataclass(frozen=True)
class Net:
    """What throughput depends on: the timm network, its input size and the batch it runs at."""

    arch: str
    input_size: int | None  # None: the architecture's own
    train_batch: int
    forward_batch: int


@dataclass
class WorkRow:
    """One stage × model × regime: trials and what they process. ``train_images`` are forward + backward,
    ``forward_images`` forward only, ``solve_flops`` the probe's (or the estimators') linear algebra."""

    stage: str
    model: str
    regime: str
    net: Net
    tasks: int = 0
    train_images: float = 0.0
    forward_images: float = 0.0
    solve_flops: float = 0.0
    kind: str = "cpu"  # the device the regime's resources ask for: gpu | cpu
    amount: float = 1.0  # of that device per worker (a GPU fraction, or CPU cores)
    workers: int = 1
    shared_with: list[str] = field(default_factory=list)

    def add(self, tasks: int, train: float = 0.0, forward: float = 0.0, solve: float = 0.0) -> None:
        self.tasks += tasks
        self.train_images += tasks * train
        self.forward_images += tasks * forward
        self.solve_flops += tasks * solve


def probe_flops(n_train: int, n_eval: int, dim: int, classes: int, lambdas: int, max_iter: int) -> float:
    """FLOPs of a λ path (or one fit) of the probe: see ``PROBE_ITERS``; plus scoring the held-out split
    once per λ (2·N·D·C)."""
    fit = min(PROBE_ITERS, max_iter) * PROBE_EVALS_PER_ITER * 4.0 * n_train * dim * classes
    return lambdas * (fit + 2.0 * n_eval * dim * classes)


class _Rows:
    """Work rows keyed by (stage, owner model, regime); resources read from the spec."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.rows: dict[tuple[str, str, str], WorkRow] = {}

    def get(self, stage: str, model: ModelSpec, regime: str, net: Net, shared: Sequence[str] = ()) -> WorkRow:
        key = (stage, model.name, regime)
        if key not in self.rows:
            res = self.spec.resources_for(regime, model.name)  # "estimate" is no regime: one CPU
            gpu = res.get("gpu", 0.0) > 0
            self.rows[key] = WorkRow(stage, model.name, regime, net, kind="gpu" if gpu else "cpu",
                                     amount=res["gpu"] if gpu else res["cpu"], workers=int(res.get("workers", 1)),
                                     shared_with=list(shared))
        return self.rows[key]


def _owners(spec: Any, regime: str) -> list[tuple[ModelSpec, list[str]]]:
    """The distinct models of a regime's trial keys: (first entry, the other entries sharing its trials)."""
    rule = REGIMES.get(regime).key_rule
    groups: dict[str, list[ModelSpec]] = {}
    for m in spec.models:
        groups.setdefault(canonical(m.key_fields(rule.model)), []).append(m)
    return [(ms[0], [m.name for m in ms[1:]]) for ms in groups.values()]


def _cell_points(regime: Any, grid: Mapping[str, list[float]]) -> tuple[list[dict[str, float]], int]:
    """The cell-axis combinations of a regime's grid (each a cell of its own) and the number of other grid
    points per cell (the hyper-parameters selection chooses among)."""
    axes = regime.cell_axes
    combos = [dict(zip([a.name for a in axes], vs)) for vs in
              itertools.product(*(grid.get(a.name, [a.default]) for a in axes))]
    others = math.prod(len(v) for k, v in grid.items() if k not in {a.name for a in axes})
    return combos, others


def _train_trial(opts: Mapping[str, Any], cell: Mapping[str, float], n_train: int, classes: int) -> float:
    """Images one fine-tune / scratch trial trains on: steps × schedule × its batch (a batch is the whole
    training set when that is smaller: ``train_size`` subsets often are)."""
    from xfer.regimes.finetune import schedule_steps

    n = n_train if not cell.get("train_size") else min(n_train, int(cell["train_size"]) * classes)
    return schedule_steps(int(opts["steps"]), float(cell.get("schedule", 1.0))) * min(int(opts["batch_size"]), n)


def work_rows(spec: Any, sizes: Callable[[DatasetRef], Sizes], dims: Callable[[ModelSpec], int]) -> list[WorkRow]:
    """Every stage's work, per model and regime (see the module docstring). ``sizes``: a dataset's split
    sizes; ``dims``: a model's feature width (the probe's D)."""
    rows = _Rows(spec)
    seeds = len(spec.seeds)
    for t in spec.pretrain_trials():
        opts, s = t.options, sizes(t.dataset)
        batch = int(opts["batch_size"])
        net = Net(t.model.arch, t.model.input_size, batch, min(batch, 256))
        rows.get("pretrain", t.model, "pretrain", net).add(1, train=int(opts["steps"]) * min(batch, s.trainval),
                                                           forward=s.test)
    if spec.estimators:
        for m in spec.models:
            if m.weights == "random":
                continue
            for d in spec.datasets:
                s, dim = sizes(d), dims(m)
                flops = len(spec.estimators) * 2.0 * s.trainval * dim * (dim + s.classes)
                # in the driver process, on its CPU (numpy on cached features)
                rows.get("estimate", m, "estimate", Net(m.arch, m.input_size, 1, 256)).add(1, solve=flops)
    searched = spec.search.get("type") == "optuna"
    for r in spec.regimes:
        regime = REGIMES.get(r.name)
        opts = dict(r.options)
        combos, others = _cell_points(regime, r.grid)
        if searched:
            others = min(others, int(spec.search["num_samples"]))
        batch = int(opts.get("batch_size", 256))
        for m, shared in _owners(spec, r.name):
            net = Net(m.arch, m.input_size, batch, batch)
            for d in spec.datasets:
                s = sizes(d)
                if regime.path_axis:  # the probe: features once, then one λ path per cell
                    lambdas = len(r.grid[regime.path_axis])
                    feature_sets = seeds if m.weights == "random" else 1  # random weights differ per seed
                    rows.get("features", m, r.name, net, shared).add(
                        feature_sets, forward=s.train + s.val + s.trainval + s.test)
                    it = int(opts.get("max_iter", PROBE_ITERS))
                    rows.get("grid", m, r.name, net, shared).add(
                        seeds, solve=probe_flops(s.train, s.val, dims(m), s.classes, lambdas, it))
                    if spec.final:
                        rows.get("final", m, r.name, net, shared).add(
                            seeds, solve=probe_flops(s.trainval, s.test, dims(m), s.classes, 1, it))
                    continue
                if not regime.grid:
                    continue
                periodic = int(opts.get("eval_every", 0) or 0)
                for cell in combos:
                    train = _train_trial(opts, cell, s.train, s.classes)
                    steps = train / max(1, min(batch, s.train))
                    evals = 1 + (max(0, math.ceil(steps / periodic) - 1) if periodic else 0)
                    rows.get("grid", m, r.name, net, shared).add(seeds * others, train=train,
                                                                 forward=evals * s.val)
                    if spec.final:
                        rows.get("final", m, r.name, net, shared).add(
                            seeds, train=_train_trial(opts, cell, s.trainval, s.classes), forward=s.test)
    return sorted(rows.rows.values(), key=lambda w: (STAGES.index(w.stage), w.model, w.regime))


# ------------------------------------------------------------------ throughput
@dataclass(frozen=True)
class Throughput:
    """A trial's speed on one device: training and forward images per second, solver FLOP/s, the time to
    build the model, and where the figures came from."""

    train_ips: float
    forward_ips: float
    solve_flops_s: float
    build_s: float
    source: str


def _device_name(device: str) -> str:
    """What a calibration was measured on: the GPU's name, or the CPU's model name (one thread)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} (1 thread)"


@dataclass(frozen=True)
class Device:
    """What a calibration is keyed by besides the network: the device's name and the trial's precision."""

    name: str
    precision: str

    @staticmethod
    def here(device: str) -> "Device":
        from xfer.features import precision_for  # the trials' own policy: bf16 autocast on CUDA, else float32

        return Device(_device_name(device), precision_for(device))


def _build(net: Net, num_classes: int, device: str = "meta") -> Any:
    """The real timm network of ``net`` with random weights (on the meta device: shapes only)."""
    import torch

    from xfer.models import load_backbone

    spec = ModelSpec(name=net.arch, arch=net.arch, weights="random", input_size=net.input_size)
    with torch.device(device):
        return load_backbone(spec, num_classes=num_classes)


_FLOPS: dict[tuple[str, int | None], tuple[float, int, int]] = {}


def forward_flops(arch: str, input_size: int | None = None) -> tuple[float, int, int]:
    """``(forward FLOPs per image, input size, feature width)`` of a timm network, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no weights, no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    key = (arch, input_size)
    if key not in _FLOPS:
        bb = _build(Net(arch, input_size, 1, 1), num_classes=0)
        size = int(bb.data_config.input_size)
        bb.model.eval()
        with FlopCounterMode(display=False) as counter:
            bb.model(torch.empty(2, 3, size, size, device="meta"))
        _FLOPS[key] = (counter.get_total_flops() / 2, size, int(bb.model.num_features))
    return _FLOPS[key]


def flop_throughput(net: Net, prof: DeviceProfile, name: str) -> Throughput:
    """The FLOP model: FLOPs per image / (the profile's peak × its assumed utilisation)."""
    f, _, _ = forward_flops(net.arch, net.input_size)
    rate = prof.flops_per_s("bf16")
    return Throughput(rate / (TRAIN_FLOPS_PER_FORWARD * f), rate / f, prof.flops_per_s("fp32"), 0.0,
                      f"FLOP model: {name}, {prof.utilisation:.0%} of peak")


def calibration_key(net: Net, on: Device, batch: int, what: str) -> dict[str, Any]:
    import torch

    return {"what": what, "arch": net.arch, "input_size": forward_flops(net.arch, net.input_size)[1],
            "batch": batch, "device": on.name, "precision": on.precision, "torch": torch.__version__,
            "version": CALIBRATION_VERSION}


class CalibrationCache:
    """Measured speeds, one JSON file per key under ``<storage>/calibration/`` (``StorageLayout``)."""

    def __init__(self, layout: StorageLayout) -> None:
        self.folder = layout.calibration_dir

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.folder / f"{stable_hash(key)}.json"

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            entry = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        return entry if entry.get("key") == dict(key) else None

    def devices(self, precision: str) -> set[str]:
        """Names of the devices with entries at ``precision``."""
        out = set()
        for p in self.folder.glob("*.json"):
            try:
                key = json.loads(p.read_text())["key"]
            except (OSError, ValueError, KeyError):
                continue
            if key.get("precision") == precision:
                out.add(key.get("device"))
        return out

    def put(self, key: Mapping[str, Any], value: Mapping[str, Any]) -> Path:
        from xfer.io import write_text

        path = self.path(key)
        write_text(path, json.dumps({"key": dict(key), **value}, indent=2, sort_keys=True))
        return path


def _timed(step: Callable[[], None], sync: Callable[[], None], warmup: int = 2, min_s: float = 0.5,
           max_steps: int = 20) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls: the median of at least 5 timed calls (more until
    ``min_s`` has passed), so a burst of other work on a shared machine does not become the figure."""
    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_s and len(times) < max_steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(net: Net, device: str, train: bool) -> dict[str, float]:
    """Time a trial's inner loop on ``device`` as the engine runs it (SGD + Nesterov, bf16 autocast and
    channels-last on CUDA, float32 and one thread on CPU): images per second and the build time."""
    import torch

    from xfer import engine

    batch = net.train_batch if train else net.forward_batch
    timed = batch if device.startswith("cuda") else min(batch, CPU_TIMED_BATCH)
    t0 = time.perf_counter()
    bb = _build(net, num_classes=100 if train else 0, device="cpu")
    model = engine.for_device(bb.model, device)
    build_s = time.perf_counter() - t0
    size = int(bb.data_config.input_size)
    x = torch.randn(timed, 3, size, size, device=device)
    if device.startswith("cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if train:
        y = torch.randint(0, 100, (timed,), device=device)
        opt = engine.make_optimizer(model, lr=0.01, wd=1e-5)
        loss_fn = engine.loss_fn(False)
        model.train()

        def step() -> None:
            with engine._autocast(device):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step() -> None:
            with torch.no_grad(), engine._autocast(device):
                model(x)
    with torch.random.fork_rng(devices=[]):
        seconds = _timed(step, sync)
    return {"images_per_s": timed / seconds, "timed_batch": timed, "build_s": build_s}


def measure_solver(device: str) -> float:
    """float32 FLOP/s of the probe's kind of matmul (N×D by D×C) on ``device``."""
    import torch

    n, d, c = SOLVE_SHAPE
    a, b = torch.randn(n, d, device=device), torch.randn(d, c, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return 2.0 * n * d * c / _timed(lambda: a @ b, sync)


# ------------------------------------------------------------------ the plan
@dataclass
class CostRow:
    work: WorkRow
    throughput: Throughput
    seconds: float  # device-busy seconds of all its tasks at full-device speed
    unit: str

    @property
    def device_hours(self) -> float:
        """GPU-hours (device busy time), or CPU-core-hours (trial time × the cores each trial holds)."""
        w = self.work
        return self.seconds / 3600 * (1.0 if self.unit == "GPU-hours" else w.amount)


@dataclass
class CostPlan:
    rows: list[CostRow]
    wall_s: dict[str, float]  # per stage, at the spec's concurrency on ``capacity``
    capacity: dict[str, float]  # gpu: devices, cpu: cores assumed for the wall time
    assumptions: list[str]

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.rows:
            out[r.unit] = out.get(r.unit, 0.0) + r.device_hours
        return out

    def by_stage(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self.rows:
            d = out.setdefault(r.work.stage, {})
            d[r.unit] = d.get(r.unit, 0.0) + r.device_hours
        return out

    def to_json(self) -> dict[str, Any]:
        return {"rows": [{**{k: v for k, v in asdict(r.work).items() if k != "net"}, **asdict(r.work.net),
                          "seconds": round(r.seconds, 3), "device_hours": round(r.device_hours, 4), "unit": r.unit,
                          "throughput": asdict(r.throughput)} for r in self.rows],
                "by_stage": self.by_stage(), "totals": self.totals(),
                "wall_hours": {s: round(v / 3600, 4) for s, v in self.wall_s.items()},
                "wall_hours_total": round(sum(self.wall_s.values()) / 3600, 4),
                "capacity": self.capacity, "assumptions": self.assumptions}


def _plan_device(kind: str, cache: CalibrationCache) -> Device | None:
    """Whose calibration a plan reads: this machine's CPU; this machine's GPU, or — on a machine without
    one (a laptop, a cluster's head node) — the one GPU the cache has figures for."""
    import torch

    if kind == "cpu":
        return Device.here("cpu")
    if torch.cuda.is_available():
        return Device.here("cuda")
    from xfer.features import precision_for

    precision = precision_for("cuda")
    names = cache.devices(precision)
    return Device(names.pop(), precision) if len(names) == 1 else None


def _cached_throughput(cache: CalibrationCache, w: WorkRow, on: Device) -> Throughput | None:
    """The calibrated speeds of what row ``w`` does (training, forward passes, solves) on ``on``, or None
    when the cache lacks any of them (then the whole row uses the FLOP model)."""
    need = {"train": (w.train_images, lambda: calibration_key(w.net, on, w.net.train_batch, "train")),
            "forward": (w.forward_images, lambda: calibration_key(w.net, on, w.net.forward_batch, "forward")),
            "solve": (w.solve_flops, lambda: _solve_key(on))}
    found = {what: cache.get(key()) for what, (amount, key) in need.items() if amount}
    if not found or any(e is None for e in found.values()):
        return None
    speed = lambda what, field: found[what][field] if what in found else math.inf  # noqa: E731 - inf: work of that kind is 0
    return Throughput(speed("train", "images_per_s"), speed("forward", "images_per_s"), speed("solve", "flops_per_s"),
                      max(e.get("build_s", 0.0) for e in found.values()), f"calibrated on {on.name}")


def _solve_key(on: Device) -> dict[str, Any]:
    import torch

    return {"what": "solve", "shape": list(SOLVE_SHAPE), "device": on.name, "precision": "float32",
            "torch": torch.__version__, "version": CALIBRATION_VERSION}


def _speed(rows: Iterable[CostRow], capacity: float, max_concurrent: int | None) -> float:
    """Wall seconds of one stage's tasks of one device kind: tasks run ``k`` at a time (the spec's
    ``max_concurrent``, the device capacity over what a task asks, the number of tasks), and ``k`` tasks
    keep at most ``capacity`` devices busy; never less than its longest task."""
    rows = [r for r in rows if r.work.tasks]
    if not rows:
        return 0.0
    tasks = sum(r.work.tasks for r in rows)
    per_task = max(r.work.amount * r.work.workers for r in rows) or 1e-9
    k = max(1, min(tasks, max_concurrent or tasks, int(capacity // per_task) or 1))
    workers = max(r.work.workers for r in rows)
    busy = min(capacity, k * workers) if rows[0].unit == "GPU-hours" else k * workers
    longest = max(r.seconds / r.work.tasks / r.work.workers for r in rows)
    return max(sum(r.seconds for r in rows) / busy, longest)


def plan_cost(spec: Any, *, layout: StorageLayout | None = None, device_profile: str = DEFAULT_GPU_PROFILE,
              gpus: float = 1, cpus: float | None = None, use_cache: bool = True,
              sizes: Callable[[DatasetRef], Sizes] | None = None) -> CostPlan:
    """Device-hours of ``spec`` per stage and model: its work (``work_rows``) at calibrated speeds where
    the calibration cache under ``layout`` has them for this machine's devices, else at the FLOP model's
    with ``device_profile`` for regimes that ask for a GPU and the ``cpu`` profile for the others. Wall
    time assumes ``gpus`` GPUs and ``cpus`` cores (default: this machine's). Never calibrates."""
    gpu_prof = profile(device_profile)
    cpu_prof = DEVICE_PROFILES.get("cpu")
    layout = layout or StorageLayout(Path(spec.storage), Path(spec.data_root))
    memo: dict[str, Sizes] = {}

    def sized(ref: DatasetRef) -> Sizes:
        k = canonical(ref.key_fields())
        if k not in memo:
            memo[k] = (sizes or (lambda r: dataset_sizes(r, layout.data_root)))(ref)
        return memo[k]

    work = work_rows(spec, sized, lambda m: forward_flops(m.arch, m.input_size)[2])
    cache = CalibrationCache(layout)
    devices: dict[str, Device | None] = {}
    rows = []
    for w in work:
        prof, name = (gpu_prof, device_profile) if w.kind == "gpu" else (cpu_prof, "cpu")
        device = devices.setdefault(w.kind, _plan_device(w.kind, cache)) if use_cache and prof.kind == w.kind \
            else None
        tp = (_cached_throughput(cache, w, device) if device else None) or flop_throughput(w.net, prof, name)
        seconds = (w.train_images / tp.train_ips + w.forward_images / tp.forward_ips
                   + w.solve_flops / tp.solve_flops_s + w.tasks * (TASK_OVERHEAD_S + tp.build_s))
        rows.append(CostRow(w, tp, seconds, prof.unit))
    capacity = {"gpu": float(gpus), "cpu": float(cpus or os.cpu_count() or 1)}
    wall = {}
    for stage in STAGES:
        mine = [r for r in rows if r.work.stage == stage]
        if mine:
            wall[stage] = max(_speed([r for r in mine if r.unit == u], capacity["gpu" if u == "GPU-hours" else "cpu"],
                                     spec.max_concurrent) for u in {r.unit for r in mine})
    assumptions = [
        f"FLOP model: {device_profile} = {gpu_prof.bf16_tflops:g} bf16 / {gpu_prof.fp32_tflops:g} fp32 TFLOP/s peak "
        f"({gpu_prof.source}) at {gpu_prof.utilisation:.0%} utilisation; cpu = {cpu_prof.fp32_tflops * 1e3:g} "
        f"GFLOP/s per core ({cpu_prof.source}) at {cpu_prof.utilisation:.0%}",
        f"a training image = {TRAIN_FLOPS_PER_FORWARD:g}× its forward FLOPs; probe: {PROBE_ITERS} L-BFGS iterations per "
        f"λ × {PROBE_EVALS_PER_ITER} evaluations × 4·N·D·C FLOPs; {TASK_OVERHEAD_S:g} s bookkeeping per task",
        f"wall time: {capacity['gpu']:g} GPU(s), {capacity['cpu']:g} CPU core(s), max_concurrent "
        f"{spec.max_concurrent or 'unset'}; a shared GPU adds no compute; stages run one after another",
    ]
    return CostPlan(rows, wall, capacity, assumptions)


def calibrate(spec: Any, device: str, *, layout: StorageLayout | None = None,
              log: Callable[[str], None] = print) -> list[Path]:
    """Time every network of ``spec`` whose regime runs on ``device``'s kind (GPU regimes on ``cuda``, the
    others on ``cpu``) at its batches, and the solver's matmul; cache each figure (existing entries are
    kept). CPU timings run one torch thread, as CPU trials do. Returns the cache files written."""
    import torch

    kind = "gpu" if device.startswith("cuda") else "cpu"
    if kind == "gpu" and not torch.cuda.is_available():
        raise CostError("--device cuda: no CUDA device on this machine; valid here: cpu")
    layout = layout or StorageLayout(Path(spec.storage), Path(spec.data_root))
    cache = CalibrationCache(layout)
    rows = [w for w in work_rows(spec, lambda ref: Sizes(2, 2, 1, 3, 1, "stub"), lambda m: 1) if w.kind == kind]
    if not rows:
        other = "cuda" if kind == "cpu" else "cpu"
        raise CostError(f"--device {device}: no regime of this sweep runs on a {kind.upper()} (its resources ask "
                        f"for the other kind); calibrate with --device {other} on a machine that has one")
    written = []
    on = Device.here(device)
    before = torch.get_num_threads()
    if kind == "cpu":
        torch.set_num_threads(1)  # as a CPU trial runs (RunContext.threads)
    try:
        jobs = sorted({(w.net.arch, w.net.input_size, w.net.train_batch, True) for w in rows if w.train_images} |
                      {(w.net.arch, w.net.input_size, w.net.forward_batch, False) for w in rows if w.forward_images},
                      key=str)
        for arch, size, batch, train in jobs:
            net = Net(arch, size, batch, batch)
            key = calibration_key(net, on, batch, "train" if train else "forward")
            if cache.get(key) is None:
                m = measure(net, device, train)
                written.append(cache.put(key, m))
                log(f"calibrated {arch} @{key['input_size']}px batch {batch} {'train' if train else 'forward'}: "
                    f"{m['images_per_s']:.1f} img/s on {key['device']}")
        if any(w.solve_flops for w in rows) and cache.get(_solve_key(on)) is None:
            flops = measure_solver(device)
            written.append(cache.put(_solve_key(on), {"flops_per_s": flops}))
            log(f"calibrated the solver's float32 matmul: {flops / 1e9:.1f} GFLOP/s")
    finally:
        torch.set_num_threads(before)
    return written


# ------------------------------------------------------------------ printing
def _hours(h: float) -> str:
    return f"{h:.3g}" if h < 10 else f"{h:,.1f}"


def _duration(seconds: float) -> str:
    """A wall time as people read one: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_plan(plan: CostPlan, brief: bool = False) -> list[str]:
    """The table per stage and model (or, ``brief``, one line per stage), totals and wall time."""
    lines = []
    if not brief:
        lines.append(f"  {'stage':<9} {'model':<18} {'regime':<13} {'tasks':>6} {'train img':>10} {'fwd img':>10} "
                     f"{'solve TF':>9} {'hours':>8}  unit / throughput source")
        for r in plan.rows:
            w = r.work
            share = f" (+{', '.join(w.shared_with)})" if w.shared_with else ""
            lines.append(f"  {w.stage:<9} {w.model[:18]:<18} {w.regime:<13} {w.tasks:>6} {w.train_images:>10.3g} "
                         f"{w.forward_images:>10.3g} {w.solve_flops / 1e12:>9.3g} {_hours(r.device_hours):>8}  "
                         f"{r.unit} / {r.throughput.source}{share}")
    for stage, by_unit in plan.by_stage().items():
        hours = ", ".join(f"{_hours(h)} {u}" for u, h in by_unit.items())
        lines.append(f"  {stage:<9} {hours}; wall {_duration(plan.wall_s.get(stage, 0))}")
    totals = plan.totals()
    on = [f"{plan.capacity[k]:g} {name}" for k, name, unit in (("gpu", "GPU(s)", "GPU-hours"),
                                                               ("cpu", "CPU core(s)", "CPU-core-hours")) if unit in totals]
    lines.append(f"  {'total':<9} {', '.join(f'{_hours(h)} {u}' for u, h in totals.items())}; "
                 f"wall {_duration(sum(plan.wall_s.values()))} on {' + '.join(on)}")
    sources = sorted({r.throughput.source for r in plan.rows})
    lines.append("  throughput: " + "; ".join(sources))
    if not brief:
        lines += [f"  assumes: {a}" for a in plan.assumptions]
    return lines
