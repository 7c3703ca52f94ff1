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

**Variants** (``contract.FeatureVariant``: Azizpour et al. 2014's factors of transferability). Besides the
protocol's feature (layer 0: the network's own pooled penultimate output), the store holds timm feature
stage k (``forward_intermediates``, stages in ``feature_info`` order) pooled globally by average, max or
both concatenated (``POOLS``); layer 0 can be max- or both-pooled too (its final feature map,
``forward_features``). A variant other than the default adds ``{"variant": {layer, pool}}`` to the key, so a
stage's features never pass for the penultimate ones, and the default variant's key is the key it always
had. Every variant a request needs is extracted in one forward pass per split. PCA is not a variant: it is
fitted by the probe on the training split's stored features (cheap, and a stored projection would have to
be keyed by the split it was fitted on).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from xfer.data.base import SPLITS
from xfer.engine import pinned_threads
from xfer.io import save_torch
from xfer.contract import POOLINGS, FeatureVariant, RunContext, splits_for
from xfer.hashing import stable_hash
from xfer.options import OptionError

if TYPE_CHECKING:
    from xfer.data.transforms import DataConfig
    from xfer.models import Backbone
    from xfer.trial import DatasetRef, ModelSpec, TrialSpec

log = logging.getLogger(__name__)

# bump when what a feature *is* changes (layer, pooling, transform, precision policy): old keys go stale
FEATURE_PROTOCOL = "1"
STORED_DTYPE = torch.float32  # what the store keeps, whatever the forward pass computed in
DEFAULT = FeatureVariant()


def _flat_map(x: torch.Tensor) -> torch.Tensor:
    """A feature map as [N, C, positions]: NCHW maps (CNN stages) or [N, tokens, C] (a transformer's final
    features, whose stages ``forward_intermediates`` already returns as NCHW)."""
    if x.ndim == 4:
        return x.flatten(2)
    if x.ndim == 3:
        return x.transpose(1, 2)
    raise FeatureStoreError(f"cannot pool a feature map of shape {tuple(x.shape)}; expected NCHW or [N, tokens, C]")


# pooling name -> [N, C, ...] feature map to [N, D] features (the names are contract.POOLINGS)
POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "avg": lambda x: _flat_map(x).mean(dim=2),
    "max": lambda x: _flat_map(x).amax(dim=2),
    "avgmax": lambda x: torch.cat([_flat_map(x).mean(dim=2), _flat_map(x).amax(dim=2)], dim=1),
}
assert tuple(POOLS) == POOLINGS, "features.POOLS must implement exactly contract.POOLINGS"


def precision_for(device: str) -> str:
    """The forward pass's precision on ``device``: bf16 autocast on CUDA, float32 elsewhere (the policy
    ``extract_features`` applies; part of every feature key)."""
    return "bf16-autocast" if torch.device(device).type == "cuda" else "float32"


class FeatureStoreError(ValueError):
    """A bad request to the feature store (unknown split, a backbone that does not give pooled features)."""


class UnknownStageError(FeatureStoreError, OptionError):
    """A feature layer the model does not have: a user's error (``xfer`` prints it, no traceback), and
    its message lists the model's valid layers."""


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
Stage = tuple[str, int]  # a timm feature stage: (module name, channels)
_STAGES: dict[str, tuple[Stage, ...]] = {}  # model → its feature stages (feature_info order)


def clear_identity_cache() -> None:
    """Forget the in-process fingerprints (the next key lookup rebuilds backbone and dataset)."""
    _BACKBONE_IDS.clear()
    _DATASET_IDS.clear()
    _STAGES.clear()


def _model_memo(model: "ModelSpec") -> str:
    return stable_hash(model.key_fields())


