"""The deployment files under deploy/, checked offline: no Docker, no cluster.

Each validator runs on the real file and on a mutated copy it must reject:

- Kubernetes core objects (deploy/k8s/*.yaml) against the OpenAPI schemas bundled by the
  PyPI package kubernetes-validate, strict (unknown fields are errors);
- the KServe InferenceService against the CRD's v1beta1 openAPIV3Schema kept in
  deploy/schemas/ (source in deploy/schemas/README.md), with unknown fields made errors as
  the API server's strict field validation does, and its metadata against ObjectMeta;
- deploy/compose*.yaml against the Compose Specification's JSON schema kept there too;
- deploy/Dockerfile by reading it: base image, COPY sources, ports, token auth, commands;
- every file against config.properties, scripts/build_mar.py and each other;
- deploy/docker/healthcheck.py against a fake TorchServe on loopback.
"""

from __future__ import annotations

import ast
import copy
import gzip
import importlib.util
import json
import re
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"
DOCKERFILE = DEPLOY / "Dockerfile"
STORAGE = K8S / "model-storage"

# The Kubernetes API KServe v0.20.0 is built against (its go.mod replaces k8s.io/api with
# v0.34.5); kubernetes-validate bundles that release's schemas.
K8S_VERSION = "1.34"
ISVC_SCHEMA = SCHEMAS / "kserve-inferenceservice-v1beta1.schema.json.gz"
# kserve/kserve v0.20.0 config/runtimes/kserve-torchserve.yaml: the ClusterServingRuntime
# an InferenceService with modelFormat pytorch runs on (deploy/schemas/README.md).
RUNTIME = SCHEMAS / "kserve-torchserve-runtime.yaml"
# compose-spec/compose-spec schema/compose-spec.json (deploy/schemas/README.md).
COMPOSE_SCHEMA = SCHEMAS / "compose-spec.json"
# The official image runs Python 3.9: pytorch/serve v0.12.0 docker/build_image.sh
# (PYTHON_VERSION=3.9), from which pytorch/torchserve:0.12.0-cpu and -gpu were built.
IMAGE_PYTHON = (3, 9)
# The base image's own config.properties and entrypoint paths, which ours replace.
IMAGE_HOME = "/home/model-server"


def _load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


healthcheck = _load_module("samserve_deploy_healthcheck", DEPLOY / "docker" / "healthcheck.py")


def properties(path: Path) -> dict[str, str]:
    return healthcheck.parse_properties(path.read_text())


def yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(K8S.glob("*.yaml")) for doc in yaml_docs(p)]


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [
        doc
        for _, doc in k8s_objects()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


# --- what the rest of the repository says -------------------------------------------------


def torchserve_pin() -> str:
    """The TorchServe version pyproject.toml pins (``torchserve==X``)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1].strip() for d in deps if re.match(r"torchserve\s*==", d)]
    assert len(pins) == 1, deps
    return pins[0]


def _build_mar_tree() -> ast.Module:
    return ast.parse((REPO / "scripts" / "build_mar.py").read_text())


def build_mar_defaults() -> dict[str, Any]:
    """``add_argument`` defaults of scripts/build_mar.py, read without importing it (which
    would import torch): the model name, the export folder, the archive format."""
    defaults: dict[str, Any] = {}
    for node in ast.walk(_build_mar_tree()):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        flag = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else ""
        for keyword in node.keywords:
            if keyword.arg == "default":
                defaults[flag] = keyword.value
    name = ast.literal_eval(defaults["--model-name"])
    archive_format = ast.literal_eval(defaults["--archive-format"])
    export = defaults["--export-path"]
    # REPO / "model_store": the folder's name relative to the repository.
    assert isinstance(export, ast.BinOp) and isinstance(export.right, ast.Constant), export
    return {"name": name, "format": archive_format, "export": export.right.value}


def archive_path() -> str:
    """Where scripts/build_mar.py writes the archive by default, relative to the repository
    (the same rule as build_archive: a ``.mar`` file unless ``no-archive``)."""
    defaults = build_mar_defaults()
    assert defaults["format"] == "default", "the deploy files copy a zipped .mar"
    return f"{defaults['export']}/{defaults['name']}.mar"


def model_config_constants() -> dict[str, Any]:
    """The constant entries of build_mar.model_config's dict (batch size, delay, timeouts)."""
    for node in ast.walk(_build_mar_tree()):
        if isinstance(node, ast.FunctionDef) and node.name == "model_config":
            returned = [n.value for n in ast.walk(node) if isinstance(n, ast.Return)]
            assert len(returned) == 1 and isinstance(returned[0], ast.Dict)
            return {
                key.value: value.value
                for key, value in zip(returned[0].keys, returned[0].values)
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant)
            }
    raise AssertionError("no model_config in scripts/build_mar.py")


def config_ports(config: dict[str, str]) -> dict[str, int]:
    """The five listeners' ports of a TorchServe config."""
    return {
        "inference": urlsplit(config["inference_address"]).port,
        "management": urlsplit(config["management_address"]).port,
        "metrics": urlsplit(config["metrics_address"]).port,
        "grpc_inference": int(config["grpc_inference_port"]),
        "grpc_management": int(config["grpc_management_port"]),
    }


