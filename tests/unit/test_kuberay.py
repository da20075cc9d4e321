"""deploy/kuberay and deploy/Containerfile: schema-valid, and what Warden relies on holds.

Schemas. Every Kubernetes object, and every pod template inside the KubeRay resources, is
checked against the model classes of the Kubernetes Python client (``openapi_types`` and
``attribute_map``): an unknown field, a value of the wrong type or a missing required field is
an error, as with ``kubectl apply --validate=strict``. The RayCluster and RayJob fields around
the pod templates are checked against ``RAY_CLUSTER_SPEC`` / ``RAY_JOB_SPEC`` below, written
from KubeRay's ray.io/v1 API reference, and ``rayStartParams`` keys against the options of
the installed Ray's ``ray start``.

Properties. Role resources and their pods, token authentication in every container, the
sandbox pods' egress policy against the ports pinned in rayStartParams, the runs volume, Ray
versions, root only inside gVisor, and the image's contents.

Each check is a function that raises ``AssertionError`` (or ``SchemaError``); every check is
also run on mutated copies that break what it names, and must fail there. No cluster, no Ray
process, no network.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import functools
import importlib.metadata
import importlib.util
import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from kubernetes import client as k8s

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"

ROLE_RESOURCES = {"trusted": "warden_trusted", "agent": "warden_agent", "sandbox": "warden_sandbox"}
COMPONENT_LABEL = "app.kubernetes.io/component"
RUNS_DIR = "/var/lib/warden/runs"
# Ports sandbox pods must never reach: Ray's dashboard / job API, Ray client server, dashboard
# agent, metrics export, and the Warden control port of deploy/prometheus/prometheus.yml.
FORBIDDEN_PORTS = {8265: "Ray dashboard and job API", 10001: "Ray client server", 52365: "Ray dashboard agent",
                   8080: "Ray metrics export", 9464: "Warden /metrics and /control (example)"}
EPHEMERAL_PORTS = range(32768, 61000)  # Linux default; where port 0 (e.g. Warden's control port) lands
# What networkpolicy-http-fetch.yaml must keep out of reach.
NON_PUBLIC = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",
              "0.0.0.0/8", "::1/128", "fc00::/7", "fe80::/10"]


# --------------------------------------------------------------------------- schema checks

class SchemaError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")


# resource.Quantity, as the API server parses it (the CRDs' pattern for int-or-string quantities).
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?$")
# Fields of type resource.Quantity: the client types them as str; the API server also takes numbers.
QUANTITY_FIELDS = {
    ("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
    ("V1VolumeResourceRequirements", "limits"), ("V1VolumeResourceRequirements", "requests"),
    ("V1EmptyDirVolumeSource", "size_limit"), ("V1Overhead", "pod_fixed"),
}
# Base64 fields (format: byte); older clients type them as plain str.
BASE64_FIELDS = {("V1Secret", "data"), ("V1ConfigMap", "binary_data")}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_str(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise SchemaError(path, f"expected a string, got {type(value).__name__} {value!r}")


def _check_int(value: Any, path: str) -> None:
    if not _is_int(value):
        raise SchemaError(path, f"expected an integer, got {type(value).__name__} {value!r}")


def _check_float(value: Any, path: str) -> None:
    if not (_is_int(value) or isinstance(value, float)):
        raise SchemaError(path, f"expected a number, got {type(value).__name__} {value!r}")


def _check_bool(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise SchemaError(path, f"expected a boolean, got {type(value).__name__} {value!r}")


def _check_bytes(value: Any, path: str) -> None:  # Secret.data: base64 in YAML
    _check_str(value, path)
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SchemaError(path, "not base64") from None


def _check_datetime(value: Any, path: str) -> None:
    if isinstance(value, datetime.datetime):
        return
    _check_str(value, path)
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SchemaError(path, f"{value!r} is not an RFC 3339 time") from None


def _check_int_or_string(value: Any, path: str) -> None:
    # The client types IntOrString fields (ports, targetPort, ...) as `object`; no manifest here
    # uses the few free-form `object` fields, so anything else there is an error, never a pass.
    if not (_is_int(value) or isinstance(value, str)):
        raise SchemaError(path, f"expected an integer or a string, got {type(value).__name__} {value!r}")


SCALARS: dict[str, Callable[[Any, str], None]] = {
    "str": _check_str, "int": _check_int, "float": _check_float, "bool": _check_bool,
    "bytes": _check_bytes, "datetime": _check_datetime, "object": _check_int_or_string,
}


@functools.cache
def required_keys(cls: type) -> frozenset[str]:
    """The JSON names of the fields the API requires in ``cls``."""
    fields = getattr(cls, "model_fields", None)
    if fields is not None:  # pydantic models: required fields have no default
        return frozenset(f.serialization_alias or name for name, f in fields.items() if f.is_required())
    # Classic generated models: with client-side validation on, a required field's setter
    # refuses None ("Invalid value for `x`, must not be `None`").
    lax, strict = k8s.Configuration(), k8s.Configuration()
    lax.client_side_validation, strict.client_side_validation = False, True
    instance = cls(local_vars_configuration=lax)
    instance.local_vars_configuration = strict
    required = set()
    for attr in cls.openapi_types:
        try:
            setattr(instance, attr, None)
        except ValueError as exc:
            if "must not be `None`" in str(exc):
                required.add(cls.attribute_map[attr])
    return frozenset(required)


def check_value(value: Any, typ: str, path: str, *, fmt: str | None = None) -> None:
    """``value`` (parsed YAML) against a type name of the Kubernetes client's ``openapi_types``;
    ``fmt`` is "quantity" or "base64" for the string fields that hold one."""
    if value is None:
        raise SchemaError(path, "null (leave the field out instead)")
    # Type names as the client spells them: List[X] / Dict[str, X] (pydantic models) or
    # list[X] / dict(str, X) (older generated models).
    if m := re.fullmatch(r"[Ll]ist\[(.+)\]", typ):
        if not isinstance(value, list):
            raise SchemaError(path, f"expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            check_value(item, m.group(1), f"{path}[{i}]", fmt=fmt)
        return
    if m := re.fullmatch(r"Dict\[str, (.+)\]|dict\(str, (.+)\)", typ):
        if not isinstance(value, dict):
            raise SchemaError(path, f"expected a map, got {type(value).__name__}")
        for key, item in value.items():
            if not isinstance(key, str):
                raise SchemaError(path, f"key {key!r} is not a string")
            check_value(item, m.group(1) or m.group(2), f"{path}.{key}", fmt=fmt)
        return
    if fmt == "base64" and typ in ("str", "bytes"):
        _check_bytes(value, path)
        return
    if fmt == "quantity" and typ == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not QUANTITY.match(str(value)):
            raise SchemaError(path, f"{value!r} is not a quantity")
        return
    if typ in SCALARS:
        SCALARS[typ](value, path)
        return
    model = getattr(k8s, typ, None)
    if model is None or not hasattr(model, "openapi_types"):
        raise SchemaError(path, f"the Kubernetes client has no model {typ}")
    check_model(value, model, path)


def check_model(obj: Any, cls: type, path: str) -> None:
    if not isinstance(obj, dict):
        raise SchemaError(path, f"expected an object ({cls.__name__}), got {type(obj).__name__}")
    attrs = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    for key in obj:
        if key not in attrs:
            raise SchemaError(path, f"unknown field {key!r} in {cls.__name__}")
    for key in sorted(required_keys(cls)):
        if key not in obj:
            raise SchemaError(path, f"missing required field {key!r} of {cls.__name__}")
    for key, value in obj.items():
        attr = attrs[key]
        fmt = ("quantity" if (cls.__name__, attr) in QUANTITY_FIELDS
               else "base64" if (cls.__name__, attr) in BASE64_FIELDS else None)
        check_value(value, cls.openapi_types[attr], f"{path}.{key}", fmt=fmt)


# KubeRay ray.io/v1, the fields of its API reference that matter here. Required: what the CRDs
# of KubeRay 1.x require (older releases also require rayStartParams, minReplicas and maxReplicas).
# Strings name Kubernetes client types, as in openapi_types.

class Obj:
    def __init__(self, fields: dict[str, Any], required: tuple[str, ...] = ()) -> None:
        self.fields, self.required = fields, required


class OneOf:
    def __init__(self, *values: str) -> None:
        self.values = values


AUTH_OPTIONS = Obj({"mode": OneOf("token", "disabled"), "secretName": "str", "enableK8sTokenAuth": "bool"})
HEAD_GROUP_SPEC = Obj({
    "rayStartParams": "Dict[str, str]", "serviceType": OneOf("ClusterIP", "NodePort", "LoadBalancer"),
    "template": "V1PodTemplateSpec", "headService": "V1Service", "enableIngress": "bool",
    "resources": "Dict[str, str]", "labels": "Dict[str, str]",
}, required=("rayStartParams", "template"))
WORKER_GROUP_SPEC = Obj({
    "groupName": "str", "replicas": "int", "minReplicas": "int", "maxReplicas": "int",
    "idleTimeoutSeconds": "int", "numOfHosts": "int", "suspend": "bool",
    "rayStartParams": "Dict[str, str]", "template": "V1PodTemplateSpec",
    "scaleStrategy": Obj({"workersToDelete": "List[str]"}),
    "resources": "Dict[str, str]", "labels": "Dict[str, str]",
}, required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"))
RAY_CLUSTER_SPEC = Obj({
    "rayVersion": "str", "enableInTreeAutoscaling": "bool", "authOptions": AUTH_OPTIONS,
    "autoscalerOptions": Obj({"resources": "V1ResourceRequirements", "image": "str", "imagePullPolicy": "str",
                              "idleTimeoutSeconds": "int",
                              "upscalingMode": OneOf("Default", "Aggressive", "Conservative"),
                              "version": OneOf("v1", "v2"), "env": "List[V1EnvVar]",
                              "envFrom": "List[V1EnvFromSource]", "volumeMounts": "List[V1VolumeMount]",
                              "securityContext": "V1SecurityContext"}),
    "headServiceAnnotations": "Dict[str, str]", "suspend": "bool", "managedBy": "str",
    "headGroupSpec": HEAD_GROUP_SPEC, "workerGroupSpecs": [WORKER_GROUP_SPEC],
}, required=("headGroupSpec",))
RAY_JOB_SPEC = Obj({
    "entrypoint": "str", "runtimeEnvYAML": "str", "jobId": "str", "metadata": "Dict[str, str]",
    "submissionMode": OneOf("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
    "shutdownAfterJobFinishes": "bool", "ttlSecondsAfterFinished": "int", "activeDeadlineSeconds": "int",
    "preRunningDeadlineSeconds": "int", "backoffLimit": "int", "suspend": "bool", "managedBy": "str",
    "entrypointNumCpus": "float", "entrypointNumGpus": "float", "entrypointResources": "str",
    "rayClusterSpec": RAY_CLUSTER_SPEC, "clusterSelector": "Dict[str, str]",
    "submitterPodTemplate": "V1PodTemplateSpec", "submitterConfig": Obj({"backoffLimit": "int"}),
})


def check_schema(value: Any, schema: Any, path: str) -> None:
    if value is None:
        raise SchemaError(path, "null (leave the field out instead)")
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            raise SchemaError(path, f"expected an object, got {type(value).__name__}")
        for key in value:
            if key not in schema.fields:
                raise SchemaError(path, f"unknown field {key!r}")
        for key in schema.required:
            if key not in value:
                raise SchemaError(path, f"missing required field {key!r}")
        for key, item in value.items():
            check_schema(item, schema.fields[key], f"{path}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise SchemaError(path, f"expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{path}[{i}]")
    elif isinstance(schema, OneOf):
        if value not in schema.values:
            raise SchemaError(path, f"{value!r} is not one of {list(schema.values)}")
    else:
        check_value(value, schema, path)


@functools.cache
def ray_start_options() -> frozenset[str]:
    """The options of the installed Ray's ``ray start``, read from its source (Ray is not imported)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin, "ray is not installed"
    source = (Path(spec.origin).parent / "scripts" / "scripts.py").read_text()
    end = source.index("\ndef start(")
    options = frozenset(re.findall(r'"--([a-z0-9][a-z0-9-]*)"', source[source.rindex("@cli.command(", 0, end):end]))
    assert {"num-cpus", "resources", "min-worker-port", "node-manager-port"} <= options, \
        "cannot read ray start's options"
    return options


