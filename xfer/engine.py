"""Plain-torch training and evaluation loops shared by the finetune, scratch and pretrain regimes.

The recipe is the paper's (Kornblith et al. 2019; SimCLR App. B.8 follows it): SGD with Nesterov momentum
0.9, cosine decay of the learning rate to zero over the run (set per step), weight decay given in the
paper's parameterisation, batch-norm statistics momentum tied to the epoch length.

Determinism and exact resume: the batch of step ``t`` is a function of ``(seed, t)`` only — epoch ``e``
uses a permutation seeded by ``(seed, e)``; in the ``cached`` input pipeline (the default) step ``t``'s
crops and flips are drawn from a ``torch.Generator`` seeded by ``mix(seed, "aug", t)``, in the ``pil``
one sample ``i`` of step ``t`` is augmented under ``torch.manual_seed(mix(seed, "aug", t, i))`` (set
inside the dataset wrapper, so DataLoader workers give the same result); and the forward pass of step ``t`` runs under ``torch.manual_seed(mix(seed, t))`` (dropout,
drop-path). Checkpoints hold model + optimizer + step; nothing else carries state, so a run resumed from
step ``k`` replays exactly what an uninterrupted run does (bit-identical on CPU).

Checkpoint integrity: each checkpoint records its SHA-256 (``train_state.pt.sha256``) and the one before
it is kept as ``train_state.prev.pt``. A resume verifies the checksum before loading; a truncated or
corrupted checkpoint is logged, removed, and the run resumes from the previous one (or from scratch) —
still exact, because a run's steps depend only on (seed, step).

Data parallel: when a ``torch.distributed`` process group is already initialised (Ray Train's
``TorchTrainer`` sets one up; ``xfer.distributed``), ``train`` runs as one rank of a data-parallel job:
rank ``r`` of ``w`` takes positions ``r·b/w … (r+1)·b/w − 1`` of step ``t``'s global batch (augmented
under the same per-position seeds), gradients are averaged by DDP and batch-norm statistics are computed
over the global batch (``sync_batchnorm``), so ``w`` workers × ``b/w`` follow the same trajectory as one
worker × ``b`` up to float rounding. Dropout and drop-path masks are drawn per rank (seeded by step and
rank), so with those on the runs agree in distribution, not bit for bit. Only rank 0 writes checkpoints.
"""
from __future__ import annotations

import hashlib
import logging
import math
import pickle
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from xfer.data.transforms import DataConfig, Transformed, eval_transform, train_transform
from xfer.io import (ChecksumError, move_with_checksum, read_checksum, remove_with_checksum, save_torch,
                     verify_file)
from xfer.contract import Diverged, RunContext
from xfer.registry import Registry

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "train_state.pt"
PREVIOUS_NAME = "train_state.prev.pt"  # the checkpoint before the latest, kept in case the latest is corrupt


# ------------------------------------------------------------------ recipe pieces (pure)
def mix(*parts: int | str) -> int:
    """A 63-bit seed from a tuple (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate of step ``step`` (0-based): ``base_lr · ½(1 + cos(π·step/total))`` — base_lr at
    the start, base_lr/2 half-way, 0 at ``total_steps``."""
    if total_steps <= 0:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def lr_at(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning rate of step ``step`` (0-based) with a linear warmup: ``base_lr·(step+1)/warmup`` for the
    first ``warmup_steps`` steps, then cosine decay to 0 over the remaining steps (ImageNet-scale source
    training at batch 4096 needs the warmup; without it, ``lr_at == cosine_lr``)."""
    if warmup_steps <= 0:
        return cosine_lr(base_lr, step, total_steps)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine_lr(base_lr, step - warmup_steps, total_steps - warmup_steps)


def torch_weight_decay(wd: float, lr: float, wd_over_lr: bool) -> float:
    """The ``weight_decay`` handed to torch's SGD.

    The paper's grid gives weight decay *divided by the learning rate* (Kornblith et al. 2019,
    SimCLR B.8): torch's SGD multiplies its weight_decay by the learning rate in the update
    (``p -= lr_t·(g + weight_decay·p)``), so ``weight_decay = wd / lr`` makes the per-step shrinkage
    ``wd · lr_t / lr``: ``wd`` at the start, following the cosine schedule after, and independent of
    the base learning rate — each wd value in the grid means the same at every lr, so the two axes stay
    separable. With ``wd_over_lr`` false, ``wd`` is torch's own weight_decay."""
    if wd < 0 or lr <= 0:
        raise ValueError(f"need wd >= 0 and lr > 0, got wd={wd}, lr={lr}")
    return wd / lr if wd_over_lr else wd