ROOT_CONFIG = properties(REPO / "config.properties")
MODEL_NAME = build_mar_defaults()["name"]


def test_the_repository_facts_the_checks_rely_on():
    assert archive_path() == "model_store/sam.mar"
    assert MODEL_NAME == "sam"
    assert set(config_ports(ROOT_CONFIG).values()) == {8080, 8081, 8082, 7070, 7071}
    assert re.fullmatch(r"\d+\.\d+\.\d+", torchserve_pin())


# --- Java properties, as TorchServe reads them --------------------------------------------


def test_properties_parse_as_java_does_later_keys_win_comments_skipped():
    text = "# a=1\n! b=2\na = 3\nurl=http://h:1/x=y\na=4\n"
    assert healthcheck.parse_properties(text) == {"a": "4", "url": "http://h:1/x=y"}


# --- Kubernetes core objects: kubernetes-validate's bundled schemas -----------------------


def k8s_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


CORE = [(f, d) for f, d in k8s_objects() if d["apiVersion"] != "serving.kserve.io/v1beta1"]


@pytest.mark.parametrize("doc", [d for _, d in CORE], ids=[f"{f}:{d['kind']}" for f, d in CORE])
def test_kubernetes_objects_match_the_kubernetes_schemas(doc):
    k8s_validate(doc)


def test_every_kind_the_brief_needs_is_there():
    kinds = {doc["kind"] for _, doc in k8s_objects()}
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    assert "InferenceService" in kinds


# One mutation per kind, each something the API server would refuse.
K8S_MUTATIONS: dict[str, Callable[[dict], None]] = {
    "Deployment": lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        {"ports": [{"containerPort": "six thousand"}]}
    ),
    "Service": lambda d: d["spec"].update({"ports": [{"port": "redis", "targetPort": 1}]}),
    "Secret": lambda d: d.update({"stringdata": d.pop("stringData")}),
    "PersistentVolumeClaim": lambda d: d["spec"].update({"accessModes": "ReadWriteOnce"}),
    "ConfigMap": lambda d: d.update({"data": {"redis.conf": {"maxmemory": "1gb"}}}),
    "NetworkPolicy": lambda d: d["spec"].update({"podselector": d["spec"].pop("podSelector")}),
    "Pod": lambda d: d["spec"].update({"containers": {"name": "x"}}),
}