def check_ray_start_params(params: dict[str, str], path: str) -> None:
    for key in params:
        if key not in ray_start_options():
            raise SchemaError(f"{path}.{key}", f"not an option of `ray start` in Ray {ray_version()}")


def check_cluster_extras(spec: dict, path: str) -> None:
    """What the CRD's schema does not say but KubeRay and `ray start` need."""
    check_ray_start_params(spec["headGroupSpec"]["rayStartParams"], f"{path}.headGroupSpec.rayStartParams")
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert len(names) == len(set(names)), f"{path}: worker group names repeat: {names}"
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        where = f"{path}.workerGroupSpecs[{i}]"
        check_ray_start_params(group["rayStartParams"], f"{where}.rayStartParams")
        if not DNS_LABEL.match(group["groupName"]):
            raise SchemaError(f"{where}.groupName", "not a DNS label")
        replicas = group.get("replicas", 0)
        if not group["minReplicas"] <= replicas <= group["maxReplicas"]:
            raise SchemaError(where, f"replicas {replicas} outside [{group['minReplicas']}, {group['maxReplicas']}]")
    for name, template in cluster_templates(spec).items():
        containers = template["spec"]["containers"]
        if not containers[0]["name"].startswith("ray-"):
            raise SchemaError(f"{path} {name}", "the Ray container must come first")


def custom_resource(spec_schema: Obj) -> Obj:
    return Obj({"apiVersion": "str", "kind": "str", "metadata": "V1ObjectMeta", "spec": spec_schema},
               required=("apiVersion", "kind", "metadata", "spec"))


