"""Run what k8s/ describes, on this machine: no Kubernetes API server can run here, so the test plays
kubelet and KubeRay itself, reading every command, argument, environment variable and Ray start
parameter from the manifests (nothing below restates them):

- Postgres from the StatefulSet: the postgres image's first-start steps (initdb with POSTGRES_USER and
  POSTGRES_PASSWORD, create POSTGRES_DB, run the init ConfigMap's *.sql with psql), on a free loopback port;
- the MLflow server from the Deployment: its exact command and args, env resolved from the Secrets
  (secretKeyRef) with kubelet's $(VAR) expansion, ConfigMap and volume mounts mapped to temp dirs,
  Service names mapped to 127.0.0.1 and ports to free ports;
- the RayJob that `xfer submit` renders (its rayClusterSpec equals k8s/base/raycluster.yaml): a Ray head
  and one worker with `ray start --block` from the groups' rayStartParams, num-cpus/num-gpus derived from
  the container limits as KubeRay does, scaled to this machine; Ray token auth and the MLflow credentials
  as pod env, the way KubeRay and the Secrets provide them;
- the submission the way KubeRay's submitter pod does it: `ray job submit --address ... --runtime-env-json
  <runtimeEnvYAML as JSON> --submission-id <id> -- <entrypoint>` (the submitter has no MLflow credentials).

Then the trials must be in MLflow (REST API, with basic auth) and in Postgres (SQL on the runs table),
the basic-auth users in their own database, and the artifacts under --artifacts-destination.

What this cannot show: scheduling (GPU requests, the taint toleration, the autoscaler, the ReadWriteMany
claim), NetworkPolicy enforcement, probes as the kubelet runs them, image contents. Processes are stopped
by process group (`ray start --block` and the MLflow server run in sessions of their own; `ray stop`
would stop every Ray on the machine) and Postgres with `pg_ctl stop`.
"""
from __future__ import annotations

import argparse
import base64
import configparser
import copy
import json
import math
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from xfer import k8s

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "k8s" / "base"
BIN = Path(sys.executable).parent
PLACEHOLDER = re.compile(r"^CHANGE-ME(-[a-z0-9-]+)?$")
LOCAL_CPUS_PER_NODE = 1  # one CPU and a small object store per Ray node on this machine
OBJECT_STORE_BYTES = 100 * 1024 * 1024

TEST_SPEC = """\
name: xfer-deploy-test
description: quickstart-sized sweep for tests/test_deploy_local.py
seeds: [0]
models:
  - {name: convnext-random, arch: test_convnext, weights: random, input_size: 32, source_top1: 0.5}
datasets:
  - digits
regimes:
  linear_probe:
    grid: {l2: [1.0e-3, 1.0e-1]}
resources:
  linear_probe: {cpu: 1}
"""


# ------------------------------------------------------------------ reading the manifests
def base_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for p in sorted(BASE.glob("*.yaml")):
        if p.name in ("kustomization.yaml", "secret.example.yaml"):
            continue
        for d in yaml.safe_load_all(p.read_text()):
            if d:
                out[(d["kind"], d["metadata"]["name"])] = d
    return out


