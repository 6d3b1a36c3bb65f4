#!/usr/bin/env python3
"""Offline checks of the manifests in this folder; no cluster is contacted.

    python3 deploy/kubernetes/check.py

Needs PyYAML (`pip install pyyaml`; Python 3.11+ for tomllib). With the `kubernetes-validate` package
installed (`pip install kubernetes-validate`), every document is also validated, strictly (unknown
fields are errors), against the Kubernetes OpenAPI schemas that package bundles.

What it checks: every YAML document parses and has apiVersion, kind and metadata.name; the
kustomization lists every manifest (and the inference-pool/ overlay's lists the base and its own); the Deployment's selector, volumes, mounts, probes, GPU request
and security context hang together; the Service selects the pod and targets a named container port;
the TOML configs in the ConfigMaps parse, use only keys orchestratord knows, and name the paths the
containers mount. The inference-pool/ overlay: its InferencePool selects the pods (their labels
with the overlay's), targets orchestratord's port, names an endpoint picker, and /metrics stays
reachable without a key for the picker; its HTTPRoute sends to that InferencePool. InferencePool
and HTTPRoute are CRDs that kubernetes-validate has no schema for: only these structural checks
apply to them. Not checked: anything only a cluster can tell (admission, the NVIDIA device plugin,
images, the Secret and the PVC, which the operator provides; a gateway and its endpoint picker).
"""

import sys
import tomllib
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOCKET = "/run/pool-managerd/pool.sock"
ORCHESTRATORD_KEYS = {
    "listen", "socket", "api_keys_file", "open_paths", "max_body_bytes",
    "admission", "streaming", "sessions",
}
ORCHESTRATORD_TABLES = {
    "admission": {"capacity", "full_policy", "batch_max_wait_ms", "queue_deadline_ms"},
    "streaming": {"decode_stall_ms", "keepalive_ms"},
    "sessions": {"ttl_ms", "max_turns", "max_tokens"},
}

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


# Kinds defined by CRDs, which kubernetes-validate bundles no schema for.
CUSTOM_KINDS = {"InferencePool", "HTTPRoute"}


def load_documents(folder=HERE):
    documents = {}
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            kind = document.get("kind")
            name = (document.get("metadata") or {}).get("name")
            check(document.get("apiVersion"), f"{path.name}: a document without apiVersion")
            check(kind, f"{path.name}: a document without kind")
            if kind != "Kustomization":
                check(name, f"{path.name}: {kind} without metadata.name")
            documents.setdefault(path.name, []).append(document)
    return documents


def find(documents, kind, name=None):
    found = [
        document
        for docs in documents.values()
        for document in docs
        if document.get("kind") == kind
        and (name is None or document["metadata"]["name"] == name)
    ]
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0] if found else {}


def check_kustomization(documents):
    kustomization = find(documents, "Kustomization")
    listed = set(kustomization.get("resources", []))
    manifests = {name for name in documents if name != "kustomization.yaml"}
    check(listed == manifests, f"kustomization lists {sorted(listed)}, folder has {sorted(manifests)}")


def mounts_of(container):
    return {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}


