"""Command line: thin sub-commands over the library. User mistakes (bad spec, unknown names, bad
flags) print one ``error: …`` line and exit 2 — never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("xfer")

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for; printed without a traceback."""


# the user-facing error types (module, class): printed as one `error: …` line, exit 2
USER_ERRORS = (("xfer.spec", "SpecError"), ("xfer.options", "OptionError"), ("xfer.layout", "LayoutError"),
               ("xfer.registry", "UnknownNameError"), ("xfer.tracking.uri", "TrackingError"),
               ("xfer.report", "ResultsTableError"), ("xfer.select", "SelectionError"), ("xfer.io", "StorageError"),
               ("xfer.cost", "CostError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Only modules already imported can have raised their errors: looking them up in ``sys.modules``
    keeps an error message from importing pandas or matplotlib just to print itself."""
    found = [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return (UsageError, FileNotFoundError, *found)


def _axis_flags() -> dict[str, str]:
    """Every grid axis a registered regime declares → its help (``xfer trial`` gets a flag for each)."""
    from xfer.regimes import REGIMES

    out: dict[str, str] = {}
    for name in REGIMES.names():
        for a in REGIMES.get(name).axes:
            out.setdefault(a.name, f"{a.help} ({', '.join(r for r in REGIMES.names() if a.name in REGIMES.get(r).axis_names)})")
    return out


def _named_axes() -> set[str]:
    """Axes some regime declares with names (``--pool max``): their flags take a name as well as a number."""
    from xfer.regimes import REGIMES

    return {a.name for r in REGIMES.names() for a in REGIMES.get(r).axes if a.names}


# ------------------------------------------------------------------ xfer trial
def _axis_arg(text: str) -> float | str:
    """An axis flag's value: a number, or a name (a named axis such as ``--pool max``; the axis checks it)."""
    try:
        return float(text)
    except ValueError:
        return text


def _add_trial(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm architecture, optionally with a tag (resnet50.tv_in1k)")
    p.add_argument("--weights", default="hub",
                   help="hub (timm pretrained), random, or a path to a state-dict file (default: hub)")
    p.add_argument("--dataset", required=True, help="a registered dataset (see `xfer datasets`)")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a dataset option, e.g. path=/data/mine (repeatable)")
    from xfer.regimes import REGIMES

    p.add_argument("--regime", required=True, help=" | ".join(REGIMES.names()))
    named = _named_axes()
    for name, help_ in _axis_flags().items():  # a number axis: argparse says "invalid float value" itself
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"axis_{name}", type=_axis_arg if name in named else float,
                       help=help_)
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other regime option, e.g. eval_every=50 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, help="override the model's input size (pixels)")
    p.add_argument("--stage", default="grid", choices=["grid", "final"],
                   help="grid: train on train, report val; final: train on train+val, report test")
    p.add_argument("--storage", default="./xfer-results", help="checkpoints and feature cache")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--download", action="store_true", help="allow dataset downloads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the result")


def _parse_kv(items: list[str], flag: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)  # numbers/bools as YAML reads them
    return out


def trial_from_args(args: argparse.Namespace):
    """Build and validate a TrialSpec from `xfer trial` flags through the same checks a spec file gets:
    the regime's own axes are its hyper-parameter flags; an axis flag of another regime is refused
    unless this regime has an option of that name (pretrain's lr/wd)."""
    from xfer.options import OptionError
    from xfer.regimes import REGIMES
    from xfer.spec import SpecError, dataset_ref, model_spec
    from xfer.trial import TrialSpec

    if args.regime not in REGIMES:
        raise UsageError(f"--regime: {REGIMES.unknown_message(args.regime)}")
    regime = REGIMES.get(args.regime)
    model_raw: dict[str, Any] = {"name": args.model, "arch": args.model, "weights": args.weights}
    if args.weights == "pretrain":
        raise UsageError("--weights pretrain needs a sweep file; pass the checkpoint file path instead")
    if args.input_size is not None:
        model_raw["input_size"] = args.input_size
    if not regime.grid or "weights" not in regime.model_identity:
        model_raw["weights"] = "random"  # the regime trains from random initialisation
    try:
        model = model_spec(model_raw, "--model/--weights", [args.seed])
        dataset = dataset_ref({"name": args.dataset, **_parse_kv(args.dataset_option, "--dataset-option")},
                              "--dataset")
    except SpecError as e:
        raise UsageError(str(e)) from None
    if model.weights == "file" and not Path(model.weights_file).expanduser().is_file():
        raise UsageError(f"--weights: no such weights file {model.weights_file}; valid: hub, random, "
                         "or the path of an existing state-dict file")
    given = {name: getattr(args, f"axis_{name}") for name in _axis_flags()}
    given.update(steps=args.steps, batch_size=args.batch_size)
    given = {k: v for k, v in given.items() if v is not None}
    flags = ", ".join(f"--{a.replace('_', '-')}" for a in regime.axis_names) or "none"
    for name in list(given):
        if name not in regime.axis_names and name not in regime.defaults:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to regime {args.regime!r}; its "
                             f"hyper-parameters: {flags}")
    hparams: dict[str, float] = {}
    for a in regime.axes:
        if a.name not in given and a.default is None:
            raise UsageError(f"--{a.name.replace('_', '-')} is required for regime {args.regime!r} "
                             f"(its hyper-parameters: {flags})")
        if a.name in given:  # a cell axis left out runs its default (and keys as a trial without it)
            hparams[a.name] = given.pop(a.name)
    try:
        hparams = {a.name: a.check(hparams[a.name], f"--{a.name.replace('_', '-')}") for a in regime.axes
                   if a.name in hparams}
        options = regime.check_options({**given, **_parse_kv(args.option, "--option")},
                                       f"regime {args.regime} option")
    except OptionError as e:
        raise UsageError(str(e)) from None
    stage = "pretrain" if not regime.grid else args.stage
    return TrialSpec(model=model, dataset=dataset, regime=args.regime, hparams=hparams, options=options,
                     seed=args.seed, stage=stage, key_rule=regime.key_rule)


