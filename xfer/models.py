"""Backbones: a timm architecture, weights from one of four sources, a new head, and its preprocessing.

``load_backbone`` is the one entry point every regime uses. Where the weights come from is a small
registry (``WEIGHT_SOURCES``), one function per ``ModelSpec.weights`` value:

- ``hub``: timm's pretrained weights (``timm.create_model(arch, pretrained=True)``; downloads unless cached);
- ``random``: timm's random initialisation, seeded;
- ``file``: a timm-format state dict on disk (``ModelSpec.weights_file``), loaded by timm through
  ``pretrained_cfg_overlay=dict(file=...)`` so timm's own adaptation (dropping a head of another size,
  input-channel conversion) applies;
- ``pretrain``: the checkpoint the pretrain regime wrote for ``ModelSpec.pretrain`` — same timm path,
  plus the preprocessing and the measured source accuracy recorded beside it in ``meta.json``.

The classifier is always new: ``num_classes`` outputs, or none (``num_classes=0``: the model returns the
globally pooled penultimate features, ``model.num_features`` wide), as the paper's regimes need.
**One rule for every new head** (``HEAD_INIT``): its weights and biases start at zero. timm's own
per-architecture initialisations differ by about 8× in scale (std 0.013 to 0.10 for the paper's
models), which at one learning-rate grid would give some architectures a hotter start than others;
a zero head gives every architecture the same start (uniform predictions, the backbone's gradient
arriving once the head has moved), whatever timm's default for it.

``source_top1`` gives a model's ImageNet (source) accuracy for the analysis: the spec's override, the
value the pretrain regime measured, or timm's published figure from the shipped ``source_top1.csv``
(``xfer.source_accuracy``), which records the image size of each figure.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from xfer.data.transforms import INTERPOLATIONS, DataConfig
from xfer import timm_names
from xfer.io import sha256_file
from xfer.registry import Registry
from xfer.source_accuracy import TABLE_PATH, read_table  # noqa: F401 - TABLE_PATH re-exported
from xfer.trial import HEAD_INIT  # the one rule for new heads (see the module docstring)

if TYPE_CHECKING:
    from xfer.contract import RunContext
    from xfer.trial import ModelSpec

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pth"
META_FILE = "meta.json"


class ModelLoadError(ValueError):
    """A backbone could not be built as specified; the message says what was wrong and what is valid."""


class MissingCheckpointError(FileNotFoundError):
    """A ``weights: pretrain`` model whose source-training checkpoint has not been made yet."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def init_new_head(module: nn.Module) -> int:
    """Zero every parameter of ``module``'s classifier (timm's ``get_classifier``; a tuple for models
    with two heads). Returns how many tensors it zeroed (0: no head, e.g. ``num_classes=0``)."""
    heads = module.get_classifier() if hasattr(module, "get_classifier") else None
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    n = 0
    with torch.no_grad():
        for head in heads:
            if not isinstance(head, nn.Module):
                continue
            for p in head.parameters():
                p.zero_()
                n += 1
    return n


@dataclass
class Backbone:
    """A ready model plus how to feed it. ``fingerprint`` identifies the backbone weights (not the new
    head): it keys cached features, so equal fingerprints must mean equal features."""

    model: nn.Module
    data_config: DataConfig
    fingerprint: str


@dataclass
class _Loaded:
    module: nn.Module
    fingerprint: str
    source_classes: int | None  # head size of the loaded weights (None: random init, nothing to keep)
    data_config: Mapping[str, Any] | None = None  # preprocessing recorded with the weights, if any


# weights source -> loader(model spec, num_classes, ctx, timm create kwargs, seed) -> _Loaded
WeightLoader = Callable[["ModelSpec", int, "RunContext | None", dict, int], _Loaded]
WEIGHT_SOURCES: "Registry[WeightLoader]" = Registry("weight source")


# ------------------------------------------------------------------ architecture checks
def check_arch(arch: str, *, pretrained: bool = False) -> None:
    """ModelLoadError for an architecture (or, with ``pretrained``, a tag) timm does not have."""
    try:
        timm_names.check_arch(arch, pretrained=pretrained)
    except timm_names.UnknownArchitectureError as e:
        raise ModelLoadError(str(e)) from None


