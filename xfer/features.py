"""The feature store: frozen penultimate features, computed once per key and shared by every trial.

The logistic-regression regime fits 45 penalties per (model, dataset); the expensive part — a forward
pass of the frozen network over every image — does not depend on the penalty, so it is done once and
cached (as CLIP_benchmark does). What is cached is the protocol's feature: the globally pooled
penultimate activations of the network in eval mode (BatchNorm uses its running statistics), on
centre-cropped, normalised images without augmentation (``eval_transform`` of the backbone's data
config), computed under ``torch.no_grad`` (bf16 autocast on CUDA, float32 on CPU), stored as float32.

Key = stable hash of (backbone fingerprint, dataset fingerprint, split, data config, the precision the
forward pass ran in and the dtype stored, feature protocol): anything that changes the numbers changes
the key, and nothing else does (batch size, where the data lives). Precision is part of it because bf16
autocast on a GPU and float32 on a CPU give different features for the same network and images: a
store shared by GPU and CPU workers must not hand one's features to the other. A file ``<storage>/features/<key>.pt`` holds ``features`` [N, D] float32, ``targets``
([N] int64 class ids, or [N, C] float32 multi-hot) and ``meta`` (what it was made from). It is written
to a temporary name and moved into place with ``os.replace``, so a file under its key is always
complete: a crash leaves at most a stray ``.tmp`` file, and two workers racing on one key both write
a valid file.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from xfer.data.base import SPLITS
from xfer.engine import pinned_threads
from xfer.io import save_torch
from xfer.contract import RunContext, splits_for
from xfer.hashing import stable_hash

if TYPE_CHECKING:
    from xfer.data.transforms import DataConfig
    from xfer.models import Backbone
    from xfer.trial import DatasetRef, ModelSpec, TrialSpec

log = logging.getLogger(__name__)

# bump when what a feature *is* changes (layer, pooling, transform, precision policy): old keys go stale
FEATURE_PROTOCOL = "1"
STORED_DTYPE = torch.float32  # what the store keeps, whatever the forward pass computed in


def precision_for(device: str) -> str:
    """The forward pass's precision on ``device``: bf16 autocast on CUDA, float32 elsewhere (the policy
    ``extract_features`` applies; part of every feature key)."""
    return "bf16-autocast" if torch.device(device).type == "cuda" else "float32"


class FeatureStoreError(ValueError):
    """A bad request to the feature store (unknown split, a backbone that does not give pooled features)."""


@dataclass
class FeatureSet:
    """One split's cached features with what a probe needs to know about the dataset."""

    features: torch.Tensor  # [N, D] float32
    targets: torch.Tensor  # [N] int64 or [N, C] float32 multi-hot
    num_classes: int
    multilabel: bool
    metric: str
    key: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Identity:
    """What a key is made of, apart from the split."""

    backbone: str  # Backbone.fingerprint
    dataset: str  # TransferDataset.fingerprint()
    data_config: dict[str, Any]
    precision: str = "float32"  # precision_for(device) of the forward pass


# Fingerprints need the backbone / the dataset built. A sweep asks for the keys of every λ-trial × split,
# so each process builds each model and each dataset once (not once per model × dataset pair).
# (A weights file rewritten in place with the same size is not noticed within one process.)
_BACKBONE_IDS: dict[str, tuple[str, dict[str, Any]]] = {}  # model → (fingerprint, data config)
_DATASET_IDS: dict[str, str] = {}  # (dataset, data root) → fingerprint


def clear_identity_cache() -> None:
    """Forget the in-process fingerprints (the next key lookup rebuilds backbone and dataset)."""
    _BACKBONE_IDS.clear()
    _DATASET_IDS.clear()


def _model_memo(model: "ModelSpec") -> str:
    return stable_hash(model.key_fields())


def _dataset_memo(ref: "DatasetRef", ctx: RunContext) -> str:
    return stable_hash({"dataset": ref.key_fields(), "data_root": str(Path(ctx.data_root).expanduser().resolve())})


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FeatureStoreError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def _key(identity: _Identity, split: str) -> str:
    return stable_hash({"backbone": identity.backbone, "dataset": identity.dataset, "split": split,
                        "data_config": identity.data_config, "precision": identity.precision,
                        "dtype": str(STORED_DTYPE).removeprefix("torch."), "protocol": FEATURE_PROTOCOL}, n=24)