def check_object(doc: Any, where: str) -> None:
    """One YAML document: its kind's schema, plus metadata.name."""
    if not isinstance(doc, dict):
        raise SchemaError(where, "not an object")
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key == ("ray.io/v1", "RayCluster"):
        check_schema(doc, custom_resource(RAY_CLUSTER_SPEC), where)
        check_cluster_extras(doc["spec"], f"{where}.spec")
    elif key == ("ray.io/v1", "RayJob"):
        check_schema(doc, custom_resource(RAY_JOB_SPEC), where)
        if "rayClusterSpec" in doc["spec"]:
            check_cluster_extras(doc["spec"]["rayClusterSpec"], f"{where}.spec.rayClusterSpec")
        if "runtimeEnvYAML" in doc["spec"] and not isinstance(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]), dict):
            raise SchemaError(f"{where}.spec.runtimeEnvYAML", "not a YAML mapping")
    elif key in K8S_KINDS:
        check_model(doc, K8S_KINDS[key], where)
    else:
        raise SchemaError(where, f"no schema for {key}: add one to this test")
    name = doc["metadata"].get("name", "")
    if not DNS_SUBDOMAIN.match(name):
        raise SchemaError(f"{where}.metadata.name", f"{name!r} is not a DNS subdomain name")
    for path, template in pod_templates(doc).items():
        for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            if not DNS_LABEL.match(container["name"]):
                raise SchemaError(f"{where} {path}", f"container name {container['name']!r} is not a DNS label")
            for port in container.get("ports", []):
                if "name" in port and not re.fullmatch(r"(?=.{1,15}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?", port["name"]):
                    raise SchemaError(f"{where} {path}", f"port name {port['name']!r} is not an IANA service name")


K8S_KINDS = {
    ("v1", "Secret"): k8s.V1Secret,
    ("v1", "PersistentVolumeClaim"): k8s.V1PersistentVolumeClaim,
    ("node.k8s.io/v1", "RuntimeClass"): k8s.V1RuntimeClass,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s.V1NetworkPolicy,
}


# --------------------------------------------------------------------------- the manifests

class StrictLoader(yaml.SafeLoader):
    """YAML as kubectl reads it, except that a repeated key is an error, not a silent overwrite."""


def _mapping_without_repeats(loader: StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"repeated key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def load_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERAY.iterdir() if p.name.endswith((".yaml", ".yml", ".yaml.example")))


@functools.cache
def _documents() -> dict[str, list[Any]]:
    return {p.name: load_all(p.read_text()) for p in manifest_files()}


def documents() -> dict[str, list[Any]]:
    return copy.deepcopy(_documents())


def the(kind: str, file: str | None = None) -> Any:
    """The one document of ``kind`` (in ``file``), as a fresh copy."""
    found = [d for name, docs in documents().items() if file in (None, name) for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}" + (f" in {file}" if file else "") + f", found {len(found)}"
    return found[0]


def cluster_templates(spec: dict) -> dict[str, dict]:
    out = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        out[f"group {group['groupName']}"] = group["template"]
    return out


def pod_templates(doc: dict) -> dict[str, dict]:
    if doc.get("kind") == "RayCluster":
        return cluster_templates(doc["spec"])
    if doc.get("kind") == "RayJob":
        out = {f"rayClusterSpec {k}": v for k, v in cluster_templates(doc["spec"]["rayClusterSpec"]).items()}
        if "submitterPodTemplate" in doc["spec"]:
            out["submitter"] = doc["spec"]["submitterPodTemplate"]
        return out
    return {}


def all_containers(template: dict) -> Iterator[dict]:
    yield from template["spec"].get("initContainers", [])
    yield from template["spec"]["containers"]


def cluster_specs() -> dict[str, dict]:
    return {"RayCluster": the("RayCluster")["spec"], "RayJob": the("RayJob")["spec"]["rayClusterSpec"]}


def ray_resources(params: dict[str, str]) -> dict[str, float]:
    """The custom resources a group advertises: rayStartParams' ``resources``, which KubeRay
    puts on the `ray start` command line, hence the shell quoting around the JSON."""
    if "resources" not in params:
        return {}
    words = shlex.split(params["resources"])
    assert len(words) == 1, f"resources must be one shell word: {params['resources']!r}"
    value = json.loads(words[0])
    assert isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()), value
    return value


def ray_version() -> str:
    return importlib.metadata.version("ray")


def labels(template: dict) -> dict[str, str]:
    return template.get("metadata", {}).get("labels", {})


