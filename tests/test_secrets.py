"""No credential leaks: a random secret is planted in the environment (MLflow, AWS and database
credentials) and in the tracking URI's userinfo (``http://user:<secret>@127.0.0.1:<port>``) of a real
``mlflow server``; a tiny real sweep then runs, and every place a value can land is searched for it:
each param, tag and metric name of every run (parent and children), each artifact file, the printed
output, the log records, Ray's storage folder, and the RayJob ``xfer submit --dry-run`` renders.

Plus the other input-trust rules: YAML only through ``yaml.safe_load`` (a ``!!python/object`` tag is a
clean SpecError), ``torch.load`` only with ``weights_only=True`` (a checkpoint that carries code is
ignored, not run). The Dockerfile's non-root user is checked in tests/test_k8s.py."""
from __future__ import annotations

import io
import logging
import os
import re
import secrets
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET = secrets.token_hex(16)
USER = "xfer-user"


def plant_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret as the environment of a real deployment would carry it."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAXFERTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://xfer:{SECRET}@db.example:5432/xfer")
    monkeypatch.setenv("PGPASSWORD", SECRET)


def hits_in_text(text: str, where: str) -> list[str]:
    return [f"{where}: …{text[max(0, i - 60):i + 40]!r}…" for i in [m.start() for m in re.finditer(SECRET, text)]]


def hits_in_folder(folder: Path, where: str) -> list[str]:
    """Every file under ``folder`` (text or binary: a pickle holds strings verbatim)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and SECRET.encode() in p.read_bytes():
            out.append(f"{where}: {p.relative_to(folder)}")
    return out


# ------------------------------------------------------------------ the redaction helper
@pytest.mark.parametrize("uri, shown", [
    ("http://user:pw@host:5000", "http://user:***@host:5000"),
    ("https://user:pw@host/path?x=1", "https://user:***@host/path?x=1"),
    ("http://tokenonly@host:5000", "http://***@host:5000"),
    ("postgresql+psycopg://u:p%40ss@db:5432/mlflow", "postgresql+psycopg://u:***@db:5432/mlflow"),
    ("http://host:5000/?token=abc&x=1", "http://host:5000/?token=***&x=1"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("databricks", "databricks"),
])
def test_redact_uri(uri, shown):
    from xfer.tracking.uri import redact_uri

    assert redact_uri(uri) == shown


def test_a_sweep_file_may_not_hold_credentials(tmp_path):
    """A sweep file is committed and logged as ``spec.yaml``: a password in its tracking_uri is refused
    (and the error does not repeat it)."""
    from xfer.spec import SpecError, load_spec

    raw = {"name": "s", "models": [{"name": "m", "arch": "test_resnet", "weights": "random"}],
           "datasets": ["digits"], "regimes": {"linear_probe": {"grid": {"l2": [1.0]}}},
           "tracking_uri": f"http://{USER}:{SECRET}@127.0.0.1:5000"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="spec.tracking_uri: must not carry credentials") as e:
        load_spec(path)
    assert SECRET not in str(e.value)


# ------------------------------------------------------------------ yaml and torch.load
def test_yaml_is_only_loaded_safely():
    """No yaml.load / full_load / unsafe_load / Loader= anywhere in the package."""
    bad = re.compile(r"yaml\.(load|full_load|unsafe_load|load_all|full_load_all|unsafe_load_all)\(|[(,]\s*Loader\s*=")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "xfer").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not found, f"unsafe YAML loading: {found}"


def test_python_object_tag_in_a_sweep_file_is_a_spec_error(tmp_path):
    from xfer.spec import SpecError, load_spec

    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: evil\nmodels: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path [{str(marker)!r}]]\n")
    with pytest.raises(SpecError, match=r"evil.yaml: not valid YAML: could not determine a constructor"):
        load_spec(path)
    assert not marker.exists()


def test_torch_load_is_weights_only_everywhere():
    calls = [(p, line) for p in sorted((ROOT / "xfer").rglob("*.py"))
             for line in p.read_text().splitlines() if "torch.load(" in line]
    assert calls, "expected torch.load calls in xfer/"
    for p, line in calls:
        assert "weights_only=True" in line, f"{p.relative_to(ROOT)}: {line.strip()}"


class _Touch:
    """Unpickling this would create a file (what a malicious checkpoint could do instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_carries_code_is_ignored_not_run(tmp_path, caplog):
    import torch

    from xfer.engine import _try_resume

    marker = tmp_path / "ran"
    ckpt = tmp_path / "train_state.pt"
    torch.save({"run_id": "r", "step": 3, "model": {}, "optimizer": {}, "payload": _Touch(marker)}, ckpt)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="xfer.engine"):
        step, _, _ = _try_resume(ckpt, "r", model, opt, "cpu")
    assert step == 0 and not marker.exists()
    assert "not a plain training state" in caplog.text