def _config_dict(cfg: "DataConfig") -> dict[str, Any]:
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class _Built:
    """The frozen backbone and the dataset, built on demand and kept for the extraction that follows."""

    model: "ModelSpec"
    ref: "DatasetRef"
    ctx: RunContext
    backbone: "Backbone | None" = None
    dataset: Any = None

    def get_backbone(self) -> "Backbone":
        if self.backbone is None:
            from xfer.models import load_backbone

            self.backbone = load_backbone(self.model, num_classes=0, ctx=self.ctx)  # pooled features, no head
            _BACKBONE_IDS[_model_memo(self.model)] = (self.backbone.fingerprint,
                                                      _config_dict(self.backbone.data_config))
        return self.backbone

    def get_dataset(self) -> Any:
        if self.dataset is None:
            from xfer.data import build_from_ref

            self.dataset = build_from_ref(self.ref, data_root=self.ctx.data_root, download=self.ctx.download)
            _DATASET_IDS[_dataset_memo(self.ref, self.ctx)] = self.dataset.fingerprint()
        return self.dataset

    def identity(self) -> _Identity:
        b = _BACKBONE_IDS.get(_model_memo(self.model))
        if b is None:
            self.get_backbone()
            b = _BACKBONE_IDS[_model_memo(self.model)]
        d = _DATASET_IDS.get(_dataset_memo(self.ref, self.ctx))
        if d is None:
            self.get_dataset()
            d = _DATASET_IDS[_dataset_memo(self.ref, self.ctx)]
        return _Identity(backbone=b[0], dataset=d, data_config=b[1],
                         precision=precision_for(self.ctx.resolved_device()))


def feature_key(model: "ModelSpec", ref: "DatasetRef", split: str, ctx: RunContext) -> str:
    """The store key of one split's features (the file is ``ctx.features_dir() / f"{key}.pt"``)."""
    _check_split(split)
    return _key(_Built(model, ref, ctx).identity(), split)


def feature_path(key: str, ctx: RunContext) -> Path:
    return ctx.layout.feature_file(key)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