@pytest.mark.parametrize("kind", sorted(K8S_MUTATIONS))
def test_kubernetes_validation_rejects_a_broken_object(kind):
    doc = copy.deepcopy(next(d for _, d in CORE if d["kind"] == kind))
    K8S_MUTATIONS[kind](doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(doc)


# --- the KServe InferenceService: the CRD's own schema ------------------------------------


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields as errors: what ``kubectl apply --validate=strict``
    (server-side field validation, Strict) does where the schema does not preserve them."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def _isvc_validator() -> Any:
    with gzip.open(ISVC_SCHEMA, "rt", encoding="utf-8") as handle:
        schema = json.load(handle)
    # An OpenAPI 3.0 schema object: JSON Schema draft 4's vocabulary, plus x- extensions
    # that validators ignore.
    return jsonschema.Draft4Validator(strict(schema))


ISVC_VALIDATOR = _isvc_validator()


def _object_meta_validator() -> Any:
    """ObjectMeta from kubernetes-validate's strict definitions (the CRD schema leaves
    ``metadata`` open: the API server checks it as ObjectMeta)."""
    base = f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict/_definitions.json"
    definitions = kubernetes_validate.utils.schema_contents(base, K8S_VERSION)
    registry = Resource.from_contents(definitions) @ Registry()
    ref = f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


OBJECT_META = _object_meta_validator()


def isvc_validate(doc: dict) -> None:
    ISVC_VALIDATOR.validate(doc)
    OBJECT_META.validate(doc["metadata"])


def test_the_vendored_crd_schema_is_kserves_whole_v1beta1_schema():
    spec = ISVC_VALIDATOR.schema["properties"]["spec"]
    predictor = spec["properties"]["predictor"]["properties"]
    # The whole schema, not an excerpt: every predictor kind and the pod spec's fields.
    assert {"model", "pytorch", "sklearn", "triton", "containers", "volumes"} <= set(predictor)
    assert "status" in ISVC_VALIDATOR.schema["properties"]


def test_inference_service_matches_the_kserve_crd():
    isvc_validate(k8s_object("InferenceService"))


ISVC_MUTATIONS: dict[str, Callable[[dict], None]] = {
    "misspelt field": lambda d: d["spec"]["predictor"]["model"].update(
        {"storageURI": d["spec"]["predictor"]["model"].pop("storageUri")}
    ),
    "model format without name": lambda d: d["spec"]["predictor"]["model"].update(
        {"modelFormat": {"version": "1"}}
    ),
    "replicas as text": lambda d: d["spec"]["predictor"].update({"minReplicas": "one"}),
    "secret ref without key": lambda d: d["spec"]["predictor"]["model"]["env"][0]["valueFrom"][
        "secretKeyRef"
    ].pop("key"),
    "bad metadata": lambda d: d["metadata"].update({"label": {"a": "b"}}),
    "no predictor": lambda d: d["spec"].pop("predictor"),
}


@pytest.mark.parametrize("mutation", sorted(ISVC_MUTATIONS))
def test_the_crd_schema_rejects_a_broken_inference_service(mutation):
    doc = copy.deepcopy(k8s_object("InferenceService"))
    ISVC_MUTATIONS[mutation](doc)
    with pytest.raises(jsonschema.ValidationError):
        isvc_validate(doc)


# --- the KServe InferenceService against its runtime, storage and the other objects -------


def runtime() -> dict:
    return yaml.safe_load(RUNTIME.read_text())


def runtime_arg(name: str) -> str:
    args = runtime()["spec"]["containers"][0]["args"]
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, args
    return values[0]


def kserve_problems(isvc: dict, objects: list[dict]) -> list[str]:
    """How the InferenceService disagrees with KServe's TorchServe runtime, its storage
    layout, the PVC, the Secret and the repository's pins."""
    problems = []
    model = isvc["spec"]["predictor"]["model"]
    served = runtime()
    formats = {f["name"] for f in served["spec"]["supportedModelFormats"]}
    if model["modelFormat"]["name"] not in formats:
        problems.append(f"modelFormat {model['modelFormat']} not in the runtime's {formats}")
    if model.get("runtime") != served["metadata"]["name"]:
        problems.append(f"runtime {model.get('runtime')} is not {served['metadata']['name']}")
    if model.get("protocolVersion") not in served["spec"]["protocolVersions"]:
        problems.append(f"protocolVersion {model.get('protocolVersion')} not supported")
    # runtimeVersion replaces the tag of pytorch/torchserve-kfs (the -gpu build adds -gpu).
    if str(model.get("runtimeVersion")).removesuffix("-gpu") != torchserve_pin():
        problems.append(f"runtimeVersion {model.get('runtimeVersion')} is not the pinned one")
    match = re.fullmatch(r"pvc://([a-z0-9]([-a-z0-9]*[a-z0-9])?)/(.+)", model["storageUri"])
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    if not match or match.group(1) not in claims:
        problems.append(f"storageUri {model['storageUri']} names no PVC of {claims}")
    secrets = {
        o["metadata"]["name"]: set(o.get("stringData", {})) | set(o.get("data", {}))
        for o in objects
        if o["kind"] == "Secret"
    }
    env = {e["name"]: e for e in model.get("env", [])}
    ref = env.get("SAMSERVE_STORE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    if ref.get("key") not in secrets.get(ref.get("name"), set()):
        problems.append(f"SAMSERVE_STORE_URL does not come from a key of a Secret: {ref}")
    return problems


def test_inference_service_agrees_with_runtime_storage_and_secret():
    objects = [d for _, d in k8s_objects()]
    assert kserve_problems(k8s_object("InferenceService"), objects) == []


@pytest.mark.parametrize(
    "path, value",
    [
        (("modelFormat",), {"name": "tensorflow"}),
        (("protocolVersion",), "v3"),
        (("runtimeVersion",), "0.9.0"),
        (("storageUri",), "pvc://another-claim/sam"),
        (("env", 0, "valueFrom", "secretKeyRef", "key"), "password"),
    ],
)
def test_kserve_cross_checks_reject_a_disagreeing_service(path, value):
    isvc = copy.deepcopy(k8s_object("InferenceService"))
    target = isvc["spec"]["predictor"]["model"]
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    assert kserve_problems(isvc, [d for _, d in k8s_objects()])


def test_storage_layout_is_the_one_the_runtime_starts_torchserve_with():
    # The runtime mounts storageUri at /mnt/models and passes these two paths.
    ts_config = runtime_arg("--ts-config")
    model_store = runtime_arg("--model-store")
    assert ts_config == "/mnt/models/config/config.properties"
    assert (STORAGE / Path(ts_config).relative_to("/mnt/models")).is_file()
    config = properties(STORAGE / "config" / "config.properties")
    assert config["model_store"] == model_store == "/mnt/models/model-store"


# Settings the KServe config must keep different from config.properties, each for a reason
# in its own comments: the wrapper's listener on loopback, no token (the wrapper sends none),
# the model from the snapshot rather than registration, the metrics config in the storage.
KSERVE_DIFFERENT = {
    "inference_address",
    "management_address",
    "model_store",
    "enable_model_api",
    "metrics_config",
}
# config.properties settings for browser pages, which never reach the pod's loopback.
KSERVE_OMITTED = {"cors_allowed_origin", "cors_allowed_methods", "cors_allowed_headers"}


def kserve_config_problems(config: dict[str, str]) -> list[str]:
    problems = []
    for key, value in ROOT_CONFIG.items():
        if key in KSERVE_OMITTED or key in KSERVE_DIFFERENT:
            continue
        if config.get(key) != value:
            problems.append(f"{key}: {config.get(key)!r} where config.properties has {value!r}")
    for key in ("inference_address", "management_address", "metrics_address"):
        if urlsplit(config[key]).hostname != "127.0.0.1":
            problems.append(f"{key} {config[key]} is not on the pod's loopback")
    # The metrics config: the repository's, in the storage mounted at /mnt/models (a file
    # TorchServe cannot read stops every worker).
    metrics_config = Path(config.get("metrics_config", ""))
    inside = metrics_config.is_relative_to("/mnt/models")
    stored = STORAGE / metrics_config.relative_to("/mnt/models") if inside else None
    if stored is None or not stored.is_file():
        problems.append(f"metrics_config {metrics_config} is not a file of the storage")
    elif stored.read_bytes() != (REPO / ROOT_CONFIG["metrics_config"]).read_bytes():
        problems.append(f"metrics_config {metrics_config} is not the repository's")
    snapshot = json.loads(config["model_snapshot"])
    versions = snapshot["models"].get(MODEL_NAME, {})
    if snapshot["modelCount"] != len(snapshot["models"]) or len(versions) != 1:
        problems.append(f"the snapshot does not load model {MODEL_NAME} once: {snapshot}")
    constants = model_config_constants()
    for entry in versions.values():
        if entry["marName"] != Path(archive_path()).name:
            problems.append(f"marName {entry['marName']} is not {archive_path()}")
        for key in ("batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"):
            if entry.get(key) != constants[key]:
                problems.append(f"snapshot {key} {entry.get(key)} != archive's {constants[key]}")
    return problems


def test_kserve_config_agrees_with_config_properties_and_the_archive():
    assert kserve_config_problems(properties(STORAGE / "config" / "config.properties")) == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_request_size", "6553500"),
        ("inference_address", "http://0.0.0.0:8085"),
        ("allowed_urls", ".*"),
        ("model_snapshot", '{"modelCount":1,"models":{"mnist":{"1.0":{"marName":"m.mar"}}}}'),
        ("metrics_config", "/mnt/models/config/missing.yaml"),
        ("metrics_config", "/mnt/models/config/config.properties"),
        ("metrics_config", "metrics.yaml"),
    ],
)
def test_kserve_config_check_rejects_a_disagreeing_config(key, value):
    config = dict(properties(STORAGE / "config" / "config.properties"))
    config[key] = value
    assert kserve_config_problems(config)


