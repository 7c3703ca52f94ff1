"""`xfer submit`: run a sweep on Kubernetes as a KubeRay RayJob.

The manifests are *data* shipped inside the package (``xfer/templates/raycluster.yaml`` and
``rayjob.yaml``), because ``k8s/`` at the repository root is not part of an installed wheel.
``render_raycluster`` / ``render_rayjob`` fill in the few things that vary per submission; the
copies under ``k8s/`` are these renders at the default settings (``python -m xfer.k8s`` rewrites
them, and a test fails when they drift), so the RayJob and RayCluster are written once.

Submission goes through the kubernetes client's ``CustomObjectsApi`` (group ray.io, version v1,
plural rayjobs); the status (``jobDeploymentStatus`` / ``jobStatus``) is then polled and each
transition printed until KubeRay reports a terminal state.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

import yaml

from xfer import __version__
from xfer.tracking.uri import has_credentials, redact_uri

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
DEFAULT_NAMESPACE = "xfer"
DEFAULT_IMAGE = f"xfer:{__version__}"
DEFAULT_TRACKING_URI = "http://xfer-mlflow:5000"
DEFAULT_CLUSTER_NAME = "xfer"
DEFAULT_SPEC = "sweeps/kornblith2019-public.yaml"
SHARED_MOUNT = "/mnt/shared"  # where raycluster.yaml mounts the ReadWriteMany claim on every pod
CLUSTER_LABEL = "ray.io/cluster"  # KubeRay's clusterSelector key
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster names <= 53, and a RayJob's cluster name adds 6 characters
MAX_RAYCLUSTER_NAME = 53
TERMINAL_DEPLOYMENT = ("Complete", "Failed")  # KubeRay's IsJobDeploymentTerminal
EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SubmitError(Exception):
    """A submission problem the user can fix (bad option, no kube-config, KubeRay missing...)."""


# ------------------------------------------------------------------ templates and rendering
def load_template(name: str) -> dict[str, Any]:
    """One manifest from xfer/templates (read through importlib.resources, so it works installed)."""
    text = resources.files("xfer").joinpath("templates", name).read_text()
    return yaml.safe_load(text)


@dataclass(frozen=True)
class ClusterOptions:
    """What varies between submissions; everything else is the template's."""

    image: str = DEFAULT_IMAGE
    namespace: str = DEFAULT_NAMESPACE
    gpus_per_worker: int = 1
    max_workers: int = 4
    min_workers: int = 0
    tracking_uri: str = DEFAULT_TRACKING_URI

    def check(self) -> None:
        if not _DNS1123_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise SubmitError(f"--namespace {self.namespace!r}: must be a DNS-1123 label "
                              "(lower-case letters, digits and '-', at most 63 characters)")
        if not self.image or any(c.isspace() for c in self.image):
            raise SubmitError(f"--image {self.image!r}: expected an image reference such as registry/xfer:0.1.0")
        if self.gpus_per_worker < 0:
            raise SubmitError(f"--gpus-per-worker must be >= 0 (0 = CPU-only workers), got {self.gpus_per_worker}")
        if self.max_workers < 1:
            raise SubmitError(f"--workers must be >= 1, got {self.max_workers}")
        if not 0 <= self.min_workers <= self.max_workers:
            raise SubmitError(f"--min-workers must be between 0 and --workers ({self.max_workers}), "
                              f"got {self.min_workers}")
        if not re.match(r"^(https?|file|sqlite|postgresql(\+\w+)?|databricks)://", self.tracking_uri) \
                and self.tracking_uri != "databricks":
            raise SubmitError(f"--tracking-uri {redact_uri(self.tracking_uri)!r}: expected an MLflow URI such as "
                              f"{DEFAULT_TRACKING_URI}")
        if has_credentials(self.tracking_uri):
            # the URI is plain text in the RayJob/RayCluster objects and in Ray's logs
            raise SubmitError(f"--tracking-uri must not carry credentials ({redact_uri(self.tracking_uri)}): it is "
                              "stored in plain text in the RayJob; the pods get MLFLOW_TRACKING_USERNAME / _PASSWORD "
                              "from the Secret xfer-mlflow-client")