def bn_momentum(steps_per_epoch: int) -> float:
    """torch BatchNorm momentum for the paper's rule: TF decay ``max(1 − 10/s, 0.9)`` with ``s`` steps
    per epoch, i.e. torch momentum (= 1 − decay) ``min(10/s, 0.1)``: statistics average over ~s/10 steps,
    a tenth of an epoch, but never fewer than 10."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return min(10.0 / steps_per_epoch, 0.1)


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set every batch-norm layer's momentum; returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
            n += 1
    return n


def make_optimizer(model: nn.Module, *, lr: float, wd: float, momentum: float = 0.9,
                   wd_over_lr: bool = True) -> torch.optim.SGD:
    """SGD + Nesterov. Weight decay applies to weight tensors (conv / linear kernels), not to biases or
    normalisation parameters — as the TF-slim L2 regularisers of the paper's models did."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": torch_weight_decay(wd, lr, wd_over_lr)},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=momentum > 0)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of step ``step``'s batch: slice ``step mod s`` of epoch ``step // s``'s permutation
    (the last partial batch of an epoch is dropped, so every batch has the same size)."""
    s = steps_per_epoch(n, batch_size)
    epoch, j = divmod(step, s)
    perm = _permutation(n, seed, epoch)
    return perm[j * batch_size:(j + 1) * batch_size]


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(mix(seed, "epoch", epoch))
    return torch.randperm(n, generator=g).tolist()


@contextmanager
def pinned_threads(ctx: RunContext) -> Iterator[None]:
    """Run the block with ``ctx.threads`` torch threads when the trial runs on CPU, then restore the count.

    Why: CPU kernels (convolutions, matmuls, batch-norm statistics) split their float reductions across
    threads, so the thread count changes the rounding, and over a few hundred SGD steps the rounding
    changes the result (quickstart ``resnet-long``: source top-1 0.7275 at 1 thread, 0.7117 at 2,
    0.7163 at 4). Left alone, the count comes from the environment (OMP_NUM_THREADS in the shell, Ray's
    per-worker default, the core count), so the same spec and seed gave different metrics. On CUDA the
    model runs on the GPU and the count is left alone."""
    if ctx.threads is None or ctx.resolved_device() != "cpu":
        yield
        return
    if ctx.threads < 1:
        raise ValueError(f"RunContext.threads must be >= 1 or None, got {ctx.threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(ctx.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ source-training regularisers
def fix_bn_scale(model: nn.Module) -> int:
    """Batch norm without a learned scale: every γ set to 1 and frozen (TF-slim's ``scale=False``, how the
    public Inception checkpoints were trained). The tensors stay, so the checkpoint loads anywhere."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.fill_(1.0)
            m.weight.requires_grad_(False)
            n += 1
    return n


def aux_tap(model: nn.Module) -> tuple[str, int]:
    """Where an attached auxiliary classifier reads from: the feature map at stride 16 (Inception's own
    auxiliary heads sit on the 17×17 grid of a 299 input), else the last-but-one stage timm lists in
    ``feature_info``. Returns (module name, channels)."""
    info = getattr(model, "feature_info", None)
    info = info.get_dicts() if hasattr(info, "get_dicts") else info
    if not info or len(info) < 2:
        raise ValueError(f"{type(model).__name__} lists no intermediate stages (timm feature_info); an auxiliary "
                         "head cannot be attached to it")
    pick = next((d for d in info if d.get("reduction") == 16), info[-2])
    return str(pick["module"]), int(pick["num_chs"])