def check_deployment(documents, configs):
    deployment = find(documents, "Deployment", "llm-host")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    check(selector.items() <= labels.items(), "the Deployment's selector does not match its pod labels")

    containers = {container["name"]: container for container in pod["containers"]}
    check(set(containers) == {"pool-managerd", "orchestratord"}, f"containers: {sorted(containers)}")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for container in containers.values():
        check(container.get("image"), f"{container['name']}: no image")
        for mount in container.get("volumeMounts", []):
            check(mount["name"] in volumes, f"{container['name']}: mount of unknown volume {mount['name']}")
    for name, volume in volumes.items():
        if "configMap" in volume:
            check(volume["configMap"]["name"] in configs, f"volume {name}: no ConfigMap {volume['configMap']['name']}")

    # The shared socket directory.
    for name, container in containers.items():
        mount = mounts_of(container).get("/run/pool-managerd")
        check(mount is not None, f"{name}: /run/pool-managerd not mounted")
        if mount:
            check("emptyDir" in volumes[mount["name"]], f"{name}: /run/pool-managerd is not an emptyDir")
    socket_volumes = {mounts_of(c)["/run/pool-managerd"]["name"] for c in containers.values() if "/run/pool-managerd" in mounts_of(c)}
    check(len(socket_volumes) == 1, "the containers mount different volumes at /run/pool-managerd")
    for name, container in containers.items():
        args = container.get("args", [])
        check("--socket" in args and args[args.index("--socket") + 1] == SOCKET, f"{name}: --socket {SOCKET} missing")

    # GPUs for pool-managerd only.
    for name, container in containers.items():
        limits = container.get("resources", {}).get("limits", {})
        check(("nvidia.com/gpu" in limits) == (name == "pool-managerd"), f"{name}: nvidia.com/gpu misplaced")

    # Security context.
    security = pod.get("securityContext", {})
    check(security.get("runAsNonRoot") is True, "pod: runAsNonRoot is not true")
    check(security.get("fsGroup") is not None and security.get("fsGroup") == security.get("runAsGroup"),
          "pod: fsGroup and runAsGroup differ (the socket is reached by group)")
    uids = set()
    for name, container in containers.items():
        context = container.get("securityContext", {})
        check(context.get("readOnlyRootFilesystem") is True, f"{name}: root filesystem not read-only")
        check(context.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation allowed")
        check(context.get("runAsUser"), f"{name}: no runAsUser")
        uids.add(context.get("runAsUser"))
    check(len(uids) == 2, "both containers run as the same uid")

    # Probes.
    orchestratord = containers.get("orchestratord", {})
    ports = {port["name"]: port["containerPort"] for port in orchestratord.get("ports", [])}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = orchestratord.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"orchestratord: {probe} is not GET {path}")
        check(get.get("port") in ports, f"orchestratord: {probe} port {get.get('port')} is not a named port")
    pool = containers.get("pool-managerd", {})
    for probe in ("livenessProbe", "readinessProbe"):
        command = pool.get(probe, {}).get("exec", {}).get("command", [])
        check("http://127.0.0.1:9200/health" in command, f"pool-managerd: {probe} does not ask the shim's /health")

    # The configs name what the containers mount.
    pool_config = configs.get("pool-managerd-config", {})
    orch_config = configs.get("orchestratord-config", {})
    check(pool_config.get("server", {}).get("socket") == SOCKET, "pool-managerd config: server.socket")
    check(orch_config.get("socket") == SOCKET, "orchestratord config: socket")
    check(security.get("runAsGroup") in pool_config.get("server", {}).get("allowed_gids", []),
          "pool-managerd config: the pod's group is not in allowed_gids")
    keys_dir = str(Path(orch_config.get("api_keys_file", "/missing/file")).parent)
    keys_mount = mounts_of(orchestratord).get(keys_dir)
    check(keys_mount is not None and "secret" in volumes.get(keys_mount["name"], {}),
          f"orchestratord: api_keys_file's directory {keys_dir} is not a Secret mount")
    for pool_entry in pool_config.get("pool", []):
        model_path = pool_entry.get("model_path", "")
        check(any(model_path.startswith(p + "/") for p in mounts_of(pool)), f"pool {pool_entry.get('id')}: {model_path} is not on a mount")
    return labels, ports


def check_service(documents, labels, ports):
    service = find(documents, "Service", "orchestratord")
    selector = service["spec"]["selector"]
    check(selector.items() <= labels.items(), "the Service does not select the pod")
    for port in service["spec"]["ports"]:
        check(port["targetPort"] in ports, f"Service port {port['name']}: targetPort {port['targetPort']} is not a container port")


def load_configs(documents):
    configs = {}
    for name in ("pool-managerd-config", "orchestratord-config"):
        text = find(documents, "ConfigMap", name).get("data", {}).get("config.toml", "")
        try:
            configs[name] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            check(False, f"ConfigMap {name}: config.toml is not valid TOML: {error}")
            configs[name] = {}
    orch = configs["orchestratord-config"]
    check(set(orch) <= ORCHESTRATORD_KEYS, f"orchestratord config: unknown keys {set(orch) - ORCHESTRATORD_KEYS}")
    for table, keys in ORCHESTRATORD_TABLES.items():
        check(set(orch.get(table, {})) <= keys, f"orchestratord config: unknown keys in [{table}]")
    return configs