def fill_secret_template() -> dict[tuple[str, str], str]:
    """The Secrets a user would create from secret.example.yaml: every placeholder gets a random value
    (equal placeholders equal values, as the template asks); other values stay as written."""
    chosen: dict[str, str] = {}
    out = {}
    for d in yaml.safe_load_all((BASE / "secret.example.yaml").read_text()):
        for key, value in d["stringData"].items():
            if PLACEHOLDER.match(value):
                value = chosen.setdefault(value, secrets.token_hex(16))
            out[(d["metadata"]["name"], key)] = value
    return out


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args/env values ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(container: dict[str, Any], secret_values: dict[tuple[str, str], str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = kubelet_expand(str(e["value"]), env)
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret_values[(ref["name"], ref["key"])]
        else:
            raise AssertionError(f"env {e['name']}: source {e.get('valueFrom')} is not emulated")
    return env


def parse_quantity(q: Any) -> float:
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_start_args(group: dict[str, Any], *, cpu_cap: int, gpu_cap: int) -> list[str]:
    """`ray start` flags for a RayCluster group, as KubeRay builds them: rayStartParams as written, and
    num-cpus / num-gpus taken from the container limits when rayStartParams leaves them out (rounded
    up, as KubeRay does), capped to what this machine can give one node. dashboard-host 0.0.0.0 becomes
    loopback: nothing outside this machine may reach the test's cluster."""
    params = dict(group.get("rayStartParams") or {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(min(math.ceil(parse_quantity(limits["cpu"])), cpu_cap))
    if "num-gpus" not in params:
        params["num-gpus"] = str(min(int(limits.get("nvidia.com/gpu", 0)), gpu_cap))
    if params.get("dashboard-host") == "0.0.0.0":
        params["dashboard-host"] = "127.0.0.1"
    return [f"--{k}={v}" for k, v in params.items()]


def test_ray_start_params_come_from_the_raycluster_yaml() -> None:
    """The emulation reads the head/worker parameters from the manifest: change the manifest, the
    `ray start` flags change with it."""
    rc = base_objects()[("RayCluster", "xfer")]["spec"]
    head = ray_start_args(rc["headGroupSpec"], cpu_cap=LOCAL_CPUS_PER_NODE, gpu_cap=0)
    assert {"--num-cpus=0", "--num-gpus=0", "--dashboard-host=127.0.0.1"} <= set(head)
    (worker_group,) = rc["workerGroupSpecs"]
    assert set(ray_start_args(worker_group, cpu_cap=64, gpu_cap=8)) == {"--num-cpus=8", "--num-gpus=1"}
    assert set(ray_start_args(worker_group, cpu_cap=1, gpu_cap=0)) == {"--num-cpus=1", "--num-gpus=0"}
    changed = copy.deepcopy(rc)
    changed["headGroupSpec"]["rayStartParams"]["num-cpus"] = "3"
    changed["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "2500m"
    assert "--num-cpus=3" in ray_start_args(changed["headGroupSpec"], cpu_cap=64, gpu_cap=0)
    assert "--num-cpus=3" in ray_start_args(changed["workerGroupSpecs"][0], cpu_cap=64, gpu_cap=0)
    # and the RayJob that `xfer submit` sends brings exactly this cluster
    assert k8s.render_rayjob(sweep="x", spec_path="sweeps/x.yaml")["spec"]["rayClusterSpec"] == rc


# ------------------------------------------------------------------ local plumbing
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pg_bindir() -> Path:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install -y postgresql "
                "(scripts/test.sh does this on Debian/Ubuntu when run as root)")


class Services:
    """Service DNS names in connection URIs → loopback ports, container mount paths → temp dirs."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.ports: dict[tuple[str, int], int] = {}
        self.mounts: dict[str, Path] = {}

    def add_service(self, name: str, port: int) -> int:
        return self.ports.setdefault((name, port), free_port())

    def map(self, text: str) -> str:
        for (name, port), local in self.ports.items():
            ns = re.escape(self.namespace)
            # only where a client connects (scheme://host:port or user@host:port), not e.g. the
            # server's list of Host headers it accepts, which must keep the in-cluster names
            text = re.sub(rf"(?:(?<=://)|(?<=@)){re.escape(name)}(\.{ns}(\.svc(\.cluster\.local)?)?)?:{port}\b",
                          f"127.0.0.1:{local}", text)
        for mount, local in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w/]){re.escape(mount)}(?=/|\b|$)", str(local), text)
        return text


class Processes:
    """Started processes, each in its own session, stopped by process group (and only those)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], *, env: dict[str, str], cwd: Path,
              user: str | None = None) -> subprocess.Popen:
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}):\n{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def stop_all(self, grace_s: float = 5) -> None:
        """Last started first (Ray workers before the head, the head before MLflow): SIGTERM to the
        process group, SIGKILL to the group after ``grace_s``."""
        for _, proc in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace_s)
                    break
                except subprocess.TimeoutExpired:
                    continue