class AuxClassifier(nn.Module):
    """A backbone trained with an auxiliary classifier. In training mode ``forward`` returns
    ``(logits, aux_logits)`` (``train`` adds ``aux_weight ×`` the auxiliary loss); in eval mode only the
    logits, so evaluation and feature extraction see the plain network.

    ``tap`` None: the architecture's own auxiliary head (timm ``aux_logits=True``, Inception v3), whose
    outputs the model returns itself. Otherwise a head is attached at module ``tap`` (``channels``
    wide): 1×1 conv to 128 → BN → ReLU → global average pool → linear, after TF-slim's Inception
    auxiliary head, for architectures whose timm port has none (Inception v4, ResNets, the quickstart's
    tiny networks). ``backbone_state_dict`` is the network without any auxiliary tensors: what transfer
    loads."""

    OWN_PREFIX = "AuxLogits."

    def __init__(self, model: nn.Module, num_classes: int, tap: str | None = None, channels: int = 0) -> None:
        super().__init__()
        self.model = model
        self.tap = tap
        self._feature: torch.Tensor | None = None
        self.head: nn.Module | None = None
        if tap is not None:
            self.head = nn.Sequential(nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128),
                                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(128, num_classes))
            model.get_submodule(tap).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._feature = output if self.training else None

    def forward(self, x: torch.Tensor) -> Any:
        out = self.model(x)
        aux = None
        if isinstance(out, (tuple, list)):  # the architecture's own head
            out, aux = out
        elif self.head is not None and self._feature is not None:
            aux, self._feature = self.head(self._feature), None
        return (out, aux) if self.training and aux is not None else out

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(self.OWN_PREFIX)}