def schema_validate(documents):
    try:
        import kubernetes_validate
    except ImportError:
        print("kubernetes-validate not installed: schema validation skipped")
        return
    validated, custom = 0, []
    for file, docs in documents.items():
        for document in docs:
            if document.get("kind") == "Kustomization":
                continue
            if document.get("kind") in CUSTOM_KINDS:
                custom.append(f"{file}: {document['kind']}")
                continue
            try:
                kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
                validated += 1
            except kubernetes_validate.ValidationError as error:
                check(False, f"{file}: {document['kind']} fails the schema: {error.message} at {list(error.path)}")
    print(f"schema-validated {validated} documents against Kubernetes {kubernetes_validate.latest_version()} (strict)"
          + (f"; no bundled schema, structural checks only: {', '.join(custom)}" if custom else ""))


def check_inference_pool(overlay, labels, ports, configs):
    kustomization = find(overlay, "Kustomization")
    listed = set(kustomization.get("resources", []))
    manifests = {name for name in overlay if name != "kustomization.yaml"}
    check(listed == manifests | {"../"}, f"inference-pool kustomization lists {sorted(listed)}")
    added = {}
    for entry in kustomization.get("labels", []):
        check(entry.get("includeSelectors") is False, "inference-pool: a label would change the Deployment's selector")
        if entry.get("includeTemplates"):
            added.update(entry.get("pairs", {}))
    pod_labels = {**labels, **added}
    for replica in kustomization.get("replicas", []):
        check(replica.get("name") == "llm-host", f"inference-pool: replicas of unknown {replica.get('name')}")

    pool = find(overlay, "InferencePool", "llm-host")
    check(pool.get("apiVersion") == "inference.networking.k8s.io/v1", "InferencePool: not inference.networking.k8s.io/v1")
    spec = pool.get("spec", {})
    selector = spec.get("selector", {}).get("matchLabels", {})
    check(selector and selector.items() <= pod_labels.items(), "InferencePool: its selector does not match the pods")
    targets = [port.get("number") for port in spec.get("targetPorts", [])]
    check(targets == [ports.get("http")], f"InferencePool: targetPorts {targets} are not orchestratord's port {ports.get('http')}")
    picker = spec.get("endpointPickerRef", {})
    check(picker.get("name") and picker.get("port", {}).get("number"), "InferencePool: no endpoint picker name and port")
    check(picker.get("failureMode", "FailClose") in {"FailOpen", "FailClose"}, "InferencePool: unknown failureMode")
    open_paths = configs.get("orchestratord-config", {}).get("open_paths", ["/livez", "/readyz", "/metrics"])
    check("/metrics" in open_paths, "orchestratord config: /metrics needs a key, the endpoint picker cannot scrape it")

    route = find(overlay, "HTTPRoute", "llm-host")
    check(route.get("apiVersion") == "gateway.networking.k8s.io/v1", "HTTPRoute: not gateway.networking.k8s.io/v1")
    backends = [ref for rule in route.get("spec", {}).get("rules", []) for ref in rule.get("backendRefs", [])]
    check(backends and all(ref.get("group") == "inference.networking.k8s.io" and ref.get("kind") == "InferencePool"
                           and ref.get("name") == pool.get("metadata", {}).get("name") for ref in backends),
          "HTTPRoute: its backends are not the InferencePool")
    check(route.get("spec", {}).get("parentRefs"), "HTTPRoute: no parent Gateway")


def main():
    documents = load_documents()
    check_kustomization(documents)
    configs = load_configs(documents)
    labels, ports = check_deployment(documents, configs)
    check_service(documents, labels, ports)
    overlay = load_documents(HERE / "inference-pool")
    check_inference_pool(overlay, labels, ports, configs)
    schema_validate(documents)
    schema_validate({f"inference-pool/{name}": docs for name, docs in overlay.items()})
    for failure in failures:
        print(f"FAIL {failure}")
    count = sum(len(docs) for docs in documents.values()) + sum(len(docs) for docs in overlay.values())
    if failures:
        sys.exit(1)
    print(f"ok: {count} documents in {len(documents) + len(overlay)} files")


if __name__ == "__main__":
    main()