def leftover_pids(marker: str) -> list[int]:
    """Processes whose command line mentions our private temp dir (Ray workers the raylet spawned)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def http(url: str, *, auth: tuple[str, str] | None = None, data: dict | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if body.strip().startswith(("{", "[")) else body
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_for(what: str, check, timeout: float, procs: Processes) -> None:
    deadline = time.time() + timeout
    last: Any = None
    while time.time() < deadline:
        procs.check_alive()
        try:
            if check():
                return
        except OSError as e:
            last = e
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {timeout:.0f}s ({last})")


def run_checked(cmd: list[str], *, user: str | None = None, env: dict[str, str] | None = None,
                timeout: float = 60) -> str:
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


# ------------------------------------------------------------------ the emulation
@pytest.fixture
def workspace() -> Iterator[Path]:
    # Ray and Postgres put unix sockets in here: keep the path short (pytest's tmp_path is too long)
    base = Path(tempfile.mkdtemp(prefix="xd", dir="/tmp"))
    os.chmod(base, 0o755)  # the postgres user must be able to reach its data dir inside
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def start_postgres(objs, secret_values, services: Services, ws: Path, procs: Processes,
                   bindir: Path) -> dict[str, Any]:
    sts = objs[("StatefulSet", "xfer-postgres")]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    env = container_env(c, secret_values)
    user, db, password = env["POSTGRES_USER"], env.get("POSTGRES_DB", env["POSTGRES_USER"]), env["POSTGRES_PASSWORD"]
    svc = objs[("Service", "xfer-postgres")]
    port = services.add_service("xfer-postgres", svc["spec"]["ports"][0]["port"])
    as_user = "postgres" if os.geteuid() == 0 else None
    data, sock = ws / "pgdata", ws / "pgsock"
    pwfile = ws / "pgpass"
    for d in (data, sock):
        d.mkdir()
    pwfile.write_text(password + "\n")
    if as_user:
        pw = pwd.getpwnam(as_user)
        for p in (data, sock, pwfile):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    pwfile.chmod(0o600)
    # what docker-entrypoint.sh does on an empty PGDATA
    run_checked([str(bindir / "initdb"), "-D", str(data), f"--username={user}", f"--pwfile={pwfile}",
                 "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8"], user=as_user, timeout=120)
    with open(data / "pg_hba.conf", "a") as f:
        f.write("host all all all scram-sha-256\n")
    log = ws / "logs" / "postgres.log"
    log.touch()
    if as_user:
        os.chown(log, pw.pw_uid, pw.pw_gid)
    run_checked([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                 "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"], user=as_user, timeout=90)
    psql = [str(bindir / "psql"), "-v", "ON_ERROR_STOP=1", "-h", str(sock), "-p", str(port), "-U", user,
            "--no-psqlrc", "-q"]
    if db != "postgres":
        run_checked([*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{db}"'], user=as_user)
    # /docker-entrypoint-initdb.d: the ConfigMap the StatefulSet mounts there
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    (init_vol,) = [n for n, p in mounts.items() if p == "/docker-entrypoint-initdb.d"]
    init = objs[("ConfigMap", vols[init_vol]["configMap"]["name"])]
    for name in sorted(init["data"]):
        assert name.endswith(".sql"), f"init script {name}: only .sql is emulated"
        script = ws / name
        script.write_text(init["data"][name])
        script.chmod(0o644)
        run_checked([*psql, "-d", db, "-f", str(script)], user=as_user)
    return {"data": data, "user": as_user, "port": port, "db_user": user, "db": db, "password": password}


def start_mlflow(objs, secret_values, services: Services, ws: Path, procs: Processes) -> dict[str, Any]:
    dep = objs[("Deployment", "xfer-mlflow")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    svc = objs[("Service", "xfer-mlflow")]
    (svc_port,) = svc["spec"]["ports"]
    (cport,) = [p["containerPort"] for p in c["ports"] if p["name"] == svc_port["targetPort"]]
    local = services.add_service("xfer-mlflow", svc_port["port"])
    # volumes → temp dirs; a ConfigMap volume becomes its files
    vols = {v["name"]: v for v in pod["volumes"]}
    for m in c["volumeMounts"]:
        d = ws / "mounts" / m["name"]
        d.mkdir(parents=True)
        src = vols[m["name"]]
        if "configMap" in src:
            for fname, text in objs[("ConfigMap", src["configMap"]["name"])]["data"].items():
                (d / fname).write_text(services.map(text))
        services.mounts[m["mountPath"]] = d
    env = container_env(c, secret_values)
    args = [kubelet_expand(a, env) for a in c["command"] + c["args"]]
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(local))):
        i = args.index(flag)
        assert flag != "--port" or args[i + 1] == str(cport), "mlflow --port must be the container port"
        args[i + 1] = value
    args = [services.map(a) for a in args]
    assert args[0] == "mlflow"
    args[0] = str(BIN / "mlflow")
    penv = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(ws / "home"), "LANG": "C.UTF-8",
            **{k: services.map(v) for k, v in env.items()}}
    procs.start("mlflow", args, env=penv, cwd=ws / "home")
    url = f"http://127.0.0.1:{local}"
    wait_for("MLflow /health", lambda: http(f"{url}/health", timeout=3)[0] == 200, 180, procs)
    auth_ini = configparser.ConfigParser()
    auth_ini.read(services.map(env["MLFLOW_AUTH_CONFIG_PATH"]))
    raw_args = c["command"] + c["args"]
    return {"url": url, "auth": auth_ini["mlflow"],
            "artifacts": Path(args[raw_args.index("--artifacts-destination") + 1]),
            "admin": (auth_ini["mlflow"]["admin_username"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])}


def ray_node_ports() -> list[str]:
    """Everything a second Ray node on the same IP would otherwise collide on (and other users' Rays)."""
    w = free_port()
    flags = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port"]
    return [f"--{f}={free_port()}" for f in flags] + [f"--min-worker-port={w}", f"--max-worker-port={w + 50}"]


def kuberay_env(cluster_spec: dict[str, Any], secret_values) -> dict[str, str]:
    """What KubeRay adds to every Ray container (and to the submitter) for authOptions."""
    auth = cluster_spec.get("authOptions") or {}
    if auth.get("mode") != "token":
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secret_values[(auth["secretName"], "auth_token")]}