def cmd_trial(args: argparse.Namespace) -> int:
    import time

    from xfer.contract import RunContext
    from xfer.regimes import run_trial

    trial = trial_from_args(args)
    ctx = RunContext.local(args.storage, args.data_root, download=args.download, device=args.device,
                     report=lambda step, m: print(f"  step {step:>6}  " + "  ".join(
                         f"{k}={v:.4g}" for k, v in m.items()), flush=True))
    print(f"trial {trial.key}: {args.model} on {args.dataset}, {args.regime} {dict(trial.hparams)}", flush=True)
    t0 = time.perf_counter()
    result = run_trial(trial, ctx)
    seconds = time.perf_counter() - t0
    print(f"status: {result.status}" + (f" ({result.message})" if result.message else ""))
    for k, v in sorted(result.metrics.items()):
        print(f"{k}: {v:.4f}")
    print(f"time: {seconds:.1f}s")
    if args.json:
        flat = {k: v for k, v in result.to_json().items() if k != "metrics"}
        print(json.dumps({**flat, **result.metrics, "trial_key": trial.key, "seconds": round(seconds, 2)}))
    return 0 if result.status in ("finished", "diverged") else 1


# ------------------------------------------------------------------ xfer plan / datasets / models
def _add_plan(p: argparse.ArgumentParser) -> None:
    from xfer.cost import DEFAULT_GPU_PROFILE, DEVICE_PROFILES

    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="machine output: the counts, and the cost under 'cost'")
    p.add_argument("--counts-only", action="store_true",
                   help="trial counts only: no cost estimate (imports no timm, counts no FLOPs)")
    p.add_argument("--calibrate", action="store_true",
                   help="first time each network's training and forward steps on --device and cache the speeds "
                        "under <storage>/calibration (a plan without this flag reads the cache, never times)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="with --calibrate: what to time on (default: cuda when there is one, else cpu)")
    p.add_argument("--device-profile", default=DEFAULT_GPU_PROFILE, metavar="NAME",
                   help=f"the GPU the FLOP model assumes where nothing is calibrated: {' | '.join(DEVICE_PROFILES.names())} "
                        f"(default {DEFAULT_GPU_PROFILE}; regimes without a GPU use 'cpu')")
    p.add_argument("--gpus", type=float, default=1, help="GPUs for the wall-time figure (default 1)")
    p.add_argument("--cpus", type=float, help="CPU cores for the wall-time figure (default: this machine's)")
    p.add_argument("--storage", help="override the spec's storage (where the calibration cache lives)")


def cmd_plan(args: argparse.Namespace) -> int:
    from xfer.spec import load_spec, plan

    if args.device and not args.calibrate:
        raise UsageError("--device says what --calibrate times on; a plan reads the calibration cache (add --calibrate)")
    spec = load_spec(args.spec)
    p = plan(spec)
    cost = None
    if not args.counts_only:
        from xfer import cost as cost_model
        from xfer.layout import StorageLayout

        cost_model.profile(args.device_profile)  # an unknown name fails before any work
        layout = StorageLayout(Path(args.storage or spec.storage), Path(spec.data_root))
        if args.calibrate:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            cost_model.calibrate(spec, device, layout=layout, log=lambda m: print(m, file=sys.stderr, flush=True))
        cost = cost_model.plan_cost(spec, layout=layout, device_profile=args.device_profile, gpus=args.gpus,
                                    cpus=args.cpus)
    if args.json:
        print(json.dumps({**p, **({"cost": cost.to_json()} if cost else {})}, indent=2))
        return 0
    print(f"sweep {p['sweep']}: {p['models']} models × {p['datasets']} datasets × {p['seeds']} seed(s)")
    for r, n in p["by_regime"].items():
        grid = " × ".join(f"{a}:{k}" for a, k in p["grids"][r].items())
        shared = p["distinct_by_regime"][r]
        note = f"; {shared} distinct, model entries share the rest" if shared < n else ""
        print(f"  {r:<14} {n:>7} trials  ({p['per_cell_by_regime'][r]} per model/dataset: {grid}{note})")
    print(f"  {'grid total':<14} {p['total']:>7}" + (f"  ({p['distinct']} distinct)" if p["distinct"] < p["total"] else ""))
    print(f"  {'pretrain':<14} {p['pretrain']:>7}  (source-training runs before the grid)")
    print(f"  {'final':<14} {p['final']:>7}  (retrain best config on train+val, test once)")
    if args.verbose:
        for cell, n in p["by_model_dataset"].items():
            print(f"    {cell}: {n}")
    if cost is not None:
        print("cost (device-hours per stage and model; hours = GPU-hours or CPU-core-hours as the row says):")
        print("\n".join(cost_model.format_plan(cost)))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from xfer.data import DATASETS

    def size(n: int | None) -> str:
        return "—" if n is None else f"{n:,}"

    print(f"{'name':<16} {'classes':>7}  {'metric':<15} {'validation':<12} {'offline':<7} {'train+val':>9} "
          f"{'val':>6} {'test':>7}  options")
    for name in DATASETS.names():
        e = DATASETS.get(name)
        i, paper = e.info, e.paper
        val = size(paper.val) if paper and paper.val else (
            f"{e.options['val_fraction']:.0%}" if paper and "val_fraction" in e.options else "—")
        opts = ", ".join(sorted(e.options))
        print(f"{name:<16} {i.num_classes:>7}  {i.metric:<15} {i.val_rule:<12} {'yes' if i.offline else 'no':<7} "
              f"{size(paper.trainval if paper else None):>9} {val:>6} {size(paper.test if paper else None):>7}  "
              f"{opts}")
    print("train+val / val / test: the published sizes (Kornblith et al. 2019, Table A1); val is the official "
          "split, or the share of train+val held out. A build at the default options warns when the files on "
          "disk give other sizes.")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.all:
        import timm

        print("\n".join(timm.list_models(args.filter or "*")))
        return 0
    from xfer.models import source_table

    print("Any timm architecture works (`xfer models --all`). Shipped ImageNet top-1 table "
          "(timm's published results) for the paper's models:")
    print(f"{'arch':<40} {'paper model':<24} {'top-1':>6}  note")
    for row in source_table():
        top1 = f"{100 * float(row['top1']):.2f}" if row.get("top1") not in (None, "") else "  —"
        note = "stand-in" if str(row.get("stand_in", "")).lower() in ("1", "true", "yes") else ""
        print(f"{row['arch']:<40} {row.get('paper_model', ''):<24} {top1:>6}  {note}")
    return 0


# ------------------------------------------------------------------ xfer sweep / report / submit
def _size_arg(text: str) -> int:
    """argparse type for sizes (``2GB``, ``500MB``, ``0``): a bad one is a usage error naming the forms."""
    from xfer.io import parse_size

    try:
        return parse_size(text, "size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a sweep file (sweeps/*.yaml)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, the spec, sqlite:///mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", help="override the spec's storage path")
    p.add_argument("--data-root", help="override the spec's data_root")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep from Ray's storage")
    p.add_argument("--no-final", action="store_true", help="stop after the grid (no final stage or report)")
    p.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    p.add_argument("--report-dir", help="where the report goes (default: <storage>/reports/<sweep>)")
    p.add_argument("--min-free", metavar="SIZE", type=_size_arg,
                   help="free space the storage must have before anything starts, e.g. 2GB or 0 (off); "
                        "default: the spec's min_free_space (256MB)")
    p.add_argument("--quiet", action="store_true", help="only the summary")


def cmd_sweep(args: argparse.Namespace) -> int:
    from xfer.sweep import run_sweep_cli

    return run_sweep_cli(args)


def _add_report(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="MLflow experiment (sweep name) to read final-stage runs from")
    src.add_argument("--from-csv", help="a results table made elsewhere (columns: see README)")
    p.add_argument("--spec", help="with --experiment: select only among this sweep file's grid trials")
    p.add_argument("--tracking-uri")
    p.add_argument("--out", help="output folder (default: ./reports/<name>)")


def cmd_report(args: argparse.Namespace) -> int:
    from xfer.final import report_cli

    return report_cli(args)


def _add_submit(p: argparse.ArgumentParser) -> None:
    from xfer import k8s

    k8s.configure_parser(p)


def cmd_submit(args: argparse.Namespace) -> int:
    from xfer import k8s

    return k8s.main(args)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None, Callable[[argparse.Namespace], int]]] = {
    "trial": ("run one trial from flags (no Ray, no MLflow)", _add_trial, cmd_trial),
    "plan": ("print a sweep's trial counts and what it will cost in device-hours", _add_plan, cmd_plan),
    "sweep": ("run a sweep with Ray Tune, tracked in MLflow", _add_sweep, cmd_sweep),
    "report": ("selection + correlation report", _add_report, cmd_report),
    "datasets": ("list registered datasets", None, cmd_datasets),
    "models": ("list the shipped source-accuracy table (or timm's models)", None, cmd_models),
    "submit": ("submit a sweep to Kubernetes as a KubeRay RayJob", _add_submit, cmd_submit),
}


def _plugin_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=add_help, prog="xfer",
                                description="Transfer-learning studies with Ray Tune and MLflow.")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module that registers regimes or datasets first (repeatable; a sweep file "
                        "names its own under `plugins:`)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _plugin_parser(add_help=True)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if add is not None:
            add(p)
    models_p = sub.choices["models"]
    models_p.add_argument("--all", action="store_true", help="list every timm architecture")
    models_p.add_argument("--filter", help="wildcard for --all, e.g. 'resnet*'")
    return parser


def main(argv: list[str] | None = None) -> int:
    from xfer.plugins import PluginError, import_plugins

    early, _ = _plugin_parser().parse_known_args(argv)
    try:  # plugins first: their regimes' axes become `xfer trial` flags
        import_plugins(early.plugin, "--plugin")
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _, _, fn = COMMANDS[args.command]
    try:
        return fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