def _containers(cluster_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def render_raycluster(opts: ClusterOptions = ClusterOptions(), name: str = DEFAULT_CLUSTER_NAME) -> dict[str, Any]:
    """The RayCluster of raycluster.yaml with ``opts`` applied."""
    opts.check()
    obj = load_template("raycluster.yaml")
    obj["metadata"]["name"] = name
    obj["metadata"]["namespace"] = opts.namespace
    spec = obj["spec"]
    for c in _containers(spec):
        c["image"] = opts.image
        for env in c.get("env", []):
            if env["name"] == "MLFLOW_TRACKING_URI":
                env["value"] = opts.tracking_uri
    (group,) = spec["workerGroupSpecs"]  # the template has exactly one (GPU) worker group
    group["minReplicas"] = opts.min_workers
    group["maxReplicas"] = opts.max_workers
    group["replicas"] = opts.min_workers
    (worker,) = group["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        if opts.gpus_per_worker:
            worker["resources"][kind]["nvidia.com/gpu"] = opts.gpus_per_worker
        else:
            worker["resources"][kind].pop("nvidia.com/gpu", None)
    return obj


def rayjob_name(sweep: str) -> str:
    """``xfer-<sweep>`` as a DNS-1035 label short enough for KubeRay."""
    slug = re.sub(r"[^a-z0-9-]+", "-", sweep.lower()).strip("-")
    return f"xfer-{slug}"[:MAX_RAYJOB_NAME].rstrip("-")


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def render_rayjob(*, sweep: str, spec_path: str, opts: ClusterOptions = ClusterOptions(),
                  cluster: str | None = None, name: str | None = None,
                  sweep_args: Sequence[str] = ()) -> dict[str, Any]:
    """The RayJob of rayjob.yaml for one sweep.

    ``spec_path`` is the sweep file's path *inside the image* (relative to its working directory);
    ``cluster`` switches to clusterSelector mode (run on an existing RayCluster, which the RayJob
    then must not shut down); ``sweep_args`` are extra ``xfer sweep`` flags.
    """
    opts.check()
    name = name or rayjob_name(sweep)
    if not _DNS1035.match(name) or len(name) > MAX_RAYJOB_NAME:
        raise SubmitError(f"--name {name!r}: a RayJob name must be a DNS-1035 label (start with a letter; "
                          f"lower-case letters, digits, '-') of at most {MAX_RAYJOB_NAME} characters")
    obj = load_template("rayjob.yaml")
    meta = obj["metadata"]
    meta["name"], meta["namespace"] = name, opts.namespace
    meta["labels"]["xfer/sweep"] = _label_value(sweep)
    spec = obj["spec"]
    spec["entrypoint"] = shlex.join(["xfer", "sweep", spec_path, *sweep_args])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = opts.tracking_uri
    spec["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    if cluster is not None:
        if not _DNS1035.match(cluster) or len(cluster) > MAX_RAYCLUSTER_NAME:
            raise SubmitError(f"--cluster {cluster!r}: not a valid RayCluster name")
        # KubeRay never deletes a cluster it did not create, and rejects a TTL without shutdown
        spec.pop("shutdownAfterJobFinishes", None)
        spec.pop("ttlSecondsAfterFinished", None)
        spec["clusterSelector"] = {CLUSTER_LABEL: cluster}
    else:
        spec["rayClusterSpec"] = render_raycluster(opts)["spec"]
    return obj


# ------------------------------------------------------------------ KubeRay's own rules
def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _cluster_spec_problems(spec: Mapping[str, Any], where: str) -> list[str]:
    out: list[str] = []
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs") or []]
    for gname, g in groups:
        if not (g.get("template") or {}).get("spec", {}).get("containers"):
            out.append(f"{where}: group {gname} has no container")
        params = g.get("rayStartParams") or {}
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            out.append(f"{where}: group {gname} sets resources both in rayStartParams and in resources")
        if "labels" in params:
            out.append(f"{where}: group {gname}: rayStartParams['labels'] is not supported; use labels")
        if gname != "head":
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
            if lo > hi or not lo <= g.get("replicas", lo) <= hi:
                out.append(f"{where}: group {gname}: need minReplicas <= replicas <= maxReplicas")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token" and _version_tuple(str(spec.get("rayVersion", "0"))) < (2, 52, 0):
        out.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
    return out


def kuberay_problems(obj: Mapping[str, Any]) -> list[str]:
    """The checks KubeRay's controller makes that the CRD's openAPIV3Schema cannot express
    (ray-operator/controllers/ray/utils/validation.go); empty when the object passes."""
    kind, meta, spec = obj.get("kind"), obj.get("metadata") or {}, obj.get("spec") or {}
    name = str(meta.get("name", ""))
    out: list[str] = []
    if kind == "RayCluster":
        if len(name) > MAX_RAYCLUSTER_NAME or not _DNS1035.match(name):
            out.append(f"RayCluster name {name!r}: a DNS-1035 label of at most {MAX_RAYCLUSTER_NAME} characters")
        out += _cluster_spec_problems(spec, "spec")
    elif kind == "RayJob":
        if len(name) > MAX_RAYJOB_NAME or not _DNS1035.match(name):
            out.append(f"RayJob name {name!r}: a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
        selector = spec.get("clusterSelector") or {}
        if not spec.get("rayClusterSpec") and not selector:
            out.append("RayJob: one of rayClusterSpec or clusterSelector must be set")
        if spec.get("rayClusterSpec") and selector:
            out.append("RayJob: rayClusterSpec is ignored when clusterSelector is set; keep one")
        if selector and not selector.get(CLUSTER_LABEL):
            out.append(f"RayJob: clusterSelector needs the key {CLUSTER_LABEL}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            out.append("RayJob: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("suspend") and (selector or not spec.get("shutdownAfterJobFinishes")):
            out.append("RayJob: suspend needs shutdownAfterJobFinishes and no clusterSelector")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            out.append("RayJob: activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit", 0) < 0:
            out.append("RayJob: backoffLimit must be >= 0")
        if not str(spec.get("entrypoint", "")).strip():
            out.append("RayJob: entrypoint is empty")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
            if not isinstance(env, dict):
                out.append("RayJob: runtimeEnvYAML must be a YAML mapping")
        except yaml.YAMLError as e:
            out.append(f"RayJob: runtimeEnvYAML is not valid YAML: {e}")
        if spec.get("rayClusterSpec"):
            out += _cluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
    return out


# ------------------------------------------------------------------ YAML out
class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (runtimeEnvYAML stays readable)."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def to_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)


# ------------------------------------------------------------------ Kubernetes API
def load_kube_api() -> Any:
    """A CustomObjectsApi from ~/.kube/config ($KUBECONFIG), else from the in-cluster service account."""
    try:
        from kubernetes import client, config
    except ImportError as e:  # pragma: no cover - kubernetes is a dependency
        raise SubmitError("the kubernetes package is missing: pip install kubernetes") from e
    try:
        config.load_kube_config()
    except config.ConfigException as kube_err:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise SubmitError(
                f"no Kubernetes configuration found ({kube_err}). Point $KUBECONFIG or ~/.kube/config at "
                "your cluster (kubectl config current-context must work), or use --dry-run to print "
                "the RayJob instead of creating it") from None
    return client.CustomObjectsApi()


def _api_message(e: Any) -> tuple[str, dict[str, Any]]:
    body = getattr(e, "body", None) or ""
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    return str(data.get("message") or body or getattr(e, "reason", "") or "").strip(), data


def explain_api_error(e: Any, namespace: str, name: str) -> str:
    """Turn an ApiException from creating/reading a RayJob into advice."""
    message, data = _api_message(e)
    status = getattr(e, "status", None)
    if status == 404:
        if (data.get("details") or {}).get("kind") == "namespaces":
            return (f"namespace {namespace!r} does not exist: deploy k8s/base first (kubectl apply -k k8s/base) "
                    f"or pass --namespace")
        return (f"this cluster has no {PLURAL}.{GROUP}/{VERSION} resource: the KubeRay operator and its CRDs "
                "are not installed (helm install kuberay-operator kuberay/kuberay-operator; see "
                f"README.md, 'Run on Kubernetes'). API server said: {message or 'not found'}")
    if status == 409:
        return (f"a RayJob named {name!r} already exists in namespace {namespace!r}: delete it "
                f"(kubectl -n {namespace} delete rayjob {name}) or pass --name")
    if status in (401, 403):
        return (f"the API server refused ({status}): {message}. Your kube-config user needs create/get on "
                f"{PLURAL}.{GROUP} in namespace {namespace!r}")
    if status in (400, 422):
        return f"the API server rejected the RayJob ({status}): {message}"
    return f"Kubernetes API error {status} {getattr(e, 'reason', '')}: {message}"


def _api_exception_type() -> type[BaseException]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _connection_errors() -> tuple[type[BaseException], ...]:
    import urllib3

    return (urllib3.exceptions.HTTPError, OSError)


def create_rayjob(api: Any, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Create the RayJob (strict field validation: unknown fields are errors, not silently dropped)."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, dict(obj),
                                                   field_validation="Strict")
    except _api_exception_type() as e:
        raise SubmitError(explain_api_error(e, ns, name)) from None
    except _connection_errors() as e:
        host = getattr(getattr(getattr(api, "api_client", None), "configuration", None), "host", "?")
        raise SubmitError(f"cannot reach the Kubernetes API server at {host}: {e}") from None


@dataclass
class FollowResult:
    job_status: str
    deployment_status: str
    message: str = ""
    deleted: bool = False

    @property
    def succeeded(self) -> bool:
        return self.job_status == "SUCCEEDED" and self.deployment_status == "Complete"


def follow_rayjob(api: Any, namespace: str, name: str, *, poll_s: float = 10.0,
                  emit: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                  max_errors: int = 5) -> FollowResult:
    """Poll the RayJob's status, emit each (jobDeploymentStatus, jobStatus) transition, return at a
    terminal deployment status (Complete / Failed) or when the RayJob disappears."""
    api_error = _api_exception_type()
    last: tuple[str, str] | None = None
    result = FollowResult("", "")
    errors = 0
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            errors = 0
        except api_error as e:
            if getattr(e, "status", None) == 404:
                emit(f"RayJob {namespace}/{name} was deleted before it finished")
                result.deleted = True
                return result
            errors += 1
            if errors >= max_errors:
                raise SubmitError(explain_api_error(e, namespace, name)) from None
            log.warning("reading RayJob status failed (%s); retrying", getattr(e, "reason", e))
            sleep(poll_s)
            continue
        except _connection_errors() as e:
            errors += 1
            if errors >= max_errors:
                raise SubmitError(f"lost the Kubernetes API server: {e}") from None
            log.warning("reading RayJob status failed (%s); retrying", e)
            sleep(poll_s)
            continue
        status = obj.get("status") or {}
        now = (status.get("jobDeploymentStatus", ""), status.get("jobStatus", ""))
        result.deployment_status, result.job_status = now
        result.message = status.get("message", "") or ""
        if now != last:
            line = f"{time.strftime('%H:%M:%S')}  deployment: {now[0] or 'New':<13} job: {now[1] or '-'}"
            if status.get("reason"):
                line += f"  ({status['reason']})"
            emit(line)
            last = now
        if now[0] in TERMINAL_DEPLOYMENT:
            if result.message:
                emit(f"message: {result.message}")
            return result
        sleep(poll_s)


# ------------------------------------------------------------------ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    """Flags of `xfer submit` (the CLI wires this in)."""
    p.add_argument("spec", help="the sweep file (validated here; see --spec-path for its path in the image)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"xfer image for head and workers (default {DEFAULT_IMAGE})")
    p.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE, help=f"namespace (default {DEFAULT_NAMESPACE})")
    p.add_argument("--gpus-per-worker", type=int, default=1, help="nvidia.com/gpu per worker pod (0: CPU workers)")
    p.add_argument("--workers", type=int, default=4, help="most worker pods the autoscaler may start (default 4)")
    p.add_argument("--min-workers", type=int, default=0, help="worker pods kept up while the job runs (default 0)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                   help=f"MLflow tracking URI as seen from the pods (default {DEFAULT_TRACKING_URI})")
    p.add_argument("--cluster", metavar="NAME",
                   help="run on the existing RayCluster NAME (clusterSelector) instead of a cluster of its own")
    p.add_argument("--name", help="RayJob name (default xfer-<sweep name>)")
    p.add_argument("--spec-path", help="the sweep file's path inside the image, relative to its working "
                                       "directory /home/ray/xfer or absolute, e.g. on the shared volume "
                                       "(default: SPEC as given)")
    p.add_argument("--storage", help=f"pass --storage to `xfer sweep` (must be on the shared volume, {SHARED_MOUNT})")
    p.add_argument("--dry-run", action="store_true", help="print the RayJob YAML instead of creating it")
    p.add_argument("--no-follow", action="store_true", help="create the RayJob and return without waiting")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between status polls (default 10)")


def _options(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions(image=args.image, namespace=args.namespace, gpus_per_worker=args.gpus_per_worker,
                          max_workers=args.workers, min_workers=args.min_workers, tracking_uri=args.tracking_uri)


def rayjob_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the sweep file, then render its RayJob (raises SpecError / SubmitError)."""
    from xfer.spec import load_spec

    spec = load_spec(args.spec)
    _options(args).check()  # the flags first: their errors matter more than the storage note below
    spec_path = args.spec_path or Path(args.spec).as_posix()
    if not args.spec_path and Path(args.spec).is_absolute():
        raise SubmitError(f"{args.spec} is a path on this machine: pass --spec-path with its path inside the "
                          "image (e.g. sweeps/x.yaml) or on the shared volume")
    storage = args.storage or spec.storage
    if not PurePosixPath(storage).is_relative_to(SHARED_MOUNT):
        log.warning("storage %r is not on the shared volume (%s): trials on different workers will not see "
                    "each other's checkpoints and features; pass --storage %s/xfer", storage, SHARED_MOUNT,
                    SHARED_MOUNT)
    sweep_args = ["--storage", args.storage] if args.storage else []
    return render_rayjob(sweep=spec.name, spec_path=spec_path, opts=_options(args), cluster=args.cluster,
                         name=args.name, sweep_args=sweep_args)


def main(args: argparse.Namespace, *, api: Any = None, sleep: Callable[[float], None] = time.sleep) -> int:
    """`xfer submit`: 0 when the sweep succeeded (or was only printed / created), 1 when it failed,
    2 for a problem to fix before anything runs. ``api`` replaces the kube-config client (tests)."""
    try:
        obj = rayjob_from_args(args)
        problems = kuberay_problems(obj)
        if problems:
            raise SubmitError("the rendered RayJob would be rejected by KubeRay: " + "; ".join(problems))
        if args.dry_run:
            sys.stdout.write(to_yaml(obj))
            return EXIT_OK
        api = api if api is not None else load_kube_api()
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        create_rayjob(api, obj)
        print(f"created RayJob {ns}/{name}: {obj['spec']['entrypoint']}", flush=True)
        print(f"  kubectl -n {ns} get rayjob {name}     kubectl -n {ns} logs -f job/{name}", flush=True)
        if args.no_follow:
            return EXIT_OK
        try:
            result = follow_rayjob(api, ns, name, poll_s=args.poll, sleep=sleep,
                                   emit=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            print(f"stopped following; the RayJob keeps running (kubectl -n {ns} delete rayjob {name} stops it)",
                  file=sys.stderr)
            return 130
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"RayJob {ns}/{name}: {'succeeded' if result.succeeded else 'did not succeed'} "
          f"(deployment {result.deployment_status or '-'}, job {result.job_status or '-'})")
    return EXIT_OK if result.succeeded else EXIT_JOB_FAILED


# ------------------------------------------------------------------ the k8s/ copies
def default_manifests(spec_path: str = DEFAULT_SPEC) -> dict[str, dict[str, Any]]:
    """What k8s/ holds, keyed by path relative to k8s/: the RayCluster and both RayJob variants for
    the paper's sweep, rendered at the default options."""
    from xfer.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    sweep = load_spec(root / spec_path).name
    return {
        "base/raycluster.yaml": render_raycluster(),
        f"jobs/{sweep}.yaml": render_rayjob(sweep=sweep, spec_path=spec_path),
        f"jobs/{sweep}-on-cluster.yaml": render_rayjob(sweep=sweep, spec_path=spec_path,
                                                       cluster=DEFAULT_CLUSTER_NAME),
    }


GENERATED_HEADER = ("# Generated from xfer/templates/ by `python -m xfer.k8s` (the same renderer as "
                    "`xfer submit`).\n# Edit the template, not this file: tests/test_k8s.py checks they agree.\n")


def write_manifests(k8s_dir: Path) -> list[Path]:
    written = []
    for rel, obj in default_manifests().items():
        path = k8s_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(GENERATED_HEADER + to_yaml(obj))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_manifests(Path(__file__).resolve().parents[1] / "k8s"):
        print(p)