# ------------------------------------------------------------------ the manifest
def test_rendered_rayjob_holds_no_credentials(monkeypatch, capsys):
    from xfer.cli import main

    plant_env(monkeypatch)
    monkeypatch.chdir(ROOT)
    assert main(["submit", "sweeps/quickstart.yaml", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert not hits_in_text(out.out + out.err, "xfer submit --dry-run (secret in the environment)")
    assert "kind: RayJob" in out.out

    rc = main(["submit", "sweeps/quickstart.yaml", "--dry-run",
               "--tracking-uri", f"http://{USER}:{SECRET}@xfer-mlflow:5000"])
    out = capsys.readouterr()
    hits = hits_in_text(out.out + out.err, "xfer submit --dry-run --tracking-uri with credentials")
    assert not hits, hits
    assert rc == 2 and "--tracking-uri must not carry credentials" in out.err, out.err
    assert "xfer-mlflow-client" in out.err  # says where credentials go instead


# ------------------------------------------------------------------ a real sweep against a real server
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (no auth: it ignores the credentials, the client still sends them)."""
    from mlflow_server import Server

    server = Server(tmp_path_factory.mktemp("server"),
                    env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")})
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


TINY = {
    "name": "secret-sweep",
    "seeds": [0],
    "models": [{"name": "rnd", "arch": "test_resnet", "weights": "random", "source_top1": 0.5}],
    "datasets": [{"name": "digits", "image_size": 8}],
    "regimes": {"linear_probe": {"grid": {"l2": [1e-3, 1e-1]}}},
    "resources": {"linear_probe": {"cpu": 1}},
}


@pytest.mark.integration
def test_no_secret_in_runs_artifacts_output_logs_or_storage(mlflow_server, tmp_path, monkeypatch, caplog, capfd):
    import ray
    from mlflow import MlflowClient

    from xfer.spec import load_spec
    from xfer.sweep import run_sweep

    plant_env(monkeypatch)
    uri = f"http://{USER}:{SECRET}@127.0.0.1:{mlflow_server}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    caplog.set_level(logging.DEBUG)
    store = tmp_path / "store"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**TINY, "storage": str(store), "data_root": str(tmp_path / "data")}))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             _node_ip_address="127.0.0.1")
    out = io.StringIO()
    try:
        result = run_sweep(load_spec(path), report_dir=str(tmp_path / "report"), stream=out)
    finally:
        ray.shutdown()
    printed = out.getvalue()
    assert "final" in printed and result.report, printed

    hits = hits_in_text(printed, "printed output")
    captured = capfd.readouterr()
    hits += hits_in_text(captured.out + captured.err, "stdout/stderr")
    for rec in caplog.records:
        hits += hits_in_text(rec.getMessage(), f"log record {rec.name}:{rec.lineno}")

    client = MlflowClient(uri)  # the client works with credentials in the URI
    exp = client.get_experiment_by_name(TINY["name"])
    hits += hits_in_text(repr(exp), "experiment")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    kinds = {"sweep" if r.data.tags.get("xfer.kind") == "sweep" else r.data.tags.get("xfer.stage") for r in runs}
    assert kinds == {"sweep", "grid", "final"}, kinds
    dl = tmp_path / "downloaded"
    for r in runs:
        rid = r.info.run_id
        hits += hits_in_text(repr(r.info), f"run {rid} info")
        for k, v in r.data.params.items():
            hits += hits_in_text(f"{k}={v}", f"run {rid} param {k}")
        for k, v in r.data.tags.items():
            hits += hits_in_text(f"{k}={v}", f"run {rid} tag {k}")
        for k in r.data.metrics:
            hits += hits_in_text(k, f"run {rid} metric name")
        if client.list_artifacts(rid):
            client.download_artifacts(rid, "", str(dl / rid))
    assert any(p.name == "spec.yaml" for p in dl.rglob("*")) and any(p.name == "predictions.npz" for p in dl.rglob("*"))
    hits += hits_in_folder(dl, "artifact")
    hits += hits_in_folder(tmp_path / "report", "report folder")
    hits += hits_in_folder(store, "storage (shared by every worker)")
    assert not hits, "the secret leaked:\n" + "\n".join(hits)


def test_credentials_leave_the_uri_for_the_environment(monkeypatch):
    """What the MLflow client is handed: the URI without userinfo, the credentials in its env vars."""
    from xfer.tracking.uri import TrackingError, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "old")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert resolve_tracking_uri(f"https://{USER}:{SECRET}%21@mlflow.example:443/base", None) == \
        "https://mlflow.example:443/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == USER and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET + "!"
    assert resolve_tracking_uri("sqlite:///x.db", None) == "sqlite:///x.db"
    with pytest.raises(TrackingError, match="credentials in a URI must be user:password") as e:
        resolve_tracking_uri(f"http://{SECRET}@127.0.0.1:5000", None)
    assert SECRET not in str(e.value)