def start_ray(job: dict[str, Any], secret_values, services: Services, ws: Path, procs: Processes) -> str:
    spec = job["spec"]["rayClusterSpec"]
    workdir = ws / "workdir"  # the image's WORKDIR: the entrypoint runs here
    auth = kuberay_env(spec, secret_values)
    base = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(ws / "home"), "LANG": "C.UTF-8",
            "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", **auth}
    gcs, dash = free_port(), free_port()
    temp = ws / "r"
    common = ["--block", "--node-ip-address=127.0.0.1", f"--object-store-memory={OBJECT_STORE_BYTES}",
              "--disable-usage-stats"]
    head = spec["headGroupSpec"]
    (hc,) = head["template"]["spec"]["containers"]
    henv = {**base, **{k: services.map(v) for k, v in container_env(hc, secret_values).items()}}
    procs.start("ray-head", [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}", *common,
                             *ray_start_args(head, cpu_cap=LOCAL_CPUS_PER_NODE, gpu_cap=0), *ray_node_ports()],
                env=henv, cwd=workdir)
    dashboard = f"http://127.0.0.1:{dash}"
    token_header = {"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"} if "RAY_AUTH_TOKEN" in auth else {}
    wait_for("Ray dashboard", lambda: http(f"{dashboard}/api/version", headers=token_header, timeout=3)[0] == 200,
             120, procs)
    for i, group in enumerate(spec["workerGroupSpecs"]):
        (wc,) = group["template"]["spec"]["containers"]
        wenv = {**base, **{k: services.map(v) for k, v in container_env(wc, secret_values).items()}}
        procs.start(f"ray-worker-{i}", [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", *common,
                                        *ray_start_args(group, cpu_cap=LOCAL_CPUS_PER_NODE, gpu_cap=0),
                                        *ray_node_ports()],
                    env=wenv, cwd=workdir)
    return dashboard


def submit_like_kuberay(job: dict[str, Any], dashboard: str, secret_values, services: Services, ws: Path) -> str:
    """The submitter pod's command (KubeRay GetK8sJobCommand, K8sJobMode), run through bash like the pod."""
    spec = job["spec"]
    runtime_env = json.dumps(yaml.safe_load(services.map(spec["runtimeEnvYAML"])))
    submission_id = f"{job['metadata']['name']}-{secrets.token_hex(3)}"
    cmd = (f"ray job submit --address {dashboard} --runtime-env-json {shlex.quote(runtime_env)} "
           f"--submission-id {submission_id} -- {services.map(spec['entrypoint'])}")
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(ws / "home"), "LANG": "C.UTF-8",
           "RAY_USAGE_STATS_ENABLED": "0", **kuberay_env(spec["rayClusterSpec"], secret_values)}
    r = subprocess.run(["bash", "-ce", cmd], env=env, capture_output=True, text=True, timeout=480)
    output = r.stdout + r.stderr
    assert r.returncode == 0, f"the Ray job failed ({r.returncode}):\n{output[-6000:]}"
    return output