def _dataset_memo(ref: "DatasetRef", ctx: RunContext) -> str:
    return stable_hash({"dataset": ref.key_fields(), "data_root": str(Path(ctx.data_root).expanduser().resolve())})


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FeatureStoreError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def _key(identity: _Identity, split: str, variant: FeatureVariant = DEFAULT) -> str:
    parts: dict[str, Any] = {"backbone": identity.backbone, "dataset": identity.dataset, "split": split,
                             "data_config": identity.data_config, "precision": identity.precision,
                             "dtype": str(STORED_DTYPE).removeprefix("torch."), "protocol": FEATURE_PROTOCOL}
    if not variant.is_default:  # absent for the protocol's feature: its keys stay as they always were
        parts["variant"] = {"layer": variant.layer, "pool": variant.pool}
    return stable_hash(parts, n=24)


def feature_stages(model: torch.nn.Module) -> tuple[Stage, ...]:
    """The feature stages of a timm model, in ``feature_info`` order (stage k is entry k-1); () when it
    exposes none that ``forward_intermediates`` can return."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not hasattr(model, "forward_intermediates"):
        return ()
    return tuple((str(d.get("module", f"stage {i + 1}")), int(d.get("num_chs", 0))) for i, d in enumerate(info))


def model_stages(model: "ModelSpec") -> tuple[Stage, ...]:
    """The feature stages of ``model``'s architecture, without its weights (built on the meta device: no
    memory, no download): for checking a sweep's layers before it runs and the report's relative depth."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(model.arch, pretrained=False, num_classes=0)
    return feature_stages(net)


def stage_count(model: "ModelSpec") -> int:
    """How many feature stages ``model`` has (the report's relative depth is stage / this)."""
    return len(model_stages(model))


def check_layer(model_name: str, stages: Sequence[Stage], layer: int) -> None:
    """An UnknownStageError naming the model's valid layers unless ``layer`` is one of them."""
    if layer <= len(stages):
        return
    listed = ", ".join(f"{i} ({m}, {c} channels)" for i, (m, c) in enumerate(stages, 1))
    raise UnknownStageError(f"model {model_name!r} has no feature stage {layer}; valid layers: 0 (the penultimate "
                            "pooled features)" + (f", {listed}" if listed else
                                                  " only: it exposes no timm feature stages (feature_info / "
                                                  "forward_intermediates)"))


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
            _STAGES[_model_memo(self.model)] = feature_stages(self.backbone.model)
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

    def check(self, variant: FeatureVariant) -> None:
        """The model has ``variant``'s layer (its stages are known once ``identity`` has run)."""
        if variant.layer:
            if _model_memo(self.model) not in _STAGES:
                self.get_backbone()
            check_layer(self.model.name, _STAGES[_model_memo(self.model)], variant.layer)


def _identity(built: _Built, variants: Sequence[FeatureVariant]) -> _Identity:
    identity = built.identity()
    for v in variants:
        built.check(v)
    return identity


def feature_key(model: "ModelSpec", ref: "DatasetRef", split: str, ctx: RunContext,
                variant: FeatureVariant = DEFAULT) -> str:
    """The store key of one split's features (the file is ``ctx.features_dir() / f"{key}.pt"``); a layer
    the model does not have is a FeatureStoreError naming the ones it has."""
    _check_split(split)
    built = _Built(model, ref, ctx)
    return _key(_identity(built, [variant]), split, variant)


def feature_path(key: str, ctx: RunContext) -> Path:
    return ctx.layout.feature_file(key)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
Pair = tuple[str, FeatureVariant]  # (split, variant): one stored entry


def _forward(model: torch.nn.Module, images: torch.Tensor, variants: Sequence[FeatureVariant]
             ) -> dict[FeatureVariant, torch.Tensor]:
    """Every variant's [N, D] features of one batch from one forward pass."""
    if all(v.is_default for v in variants):  # the protocol's feature: the model's own pooled output
        out = model(images)
        if out.ndim != 2:
            raise FeatureStoreError(
                f"the backbone returned features of shape {tuple(out.shape)}; expected globally pooled "
                "[batch, num_features] (build it with num_classes=0 and global pooling)")
        return {v: out for v in variants}
    layers = sorted({v.layer for v in variants if v.layer})
    if layers:  # the final map and every stage asked for, in one pass
        final, maps = model.forward_intermediates(images, indices=[k - 1 for k in layers])
        stage = dict(zip(layers, maps))
    else:
        final, stage = model.forward_features(images), {}
    # layer 0, average: forward_head is what model(x) runs after forward_features (timm's contract)
    return {v: model.forward_head(final, pre_logits=True) if v.is_default else
            POOLS[v.pool](final if v.layer == 0 else stage[v.layer]) for v in variants}