def selects(selector: dict, pod_labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics."""
    if any(pod_labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if ((op == "In" and pod_labels.get(key) not in values) or (op == "NotIn" and pod_labels.get(key) in values)
                or (op == "Exists" and key not in pod_labels) or (op == "DoesNotExist" and key in pod_labels)):
            return False
    return True


# --------------------------------------------------------------------------- property checks

def check_roles(spec: dict) -> None:
    """Head: warden_trusted, no CPUs. Each worker group: exactly one of warden_agent /
    warden_sandbox, labelled with that role; sandbox groups in gVisor with no CPUs."""
    head = spec["headGroupSpec"]
    warden = {k: v for k, v in ray_resources(head["rayStartParams"]).items() if k.startswith("warden_")}
    assert set(warden) == {ROLE_RESOURCES["trusted"]} and warden[ROLE_RESOURCES["trusted"]] >= 1, \
        f"the head must advertise warden_trusted and no other role: {warden}"
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must advertise no CPUs"
    assert labels(head["template"]).get(COMPONENT_LABEL) == "trusted", "the head pods must be labelled trusted"
    roles_seen = set()
    for group in spec["workerGroupSpecs"]:
        res = {k: v for k, v in ray_resources(group["rayStartParams"]).items() if k.startswith("warden_")}
        roles = [role for role, name in ROLE_RESOURCES.items() if name in res]
        assert len(roles) == 1 and roles[0] != "trusted", \
            f"group {group['groupName']} must advertise exactly one of warden_agent, warden_sandbox: {res}"
        role = roles[0]
        assert res[ROLE_RESOURCES[role]] >= 1, f"group {group['groupName']}: {res}"
        roles_seen.add(role)
        assert labels(group["template"]).get(COMPONENT_LABEL) == role, \
            f"group {group['groupName']} advertises {ROLE_RESOURCES[role]} but is labelled " \
            f"{labels(group['template']).get(COMPONENT_LABEL)!r}"
        if role == "sandbox":
            assert group["template"]["spec"].get("runtimeClassName") == runtime_class_name(), \
                f"sandbox group {group['groupName']} must run in gVisor (runtimeClassName)"
            assert group["rayStartParams"].get("num-cpus") == "0", \
                f"sandbox group {group['groupName']} must advertise no CPUs"
    assert roles_seen == {"agent", "sandbox"}, f"worker groups for agents and sandboxes needed, got {roles_seen}"


def runtime_class_name() -> str:
    rc = the("RuntimeClass")
    assert rc["handler"] == "runsc", "the gVisor RuntimeClass's handler must be runsc"
    return rc["metadata"]["name"]


def check_auth(templates: dict[str, dict], secret: dict, cluster_specs_: list[dict]) -> None:
    """Every container: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret's auth_token."""
    name, key = secret["metadata"]["name"], "auth_token"
    assert key in {**secret.get("data", {}), **secret.get("stringData", {})}, f"the Secret has no {key}"
    for where, template in templates.items():
        for container in all_containers(template):
            env = container.get("env", [])
            mode = [e for e in env if e["name"] == "RAY_AUTH_MODE"]
            token = [e for e in env if e["name"] == "RAY_AUTH_TOKEN"]
            assert len(mode) == 1 and mode[0].get("value") == "token", \
                f"{where}, container {container['name']}: RAY_AUTH_MODE must be token"
            assert len(token) == 1 and "value" not in token[0], \
                f"{where}, container {container['name']}: RAY_AUTH_TOKEN must come from the Secret, once"
            ref = token[0].get("valueFrom", {}).get("secretKeyRef", {})
            assert ref.get("name") == name and ref.get("key") == key and not ref.get("optional", False), \
                f"{where}, container {container['name']}: RAY_AUTH_TOKEN must be secretKeyRef {name}/{key}: {ref}"
            assert not any(e["name"] == "RAY_AUTH_TOKEN_PATH" for e in env), f"{where}: a second token source"
    for spec in cluster_specs_:
        auth = spec.get("authOptions")
        if auth is not None:
            assert auth.get("mode", "token") == "token" and auth.get("secretName") == name, \
                f"authOptions must use token mode and the Secret {name}: {auth}"


def check_secret_template(secret: dict) -> None:
    values = {**{k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()},
              **secret.get("stringData", {})}
    assert values.get("auth_token") == "", "the Secret template must not carry a token"


def _ports(rule: dict) -> set[tuple[str, int]]:
    out = set()
    for p in rule.get("ports", []):
        assert _is_int(p.get("port")), f"use port numbers, not names, in this policy: {p}"
        for port in range(p["port"], p.get("endPort", p["port"]) + 1):
            out.add((p.get("protocol", "TCP"), port))
    return out


def head_ports(spec: dict) -> set[int]:
    """The head's ports a sandbox pod needs, as pinned by rayStartParams."""
    params = spec["headGroupSpec"]["rayStartParams"]
    for name in ("port", "node-manager-port", "object-manager-port", "min-worker-port", "max-worker-port"):
        assert name in params and params[name] != "0", f"the head must pin {name} in rayStartParams"
    lo, hi = int(params["min-worker-port"]), int(params["max-worker-port"])
    assert lo <= hi
    return {int(params["port"]), int(params["node-manager-port"]), int(params["object-manager-port"]),
            *range(lo, hi + 1)}


def check_ports(spec: dict) -> None:
    """The head's Ray ports avoid the forbidden ones; every group pins the same ports."""
    ports = head_ports(spec)
    for port, what in FORBIDDEN_PORTS.items():
        assert port not in ports, f"the head's Ray ports include {port} ({what})"
    assert not ports & set(EPHEMERAL_PORTS), "the head's Ray ports overlap the ephemeral range"
    pinned = ("node-manager-port", "object-manager-port", "min-worker-port", "max-worker-port")
    head = {k: spec["headGroupSpec"]["rayStartParams"][k] for k in pinned}
    for group in spec["workerGroupSpecs"]:
        assert {k: group["rayStartParams"].get(k) for k in pinned} == head, \
            f"group {group['groupName']} must pin the same Ray ports as the head"


def check_sandbox_egress(policy: dict, spec: dict) -> None:
    """Selects the sandbox pods only; egress only to the head's Ray ports and to DNS."""
    templates = cluster_templates(spec)
    by_role = {labels(t).get(COMPONENT_LABEL): labels(t) for t in templates.values()}
    selector = policy["spec"]["podSelector"]
    assert selects(selector, by_role["sandbox"]), "the policy must select the sandbox pods"
    assert not selects(selector, by_role["trusted"]) and not selects(selector, by_role["agent"]), \
        "the policy must not select head or agent pods"
    assert "Egress" in policy["spec"].get("policyTypes", []), "the policy must restrict egress"
    to_head: set[tuple[str, int]] = set()
    dns_rules = 0
    for i, rule in enumerate(policy["spec"].get("egress", [])):
        assert rule.get("to"), f"egress rule {i} has no `to`: it would allow every destination"
        assert rule.get("ports"), f"egress rule {i} has no `ports`: it would allow every port"
        ports = _ports(rule)
        for peer in rule["to"]:
            assert "ipBlock" not in peer, f"egress rule {i}: no address blocks in this policy"
            if "namespaceSelector" in peer:  # the cluster DNS
                kube_system = {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
                assert peer["namespaceSelector"] == kube_system, peer
                assert peer.get("podSelector") == {"matchLabels": {"k8s-app": "kube-dns"}}, peer
                assert ports == {("UDP", 53), ("TCP", 53)}, f"egress rule {i}: DNS only on port 53, got {sorted(ports)}"
                dns_rules += 1
            else:
                pod_selector = peer["podSelector"]
                assert selects(pod_selector, by_role["trusted"]), f"egress rule {i} must name the head pods"
                assert not selects(pod_selector, by_role["agent"]) and not selects(pod_selector, by_role["sandbox"]), \
                    f"egress rule {i} reaches agent or sandbox pods"
                to_head |= ports
    assert dns_rules == 1, "one egress rule for the cluster DNS"
    assert all(proto == "TCP" for proto, _ in to_head) and {p for _, p in to_head} == head_ports(spec), \
        "the ports allowed to the head must be exactly the Ray ports pinned in its rayStartParams"
    allowed = {p for _, p in to_head}
    for port, what in FORBIDDEN_PORTS.items():
        assert port not in allowed, f"sandbox pods may reach {port} ({what})"


def check_http_fetch_egress(policy: dict, spec: dict) -> None:
    """The optional policy: sandbox pods only, ports 80/443, no non-public address."""
    by_role = {labels(t).get(COMPONENT_LABEL): labels(t) for t in cluster_templates(spec).values()}
    selector = policy["spec"]["podSelector"]
    assert selects(selector, by_role["sandbox"]) and not selects(selector, by_role["trusted"]) \
        and not selects(selector, by_role["agent"]), "the policy must select the sandbox pods only"
    for i, rule in enumerate(policy["spec"]["egress"]):
        assert _ports(rule) <= {("TCP", 80), ("TCP", 443)} and rule.get("ports"), f"egress rule {i}: HTTP(S) only"
        assert rule.get("to"), f"egress rule {i} has no `to`"
        for peer in rule["to"]:
            assert set(peer) == {"ipBlock"}, f"egress rule {i}: address blocks only: {peer}"
            cidr = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            excepted = [ipaddress.ip_network(c) for c in peer["ipBlock"].get("except", [])]
            for net in map(ipaddress.ip_network, NON_PUBLIC):
                if net.version == cidr.version and net.subnet_of(cidr):
                    assert any(e.version == net.version and net.subnet_of(e) for e in excepted), \
                        f"egress rule {i} reaches {net}"


def check_runs_volume(spec: dict, pvc: dict, entrypoint: str | None = None) -> None:
    """The head keeps runs on the PersistentVolumeClaim, and the job writes its runs there."""
    pod = spec["headGroupSpec"]["template"]["spec"]
    mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == RUNS_DIR]
    assert len(mounts) == 1, f"the head must mount a volume at {RUNS_DIR}"
    volume = next(v for v in pod.get("volumes", []) if v["name"] == mounts[0]["name"])
    assert volume.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"], \
        f"the runs volume must be the PersistentVolumeClaim {pvc['metadata']['name']}, not {volume}"
    assert not mounts[0].get("readOnly", False)
    if entrypoint is not None:
        argv = shlex.split(entrypoint)
        assert argv[:2] == ["warden", "run"], f"the entrypoint must be `warden run`: {entrypoint}"
        assert "--runs-dir" in argv and argv[argv.index("--runs-dir") + 1] == RUNS_DIR, \
            f"the job must write its runs to {RUNS_DIR}: {entrypoint}"
        job = argv[2]
        assert job.startswith("/opt/warden/") and (ROOT / job.removeprefix("/opt/warden/")).is_file(), \
            f"the job file {job} must be one the image copies to /opt/warden"


def check_pod_security(templates: dict[str, dict], gvisor: str) -> None:
    """Root, added capabilities or privilege only inside gVisor; elsewhere non-root, no
    capabilities, no privilege escalation. No pod gets a service account token."""
    for where, template in templates.items():
        spec = template["spec"]
        assert spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken must be false"
        pod_sc = spec.get("securityContext", {})
        for c in all_containers(template):
            sc = {**pod_sc, **c.get("securityContext", {})}
            # Without runAsNonRoot the user is the image's, which the manifest cannot vouch for.
            may_be_root = sc.get("runAsUser") == 0 or not sc.get("runAsNonRoot", False)
            elevated = may_be_root or sc.get("privileged", False) or bool(sc.get("capabilities", {}).get("add"))
            if elevated:
                assert spec.get("runtimeClassName") == gvisor, \
                    f"{where}, container {c['name']}: root or capabilities only in a gVisor pod"
                assert not sc.get("privileged", False), f"{where}: no privileged containers"
            else:
                assert sc.get("allowPrivilegeEscalation") is False, f"{where}, {c['name']}: allowPrivilegeEscalation"
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}, {c['name']}: drop ALL capabilities"