# --- the Kubernetes objects against each other --------------------------------------------


def size_bytes(text: str) -> int:
    """A Redis size (``1gb``, ``512mb``: powers of 1024) or Kubernetes/Compose quantity
    (``1536Mi``, ``1536m`` in Compose, ``2G``) in bytes."""
    match = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text.strip())
    assert match, text
    number, unit = int(match.group(1)), match.group(2).lower().rstrip("bi") or "b"
    powers = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}
    return number * 1024 ** powers[unit]


def redis_conf(text: str) -> dict[str, str]:
    lines = [line.split(None, 1) for line in text.splitlines()]
    return {p[0]: p[1].strip() if len(p) > 1 else "" for p in lines if p and p[0][0] != "#"}


def k8s_redis_problems(objects: list[dict]) -> list[str]:
    """How the Redis objects, the Secret, the store URL and the InferenceService disagree."""
    by_kind = {o["kind"]: o for o in objects if o["metadata"]["name"].endswith("redis")}
    deployment, service, policy = (
        by_kind["Deployment"],
        by_kind["Service"],
        by_kind["NetworkPolicy"],
    )
    config_map = by_kind["ConfigMap"]
    secret = next(o for o in objects if o["kind"] == "Secret")
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    problems = []
    labels = pod["metadata"]["labels"]
    for name, selector in (
        ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
        ("Service", service["spec"]["selector"]),
        ("NetworkPolicy", policy["spec"]["podSelector"]["matchLabels"]),
    ):
        if not selector.items() <= labels.items():
            problems.append(f"the {name} selects {selector}, not the Redis pod {labels}")
    conf = redis_conf(config_map["data"]["redis.conf"])
    if conf.get("maxmemory-policy") != "allkeys-lru":
        problems.append(f"maxmemory-policy {conf.get('maxmemory-policy')}")
    limit = container["resources"]["limits"]["memory"]
    if "maxmemory" not in conf or size_bytes(conf["maxmemory"]) >= size_bytes(limit):
        problems.append(f"maxmemory {conf.get('maxmemory')} not below the limit {limit}")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    conf_dir = str(Path(container["args"][0]).parent)
    if mounted.get(conf_dir, {}).get("configMap", {}).get("name") != config_map["metadata"]["name"]:
        problems.append(f"{container['args'][0]} is not the ConfigMap's redis.conf")
    args = container["args"]
    password_var = args[args.index("--requirepass") + 1] if "--requirepass" in args else ""
    env = {e["name"]: e for e in container.get("env", [])}
    password_ref = env.get(password_var.strip("$()"), {}).get("valueFrom", {}).get("secretKeyRef")
    if not password_ref or password_ref["name"] != secret["metadata"]["name"]:
        problems.append(f"--requirepass {password_var} is not the Secret's password")
        return problems
    url = urlsplit(secret["stringData"]["store-url"])
    port = service["spec"]["ports"][0]
    if url.scheme != "redis" or url.hostname != service["metadata"]["name"]:
        problems.append(f"the store URL does not name the Service: {url.geturl()}")
    if url.port != port["port"] or port["targetPort"] not in (
        *(p["name"] for p in container["ports"]),
        *(p["containerPort"] for p in container["ports"]),
    ):
        problems.append(f"the store URL's port {url.port} does not reach the container")
    if url.password != secret["stringData"][password_ref["key"]]:
        problems.append("the store URL's password is not the Redis password")
    allowed = [
        f["podSelector"]["matchLabels"] for r in policy["spec"]["ingress"] for f in r["from"]
    ]
    if {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]} not in allowed:
        problems.append(f"the NetworkPolicy lets {allowed} in, not the InferenceService's pods")
    return problems