@pytest.mark.integration
def test_the_manifests_run_here(workspace: Path) -> None:
    bindir = find_pg_bindir()
    ws = workspace
    for d in ("logs", "home", "workdir/sweeps", "shared"):
        (ws / d).mkdir(parents=True)
    objs = base_objects()
    secret_values = fill_secret_template()
    namespace = objs[("Deployment", "xfer-mlflow")]["metadata"].get("namespace", k8s.DEFAULT_NAMESPACE)
    services = Services(namespace)
    procs = Processes(ws / "logs")

    # the RayJob exactly as `xfer submit` renders it (storage on the shared volume)
    spec_file = ws / "workdir" / "sweeps" / "deploy-test.yaml"
    spec_file.write_text(TEST_SPEC)
    parser = argparse.ArgumentParser()
    k8s.configure_parser(parser)
    args = parser.parse_args([str(spec_file), "--spec-path", "sweeps/deploy-test.yaml",
                              "--storage", f"{k8s.SHARED_MOUNT}/xfer"])
    job = k8s.rayjob_from_args(args)
    assert k8s.kuberay_problems(job) == []
    assert job["spec"]["rayClusterSpec"] == objs[("RayCluster", "xfer")]["spec"]
    services.mounts[k8s.SHARED_MOUNT] = ws / "shared"  # the ReadWriteMany claim every Ray pod mounts

    pg = None
    try:
        pg = start_postgres(objs, secret_values, services, ws, procs, bindir)
        mlflow = start_mlflow(objs, secret_values, services, ws, procs)
        mlflow_url, admin = mlflow["url"], mlflow["admin"]
        client_auth = (secret_values[("xfer-mlflow-client", "username")],
                       secret_values[("xfer-mlflow-client", "password")])

        # basic auth is on, and the allowed hosts are the Service's names
        search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http(search)[0] == 401
        assert http(search, auth=admin)[0] == 200
        assert http(search, auth=admin, headers={"Host": "xfer-mlflow:5000"})[0] == 200
        assert http(search, auth=admin, headers={"Host": f"xfer-mlflow.{namespace}.svc:5000"})[0] == 200
        assert http(search, auth=admin, headers={"Host": "attacker.example:5000"})[0] == 403

        dashboard = start_ray(job, secret_values, services, ws, procs)
        output = submit_like_kuberay(job, dashboard, secret_values, services, ws)
        procs.check_alive()

        # the trials are in MLflow ...
        name = yaml.safe_load(TEST_SPEC)["name"]
        status, exp = http(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}",
                           auth=client_auth)
        assert status == 200, f"no experiment {name!r} in MLflow ({status} {exp}); job output:\n{output[-4000:]}"
        exp_id = exp["experiment"]["experiment_id"]
        status, found = http(f"{mlflow_url}/api/2.0/mlflow/runs/search", auth=client_auth,
                             data={"experiment_ids": [exp_id], "max_results": 1000})
        assert status == 200, found
        runs = found.get("runs", [])
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        grid = [t for t in tags if t.get("xfer.stage") == "grid"]
        final = [t for t in tags if t.get("xfer.stage") == "final"]
        assert len(grid) == 2 and all(t.get("xfer.status") == "finished" for t in grid), tags
        assert len(final) == 1 and final[0].get("xfer.status") == "finished", tags
        assert all(t.get("mlflow.parentRunId") for t in grid + final)
        assert http(f"{mlflow_url}/api/2.0/mlflow/runs/search", data={"experiment_ids": [exp_id]})[0] == 401

        # ... stored in Postgres (the backend store the Deployment names) ...
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=pg["port"], user=pg["db_user"], password=pg["password"],
                                dbname=pg["db"])
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT r.run_uuid FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                            "WHERE e.name = %s", (name,))
                assert {row[0] for row in cur.fetchall()} == {r["info"]["run_id"] for r in runs}
                cur.execute("SELECT count(*) FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                            "JOIN experiments e ON e.experiment_id = r.experiment_id "
                            "WHERE e.name = %s AND t.key = 'xfer.trial_key'", (name,))
                assert cur.fetchone()[0] == len(grid) + len(final)
        finally:
            conn.close()
        # ... with the basic-auth users in their own database (the ConfigMap's database_uri) ...
        auth_db = mlflow["auth"]["database_uri"].rsplit("/", 1)[1]
        assert auth_db != pg["db"]
        conn = psycopg2.connect(host="127.0.0.1", port=pg["port"], user=pg["db_user"], password=pg["password"],
                                dbname=auth_db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT username, is_admin FROM users")
                assert (admin[0], True) in cur.fetchall()
        finally:
            conn.close()
        # ... and artifacts went through the server to --artifacts-destination
        artifact_roots = {r["info"]["artifact_uri"].split(":", 1)[0] for r in runs}
        assert artifact_roots == {"mlflow-artifacts"}, artifact_roots
        stored = [p for p in mlflow["artifacts"].rglob("*") if p.is_file()]
        assert stored, "no artifact reached the server's artifact volume"
        # the sweep wrote its results to the shared volume
        assert (ws / "shared" / "xfer").is_dir()
    except AssertionError as e:
        logs = "\n".join(f"--- {n} ---\n{procs.tail(n, 2500)}" for n, _ in procs.procs)
        raise AssertionError(f"{e}\n{logs}") from None
    finally:
        procs.stop_all()
        if pg:
            stop = [str(bindir / "pg_ctl"), "-D", str(pg["data"]), "-m", "fast", "-w", "stop"]
            subprocess.run(["runuser", "-u", pg["user"], "--", *stop] if pg["user"] else stop,
                           capture_output=True, timeout=60)
        for pid in leftover_pids(str(ws)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