def check_images(templates: dict[str, dict]) -> None:
    images = {c["image"] for t in templates.values() for c in all_containers(t)}
    assert len(images) == 1, f"every pod must run the same image (same Ray, same Python): {images}"


def containerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, out = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))), []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def check_containerfile(text: str) -> None:
    """Python 3.11 on bookworm, runsc + bubblewrap + util-linux from Debian, Ray pinned to the
    manifests' version, a non-root default user, no secret baked in."""
    instr = containerfile_instructions(text)
    args = dict(a.split("=", 1) if "=" in a else (a, "") for k, a in instr if k == "ARG")
    base = next(a for k, a in instr if k == "FROM")
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    assert base == "python:3.11-slim-bookworm", f"base image: {base}"
    apt = [a for k, a in instr if k == "RUN" and "apt-get install" in a]
    assert apt, "no apt-get install"
    packages = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", apt[0].split("apt-get install", 1)[1].split("&&")[0]))
    assert {"runsc", "bubblewrap", "util-linux", "wget"} <= packages, f"apt packages: {sorted(packages)}"
    assert args.get("RAY_VERSION") == ray_version(), f"RAY_VERSION {args.get('RAY_VERSION')} != Ray {ray_version()}"
    assert any(k == "RUN" and 'ray[default]==${RAY_VERSION}' in a for k, a in instr), "Ray not pinned to RAY_VERSION"
    users = [a for k, a in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"the default user must not be root: {users}"
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|CREDENTIAL", re.I)
    for k, a in instr:
        if k in ("ARG", "ENV", "LABEL"):
            assert not secretish.search(a), f"{k} {a}: no secrets in the image"
    assert "RAY_AUTH_TOKEN" not in text and "auth_token" not in text


# --------------------------------------------------------------------------- tests: schemas

def test_every_file_in_deploy_kuberay_is_checked():
    names = {p.name for p in KUBERAY.iterdir()}
    assert names - {p.name for p in manifest_files()} == {"README.md"}, "a file this test does not know about"
    kinds = sorted(d["kind"] for docs in _documents().values() for d in docs)
    assert kinds == sorted(["NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "RayJob",
                            "RuntimeClass", "Secret"]), kinds


@pytest.mark.parametrize("name", [p.name for p in manifest_files()])
def test_manifest_matches_the_kubernetes_and_kuberay_schemas(name):
    for i, doc in enumerate(documents()[name]):
        check_object(doc, f"{name}[{i}]")


def test_a_repeated_key_is_an_error():
    assert load_all("a: 1\nb: {c: 2}\n") == [{"a": 1, "b": {"c": 2}}]
    with pytest.raises(yaml.YAMLError):
        load_all("spec:\n  env: []\n  image: x\n  env: [1]\n")


def test_rayjob_runs_the_same_cluster_as_raycluster():
    assert the("RayJob")["spec"]["rayClusterSpec"] == the("RayCluster")["spec"]


def test_required_fields_are_read_from_the_client():
    assert required_keys(k8s.V1Container) == {"name"}
    assert required_keys(k8s.V1EnvVar) == {"name"}
    assert required_keys(k8s.V1SecretKeySelector) == {"key"}
    assert required_keys(k8s.V1RuntimeClass) == {"handler"}
    assert required_keys(k8s.V1IPBlock) == {"cidr"}
    assert required_keys(k8s.V1ContainerPort) == {"containerPort"}


def _head_pod(doc):
    return doc["spec"]["headGroupSpec"]["template"]["spec"]


def _head_container(doc):
    return _head_pod(doc)["containers"][0]


def _sandbox_group(doc):
    return next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "sandbox")


def _sandbox_pod(doc):
    return _sandbox_group(doc)["template"]["spec"]


def _first_port(policy):
    return policy["spec"]["egress"][0]["ports"][0]


RC, JOB, NETPOL, FETCH = ("RayCluster", "RayJob", "NetworkPolicy@networkpolicy.yaml",
                          "NetworkPolicy@networkpolicy-http-fetch.yaml")