def test_redis_objects_agree_with_each_other_and_the_store_url():
    assert k8s_redis_problems([d for _, d in k8s_objects()]) == []


def _mutate_k8s(kind: str, change: Callable[[dict], None]) -> list[dict]:
    objects = copy.deepcopy([d for _, d in k8s_objects()])
    change(next(o for o in objects if o["kind"] == kind))
    return objects


@pytest.mark.parametrize(
    "kind, change",
    [
        ("Secret", lambda o: o["stringData"].update(
            {"store-url": "redis://:other@samserve-redis:6379/0"})),
        ("Secret", lambda o: o["stringData"].update(
            {"store-url": "redis://:change-me@redis:6379/0"})),
        ("Service", lambda o: o["spec"].update({"selector": {"app": "other"}})),
        ("ConfigMap", lambda o: o["data"].update(
            {"redis.conf": "maxmemory 8gb\nmaxmemory-policy allkeys-lru\n"})),
        ("ConfigMap", lambda o: o["data"].update(
            {"redis.conf": "maxmemory 1gb\nmaxmemory-policy noeviction\n"})),
        ("NetworkPolicy", lambda o: o["spec"]["ingress"][0]["from"][0]["podSelector"].update(
            {"matchLabels": {"serving.kserve.io/inferenceservice": "other"}})),
    ],
)  # fmt: skip
def test_redis_cross_checks_reject_disagreeing_objects(kind, change):
    assert k8s_redis_problems(_mutate_k8s(kind, change))


def test_the_store_urls_parse_as_the_handler_parses_them():
    # samserve.store is the handler's parser of SAMSERVE_STORE_URL (skipped where absent).
    store = pytest.importorskip("samserve.store")
    options = store.StoreOptions.from_url(k8s_object("Secret")["stringData"]["store-url"])
    assert (options.backend, options.host) == ("redis", "samserve-redis")
    url = compose()["services"]["torchserve"]["environment"]["SAMSERVE_STORE_URL"]
    options = store.StoreOptions.from_url(url)
    assert (options.backend, options.host, options.password) == (
        "redis",
        "redis",
        COMPOSE_ENV["REDIS_PASSWORD"],
    )


def test_the_copy_pod_mounts_the_model_storage_claim():
    pod = k8s_object("Pod")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]]
    assert claims == [k8s_object("PersistentVolumeClaim")["metadata"]["name"]]


# --- Compose: the Compose Specification's schema ------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and
    ``$$`` in every string (compose-spec spec.md, "Interpolation")."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, word = match.groups()
        current = env.get(name)
        missing = current is None or (operator and operator.startswith(":") and not current)
        if operator and operator.endswith("?") and missing:
            raise KeyError(f"{name}: {word}")
        if operator and operator.endswith("-") and missing:
            return word
        return current or ""

    return _VARIABLE.sub(substitute, value)


COMPOSE_ENV = {"REDIS_PASSWORD": "0123abcd"}
COMPOSE_VALIDATOR = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))


def compose(name: str = "compose.yaml", env: dict[str, str] | None = None) -> dict:
    return interpolate(
        yaml.safe_load((DEPLOY / name).read_text()), COMPOSE_ENV if env is None else env
    )


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_files_match_the_compose_specification(name):
    COMPOSE_VALIDATOR.validate(compose(name))


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["services"]["redis"]["healthcheck"].update({"intervall": "5s"}),
        lambda c: c["services"]["torchserve"]["depends_on"]["redis"].update(
            {"condition": "service_ready"}
        ),
        lambda c: c["services"]["torchserve"].update({"ports": "8080:8080"}),
        lambda c: c.update({"service": c.pop("services")}),
    ],
)
def test_the_compose_schema_rejects_a_broken_file(change):
    document = compose()
    change(document)
    with pytest.raises(jsonschema.ValidationError):
        COMPOSE_VALIDATOR.validate(document)


def test_compose_needs_the_redis_password():
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        compose(env={})


def _published(entry: str) -> tuple[str, int, int]:
    """(host address, host port, container port) of a ``HOST:PUBLISHED:TARGET`` entry."""
    host, published, target = entry.rsplit(":", 2)
    return host, int(published), int(target)


def _command_option(command: list[str], option: str) -> str | None:
    return command[command.index(option) + 1] if option in command else None