def _create_kwargs(model: "ModelSpec") -> dict[str, Any]:
    """Extra timm kwargs: models with a fixed input size (ViTs) are built for the overridden size."""
    import timm

    kwargs: dict[str, Any] = {}
    if model.input_size is not None:
        cfg = timm.models.get_pretrained_cfg(model.arch)
        if cfg is not None and getattr(cfg, "fixed_input_size", False):
            kwargs["img_size"] = model.input_size
    return kwargs


def _is_head_key(key: str, heads: tuple[str, ...]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in heads)


def _file_digest(path: Path) -> str:
    return sha256_file(path)[:16]


# ------------------------------------------------------------------ weight sources
@WEIGHT_SOURCES.register("hub")
def _from_hub(model: "ModelSpec", num_classes: int, ctx: "RunContext | None", kwargs: dict, seed: int) -> _Loaded:
    import timm

    try:
        module = timm.create_model(model.arch, pretrained=True, num_classes=num_classes, **kwargs)
    except (RuntimeError, OSError) as e:  # no weights for the arch, or no network / cache
        raise ModelLoadError(
            f"could not load timm's pretrained weights for {model.arch!r}: {e}. Hub weights need network "
            "access (or a filled Hugging Face cache); offline, use `weights: file` with a local state dict "
            "or `weights: pretrain`.") from e
    cfg = module.pretrained_cfg or {}
    tag = cfg.get("tag") or ""
    name = f"{cfg.get('architecture') or model.arch}.{tag}" if tag else model.arch
    return _Loaded(module, f"hub:{name}", source_classes=int(cfg.get("num_classes") or 0) or None)


@WEIGHT_SOURCES.register("random")
def _random(model: "ModelSpec", num_classes: int, ctx: "RunContext | None", kwargs: dict, seed: int) -> _Loaded:
    import timm

    module = timm.create_model(model.arch, pretrained=False, num_classes=num_classes, **kwargs)
    return _Loaded(module, f"random:{model.arch}:seed={seed}", source_classes=None)


def _load_through_timm(arch: str, path: Path, num_classes: int, source_classes: int | None,
                       kwargs: dict) -> tuple[nn.Module, int]:
    """Load a timm-format state dict via timm's pretrained path (``pretrained_cfg_overlay`` with the
    file and the file's head size, so timm drops a head of another size), then check that every
    non-head tensor came from the file: timm loads non-strictly whenever it drops the old head, and a
    file of another architecture must not leave a silently random-initialised model behind."""
    import timm
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ModelLoadError(f"could not read weights file {path}: {type(e).__name__}: {e}") from e
    pcfg = timm.models.get_pretrained_cfg(arch)
    heads = getattr(pcfg, "classifier", None) or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    if source_classes is None:  # the file's head size, from its classifier weight
        w = next((state[f"{h}.weight"] for h in heads if f"{h}.weight" in state), None)
        source_classes = int(w.shape[0]) if w is not None else int(getattr(pcfg, "num_classes", 0) or 0)
    given = {k for k in state if not _is_head_key(k, heads)}
    del state
    overlay = {"file": str(path), "num_classes": source_classes}
    try:
        module = timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                   pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:  # missing keys (strict load) or shape mismatches
        raise ModelLoadError(f"weights file {path} does not fit timm architecture {arch!r}: {e}") from e
    expected = {k for k in module.state_dict() if not _is_head_key(k, heads)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights file {path} does not match timm architecture {arch!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). It must be a state "
            f"dict of timm.create_model({arch!r}) (torch.save(model.state_dict(), path)).")
    return module, source_classes


@WEIGHT_SOURCES.register("file")
def _from_file(model: "ModelSpec", num_classes: int, ctx: "RunContext | None", kwargs: dict, seed: int) -> _Loaded:
    if not model.weights_file:
        raise ModelLoadError(f"model {model.name!r}: weights 'file' needs weights_file (a path to a state dict)")
    path = Path(model.weights_file).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model {model.name!r}: weights file {path} does not exist")
    module, src = _load_through_timm(model.arch, path, num_classes, None, kwargs)
    return _Loaded(module, f"file:{_file_digest(path)}", source_classes=src)