# Each mutation breaks one schema rule; check_object must reject the result.
SCHEMA_BREAKS: dict[str, tuple[str, Callable[[Any], None]]] = {
    "unknown container field": (RC, lambda d: _head_container(d).update(imagee="warden:latest")),
    "unknown pod spec field": (RC, lambda d: _sandbox_pod(d).update(runtimeClass="gvisor")),
    "unknown RayCluster spec field": (RC, lambda d: d["spec"].update(workerGroupSpec=[])),
    "unknown worker group field": (RC, lambda d: _sandbox_group(d).update(replica=1)),
    "unknown top-level field": (RC, lambda d: d.update(specs={})),
    "unknown RayJob field": (JOB, lambda d: d["spec"].update(shutdownAfterJobFinished=True)),
    "unknown NetworkPolicy field": (NETPOL, lambda d: d["spec"].update(egres=[])),
    "containerPort as a string": (RC, lambda d: _head_container(d)["ports"][0].update(containerPort="6379")),
    "replicas as a string": (RC, lambda d: _sandbox_group(d).update(replicas="1")),
    "rayStartParams value as a number": (RC, lambda d: _sandbox_group(d)["rayStartParams"].update({"num-cpus": 0})),
    "runAsNonRoot as a string": (RC, lambda d: _head_pod(d)["securityContext"].update(runAsNonRoot="true")),
    "env as a map": (RC, lambda d: _head_container(d).update(env={"RAY_AUTH_MODE": "token"})),
    "enableInTreeAutoscaling as a string": (RC, lambda d: d["spec"].update(enableInTreeAutoscaling="false")),
    "RayJob ttl as a string": (JOB, lambda d: d["spec"].update(ttlSecondsAfterFinished="600")),
    "container without a name": (RC, lambda d: _head_container(d).pop("name")),
    "env var without a name": (RC, lambda d: _head_container(d)["env"][0].pop("name")),
    "secretKeyRef without a key": (RC, lambda d: _head_container(d)["env"][1]["valueFrom"]["secretKeyRef"].pop("key")),
    "worker group without groupName": (RC, lambda d: _sandbox_group(d).pop("groupName")),
    "worker group without template": (RC, lambda d: _sandbox_group(d).pop("template")),
    "RuntimeClass without handler": ("RuntimeClass", lambda d: d.pop("handler")),
    "ipBlock without cidr": (FETCH, lambda d: d["spec"]["egress"][0]["to"][0]["ipBlock"].pop("cidr")),
    "memory that is not a quantity": (RC, lambda d: _head_container(d)["resources"]["limits"].update(memory="4 GiB")),
    "cpu as a boolean": (RC, lambda d: _head_container(d)["resources"]["limits"].update(cpu=True)),
    "sizeLimit not a quantity": (RC, lambda d: _sandbox_pod(d)["volumes"][0]["emptyDir"].update(sizeLimit="a")),
    "NetworkPolicy port as a boolean": (NETPOL, lambda d: _first_port(d).update(port=True)),
    "NetworkPolicy port as a float": (NETPOL, lambda d: _first_port(d).update(port=5.5)),
    "null image": (RC, lambda d: _head_container(d).update(image=None)),
    "unknown submissionMode": (JOB, lambda d: d["spec"].update(submissionMode="K8sJob")),
    "unknown authOptions mode": (RC, lambda d: d["spec"]["authOptions"].update(mode="password")),
    "misspelt ray start option": (RC, lambda d: _sandbox_group(d)["rayStartParams"].update({"node-manger-port": "1"})),
    "Secret data not base64": ("Secret", lambda d: d.update(data={"auth_token": "not base64!"})),
    "PVC storage not a quantity": ("PersistentVolumeClaim",
                                   lambda d: d["spec"]["resources"]["requests"].update(storage="ten")),
    "replicas above maxReplicas": (RC, lambda d: _sandbox_group(d).update(replicas=11)),
    "Ray container not first": (RC, lambda d: _head_container(d).update(name="sidecar")),
    "name not a DNS name": (RC, lambda d: d["metadata"].update(name="Warden_Cluster")),
    "RayJob runtimeEnvYAML not a mapping": (JOB, lambda d: d["spec"].update(runtimeEnvYAML="- a list")),
}


def _doc_for(target: str) -> Any:
    kind, _, file = target.partition("@")
    return the(kind, file or None)


@pytest.mark.parametrize("what", sorted(SCHEMA_BREAKS))
def test_schema_check_rejects(what):
    target, mutate = SCHEMA_BREAKS[what]
    doc = _doc_for(target)
    check_object(copy.deepcopy(doc), "unchanged")  # the original passes...
    mutate(doc)
    with pytest.raises(SchemaError):  # ...the mutated copy does not
        check_object(doc, what)


@pytest.mark.parametrize("value", [2, 0.5, "500m", "4Gi", "1e3", "+1", ".5"])
def test_schema_check_accepts_quantities_as_the_api_server_does(value):
    doc = the("RayCluster")
    _head_container(doc)["resources"]["limits"]["cpu"] = value
    check_object(doc, "quantity")


def test_schema_check_accepts_a_named_port():
    doc = the("NetworkPolicy", "networkpolicy.yaml")
    doc["spec"]["egress"][0]["ports"][0]["port"] = "gcs-server"
    check_object(doc, "named port")


# --------------------------------------------------------------------------- tests: properties

@pytest.mark.parametrize("source", ["RayCluster", "RayJob"])
def test_each_role_has_its_resource_and_pods(source):
    check_roles(cluster_specs()[source])


def test_every_container_authenticates_to_ray_with_the_secret_token():
    templates = {**pod_templates(the("RayCluster")), **pod_templates(the("RayJob"))}
    assert "submitter" in templates and any(k.startswith("rayClusterSpec group sandbox") for k in templates)
    check_auth(templates, the("Secret"), list(cluster_specs().values()))


def test_the_secret_template_carries_no_token():
    check_secret_template(the("Secret"))


@pytest.mark.parametrize("source", ["RayCluster", "RayJob"])
def test_ray_ports_are_pinned_and_avoid_forbidden_ones(source):
    check_ports(cluster_specs()[source])


@pytest.mark.parametrize("source", ["RayCluster", "RayJob"])
def test_sandbox_pods_reach_only_the_heads_ray_ports_and_dns(source):
    check_sandbox_egress(the("NetworkPolicy", "networkpolicy.yaml"), cluster_specs()[source])


def test_the_optional_http_fetch_policy_keeps_non_public_addresses_out():
    check_http_fetch_egress(the("NetworkPolicy", "networkpolicy-http-fetch.yaml"), cluster_specs()["RayCluster"])


def test_the_head_keeps_runs_on_the_volume_claim_and_the_job_writes_there():
    pvc = the("PersistentVolumeClaim")
    check_runs_volume(cluster_specs()["RayCluster"], pvc)
    check_runs_volume(cluster_specs()["RayJob"], pvc, the("RayJob")["spec"]["entrypoint"])


def test_ray_versions_match_the_installed_ray_and_the_image():
    for source, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray_version(), f"{source}: rayVersion {spec['rayVersion']} != Ray {ray_version()}"
    check_containerfile(CONTAINERFILE.read_text())