# ------------------------------------------------------------------ data parallel
def world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sync_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm over the *global* batch: per-channel sums of every rank, all-reduced (differentiably,
    so the backward pass sees the other ranks' examples too). torch's SyncBatchNorm refuses CPU tensors;
    this works on gloo (CPU) and NCCL alike. timm's BatchNormAct layers keep their drop + act."""
    from torch.distributed.nn.functional import all_reduce

    if not self.training or world()[1] == 1:
        return type(self).forward(self, x)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.new_full((1,), x.numel() // c)
    total = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    n = total[-1]
    mean, var = total[:c] / n, (total[c:2 * c] / n - (total[:c] / n) ** 2).clamp_min(0)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
    for extra in ("drop", "act"):  # timm BatchNormAct2d: norm, then dropout and activation
        if hasattr(self, extra):
            y = getattr(self, extra)(y)
    return y


def sync_batchnorm(model: nn.Module) -> int:
    """Make every batch-norm layer of ``model`` normalise over the global batch while a process group of
    more than one rank is up (instance-level forward: the state dict and the layers' classes stay as they
    are). Returns how many layers were switched."""
    import types

    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = types.MethodType(_sync_bn_forward, m)
            n += 1
    return n


def from_rank0(value: float) -> float:
    """``value`` as rank 0 has it, on every rank (a no-op outside a data-parallel run)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])


def _mean_over_ranks(value: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return value
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out / size


# ------------------------------------------------------------------ data plumbing
class _StepBatches(Sampler[list[tuple[int, int, int]]]):
    """Batches for steps ``start .. stop-1`` as lists of (step, position, index) keys; with ``size`` > 1
    ranks, rank ``rank``'s contiguous share of each global batch (positions stay global, so every
    example is augmented as it would be in a one-worker run)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.lo, self.hi = rank * batch_size // size, (rank + 1) * batch_size // size

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        s = steps_per_epoch(self.n, self.batch_size)
        cached: tuple[int, list[int]] | None = None
        for t in range(self.start, self.stop):
            epoch, j = divmod(t, s)
            if cached is None or cached[0] != epoch:
                cached = (epoch, _permutation(self.n, self.seed, epoch))
            idx = cached[1][j * self.batch_size:(j + 1) * self.batch_size]
            yield [(t, i, k) for i, k in enumerate(idx) if self.lo <= i < self.hi]

    def __len__(self) -> int:
        return self.stop - self.start


class _SeededAugment(Dataset):
    """Applies the training transform to item ``index`` under a seed fixed by (seed, step, position)."""

    def __init__(self, base: Dataset, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, Any]:
        step, pos, index = key
        image, target = self.base[index]
        torch.manual_seed(mix(self.seed, "aug", step, pos))
        return self.transform(image), target


def _autocast(device: str):
    """bf16 autocast on CUDA only (CPU runs stay fp32, so they are exact and reproducible)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


def loss_fn(multilabel: bool, label_smoothing: float = 0.0) -> nn.Module:
    """BCE-with-logits for multi-label targets (one binary problem per class), else cross-entropy."""
    if multilabel:
        return nn.BCEWithLogitsLoss()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def _outputs_loss(out: Any, y: torch.Tensor, criterion: nn.Module, aux_weight: float) -> torch.Tensor:
    """The training loss of a forward pass: ``(logits, aux_logits)`` (a model trained with an auxiliary
    classifier, as Inception was) adds ``aux_weight ×`` the auxiliary head's loss."""
    if isinstance(out, (tuple, list)):
        logits, aux = out
        return criterion(logits.float(), y) + aux_weight * criterion(aux.float(), y)
    return criterion(out.float(), y)


# ------------------------------------------------------------------ checkpoints
def checkpoint_path(ctx: RunContext) -> Path | None:
    return Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir is not None else None


def clear_checkpoint(ctx: RunContext) -> None:
    """Remove the periodic checkpoints once a trial's result is final (they can be large)."""
    path = checkpoint_path(ctx)
    if path is not None:
        remove_with_checksum(path)
        remove_with_checksum(path.with_name(PREVIOUS_NAME))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` with its SHA-256 sidecar; the checkpoint it replaces becomes ``PREVIOUS_NAME``
    (so there is always one to fall back on if the new one later turns out corrupt)."""
    if path.is_file():
        move_with_checksum(path, path.with_name(PREVIOUS_NAME))
    save_torch(state, path, checksum=True)


def _load_verified(path: Path, device: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if its SHA-256 matches its sidecar and it loads; else None (a warning
    names the file, which is removed so that it can never be resumed or kept as the previous one)."""
    if not path.is_file():
        return None
    expected = read_checksum(path)
    try:
        if expected is None:
            log.warning("checkpoint %s has no SHA-256 sidecar (written before checksums); loading it unverified",
                        path)
        else:
            verify_file(path, expected)
        # weights_only: a checkpoint on shared storage is data, never code to run
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or "step" not in state:
            raise ChecksumError(f"{path} is not a training checkpoint (no step)")
        return state
    except pickle.UnpicklingError as e:  # weights_only refused it: objects that would run code on load
        log.warning("ignoring checkpoint %s: not a plain training state (%s); it is not loaded",
                    path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        remove_with_checksum(path)
        return None
    except Exception as e:  # noqa: BLE001 - a checksum mismatch or an unreadable (truncated) file alike
        log.warning("corrupt checkpoint %s, not resuming from it (removed): %s", path, e)
        remove_with_checksum(path)
        return None


def _try_resume(path: Path | None, run_id: str, model: nn.Module, opt: torch.optim.Optimizer,
                device: str) -> tuple[int, float, tuple[float, int]]:
    """Resume from the latest intact checkpoint of ``run_id``: the latest, else the previous one, else
    nothing (step 0)."""
    fresh = (0, float("nan"), (0.0, 0))
    if path is None:
        return fresh
    state = None
    for candidate in (path, path.with_name(PREVIOUS_NAME)):
        state = _load_verified(candidate, device)
        if state is not None:
            if candidate != path:
                log.warning("resuming %s from the previous checkpoint %s (step %d)", run_id, candidate,
                            state["step"])
            break
    if state is None:
        return fresh
    if state.get("run_id") != run_id:
        log.warning("ignoring checkpoint %s: it belongs to another run (%s, not %s)", path, state.get("run_id"), run_id)
        return fresh
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    log.info("resumed %s at step %d", run_id, state["step"])
    total, count = state.get("window", (0.0, 0))
    return int(state["step"]), float(state.get("last_loss", float("nan"))), (float(total), int(count))


# ------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``wd`` is in the paper's parameterisation when ``wd_over_lr`` (see
    ``torch_weight_decay``). ``checkpoint_every``/``log_every``/``eval_every`` of 0 switch that off
    (an ``eval_every`` of 0 leaves evaluation to the caller, after training)."""

    steps: int
    batch_size: int
    lr: float
    wd: float = 0.0
    wd_over_lr: bool = True
    momentum: float = 0.9
    label_smoothing: float = 0.0
    warmup_steps: int = 0  # linear warmup before the cosine decay (source training; 0: none)
    aux_weight: float = 0.4  # weight of an auxiliary classifier's loss, when the model returns one
    checkpoint_every: int = 1000
    log_every: int = 50
    eval_every: int = 0
    seed: int = 0
    pipeline: str = "cached"  # how batches are made: a name in PIPELINES (see "input pipelines" below)

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline: {PIPELINES.unknown_message(self.pipeline)}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("checkpoint_every", "log_every", "eval_every", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (self.wd >= 0 and math.isfinite(self.wd)):
            raise ValueError(f"wd must be a finite number >= 0, got {self.wd!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if not (self.aux_weight >= 0 and math.isfinite(self.aux_weight)):
            raise ValueError(f"aux_weight must be a finite number >= 0, got {self.aux_weight!r}")


@dataclass
class TrainOutcome:
    steps_done: int
    last_loss: float  # mean training loss over the last logging window (or the last step)
    resumed_from: int = 0


def train(model: nn.Module, split: Dataset, data_config: DataConfig, cfg: TrainConfig, ctx: RunContext, *,
          multilabel: bool = False, run_id: str = "",
          periodic_eval: Callable[[nn.Module], dict[str, float]] | None = None) -> TrainOutcome:
    """Train ``model`` in place on ``split`` (items ``(image, target)``) with the paper's recipe.

    Reports ``train_loss`` every ``log_every`` steps and ``periodic_eval(model)`` every ``eval_every``
    steps through ``ctx.report(step, metrics)`` (step = steps done). Writes a checkpoint to
    ``ctx.work_dir`` every ``checkpoint_every`` steps and at the end, and resumes from one written for
    the same ``run_id``. Raises ``Diverged`` when the loss stops being finite. Inside an initialised
    process group it is one rank of a data-parallel run (module docstring); every rank reports the same
    (all-reduced) losses, and only rank 0 writes checkpoints."""
    device = ctx.resolved_device()
    rank, size = world()
    n = len(split)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the training split is empty")
    if cfg.batch_size > n:
        log.warning("batch_size %d > %d training examples: every batch is the whole split", cfg.batch_size, n)
    if size > 1 and (cfg.batch_size % size or periodic_eval is not None):
        raise ValueError(f"a data-parallel run over {size} workers needs a batch_size divisible by {size} (got "
                         f"{cfg.batch_size}) and no periodic evaluation")
    spe = steps_per_epoch(n, cfg.batch_size)
    set_bn_momentum(model, bn_momentum(spe))  # s is global steps per epoch: the same for any worker count
    for_device(model, device)
    opt = make_optimizer(model, lr=cfg.lr, wd=cfg.wd, momentum=cfg.momentum, wd_over_lr=cfg.wd_over_lr)
    ckpt = checkpoint_path(ctx)
    start, last_loss, (window_total, window_n) = _try_resume(ckpt, run_id, model, opt, device)
    criterion = loss_fn(multilabel, cfg.label_smoothing)
    if start >= cfg.steps:
        return TrainOutcome(start, last_loss, resumed_from=start)
    net: nn.Module = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[torch.device(device).index or 0]
                                      if device.startswith("cuda") else None)
    writes = ckpt is not None and rank == 0

    loader = PIPELINES.get(cfg.pipeline).train(split, data_config, cfg, ctx, start, device)
    window_sum = torch.full((), window_total, dtype=torch.float32, device=device)
    devices = [torch.cuda.current_device()] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):  # leave the caller's RNG as it was
        net.train()
        for t, (x, y) in enumerate(loader, start=start):
            x = x.to(device, non_blocking=True)
            y = (y.float() if multilabel else y.long()).to(device, non_blocking=True)
            lr_t = lr_at(cfg.lr, t, cfg.steps, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr_t
            torch.manual_seed(mix(cfg.seed, "step", t) if size == 1 else mix(cfg.seed, "step", t, "rank", rank))
            with _autocast(device):
                loss = _outputs_loss(net(x), y, criterion, cfg.aux_weight)
            seen = _mean_over_ranks(loss.detach(), size)  # every rank sees (and stops on) the same value
            if not torch.isfinite(seen):
                raise Diverged(f"loss became {seen.item()} at step {t} (lr {cfg.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window_sum += seen
            window_n += 1
            done = t + 1
            final = done == cfg.steps
            log_now = bool(cfg.log_every) and done % cfg.log_every == 0
            if log_now or final:
                last_loss = float(window_sum) / window_n
                window_sum.zero_()
                window_n = 0
            if writes and (final or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                # the partial loss window travels too, so a resumed run reports the same losses
                save_checkpoint({"run_id": run_id, "step": done, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "last_loss": last_loss,
                                 "window": (float(window_sum), window_n)}, ckpt)
            if cfg.log_every and (log_now or final):
                ctx.report(done, {"train_loss": last_loss})
            if periodic_eval is not None and cfg.eval_every and done % cfg.eval_every == 0 and not final:
                ctx.report(done, periodic_eval(model))
                model.train()
    return TrainOutcome(cfg.steps, last_loss, resumed_from=start)


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(model: nn.Module, split: Dataset, data_config: DataConfig, *, device: str = "cpu",
            batch_size: int = 256, num_workers: int = 0, pipeline: str = "cached",
            cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores [N, C] (float32 logits) and targets ([N] ints or [N, C] multi-hot) over ``split``,
    preprocessed with the deterministic evaluation transform of ``pipeline`` (BN in eval mode);
    ``cache_dir``: where the cached pipeline keeps decoded images (None: decoded in memory per call)."""
    was_training = model.training
    model.eval().to(device)
    loader = PIPELINES.get(pipeline).eval(split, data_config, device=device, batch_size=batch_size,
                                          num_workers=num_workers, cache_dir=cache_dir)
    scores: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for x, y in loader:
        with _autocast(device):
            out = model(x.to(device, non_blocking=True))
        scores.append(out.float().cpu().numpy())
        targets.append(np.asarray(y))
    model.train(was_training)
    if not scores:
        raise ValueError("the evaluation split is empty")
    return np.concatenate(scores), np.concatenate(targets)


def evaluate(model: nn.Module, split: Dataset, data_config: DataConfig, metric: str, *, device: str = "cpu",
             batch_size: int = 256, num_workers: int = 0, pipeline: str = "cached",
             cache_dir: Path | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """``(metric value, scores, targets)`` of ``model`` on ``split`` (metric from ``xfer.metrics``)."""
    from xfer.metrics import compute_metric

    scores, targets = predict(model, split, data_config, device=device, batch_size=batch_size,
                              num_workers=num_workers, pipeline=pipeline, cache_dir=cache_dir)
    return compute_metric(metric, scores, targets), scores, targets


# ------------------------------------------------------------------ input pipelines
# How a loop gets its batches. ``train(split, data_config, cfg, ctx, start, device)`` yields step t's
# ``(x, y)`` for t = start .. cfg.steps - 1, x already on ``device``; ``eval(split, data_config, device=,
# batch_size=, num_workers=, cache_dir=)`` yields ``(x, y)`` over the split in order. Both keep the
# determinism contract of the module docstring: step t's batch is a function of (seed, t) only.
Batches = Iterator[tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Pipeline:
    train: Callable[..., Batches]
    eval: Callable[..., Batches]
    help: str


def for_device(model: nn.Module, device: str) -> nn.Module:
    """The model on ``device``; channels-last memory on CUDA, where convolutions run fastest on it (CPU
    keeps the default layout: its results stay bit-identical to earlier runs)."""
    model.to(device)
    if device.startswith("cuda"):
        model.to(memory_format=torch.channels_last)
    return model


def _pil_train(split: Dataset, data_config: DataConfig, cfg: TrainConfig, ctx: RunContext, start: int,
               device: str) -> Batches:
    rank, size = world()  # a data-parallel rank reads its share of every global batch
    loader = DataLoader(_SeededAugment(split, train_transform(data_config), cfg.seed),
                        batch_sampler=_StepBatches(len(split), cfg.batch_size, cfg.seed, start, cfg.steps,  # type: ignore[arg-type]
                                                   rank, size),
                        num_workers=ctx.num_workers, pin_memory=device.startswith("cuda"))
    for x, y in loader:
        yield _on_device(x, device), y


def _pil_eval(split: Dataset, data_config: DataConfig, *, device: str, batch_size: int, num_workers: int,
              cache_dir: Path | None = None) -> Batches:
    loader = DataLoader(Transformed(split, eval_transform(data_config)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.startswith("cuda"))
    for x, y in loader:
        yield _on_device(x, device), y


def _on_device(x: torch.Tensor, device: str) -> torch.Tensor:
    """A collated batch on ``device`` (asynchronously from pinned memory; channels-last on CUDA)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.startswith("cuda") else x


PREFETCH = 2  # batches gathered ahead of the step that uses them


def _prefetched(gather: Callable[[Any], torch.Tensor], jobs: Iterable[Any],
                ahead: int = PREFETCH) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(job, gather(job))`` for each job, gathered up to ``ahead`` jobs early in a background thread
    (numpy's copy out of the memory-mapped cache releases the GIL), so reading a batch overlaps the step
    before it. The jobs are produced lazily (a 20,000-step run never holds all of its index lists)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfer-batches") as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append((job, pool.submit(gather, job)))
            if len(pending) > ahead:
                job0, fut = pending.popleft()
                yield job0, fut.result()
        while pending:
            job0, fut = pending.popleft()
            yield job0, fut.result()


def _device_batches(images: Any, jobs: Iterable[Any], indices: Callable[[Any], list[int]],
                    device: str) -> Iterator[tuple[Any, Any]]:
    """``(job, the job's images on device)``. On CUDA: gathered ahead into pinned memory (torch's caching
    host allocator reuses a buffer only once its asynchronous copy is done) and copied without a sync.
    On CPU there is no copy to make: the batch is per-image views of the memory map, cropped directly."""
    if not device.startswith("cuda"):
        for job in jobs:
            yield job, images.views(indices(job))
        return

    def gather(job: Any) -> torch.Tensor:
        idx = indices(job)
        buf = torch.empty((len(idx), 3, images.side, images.side), dtype=torch.uint8, pin_memory=True)
        images.gather(idx, out=buf.numpy())
        return buf

    for job, host in _prefetched(gather, jobs):
        yield job, host.to(device, non_blocking=True)


def _cached_train(split: Dataset, data_config: DataConfig, cfg: TrainConfig, ctx: RunContext, start: int,
                  device: str) -> Batches:
    from xfer.data.cache import cache_side, split_images
    from xfer.data.device_augment import DeviceAugment

    images = split_images(split, cache_side(data_config), root=ctx.layout.image_cache_dir,
                          num_workers=ctx.num_workers)
    augment = DeviceAugment(data_config, device)
    pin = device.startswith("cuda")
    rank, size = world()  # a data-parallel rank reads its share of every global batch, augmented as in one worker
    steps = ((b[0][0], [k for _, _, k in b]) for b in _StepBatches(len(images), cfg.batch_size, cfg.seed,
                                                                     start, cfg.steps))

    def share(idx: list[int]) -> slice:  # positions as _StepBatches' rank split
        return slice(rank * cfg.batch_size // size, (rank + 1) * cfg.batch_size // size)

    for (t, idx), x in _device_batches(images, steps, lambda job: job[1][share(job[1])], device):
        g = torch.Generator().manual_seed(mix(cfg.seed, "aug", t))
        y = torch.from_numpy(images.targets(idx[share(idx)]))
        keep = share(idx) if size > 1 else None
        yield augment.train(x, torch.from_numpy(images.sizes(idx)), g, keep), (y.pin_memory() if pin else y)


def _cached_eval(split: Dataset, data_config: DataConfig, *, device: str, batch_size: int, num_workers: int,
                 cache_dir: Path | None = None) -> Batches:
    from xfer.data.cache import cache_side, split_images
    from xfer.data.device_augment import DeviceAugment

    images = split_images(split, cache_side(data_config), root=cache_dir, num_workers=num_workers)
    augment = DeviceAugment(data_config, device)
    chunks = (list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size))
    for idx, x in _device_batches(images, chunks, lambda job: job, device):
        yield augment.eval(x, torch.from_numpy(images.sizes(idx))), images.targets(idx)


PIPELINES: "Registry[Pipeline]" = Registry("input pipeline")
PIPELINES.add("pil", Pipeline(_pil_train, _pil_eval, "per-sample torchvision transforms of each decoded image in "
                              "DataLoader workers (decodes every image every epoch)"))
PIPELINES.add("cached", Pipeline(_cached_train, _cached_eval, "images decoded once into a memory-mapped uint8 "
                                 "cache; crop, flip and normalise as batched ops on the trial's device"))
