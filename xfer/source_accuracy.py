"""The shipped source-accuracy table (``source_top1.csv``) and what a model entry is, for the report:
which paper model it stands for, whether it is a stand-in, and the image size its source figure and its
transfer runs use.

Plain data, no torch: the spec loader, selection and the report read it without building a model
(``xfer.models`` adds the timm-tag resolution on top). Why each fact matters:

* ``stand_in``: timm has no weights for a few of the paper's models, so a sweep runs the nearest timm
  weights under the paper's name. Their rows measure another network; the report draws them apart and
  gives every correlation with and without them.
* ``input_size`` of a figure: a network's ImageNet top-1 depends on the resolution it is evaluated at
  (MobileNet v1: 75.4 % at 224 px, 76.1 % at 256 px). The figure on the x-axis must be the one at the
  size the study feeds the network, so the table records it and a model run at another size is flagged.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xfer import timm_names

if TYPE_CHECKING:
    from xfer.trial import ModelSpec

TABLE_PATH = Path(__file__).with_name("source_top1.csv")
TABLE_COLUMNS = ("arch", "paper_model", "top1", "input_size", "source", "stand_in")


class SourceTableError(ValueError):
    """The shipped table is malformed (a packaging bug); the message names the row and column."""


@dataclass(frozen=True)
class SourceFigure:
    """One published figure: ``top1`` (fraction, or None when unknown) of ``arch`` at ``input_size`` px."""

    arch: str
    paper_model: str
    top1: float | None
    input_size: int | None
    source: str
    stand_in: bool

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "paper_model": self.paper_model, "top1": self.top1,
                "input_size": self.input_size, "source": self.source, "stand_in": self.stand_in}


def _parse_bool(text: str, where: str) -> bool:
    v = text.strip().lower()
    if v not in ("true", "false"):
        raise SourceTableError(f"{where}: stand_in must be true or false, got {text!r}")
    return v == "true"


@lru_cache(maxsize=4)
def read_table(path: Path = TABLE_PATH) -> tuple[SourceFigure, ...]:
    """The table's rows (``#`` lines are comments). Every column of ``TABLE_COLUMNS`` is required."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    reader = csv.DictReader(lines)
    missing = [c for c in TABLE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise SourceTableError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(TABLE_COLUMNS)}")
    rows = []
    for i, row in enumerate(reader, start=2):
        where = f"{path} row {i} ({row['arch']})"
        top1, size = row["top1"].strip(), row["input_size"].strip()
        try:
            rows.append(SourceFigure(arch=row["arch"].strip(), paper_model=row["paper_model"].strip(),
                                     top1=float(top1) if top1 else None, input_size=int(size) if size else None,
                                     source=row["source"].strip(), stand_in=_parse_bool(row["stand_in"], where)))
        except ValueError as e:
            if isinstance(e, SourceTableError):
                raise
            raise SourceTableError(f"{where}: top1 must be a fraction and input_size an integer: {e}") from None
    return tuple(rows)


def figure(arch: str) -> SourceFigure | None:
    """The shipped figure for exactly these weights (a tagged timm name), or None."""
    return next((r for r in read_table() if r.arch == arch), None)


def run_input_size(model: "ModelSpec") -> int | None:
    """The image size a transfer trial feeds the network: the entry's ``input_size``, else the size of
    timm's pretrained config for the weights (None when timm has no config for the name)."""
    if model.input_size is not None:
        return int(model.input_size)
    pre = timm_names.preprocessing(model.arch)
    return int(pre["input_size"]) if pre else None


def is_stand_in(model: "ModelSpec") -> bool:
    """Whether the entry runs other weights than the paper model it is named for: its declared
    ``stand_in``, else the shipped table's verdict for these weights under that paper name, else False
    (an entry without a paper name is itself)."""
    if model.stand_in is not None:
        return bool(model.stand_in)
    if not model.paper_name:
        return False
    row = figure(model.arch)
    return bool(row is not None and row.paper_model == model.paper_name and row.stand_in)


def model_facts(model: "ModelSpec", source_input_size: int | None = None) -> dict[str, Any]:
    """What the results table and the report say about a model entry: ``paper_name``, ``stand_in``,
    ``input_size`` (the size its trials use) and ``source_input_size`` (the size its source top-1 was
    measured at: the shipped figure's for hub weights, the run's own for a ``pretrain`` checkpoint, which
    is measured at the entry's size; unknown for a spec's ``source_top1`` override unless given)."""
    size = run_input_size(model)
    if source_input_size is None and model.source_top1 is None:
        if model.weights == "hub":
            row = figure(model.arch)
            source_input_size = row.input_size if row is not None else None
        elif model.weights == "pretrain":
            source_input_size = size
    return {"paper_name": model.paper_name or "", "stand_in": is_stand_in(model), "input_size": size,
            "source_input_size": source_input_size}