def pretrain_checkpoint(model: "ModelSpec", ctx: "RunContext") -> tuple[Path, Path]:
    """(model.pth, meta.json) of a ``weights: pretrain`` model under the run's storage."""
    folder = ctx.layout.checkpoint_dir(model.pretrain_trial().key)
    return folder / CHECKPOINT_FILE, folder / META_FILE


def read_meta(path: Path) -> dict[str, Any] | None:
    """A pretrain checkpoint's meta.json, or None when the checkpoint is incomplete or absent."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") else None


def _checksum_problem(pth: Path, meta: Mapping[str, Any], digest: str | None = None) -> str | None:
    """Why ``pth`` does not match the SHA-256 its meta.json recorded, or None (also for checkpoints
    written before checksums were recorded: nothing to compare)."""
    expected = meta.get("sha256")
    if not expected:
        return None
    digest = digest or sha256_file(pth)
    if digest == expected:
        return None
    return (f"pretrain checkpoint {pth} ({pth.stat().st_size} bytes) has SHA-256 {digest[:16]}…, not the "
            f"{str(expected)[:16]}… recorded in {pth.parent / META_FILE}: it is truncated or corrupted")


def pretrain_checkpoint_problem(folder: Path) -> str | None:
    """Why the pretrain checkpoint in ``folder`` cannot be used (absent, incomplete, corrupt), or None
    when it is complete and intact. The sweep driver retrains the ones that have a problem."""
    pth, meta_path = Path(folder) / CHECKPOINT_FILE, Path(folder) / META_FILE
    meta = read_meta(meta_path)
    if meta is None or not pth.is_file():
        return f"no complete pretrain checkpoint in {folder}"
    return _checksum_problem(pth, meta)


@WEIGHT_SOURCES.register("pretrain")
def _from_pretrain(model: "ModelSpec", num_classes: int, ctx: "RunContext | None", kwargs: dict, seed: int) -> _Loaded:
    if ctx is None:
        raise ModelLoadError(f"model {model.name!r}: weights 'pretrain' needs a RunContext (where checkpoints live)")
    pth, meta_path = pretrain_checkpoint(model, ctx)
    meta = read_meta(meta_path)
    if meta is None or not pth.is_file():
        raise MissingCheckpointError(
            f"model {model.name!r}: no pretrain checkpoint at {pth.parent} — the pretrain stage must run first "
            f"(`xfer sweep` runs it before the grid; storage is {ctx.layout.storage})")
    if meta.get("arch") != model.arch:
        raise ModelLoadError(f"pretrain checkpoint {pth} is for {meta.get('arch')!r}, not {model.arch!r}")
    digest = sha256_file(pth)  # one read: the integrity check and the fingerprint
    problem = _checksum_problem(pth, meta, digest)
    if problem:
        raise ModelLoadError(f"model {model.name!r}: {problem}. Refusing to load it; rerun `xfer sweep` (its "
                             f"pretrain stage retrains a corrupt checkpoint) or delete {pth.parent}")
    module, _ = _load_through_timm(model.arch, pth, num_classes, int(meta["num_classes"]), kwargs)
    return _Loaded(module, f"pretrain:{meta.get('trial_key')}:{digest[:16]}",
                   source_classes=int(meta["num_classes"]), data_config=meta.get("data_config"))


# ------------------------------------------------------------------ preprocessing
def data_config_from_timm(module: nn.Module) -> DataConfig:
    """The model's pretrained preprocessing (timm ``resolve_model_data_config``) as a DataConfig."""
    import timm

    cfg = timm.data.resolve_model_data_config(module)
    interp = str(cfg.get("interpolation") or "bilinear").lower()
    if interp not in INTERPOLATIONS:
        log.warning("interpolation %r is not supported on tensors; using bilinear", interp)
        interp = "bilinear"
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    if crop_pct > 1:  # a few timm configs resize below the crop size; centre crops cannot do that
        log.warning("crop_pct %.3f > 1 clipped to 1.0", crop_pct)
        crop_pct = 1.0
    return DataConfig(input_size=int(cfg["input_size"][-1]), mean=tuple(float(x) for x in cfg["mean"]),
                      std=tuple(float(x) for x in cfg["std"]), interpolation=interp, crop_pct=crop_pct)