def compose_problems(document: dict, env: dict[str, str]) -> list[str]:
    """How compose.yaml disagrees with config.properties, the Dockerfile and itself."""
    problems = []
    services = document["services"]
    torchserve, redis = services["torchserve"], services["redis"]
    build = torchserve["build"]
    if (DEPLOY / build["context"] / build["dockerfile"]).resolve() != DOCKERFILE:
        problems.append(f"build {build} is not deploy/Dockerfile from the repository's root")
    ports = config_ports(ROOT_CONFIG)
    published = [_published(p) for p in torchserve["ports"]]
    if sorted(t for _, _, t in published) != sorted(ports.values()):
        problems.append(f"published {published}, config.properties listens on {ports}")
    for api in ("management", "metrics", "grpc_management"):
        hosts = {h for h, _, t in published if t == ports[api]}
        if hosts != {"127.0.0.1"}:
            problems.append(f"{api} port published on {hosts}, not only the host's loopback")
    url = urlsplit(torchserve["environment"]["SAMSERVE_STORE_URL"])
    command = redis["command"]
    redis_port = int(_command_option(command, "--port") or 6379)
    if url.scheme != "redis" or url.hostname != "redis" or url.port != redis_port:
        problems.append(f"SAMSERVE_STORE_URL {url.geturl()} does not reach the redis service")
    if (
        url.password != env["REDIS_PASSWORD"]
        or _command_option(command, "--requirepass") != env["REDIS_PASSWORD"]
    ):
        problems.append("the store URL and --requirepass do not both carry REDIS_PASSWORD")
    if _command_option(command, "--maxmemory-policy") != "allkeys-lru":
        problems.append("redis runs without --maxmemory-policy allkeys-lru")
    maxmemory = _command_option(command, "--maxmemory")
    if maxmemory is None or size_bytes(maxmemory) >= size_bytes(redis["mem_limit"]):
        problems.append(f"--maxmemory {maxmemory} not below mem_limit {redis['mem_limit']}")
    for name, service in services.items():
        if not service.get("healthcheck", {}).get("test"):
            problems.append(f"service {name} has no health check")
    if torchserve["depends_on"]["redis"]["condition"] != "service_healthy":
        problems.append("torchserve starts before redis is healthy")
    check = torchserve["healthcheck"]["test"]
    if check != dockerfile_healthcheck():
        problems.append(f"the compose health check {check} is not the image's")
    return problems


def test_compose_agrees_with_config_properties_and_the_dockerfile():
    assert compose_problems(compose(), COMPOSE_ENV) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["services"]["torchserve"]["ports"].append("0.0.0.0:9090:9090"),
        lambda c: c["services"]["torchserve"]["ports"].__setitem__(2, "0.0.0.0:8081:8081"),
        lambda c: c["services"]["torchserve"]["environment"].update(
            {"SAMSERVE_STORE_URL": "redis://:0123abcd@localhost:6379/0"}
        ),
        lambda c: c["services"]["redis"]["command"].__setitem__(6, "volatile-lru"),
        lambda c: c["services"]["redis"].update({"mem_limit": "512m"}),
        lambda c: c["services"]["redis"].pop("healthcheck"),
        lambda c: c["services"]["torchserve"]["build"].update({"context": "."}),
    ],
)
def test_compose_cross_checks_reject_a_disagreeing_file(change):
    document = compose()
    change(document)
    assert compose_problems(document, COMPOSE_ENV)


def test_compose_builds_the_cpu_image_and_the_gpu_override_the_gpu_one():
    flavor = compose()["services"]["torchserve"]["build"]["args"]["FLAVOR"]
    assert flavor == dockerfile_args()["FLAVOR"] == "cpu"
    override = compose("compose.gpu.yaml")["services"]["torchserve"]
    assert override["build"]["args"]["FLAVOR"] == "gpu"


# --- the Dockerfile, read -----------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        # Runs of blanks as one: the shell reads them alike, and no quoted word here has two.
        whole = " ".join((pending + line).split())
        pending = ""
        if whole:
            keyword, _, rest = whole.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_args(text: str | None = None) -> dict[str, str]:
    """Defaults of the ARGs before FROM (the ones FROM may use)."""
    args = {}
    for keyword, rest in dockerfile_instructions(text or DOCKERFILE.read_text()):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def _exec_form(rest: str) -> list[str]:
    return json.loads(rest)


def dockerfile_healthcheck(text: str | None = None) -> list[str]:
    for keyword, rest in dockerfile_instructions(text or DOCKERFILE.read_text()):
        if keyword == "HEALTHCHECK":
            return ["CMD", *_exec_form(rest.split(" CMD ", 1)[1])]
    return []


def dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore (last matching pattern wins, ``!`` re-includes) keeps ``path``."""
    kept = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if fnmatch(path, glob) or path == glob:
            kept = negated
    return kept


def dockerfile_problems(text: str, ignore: list[str]) -> list[str]:
    """How the Dockerfile disagrees with pyproject.toml, config.properties, build_mar.py,
    the repository's files and its own .dockerignore; and what would turn token auth off."""
    problems = []
    instructions = dockerfile_instructions(text)
    args = dockerfile_args(text)
    if args.get("TORCHSERVE_VERSION") != torchserve_pin():
        problems.append(f"TORCHSERVE_VERSION {args.get('TORCHSERVE_VERSION')} != pyproject's")
    if args.get("FLAVOR") != "cpu":
        problems.append(f"FLAVOR defaults to {args.get('FLAVOR')}, not cpu")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    if froms != ["pytorch/torchserve:${TORCHSERVE_VERSION}-${FLAVOR}"]:
        problems.append(f"FROM {froms} is not the official image at the pinned release")

    copies: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword != "COPY":
            continue
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        for source in words[:-1]:
            copies[source] = words[-1]
            built = source == archive_path()
            if not (REPO / source).is_file() and not built:
                problems.append(f"COPY {source}: no such file, and no build step makes it")
            if not dockerignore_admits(source, ignore):
                problems.append(f"COPY {source}: left out of the build context by the ignore file")
    if archive_path() not in copies:
        problems.append(f"the image lacks the archive {archive_path()}")

    exposed = sorted(int(p) for k, r in instructions if k == "EXPOSE" for p in r.split())
    if exposed != sorted(config_ports(ROOT_CONFIG).values()):
        problems.append(
            f"EXPOSE {exposed}, config.properties listens on {config_ports(ROOT_CONFIG)}"
        )

    # The flag, the config key or TorchServe's environment variable, in any instruction.
    if any(re.search(r"disable[-_]token", r, re.IGNORECASE) for _, r in instructions):
        problems.append("an instruction turns token authorization off")
    entrypoint = next((_exec_form(r) for k, r in instructions if k == "ENTRYPOINT"), [])
    cmd = next((_exec_form(r) for k, r in instructions if k == "CMD"), [])
    command = entrypoint + cmd
    if command[:1] != ["torchserve"] or "--foreground" not in command:
        problems.append(f"the container does not run TorchServe in the foreground: {command}")
    ts_config = _command_option(command, "--ts-config")
    model_store = _command_option(command, "--model-store")
    # The config TorchServe reads is config.properties with the container's overlay after it.
    assembled = f"cat {copies.get('config.properties')} "
    overlay = copies.get("deploy/docker/container.properties")
    runs = [r for k, r in instructions if k == "RUN"]
    if not any(r.startswith(assembled) and f"{overlay} > {ts_config}" in r for r in runs):
        problems.append(f"--ts-config {ts_config} is not config.properties + container.properties")
    if f"{MODEL_NAME}={Path(archive_path()).name}" != _command_option(command, "--models"):
        problems.append(f"--models {_command_option(command, '--models')} is not the archive")
    if copies.get(archive_path()) != f"{model_store}/{Path(archive_path()).name}":
        problems.append(f"the archive is copied to {copies.get(archive_path())}, not {model_store}")
    requirements = copies.get("handler/requirements.txt")
    if not any(f"-r {requirements}" in r and " -c " in r for r in runs):
        problems.append("handler/requirements.txt is not installed against the image's torch")
    check = dockerfile_healthcheck(text)
    if copies.get("deploy/docker/healthcheck.py") not in check:
        problems.append(f"HEALTHCHECK {check} does not run the copied health check")
    # A metrics config TorchServe cannot read stops every worker.
    metrics_config = container_config().get("metrics_config")
    metrics_yaml = ROOT_CONFIG["metrics_config"]
    if copies.get(metrics_yaml) != metrics_config:
        problems.append(f"metrics_config {metrics_config} is not where {metrics_yaml} is copied")
    return problems


def dockerignore() -> list[str]:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_agrees_with_the_repository():
    assert dockerfile_problems(DOCKERFILE.read_text(), dockerignore()) == []


@pytest.mark.parametrize(
    "old, new",
    [
        ("ARG TORCHSERVE_VERSION=0.12.0", "ARG TORCHSERVE_VERSION=0.11.0"),
        ("FROM pytorch/torchserve:${TORCHSERVE_VERSION}-${FLAVOR}", "FROM ubuntu:24.04"),
        ("COPY --chown=model-server config.properties", "COPY --chown=model-server config.yaml"),
        ("model_store/sam.mar /home", "model_store/sam2.mar /home"),
        ("EXPOSE 8080 8081 8082 7070 7071", "EXPOSE 8080 8081"),
        ('"--ncs",', '"--ncs", "--disable-token-auth",'),
        ('CMD ["--models", "sam=sam.mar"]', 'CMD ["--models", "sam=other.mar"]'),
        ("-c /home/model-server/samserve/torch-constraints.txt", ""),
        ("/home/model-server/samserve/container.properties \\", "\\"),
        ('CMD ["python", "/home/model-server/samserve/healthcheck.py"]', 'CMD ["true"]'),
        ("metrics.yaml /home/model-server/samserve/metrics.yaml", "metrics.yaml /tmp/m.yaml"),
    ],
)
def test_dockerfile_check_rejects_a_broken_dockerfile(old, new):
    text = DOCKERFILE.read_text()
    assert old in text
    assert dockerfile_problems(text.replace(old, new, 1), dockerignore())


def test_dockerfile_check_rejects_a_build_context_without_the_archive():
    ignore = [p for p in dockerignore() if p != f"!{archive_path()}"]
    assert dockerfile_problems(DOCKERFILE.read_text(), ignore)


def container_config() -> dict[str, str]:
    """What TorchServe reads in the image: config.properties, then the overlay (later wins)."""
    text = (REPO / "config.properties").read_text() + "\n"
    return healthcheck.parse_properties(
        text + (DEPLOY / "docker" / "container.properties").read_text()
    )