def extract_features(model: torch.nn.Module, split: Dataset, cfg: "DataConfig", *, batch_size: int = 256,
                     device: str = "cpu", num_workers: int = 0, variants: Sequence[FeatureVariant] = (DEFAULT,)
                     ) -> tuple[dict[FeatureVariant, torch.Tensor], torch.Tensor]:
    """Pooled features of each of ``variants`` ({variant: [N, D] float32, CPU}) and the targets of
    ``split`` under the frozen ``model`` (a timm model built with ``num_classes=0``, so its output is the
    pooled penultimate layer), all from one pass over the data."""
    from xfer.data.transforms import Transformed, eval_transform

    was_training = model.training
    model.eval()  # BN running statistics, no dropout: the network is frozen
    model.to(device)
    cuda = torch.device(device).type == "cuda"
    loader = DataLoader(Transformed(split, eval_transform(cfg)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=cuda)
    feats: dict[FeatureVariant, list[torch.Tensor]] = {v: [] for v in variants}
    targets: list[torch.Tensor] = []
    try:
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            for images, t in loader:
                for v, out in _forward(model, images.to(device, non_blocking=True), variants).items():
                    feats[v].append(out.to(STORED_DTYPE).cpu())
                targets.append(t)
    finally:
        model.train(was_training)
    if not targets:
        raise FeatureStoreError("the split is empty; there is nothing to extract")
    return {v: torch.cat(x) for v, x in feats.items()}, torch.cat(targets)


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


def _compute(built: _Built, pairs: Sequence[Pair], batch_size: int) -> dict[Pair, FeatureSet]:
    """Extract every (split, variant) not in the store, with one backbone and one dataset build and one
    pass over each split for all of its variants."""
    import timm

    from xfer import __version__

    model, ref, ctx = built.model, built.ref, built.ctx
    identity = built.identity()
    backbone, ds = built.get_backbone(), built.get_dataset()
    stages = feature_stages(backbone.model)
    device = ctx.resolved_device()
    out: dict[Pair, FeatureSet] = {}
    for split in dict.fromkeys(s for s, _ in pairs):
        todo: list[FeatureVariant] = []
        for v in dict.fromkeys(v for s, v in pairs if s == split):
            key = _key(identity, split, v)
            stored = _load(feature_path(key, ctx))  # another worker may have written it meanwhile
            if stored is not None:
                out[(split, v)] = _as_set(stored, key)
            else:
                todo.append(v)
        if not todo:
            continue
        data = ds.split(split)
        log.info("feature store miss: extracting %s features of %s/%s (%d images; %s) on %s", model.name,
                 ref.display, split, len(data), "; ".join(v.describe() for v in todo), device)
        t0 = time.perf_counter()
        with pinned_threads(ctx):  # stored features must not depend on the worker's thread count
            xs, y = extract_features(backbone.model, data, backbone.data_config, batch_size=batch_size,
                                     device=device, num_workers=ctx.num_workers, variants=todo)
        seconds = round(time.perf_counter() - t0, 3)
        info = ds.info
        for v in todo:
            key, x = _key(identity, split, v), xs[v]
            meta = {
                "key": key, "split": split, "model": model.name, "arch": model.arch, "weights": model.weights_id(),
                "backbone_fingerprint": identity.backbone, "dataset": ref.name, "dataset_label": ref.display,
                "dataset_fingerprint": identity.dataset, "data_config": identity.data_config,
                "num_classes": int(info.num_classes), "multilabel": bool(info.multilabel), "metric": info.metric,
                "n": int(x.shape[0]), "dim": int(x.shape[1]), "protocol": FEATURE_PROTOCOL,
                "precision": identity.precision, "dtype": str(STORED_DTYPE).removeprefix("torch."),
                "device": device, "seconds": seconds, "created": time.time(),
                "versions": {"xfer": str(__version__), "torch": str(torch.__version__), "timm": str(timm.__version__)},
            }
            if not v.is_default:  # which stage (its timm module) and pooling; the default's meta is as it was
                meta.update(layer=v.layer, pool=v.pool, stage=stages[v.layer - 1][0] if v.layer else "penultimate",
                            num_stages=len(stages))
            obj = {"features": x.contiguous(), "targets": y.contiguous(), "meta": meta}
            save_torch(obj, feature_path(key, ctx))
            log.info("feature store: wrote %s [%d x %d] in %.1fs", feature_path(key, ctx), x.shape[0], x.shape[1],
                     seconds)
            out[(split, v)] = _as_set(obj, key)
    return out


def get_variant_sets(model: "ModelSpec", ref: "DatasetRef", pairs: Sequence[Pair], ctx: RunContext, *,
                     batch_size: int = 256) -> dict[Pair, FeatureSet]:
    """Several (split, variant) entries, computing (with one backbone build) only the ones not yet stored;
    a layer the model does not have is a FeatureStoreError naming its valid layers."""
    for s, _ in pairs:
        _check_split(s)
    built = _Built(model, ref, ctx)  # builds only what the in-process memo lacks; reused on a miss
    identity = _identity(built, [v for _, v in pairs])
    out: dict[Pair, FeatureSet] = {}
    missing: list[Pair] = []
    for pair in dict.fromkeys(pairs):
        key = _key(identity, *pair)
        stored = _load(feature_path(key, ctx))
        if stored is None:
            missing.append(pair)
        else:
            out[pair] = _as_set(stored, key)
    if missing:
        out.update(_compute(built, missing, batch_size))
    return {p: out[p] for p in pairs}


def get_feature_sets(model: "ModelSpec", ref: "DatasetRef", splits: Sequence[str], ctx: RunContext, *,
                     batch_size: int = 256, variant: FeatureVariant = DEFAULT) -> dict[str, FeatureSet]:
    """Several splits' features (of one variant), computing only the ones not yet stored."""
    sets = get_variant_sets(model, ref, [(s, variant) for s in splits], ctx, batch_size=batch_size)
    return {s: sets[(s, variant)] for s in splits}


def get_feature_set(model: "ModelSpec", ref: "DatasetRef", split: str, ctx: RunContext, *,
                    batch_size: int = 256) -> FeatureSet:
    """One split's features and dataset facts (num_classes, multilabel, metric), from the store or computed."""
    return get_feature_sets(model, ref, [split], ctx, batch_size=batch_size)[split]


def get_features(model: "ModelSpec", ref: "DatasetRef", split: str, ctx: RunContext, *,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)``: features [N, D] float32 and targets of one split, from the store or computed on a miss."""
    fs = get_feature_set(model, ref, split, ctx, batch_size=batch_size)
    return fs.features, fs.targets


def precompute(trial: "TrialSpec", ctx: RunContext, stages: Sequence[str] | None = None,
               variants: Sequence[FeatureVariant] = (DEFAULT,)) -> list[str]:
    """Fill the store for the splits ``trial`` reads (train/val in the grid stage, trainval/test in the
    final stage) before the λ grid runs; ``stages=("grid", "final")`` does both stages' four splits with
    one backbone build, ``variants`` every feature variant the sweep's probes read, in the same pass.
    Returns the keys, variant by variant, each in split order."""
    wanted: list[str] = []
    for stage in stages or (trial.stage,):
        s = splits_for(stage)
        wanted += [s.train, s.eval]
    batch_size = int(trial.options.get("batch_size", 256))
    pairs = [(s, v) for v in dict.fromkeys(variants) for s in dict.fromkeys(wanted)]
    sets = get_variant_sets(trial.model, trial.dataset, pairs, ctx, batch_size=batch_size)
    return [fs.key for fs in sets.values()]