def test_root_and_capabilities_only_inside_gvisor():
    templates = {**pod_templates(the("RayCluster")), **pod_templates(the("RayJob"))}
    check_pod_security(templates, runtime_class_name())


def test_every_pod_runs_the_same_image():
    check_images({**pod_templates(the("RayCluster")), **pod_templates(the("RayJob"))})


def test_the_image_is_built_without_the_local_environment():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".git"} <= ignored


def test_sandbox_resource_name_matches_the_runtime():
    from runtime.job import SANDBOX_RESOURCE

    assert SANDBOX_RESOURCE == ROLE_RESOURCES["sandbox"]


# Each mutation breaks the property its check names; the check must then fail.

def _group(spec, name):
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def _set_resources(params, resources):
    params["resources"] = json.dumps(json.dumps(resources))


def _container(template):
    return template["spec"]["containers"][0]


def _env(template, name):
    return next(e for e in _container(template)["env"] if e["name"] == name)


ROLE_BREAKS = {
    "head advertises agents": lambda s: _set_resources(s["headGroupSpec"]["rayStartParams"], {"warden_agent": 1000}),
    "head advertises sandboxes too": lambda s: _set_resources(s["headGroupSpec"]["rayStartParams"],
                                                              {"warden_trusted": 1000, "warden_sandbox": 1}),
    "head advertises nothing": lambda s: s["headGroupSpec"]["rayStartParams"].pop("resources"),
    "head has CPUs": lambda s: s["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
    "sandbox group advertises agents": lambda s: _set_resources(_group(s, "sandbox")["rayStartParams"],
                                                                {"warden_agent": 1000}),
    "agent group advertises trusted": lambda s: _set_resources(_group(s, "agents")["rayStartParams"],
                                                               {"warden_trusted": 1000}),
    "sandbox group outside gVisor": lambda s: _group(s, "sandbox")["template"]["spec"].pop("runtimeClassName"),
    "sandbox group has CPUs": lambda s: _group(s, "sandbox")["rayStartParams"].pop("num-cpus"),
    "sandbox pods labelled as agents": lambda s: _group(s, "sandbox")["template"]["metadata"]["labels"].update(
        {COMPONENT_LABEL: "agent"}),
    "no sandbox group": lambda s: s["workerGroupSpecs"].remove(_group(s, "sandbox")),
    "resources not one shell word": lambda s: _group(s, "agents")["rayStartParams"].update(
        resources='{"warden_agent": 1000}'),
}


@pytest.mark.parametrize("what", sorted(ROLE_BREAKS))
def test_role_check_fails_when(what):
    spec = cluster_specs()["RayCluster"]
    ROLE_BREAKS[what](spec)
    with pytest.raises(AssertionError):
        check_roles(spec)


def _auth_inputs():
    cluster = the("RayCluster")
    return pod_templates(cluster), the("Secret"), [cluster["spec"]]


def _write_token_in_manifest(templates):
    env = _env(templates["group agents"], "RAY_AUTH_TOKEN")
    env.pop("valueFrom")
    env["value"] = "hunter2"


AUTH_BREAKS = {
    "sandbox container without RAY_AUTH_MODE": lambda t, s, c: _container(t["group sandbox"])["env"].remove(
        _env(t["group sandbox"], "RAY_AUTH_MODE")),
    "head with auth disabled": lambda t, s, c: _env(t["head"], "RAY_AUTH_MODE").update(value="disabled"),
    "token written in the manifest": lambda t, s, c: _write_token_in_manifest(t),
    "token from another Secret": lambda t, s, c: _env(t["head"], "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"].update(
        name="other"),
    "token Secret optional": lambda t, s, c: _env(t["head"], "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"].update(
        optional=True),
    "an init container without the token": lambda t, s, c: t["head"]["spec"].update(
        initContainers=[{"name": "init", "image": "warden:latest"}]),
    "Secret without auth_token": lambda t, s, c: s.update(stringData={"token": ""}),
    "operator told another Secret": lambda t, s, c: c[0]["authOptions"].update(secretName="other"),
}


@pytest.mark.parametrize("what", sorted(AUTH_BREAKS))
def test_auth_check_fails_when(what):
    templates, secret, specs = _auth_inputs()
    AUTH_BREAKS[what](templates, secret, specs)
    with pytest.raises(AssertionError):
        check_auth(templates, secret, specs)


def test_auth_check_covers_the_rayjob_submitter():
    templates = pod_templates(the("RayJob"))
    templates["submitter"]["spec"]["containers"][0]["env"] = []
    with pytest.raises(AssertionError):
        check_auth(templates, the("Secret"), [])


def test_secret_check_fails_when_a_token_is_committed():
    secret = the("Secret")
    secret["stringData"]["auth_token"] = "s3cr3t"
    with pytest.raises(AssertionError):
        check_secret_template(secret)


PORT_BREAKS = {
    "worker ports include the dashboard": lambda s: s["headGroupSpec"]["rayStartParams"].update(
        {"min-worker-port": "8000", "max-worker-port": "9999"}),
    "worker ports reach the ephemeral range": lambda s: s["headGroupSpec"]["rayStartParams"].update(
        {"max-worker-port": "40000"}),
    "head raylet port left to chance": lambda s: s["headGroupSpec"]["rayStartParams"].update(
        {"node-manager-port": "0"}),
    "GCS port not pinned": lambda s: s["headGroupSpec"]["rayStartParams"].pop("port"),
    "a group pins other ports": lambda s: _group(s, "agents")["rayStartParams"].update({"object-manager-port": "7000"}),
}


@pytest.mark.parametrize("what", sorted(PORT_BREAKS))
def test_port_check_fails_when(what):
    spec = cluster_specs()["RayCluster"]
    PORT_BREAKS[what](spec)
    with pytest.raises(AssertionError):
        check_ports(spec)


EGRESS_BREAKS = {
    "dashboard allowed": lambda p, s: p["spec"]["egress"][0]["ports"].append({"protocol": "TCP", "port": 8265}),
    "Warden control port allowed": lambda p, s: p["spec"]["egress"][0]["ports"].append(
        {"protocol": "TCP", "port": 9464}),
    "a rule without ports": lambda p, s: p["spec"]["egress"][0].pop("ports"),
    "a rule without destinations": lambda p, s: p["spec"]["egress"].append({"ports": [{"port": 443}]}),
    "anywhere allowed": lambda p, s: p["spec"]["egress"][0]["to"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
    "agent pods allowed": lambda p, s: p["spec"]["egress"][0]["to"].append(
        {"podSelector": {"matchLabels": {COMPONENT_LABEL: "agent"}}}),
    "head named by a label every pod has": lambda p, s: p["spec"]["egress"][0]["to"][0]["podSelector"].update(
        matchLabels={"app.kubernetes.io/name": "warden"}),
    "selects agent pods instead": lambda p, s: p["spec"]["podSelector"]["matchLabels"].update(
        {COMPONENT_LABEL: "agent"}),
    "selects every Warden pod": lambda p, s: p["spec"]["podSelector"]["matchLabels"].pop(COMPONENT_LABEL),
    "ingress only": lambda p, s: p["spec"].update(policyTypes=["Ingress"]),
    "worker port range moved on the head only": lambda p, s: s["headGroupSpec"]["rayStartParams"].update(
        {"max-worker-port": "19999"}),
    "a head port missing": lambda p, s: p["spec"]["egress"][0]["ports"].pop(2),
    "DNS on every port": lambda p, s: p["spec"]["egress"][1]["ports"].append({"protocol": "TCP", "port": 443}),
    "DNS in every namespace": lambda p, s: p["spec"]["egress"][1]["to"][0].update(namespaceSelector={}),
}


@pytest.mark.parametrize("what", sorted(EGRESS_BREAKS))
def test_sandbox_egress_check_fails_when(what):
    policy, spec = the("NetworkPolicy", "networkpolicy.yaml"), cluster_specs()["RayCluster"]
    EGRESS_BREAKS[what](policy, spec)
    with pytest.raises(AssertionError):
        check_sandbox_egress(policy, spec)


HTTP_FETCH_BREAKS = {
    "cloud metadata reachable": lambda p: p["spec"]["egress"][0]["to"][0]["ipBlock"]["except"].remove("169.254.0.0/16"),
    "cluster network reachable": lambda p: p["spec"]["egress"][0]["to"][0]["ipBlock"]["except"].remove("10.0.0.0/8"),
    "any port": lambda p: p["spec"]["egress"][0].pop("ports"),
    "dashboard port": lambda p: p["spec"]["egress"][0]["ports"].append({"protocol": "TCP", "port": 8265}),
    "selects agent pods": lambda p: p["spec"]["podSelector"]["matchLabels"].update({COMPONENT_LABEL: "agent"}),
    "a pod peer": lambda p: p["spec"]["egress"][0]["to"].append({"podSelector": {}}),
}


@pytest.mark.parametrize("what", sorted(HTTP_FETCH_BREAKS))
def test_http_fetch_egress_check_fails_when(what):
    policy = the("NetworkPolicy", "networkpolicy-http-fetch.yaml")
    HTTP_FETCH_BREAKS[what](policy)
    with pytest.raises(AssertionError):
        check_http_fetch_egress(policy, cluster_specs()["RayCluster"])


def _runs_on_empty_dir(spec):
    volume = next(v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == "runs")
    volume.pop("persistentVolumeClaim")
    volume["emptyDir"] = {}


RUNS_BREAKS = {
    "runs on an emptyDir": lambda s, p, e: _runs_on_empty_dir(s),
    "another claim": lambda s, p, e: p["metadata"].update(name="other"),
    "no runs mount": lambda s, p, e: s["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"].pop(0),
}


@pytest.mark.parametrize("what", sorted(RUNS_BREAKS))
def test_runs_volume_check_fails_when(what):
    spec, pvc, entry = cluster_specs()["RayJob"], the("PersistentVolumeClaim"), the("RayJob")["spec"]["entrypoint"]
    RUNS_BREAKS[what](spec, pvc, entry)
    with pytest.raises(AssertionError):
        check_runs_volume(spec, pvc, entry)


@pytest.mark.parametrize("entrypoint", [
    "warden run /opt/warden/jobs/demo.yaml --runs-dir runs",
    "warden run /opt/warden/jobs/demo.yaml",
    "warden run /opt/warden/jobs/missing.yaml --runs-dir /var/lib/warden/runs",
    "python -m runtime.cli run /opt/warden/jobs/demo.yaml --runs-dir /var/lib/warden/runs",
])
def test_runs_volume_check_fails_for_entrypoint(entrypoint):
    with pytest.raises(AssertionError):
        check_runs_volume(cluster_specs()["RayJob"], the("PersistentVolumeClaim"), entrypoint)


def test_version_check_fails_on_another_ray_version():
    spec = cluster_specs()["RayCluster"]
    spec["rayVersion"] = "2.9.0"
    assert spec["rayVersion"] != ray_version()
    text = CONTAINERFILE.read_text().replace(f"RAY_VERSION={ray_version()}", "RAY_VERSION=2.9.0")
    with pytest.raises(AssertionError):
        check_containerfile(text)


CONTAINERFILE_BREAKS = {
    "no runsc": lambda t: t.replace(" runsc util-linux", " util-linux"),
    "no bubblewrap": lambda t: t.replace("--no-install-recommends bubblewrap", "--no-install-recommends"),
    "root by default": lambda t: t.replace("USER 1000:1000", "USER root"),
    "a token baked in": lambda t: t.replace("ARG RUNSC_PLATFORM=", "ARG RUNSC_PLATFORM=\nENV RAY_AUTH_TOKEN=abc"),
    "another Python": lambda t: t.replace("python:3.11-slim-bookworm", "python:3.12-slim-bookworm"),
    "Ray not pinned": lambda t: t.replace('"ray[default]==${RAY_VERSION}"', '"ray[default]"'),
}


@pytest.mark.parametrize("what", sorted(CONTAINERFILE_BREAKS))
def test_containerfile_check_fails_when(what):
    text = CONTAINERFILE.read_text()
    broken = CONTAINERFILE_BREAKS[what](text)
    assert broken != text, "the mutation did not apply"
    with pytest.raises(AssertionError):
        check_containerfile(broken)


SECURITY_BREAKS = {
    "agents as root": lambda t: t["group agents"]["spec"]["securityContext"].update(runAsUser=0, runAsNonRoot=False),
    "sandbox root outside gVisor": lambda t: t["group sandbox"]["spec"].pop("runtimeClassName"),
    "head adds a capability": lambda t: t["head"]["spec"]["containers"][0]["securityContext"]["capabilities"].update(
        add=["NET_ADMIN"]),
    "head keeps its capabilities": lambda t: t["head"]["spec"]["containers"][0]["securityContext"].pop("capabilities"),
    "privileged sandbox": lambda t: _container(t["group sandbox"])["securityContext"].update(privileged=True),
    "service account token in a sandbox": lambda t: t["group sandbox"]["spec"].update(
        automountServiceAccountToken=True),
    "escalation allowed on agents": lambda t: t["group agents"]["spec"]["containers"][0]["securityContext"].update(
        allowPrivilegeEscalation=True),
}


@pytest.mark.parametrize("what", sorted(SECURITY_BREAKS))
def test_pod_security_check_fails_when(what):
    templates = pod_templates(the("RayCluster"))
    SECURITY_BREAKS[what](templates)
    with pytest.raises(AssertionError):
        check_pod_security(templates, runtime_class_name())


def test_image_check_fails_on_mixed_images():
    templates = pod_templates(the("RayCluster"))
    templates["group sandbox"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.60.0"
    with pytest.raises(AssertionError):
        check_images(templates)


def test_cluster_drift_between_rayjob_and_raycluster_is_caught():
    job = the("RayJob")
    _group(job["spec"]["rayClusterSpec"], "sandbox")["replicas"] = 3
    assert job["spec"]["rayClusterSpec"] != the("RayCluster")["spec"]