def test_container_config_changes_only_addresses_and_paths():
    config = container_config()
    assert config_ports(config) == config_ports(ROOT_CONFIG)
    changed = {k for k in config if config[k] != ROOT_CONFIG.get(k)}
    assert changed == {
        "inference_address",
        "management_address",
        "metrics_address",
        "grpc_inference_address",
        "grpc_management_address",
        "model_store",
        "metrics_config",  # absolute: where the Dockerfile copies it (dockerfile_problems)
    }
    assert config.get("disable_token_authorization", "false") == "false"
    assert config["allowed_urls"] == "^$"
    model_store = _command_option(_exec_form(next(
        r for k, r in dockerfile_instructions(DOCKERFILE.read_text()) if k == "ENTRYPOINT"
    )), "--model-store")  # fmt: skip
    assert config["model_store"] == model_store


# --- Python the image runs ----------------------------------------------------------------


def python_files_the_image_runs() -> Iterator[Path]:
    yield DEPLOY / "docker" / "healthcheck.py"
    yield from sorted((REPO / "handler").rglob("*.py"))


@pytest.mark.parametrize(
    "path", list(python_files_the_image_runs()), ids=lambda p: str(p.relative_to(REPO))
)
def test_the_images_python_can_parse_what_it_runs(path):
    # Syntax only (feature_version is best effort); the image build imports the handler.
    ast.parse(path.read_text(), filename=str(path), feature_version=IMAGE_PYTHON)


def test_the_python_check_rejects_newer_syntax():
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=IMAGE_PYTHON)


# --- the health check, against a fake TorchServe ------------------------------------------


class FakeTorchServe:
    """/ping on one port and /token on another, with keys as TorchServe 0.12 checks them:
    400 InvalidKeyException for a wrong or expired key; /token rewrites the key file."""

    def __init__(self, key_file: Path, status: int = 200) -> None:
        self.key_file = key_file
        self.status = status
        self.inference_key = "inf-1"
        self.api_key = "api-key"
        self.renewals = 0
        self.write_keys()
        self.servers = [self._server(self._ping), self._server(self._token)]

    def write_keys(self) -> None:
        keys = {
            "management": {"key": "mgmt", "expiration time": "2099-01-01T00:00:00Z"},
            "inference": {"key": self.inference_key, "expiration time": "2099-01-01T00:00:00Z"},
            "API": {"key": self.api_key},
        }
        self.key_file.write_text(json.dumps(keys))

    def _server(self, answer: Callable[[BaseHTTPRequestHandler], tuple[int, dict]]) -> Any:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                status, body = answer(self)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    @staticmethod
    def _refused() -> tuple[int, dict]:
        return 400, {"code": 400, "type": "InvalidKeyException", "message": "Token failed"}

    def _bearer(self, request: BaseHTTPRequestHandler) -> str:
        return (request.headers.get("Authorization") or "").removeprefix("Bearer ")

    def _ping(self, request: BaseHTTPRequestHandler) -> tuple[int, dict]:
        if request.path != "/ping" or self._bearer(request) != self.inference_key:
            return self._refused()
        return self.status, {"status": "Healthy" if self.status == 200 else "Unhealthy"}

    def _token(self, request: BaseHTTPRequestHandler) -> tuple[int, dict]:
        query = parse_qs(urlsplit(request.path).query)
        if self._bearer(request) != self.api_key or query.get("type") != ["inference"]:
            return self._refused()
        self.renewals += 1
        self.inference_key = f"inf-{self.renewals + 1}"
        self.write_keys()
        return 200, {}

    def config(self, path: Path) -> Path:
        ping, token = (s.server_address[1] for s in self.servers)
        # Wildcard addresses, as in the image: the check calls them on loopback.
        path.write_text(
            f"inference_address=http://0.0.0.0:{ping}\nmanagement_address=http://0.0.0.0:{token}\n"
        )
        return path

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeTorchServe]:
    server = FakeTorchServe(tmp_path / "key_file.json")
    yield server
    server.close()


def _run_check(fake: FakeTorchServe, tmp_path: Path) -> int:
    config = fake.config(tmp_path / "config.properties")
    return healthcheck.main(["--config", str(config), "--key-file", str(fake.key_file)])


def test_healthcheck_passes_with_the_current_key(fake, tmp_path):
    assert _run_check(fake, tmp_path) == 0
    assert fake.renewals == 0


def test_healthcheck_renews_an_expired_key_once_and_passes(fake, tmp_path):
    fake.inference_key = "inf-expired-server-side"  # the file's key is now refused
    assert _run_check(fake, tmp_path) == 0
    assert fake.renewals == 1
    assert json.loads(fake.key_file.read_text())["inference"]["key"] == fake.inference_key


def test_healthcheck_fails_on_an_unhealthy_server(fake, tmp_path):
    fake.status = 500
    assert _run_check(fake, tmp_path) == 1


def test_healthcheck_fails_when_the_key_cannot_be_renewed(fake, tmp_path):
    fake.inference_key = "inf-expired-server-side"
    fake.api_key = "another-api-key"
    assert _run_check(fake, tmp_path) == 1


def test_healthcheck_fails_without_a_key_file_or_server(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\n")
    missing = tmp_path / "key_file.json"
    assert healthcheck.main(["--config", str(config), "--key-file", str(missing)]) == 1
    missing.write_text(json.dumps({"inference": {"key": "k"}}))
    assert healthcheck.main(["--config", str(config), "--key-file", str(missing)]) == 1