def data_config_to_dict(cfg: DataConfig) -> dict[str, Any]:
    return {"input_size": cfg.input_size, "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct}


def data_config_from_dict(d: Mapping[str, Any]) -> DataConfig:
    return DataConfig(input_size=int(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                      interpolation=str(d.get("interpolation", "bilinear")), crop_pct=float(d.get("crop_pct", 0.875)))


# ------------------------------------------------------------------ entry point
def load_backbone(model: "ModelSpec", *, num_classes: int, ctx: "RunContext | None" = None,
                  seed: int = 0, create_kwargs: Mapping[str, Any] | None = None) -> Backbone:
    """Build ``model.arch`` with weights from ``model.weights`` and a new ``num_classes``-way head
    (0: no head, pooled features). ``seed`` fixes every random initialisation (the head, or the whole
    network for ``random``) without disturbing the caller's RNG. ``create_kwargs`` go to
    ``timm.create_model`` as they are (source training's regularisers: ``drop_rate`` — dropout before the
    classifier — and ``aux_logits`` for an architecture with its own auxiliary classifier, whose tensors the
    pretrain regime leaves out of the checkpoint it saves)."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ModelLoadError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    check_arch(model.arch, pretrained=model.weights == "hub")
    loader = WEIGHT_SOURCES.get(model.weights)
    kwargs = {**_create_kwargs(model), **dict(create_kwargs or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded = loader(model, num_classes, ctx, kwargs, seed)
        module = loaded.module
        if loaded.source_classes is not None and num_classes == loaded.source_classes and num_classes > 0:
            # timm keeps a head whose size matches; the regimes always train a new one
            module.reset_classifier(num_classes)
        if num_classes > 0:
            init_new_head(module)
    if loaded.data_config is not None:
        cfg = data_config_from_dict(loaded.data_config)
    else:
        cfg = data_config_from_timm(module)
    if model.input_size is not None:
        cfg = replace(cfg, input_size=int(model.input_size))
    return Backbone(model=module, data_config=cfg, fingerprint=loaded.fingerprint)


# ------------------------------------------------------------------ source accuracy
def source_table() -> list[dict[str, Any]]:
    """The shipped table: arch, paper_model, top1 (fraction or None), input_size (px the figure was
    measured at), source, stand_in (bool)."""
    return [r.to_dict() for r in read_table()]


def _full_name(arch: str) -> str:
    """``arch`` with timm's default pretrained tag when none is given (``resnet50`` → ``resnet50.a1_in1k``)."""
    if "." in arch:
        return arch
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    tag = getattr(cfg, "tag", None) if cfg is not None else None
    return f"{arch}.{tag}" if tag else arch


def published_figure(arch: str) -> dict[str, Any] | None:
    """timm's published ImageNet figure for these weights (top1 and the input size it was measured
    at), if the shipped table has them."""
    name = _full_name(arch)
    return next((r.to_dict() for r in read_table() if r.arch == name), None)


def published_top1(arch: str) -> float | None:
    """timm's published ImageNet top-1 for these weights, if the shipped table has them."""
    row = published_figure(arch)
    return row["top1"] if row else None


def source_top1(model: "ModelSpec", ctx: "RunContext | None" = None) -> float | None:
    """Source (ImageNet) top-1 as a fraction: the spec's ``source_top1``, else the value the pretrain
    regime measured (``weights: pretrain``), else timm's published figure (``weights: hub``), else None.
    A published figure is at its own input size (``published_figure``); ``xfer.source_accuracy.model_facts``
    says when a model runs at another."""
    if model.source_top1 is not None:
        return float(model.source_top1)
    if model.weights == "pretrain":
        if ctx is None:
            return None
        meta = read_meta(pretrain_checkpoint(model, ctx)[1])
        if meta is None or meta.get("source_top1") is None:
            log.warning("model %s: no measured source accuracy yet (pretrain checkpoint missing)", model.name)
            return None
        return float(meta["source_top1"])
    if model.weights == "hub":
        return published_top1(model.arch)
    return None