def extract_features(model: torch.nn.Module, split: Dataset, cfg: "DataConfig", *, batch_size: int = 256,
                     device: str = "cpu", num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features [N, D] (float32, CPU) and targets of ``split`` under the frozen ``model``
    (a timm model built with ``num_classes=0``, so its output is the pooled penultimate layer)."""
    from xfer.data.transforms import Transformed, eval_transform

    was_training = model.training
    model.eval()  # BN running statistics, no dropout: the network is frozen
    model.to(device)
    cuda = torch.device(device).type == "cuda"
    loader = DataLoader(Transformed(split, eval_transform(cfg)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=cuda)
    feats: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    try:
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            for images, t in loader:
                out = model(images.to(device, non_blocking=True))
                if out.ndim != 2:
                    raise FeatureStoreError(
                        f"the backbone returned features of shape {tuple(out.shape)}; expected globally pooled "
                        "[batch, num_features] (build it with num_classes=0 and global pooling)")
                feats.append(out.to(STORED_DTYPE).cpu())
                targets.append(t)
    finally:
        model.train(was_training)
    if not feats:
        raise FeatureStoreError("the split is empty; there is nothing to extract")
    return torch.cat(feats), torch.cat(targets)


def _load(path: Path) -> dict[str, Any] | None:
    """A stored entry, or None when it is missing or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not {"features", "targets", "meta"} <= set(obj):
            raise ValueError(f"missing fields; has {sorted(obj)}")
        return obj
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
        log.warning("feature store: unreadable entry %s (%s); recomputing", path, str(e).strip().splitlines()[0])
        return None


def _as_set(obj: dict[str, Any], key: str) -> FeatureSet:
    meta = dict(obj["meta"])
    return FeatureSet(features=obj["features"], targets=obj["targets"], num_classes=int(meta["num_classes"]),
                      multilabel=bool(meta["multilabel"]), metric=str(meta["metric"]), key=key, meta=meta)


def _compute(built: _Built, splits: Sequence[str], batch_size: int) -> dict[str, FeatureSet]:
    """Extract every split not in the store, with one backbone and one dataset build."""
    import timm

    from xfer import __version__

    model, ref, ctx = built.model, built.ref, built.ctx
    identity = built.identity()
    backbone, ds = built.get_backbone(), built.get_dataset()
    device = ctx.resolved_device()
    out: dict[str, FeatureSet] = {}
    for split in splits:
        key = _key(identity, split)
        path = feature_path(key, ctx)
        stored = _load(path)  # another worker may have written it meanwhile
        if stored is not None:
            out[split] = _as_set(stored, key)
            continue
        data = ds.split(split)
        log.info("feature store miss %s: extracting %s features of %s/%s (%d images) on %s",
                 key, model.name, ref.display, split, len(data), device)
        t0 = time.perf_counter()
        with pinned_threads(ctx):  # stored features must not depend on the worker's thread count
            x, y = extract_features(backbone.model, data, backbone.data_config, batch_size=batch_size,
                                    device=device, num_workers=ctx.num_workers)
        info = ds.info
        meta = {
            "key": key, "split": split, "model": model.name, "arch": model.arch, "weights": model.weights_id(),
            "backbone_fingerprint": identity.backbone, "dataset": ref.name, "dataset_label": ref.display,
            "dataset_fingerprint": identity.dataset, "data_config": identity.data_config,
            "num_classes": int(info.num_classes), "multilabel": bool(info.multilabel), "metric": info.metric,
            "n": int(x.shape[0]), "dim": int(x.shape[1]), "protocol": FEATURE_PROTOCOL,
            "precision": identity.precision, "dtype": str(STORED_DTYPE).removeprefix("torch."),
            "device": device, "seconds": round(time.perf_counter() - t0, 3), "created": time.time(),
            "versions": {"xfer": str(__version__), "torch": str(torch.__version__), "timm": str(timm.__version__)},
        }
        obj = {"features": x.contiguous(), "targets": y.contiguous(), "meta": meta}
        save_torch(obj, path)
        log.info("feature store: wrote %s [%d x %d] in %.1fs", path, x.shape[0], x.shape[1], meta["seconds"])
        out[split] = _as_set(obj, key)
    return out


def get_feature_sets(model: "ModelSpec", ref: "DatasetRef", splits: Sequence[str], ctx: RunContext, *,
                     batch_size: int = 256) -> dict[str, FeatureSet]:
    """Several splits' features, computing (with one backbone build) only the ones not yet stored."""
    for s in splits:
        _check_split(s)
    built = _Built(model, ref, ctx)  # builds only what the in-process memo lacks; reused on a miss
    identity = built.identity()
    out: dict[str, FeatureSet] = {}
    missing: list[str] = []
    for split in dict.fromkeys(splits):
        key = _key(identity, split)
        stored = _load(feature_path(key, ctx))
        if stored is None:
            missing.append(split)
        else:
            out[split] = _as_set(stored, key)
    if missing:
        out.update(_compute(built, missing, batch_size))
    return {s: out[s] for s in splits}


def get_feature_set(model: "ModelSpec", ref: "DatasetRef", split: str, ctx: RunContext, *,
                    batch_size: int = 256) -> FeatureSet:
    """One split's features and dataset facts (num_classes, multilabel, metric), from the store or computed."""
    return get_feature_sets(model, ref, [split], ctx, batch_size=batch_size)[split]


def get_features(model: "ModelSpec", ref: "DatasetRef", split: str, ctx: RunContext, *,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)``: features [N, D] float32 and targets of one split, from the store or computed on a miss."""
    fs = get_feature_set(model, ref, split, ctx, batch_size=batch_size)
    return fs.features, fs.targets


def precompute(trial: "TrialSpec", ctx: RunContext, stages: Sequence[str] | None = None) -> list[str]:
    """Fill the store for the splits ``trial`` reads (train/val in the grid stage, trainval/test in the
    final stage) before the λ grid runs; ``stages=("grid", "final")`` does both stages' four splits with
    one backbone build. Returns the keys, in split order."""
    wanted: list[str] = []
    for stage in stages or (trial.stage,):
        s = splits_for(stage)
        wanted += [s.train, s.eval]
    batch_size = int(trial.options.get("batch_size", 256))
    sets = get_feature_sets(trial.model, trial.dataset, list(dict.fromkeys(wanted)), ctx, batch_size=batch_size)
    return [fs.key for fs in sets.values()]
