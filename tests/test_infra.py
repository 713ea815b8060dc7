"""The deployment files in infra/ (no cluster needed): manifests parse and hang together, every
container runs as non-root with resource limits, RBAC grants exactly what Metaflow's Kubernetes
client uses, the step-Job admission policy (15-step-admission.yaml) is valid for the kubernetes
client's models and its CEL, evaluated by cel-python (the API server's own evaluator is Go's
cel-go; these expressions use only core CEL: has(), all(), in, startsWith, size), admits the Job
Metaflow builds for a step and refuses each forbidden variant, no literal credentials anywhere, the Metaflow config template names real Metaflow
settings, and the image definitions hold their promises. One slow test runs the MLflow Deployment's
own command line against a local S3 (moto) to check its arguments, host allow-list and S3 artifacts.
"""

from __future__ import annotations

import json
import os
import re
import string
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
NAMESPACE = "srpo"
RUNNER_SA = "srpo-runner"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
# the RBAC the step pods get: exactly the calls Metaflow's Kubernetes client makes (see infra/k8s/10-rbac.yaml)
EXPECTED_RULES = {
    ("batch", "jobs"): {"create", "get", "patch", "delete"},
    ("", "pods"): {"list"},
}


def manifest_files() -> list[Path]:
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yaml.template"))
    assert files, "no manifests in infra/k8s"
    return files


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def our_docs() -> list[tuple[Path, dict]]:
    """Documents of this project's infra files (all of them, the inference server included)."""
    return all_docs()


def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOAD_KINDS:
        return doc["spec"]["template"]["spec"]
    return None


def workloads() -> list[tuple[Path, dict, dict]]:
    out = [(p, d, pod_spec(d)) for p, d in all_docs() if d.get("kind") in WORKLOAD_KINDS]
    assert out
    return out


def pod_labels(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["metadata"].get("labels", {})
    template = doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" else doc["spec"]["template"]
    return template["metadata"].get("labels", {})


# --- parsing and structure -------------------------------------------------------------------------
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_parses(path):
    docs = load_docs(path)
    assert docs, f"{path}: empty"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: {doc}"
        assert doc["metadata"].get("name"), f"{path}: a {doc['kind']} without a name"


def test_our_namespaced_objects_live_in_the_namespace():
    for path, doc in our_docs():
        if doc["kind"] in CLUSTER_SCOPED:
            continue
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']}/{doc['metadata']['name']}"
    namespaces = [d for _, d in all_docs() if d["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [NAMESPACE]


def test_apply_order_is_the_file_order():
    """kubectl apply -f infra/k8s/ goes alphabetically: the namespace and identities first."""
    numbered = sorted(p.name for p in K8S.glob("[0-9][0-9]-*.yaml"))
    assert numbered[0] == "00-namespace.yaml" and numbered[1] == "10-rbac.yaml"
    assert not any(p.suffix == ".yaml" and "secret" in p.name for p in K8S.iterdir()), "secret files must not be applied by a plain -f infra/k8s/"


# --- every container: non-root, no escalation, requests and limits -----------------------------------
def containers_of(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@pytest.mark.parametrize("path,doc,spec", workloads(), ids=lambda x: x.name if isinstance(x, Path) else (x.get("metadata", {}).get("name", "") if isinstance(x, dict) else ""))
def test_containers_are_locked_down(path, doc, spec):
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True, f"{path.name}: pod securityContext.runAsNonRoot"
    assert pod_sc.get("runAsUser", 1) != 0
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for c in containers_of(spec):
        where = f"{path.name}: {doc['metadata']['name']}/{c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}: runs as uid 0"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert not sc.get("privileged"), f"{where}: privileged"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities.drop ALL"
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                assert resources.get(kind, {}).get(res), f"{where}: resources.{kind}.{res}"
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: pin the image tag"


def test_pods_without_api_needs_get_no_token():
    for path, doc, spec in workloads():
        if spec.get("serviceAccountName") != RUNNER_SA:
            assert spec.get("automountServiceAccountToken") is False, f"{path.name}: {doc['metadata']['name']} mounts an API token it does not need"


# --- RBAC ---------------------------------------------------------------------------------------------
def rbac_docs(kind: str) -> list[dict]:
    return [d for _, d in all_docs() if d["kind"] == kind]


def test_rbac_is_exactly_what_steps_need():
    assert not rbac_docs("ClusterRole") and not rbac_docs("ClusterRoleBinding"), "nothing cluster-wide"
    roles = rbac_docs("Role")
    assert [r["metadata"]["name"] for r in roles] == [RUNNER_SA]
    role = roles[0]
    assert role["metadata"]["namespace"] == NAMESPACE
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"], f"wildcard in {rule}"
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == EXPECTED_RULES
    bindings = rbac_docs("RoleBinding")
    assert len(bindings) == 1
    binding = bindings[0]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RUNNER_SA}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RUNNER_SA, "namespace": NAMESPACE}]


def test_rbac_is_exactly_the_job_and_pod_calls_metaflow_makes():
    """Scan Metaflow's Kubernetes client for its namespaced Job/Pod API calls: the Role grants each
    and nothing more (no list/watch of Jobs, no get/watch of Pods), except pods/exec, which is
    denied on purpose (Metaflow falls back to patching the Job)."""
    import metaflow.plugins.kubernetes as mfk

    verb_of = {"create": "create", "read": "get", "list": "list", "patch": "patch", "delete": "delete", "replace": "update"}
    calls, sources = set(), [p.read_text() for p in Path(mfk.__file__).parent.glob("*.py")]
    for text in sources:
        for verb, resource, sub in re.findall(r"\b(create|read|list|patch|delete|replace)_namespaced_(job|pod)(\w*)", text):
            assert sub == "", f"Metaflow calls a {resource} subresource ({verb}_namespaced_{resource}{sub}): grant it in 10-rbac.yaml"
            calls.add((("batch", "jobs") if resource == "job" else ("", "pods"), verb_of[verb]))
    assert ("create" in {v for _, v in calls}) and not any("Watch(" in t for t in sources), f"Metaflow's client changed shape: {calls}"
    needed: dict[tuple[str, str], set[str]] = {}
    for key, verb in calls:
        needed.setdefault(key, set()).add(verb)
    assert needed == EXPECTED_RULES, f"Metaflow calls {needed}, the Role grants {EXPECTED_RULES}"
    exec_calls = re.findall(r"connect_get_namespaced_pod_exec", (Path(mfk.__file__).parent / "kubernetes_job.py").read_text())
    assert exec_calls, "Metaflow no longer uses pods/exec: revisit the comment in 10-rbac.yaml"


# --- references between the files --------------------------------------------------------------------
def secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for _, d in all_docs() if d["kind"] == "Secret"}


def test_secret_references_resolve():
    secrets = secret_keys()
    assert {"srpo-s3", "srpo-runtime", "srpo-mlflow-db"} <= secrets.keys()
    for path, doc, spec in workloads():
        for c in containers_of(spec):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{path.name}/{c['name']}: {ref}"
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets


def test_volume_claims_accounts_and_services_resolve():
    docs = [d for _, d in all_docs()]
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for path, doc, spec in workloads():
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs, f"{path.name}: {vol}"
        assert spec.get("serviceAccountName") in accounts, f"{path.name}: {doc['metadata']['name']}"
    pods = [(pod_labels(d), pod_spec(d)) for d in docs if d["kind"] in WORKLOAD_KINDS]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [(labels, spec) for labels, spec in pods if svc["spec"]["selector"].items() <= labels.items()]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        ports = {p.get("name") for _, spec in selected for c in spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert not isinstance(port["targetPort"], str) or port["targetPort"] in ports


def test_mlflow_server_settings():
    deployment = next(d for _, d in all_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "srpo-mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    # no artifact proxy: with --serve-artifacts any caller of MLflow reads and writes S3 with MLflow's keys
    assert "--no-serve-artifacts" in args and "--serve-artifacts" not in args and "--default-artifact-root=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    assert not any("backend-store-uri" in a for a in args), "the database URI (with its password) belongs in the environment"
    env = {e["name"]: e for e in container["env"]}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & env.keys(), "MLflow holds no S3 credentials"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "srpo-mlflow-db"
    runtime = next(d for _, d in all_docs() if d["kind"] == "Secret" and d["metadata"]["name"] == "srpo-runtime")
    assert runtime["stringData"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert runtime["stringData"]["MLFLOW_TRACKING_URI"] == "http://srpo-mlflow.srpo.svc:5000"


# --- who may reach what: NetworkPolicies, the inference server's identity and keys ----------------------------
STEP_LABELS = {"app.kubernetes.io/part-of": "srpo", "srpo.io/role": "step"}


def policies() -> list[dict]:
    return [d for _, d in all_docs() if d["kind"] == "NetworkPolicy"]


def admitted(pod_labels_: dict, port: int, source_labels: dict) -> bool:
    """Would a pod with `source_labels` (same namespace) reach `port` of a pod with `pod_labels_`?
    Ingress isolation: selected by any policy -> only what some policy's rule allows."""
    selecting = [p for p in policies() if p["spec"]["podSelector"].get("matchLabels", {}).items() <= pod_labels_.items() and "Ingress" in p["spec"]["policyTypes"]]
    assert selecting, f"no NetworkPolicy selects {pod_labels_}"
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            assert all(set(peer) == {"podSelector"} for peer in rule["from"]), f"{policy['metadata']['name']}: only same-namespace pod peers expected"
            sources = any(peer["podSelector"].get("matchLabels", {}).items() <= source_labels.items() for peer in rule["from"])
            ports = any(p["port"] == port for p in rule.get("ports", []))
            if sources and ports:
                return True
    return False


def test_network_policies_admit_only_the_clients_of_each_server():
    deny = [p for p in policies() if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")]
    assert [p["metadata"]["name"] for p in deny] == ["default-deny-ingress"]
    assert deny[0]["metadata"]["namespace"] == NAMESPACE
    labels = {d["metadata"]["name"]: pod_labels(d) for _, d in all_docs() if d["kind"] == "Deployment"}
    stranger = {"app.kubernetes.io/part-of": "srpo", "app": "something-else"}
    assert admitted(labels["srpo-inference"], 8000, STEP_LABELS) and not admitted(labels["srpo-inference"], 8000, stranger)
    assert not admitted(labels["srpo-inference"], 8000, labels["srpo-mlflow"])
    assert admitted(labels["srpo-mlflow"], 5000, STEP_LABELS) and not admitted(labels["srpo-mlflow"], 5000, stranger)
    assert not admitted(labels["srpo-mlflow"], 5000, labels["srpo-inference"])
    assert admitted(labels["srpo-postgres"], 5432, labels["srpo-mlflow"]) and not admitted(labels["srpo-postgres"], 5432, STEP_LABELS)
    # the step pods carry the label the policies admit (Metaflow's METAFLOW_KUBERNETES_LABELS)
    config = rendered_metaflow_config()
    step_labels = dict(kv.split("=", 1) for kv in config["METAFLOW_KUBERNETES_LABELS"].split(","))
    assert step_labels == STEP_LABELS


def test_inference_server_identity_keys_and_token():
    docs = {(d["kind"], d["metadata"]["name"]): d for p, d in all_docs() if p.name == "inference-server.yaml"}
    account = docs[("ServiceAccount", "srpo-inference")]
    assert account["automountServiceAccountToken"] is False and account["metadata"]["namespace"] == NAMESPACE
    deployment = docs[("Deployment", "srpo-inference")]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "srpo-inference" and spec["automountServiceAccountToken"] is False
    assert not any(b["subjects"][0]["name"] == "srpo-inference" for b in rbac_docs("RoleBinding")), "no API rights"
    container = spec["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"] == refs["AWS_SECRET_ACCESS_KEY"] == "srpo-s3-readonly", "read-only keys, not the steps' srpo-s3"
    assert refs["SRPO_SERVER_TOKEN"] == "srpo-inference-token"
    assert "--host=0.0.0.0" in container["args"] and "--artifact-root=$(SRPO_ARTIFACT_ROOT)" in container["args"]
    assert not any("token" in a for a in container["args"]), "the token never goes on the command line"
    # the step pods get the token (and no pod but the server gets the read-only keys' Secret by name)
    assert "srpo-inference-token" in rendered_metaflow_config()["METAFLOW_KUBERNETES_SECRETS"].split(",")
    assert "srpo-s3" not in rendered_metaflow_config()["METAFLOW_KUBERNETES_SECRETS"].split(",")[1:]


# --- what a step's Jobs may contain: the ValidatingAdmissionPolicy of 15-step-admission.yaml --------------------
def admission_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in load_docs(K8S / "15-step-admission.yaml")}


def test_step_admission_policy_is_valid_for_the_kubernetes_client_models():
    """Each object deserializes into the kubernetes client's model (required fields present) and
    serializes back unchanged (no misspelled or unknown field silently dropped)."""
    kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client models (test extra)")
    api = kubernetes.client.ApiClient()

    class Response:
        def __init__(self, doc):
            self.data = json.dumps(doc)

    for kind, model in (("ValidatingAdmissionPolicy", "V1ValidatingAdmissionPolicy"), ("ValidatingAdmissionPolicyBinding", "V1ValidatingAdmissionPolicyBinding"), ("ConfigMap", "V1ConfigMap")):
        doc = admission_docs()[kind]
        obj = api.deserialize(Response(doc), model)
        assert api.sanitize_for_serialization(obj) == doc, f"{kind}: fields the {model} model does not know"


def test_step_admission_policy_covers_what_the_step_account_can_create():
    docs = admission_docs()
    policy, binding, params = docs["ValidatingAdmissionPolicy"]["spec"], docs["ValidatingAdmissionPolicyBinding"]["spec"], docs["ConfigMap"]
    assert docs["ValidatingAdmissionPolicy"]["apiVersion"] == "admissionregistration.k8s.io/v1" and policy["failurePolicy"] == "Fail"
    # every object srpo-runner may create (RBAC) is matched, on CREATE, in the namespace, for that account only
    creatable = {(group, resource) for group_resource, verbs in EXPECTED_RULES.items() for group, resource in [group_resource] if "create" in verbs}
    matched = {(g, r) for rule in policy["matchConstraints"]["resourceRules"] for g in rule["apiGroups"] for r in rule["resources"] if "CREATE" in rule["operations"]}
    assert creatable == matched == {("batch", "jobs")}
    assert [c["expression"] for c in policy["matchConditions"]] == [f"request.userInfo.username == 'system:serviceaccount:{NAMESPACE}:{RUNNER_SA}'"]
    assert binding["policyName"] == docs["ValidatingAdmissionPolicy"]["metadata"]["name"] and binding["validationActions"] == ["Deny"]
    assert binding["matchResources"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    assert binding["paramRef"] == {"name": params["metadata"]["name"], "namespace": NAMESPACE, "parameterNotFoundAction": "Deny"}
    # the allow-lists are what the Metaflow config gives the steps
    config = rendered_metaflow_config()
    variables = {v["name"]: v["expression"] for v in policy["variables"]}
    assert sorted(json.loads(variables["allowedSecrets"].replace("'", '"'))) == sorted(config["METAFLOW_KUBERNETES_SECRETS"].split(","))
    assert json.loads(variables["allowedClaims"].replace("'", '"')) == list(json.loads(config["METAFLOW_KUBERNETES_PERSISTENT_VOLUME_CLAIMS"]))
    images = {c["image"].rsplit(":", 1)[0] for _, _, spec in workloads() for c in containers_of(spec) if c["image"].rsplit("/", 1)[-1].startswith("srpo:")}
    assert images == {params["data"]["image"]}, "the ConfigMap names the repository of the srpo image the manifests run"
    assert "srpo-mlflow-db" not in variables["allowedSecrets"] and "srpo-postgres-data" not in variables["allowedClaims"]
    assert "15-step-admission.yaml" in (K8S / "10-rbac.yaml").read_text() and "Residual" not in (K8S / "10-rbac.yaml").read_text()


IMAGE = "ghcr.io/srpo/srpo:0.1.0-cuda"


def metaflow_step_job(**overrides) -> dict:
    """The Job Metaflow's own KubernetesJob builds for a step with this repository's Metaflow config
    (Secrets, service account, model volume, shared memory, labels), as the API server receives it."""
    kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client models (test extra)")
    from metaflow.plugins.kubernetes.kubernetes_job import KubernetesJob

    config = rendered_metaflow_config(SRPO_IMAGE=IMAGE)

    class Client:
        def get(self):
            return kubernetes.client

    kwargs = dict(
        use_tmpfs=False, tmpfs_size=None, tmpfs_path="/metaflow_temp", shared_memory=config["METAFLOW_KUBERNETES_SHARED_MEMORY"], qos="Burstable",
        cpu="4", memory="16384", disk="10240", extended_resources={}, security_context=None, retries=0, completions=1, annotations={"metaflow/step_name": "generate"},
        labels=dict(kv.split("=", 1) for kv in config["METAFLOW_KUBERNETES_LABELS"].split(",")), namespace=config["METAFLOW_KUBERNETES_NAMESPACE"],
        timeout_in_seconds=7200, command=["bash", "-c", "python flows/srpo_step_flow.py step generate"], port=None, environment_variables={"METAFLOW_CODE_URL": "s3://b/c"},
        secrets=config["METAFLOW_KUBERNETES_SECRETS"].split(","), image=config["METAFLOW_KUBERNETES_CONTAINER_IMAGE"], image_pull_policy="IfNotPresent",
        step_name="generate", gpu_vendor="nvidia", gpu="1", persistent_volume_claims=json.loads(config["METAFLOW_KUBERNETES_PERSISTENT_VOLUME_CLAIMS"]),
        node_selector=None, image_pull_secrets=None, service_account=config["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"],
        tolerations=json.loads(config["METAFLOW_KUBERNETES_TOLERATIONS"]), generate_name="t-generate-",
    )  # fmt: skip
    kwargs.update(overrides)
    job = KubernetesJob(Client(), **kwargs).create()._job
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


def admission_verdict(job: dict, username: str = f"system:serviceaccount:{NAMESPACE}:{RUNNER_SA}") -> list[str]:
    """The messages of the policy's failing validations for `job` (empty: admitted), the policy's
    own CEL (match condition, variables in order, validations) evaluated by cel-python."""
    if os.environ.get("CI"):  # installed with the test extra: CI fails rather than skips without it
        import celpy
    else:
        celpy = pytest.importorskip("celpy", reason="cel-python evaluates the policy's CEL (test extra: pip install -e '.[test]')")
    docs = admission_docs()
    spec = docs["ValidatingAdmissionPolicy"]["spec"]
    env = celpy.Environment()
    run = lambda expr, act: env.program(env.compile(expr)).evaluate(act)
    act = {"object": celpy.json_to_cel(job), "params": celpy.json_to_cel(docs["ConfigMap"]), "request": celpy.json_to_cel({"userInfo": {"username": username}})}
    if not all(bool(run(c["expression"], act)) for c in spec["matchConditions"]):
        return []
    variables: dict = {}
    for var in spec["variables"]:
        variables[var["name"]] = run(var["expression"], {**act, "variables": celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})})
    act["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})
    failed = []
    for rule in spec["validations"]:
        result = run(rule["expression"], act)
        assert isinstance(result, celpy.celtypes.BoolType), f"{rule['expression']}: {result!r} (an evaluation error fails the request: failurePolicy Fail)"
        if not result:
            failed.append(rule["message"])
    return failed


def edit(job: dict, change) -> dict:
    job = json.loads(json.dumps(job))
    change(job["spec"]["template"]["spec"])
    return job


FORBIDDEN = {
    "a volume of the database Secret": (lambda p: p.setdefault("volumes", []).append({"name": "db", "secret": {"secretName": "srpo-mlflow-db"}}), "mounts only the step Secrets"),
    "a projected database Secret": (lambda p: p.setdefault("volumes", []).append({"name": "db", "projected": {"sources": [{"secret": {"name": "srpo-mlflow-db"}}]}}), "projects only"),
    "envFrom the database Secret": (lambda p: p["containers"][0]["envFrom"].append({"secretRef": {"name": "srpo-mlflow-db"}}), "environment (envFrom)"),
    "a secretKeyRef into it": (lambda p: p["containers"][0]["env"].append({"name": "PW", "valueFrom": {"secretKeyRef": {"name": "srpo-mlflow-db", "key": "POSTGRES_PASSWORD"}}}), "secretKeyRef"),
    "an init container reading it": (lambda p: p.setdefault("initContainers", []).append({"name": "i", "image": IMAGE, "envFrom": [{"secretRef": {"name": "srpo-mlflow-db"}}]}), "(envFrom)"),
    "the database's volume claim": (lambda p: p["volumes"].append({"name": "pg", "persistentVolumeClaim": {"claimName": "srpo-postgres-data"}}), "only the srpo-models volume claim"),
    "a hostPath": (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "no hostPath"),
    "another image": (lambda p: p["containers"][0].update(image="docker.io/library/postgres:16"), "srpo image only"),
    "a look-alike repository": (lambda p: p["containers"][0].update(image="ghcr.io/srpo/srpo-evil:1"), "srpo image only"),
    "another service account": (lambda p: p.update(serviceAccountName="default"), "service account srpo-runner"),
    "root by uid": (lambda p: p["containers"][0].update(securityContext={"runAsUser": 0}), "does not run as root"),
    "root by pod securityContext": (lambda p: p.update(securityContext={"runAsNonRoot": False}), "does not run as root"),
    "privileged": (lambda p: p["containers"][0].update(securityContext={"privileged": True}), "privileged"),
    "an added capability": (lambda p: p["containers"][0].update(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}), "added capabilities"),
    "the host network": (lambda p: p.update(hostNetwork=True), "no host namespaces"),
}


def test_the_job_metaflow_builds_for_a_step_is_admitted():
    job = metaflow_step_job()
    pod = job["spec"]["template"]["spec"]
    assert {e["secretRef"]["name"] for e in pod["containers"][0]["envFrom"]} == set(rendered_metaflow_config()["METAFLOW_KUBERNETES_SECRETS"].split(","))
    assert {v["name"] for v in pod["volumes"]} == {"dhsm", "srpo-models"} and pod["serviceAccountName"] == RUNNER_SA
    assert admission_verdict(job) == []
    assert admission_verdict(metaflow_step_job(use_tmpfs=True, tmpfs_size=1024, security_context={"run_as_non_root": True, "run_as_user": 10001})) == []


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_a_job_from_the_step_account_is_refused(name):
    change, message = FORBIDDEN[name]
    job = edit(metaflow_step_job(), change)
    failed = admission_verdict(job)
    assert failed and any(message in m for m in failed), f"{name}: {failed}"
    assert admission_verdict(job, username="kubernetes-admin") == [], "only the step account's requests are matched"


# --- no literal credentials -------------------------------------------------------------------------------
def scanned_files() -> list[Path]:
    roots = [INFRA, REPO / "slurm", REPO / "tests" / "golden"]
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]
    files.append(REPO / ".ci" / "install-slurm.sh")
    return sorted(files)


PLACEHOLDER = re.compile(r"""^["']?(<[^>]*>?|\$|\{\{|\[\]|\{\}|\.\.\.|$)""")  # <...>, $VAR, {{ }}, ..., empty
CREDENTIAL_KEY = re.compile(
    r"""(?i)\b[\w.-]*(password|passwd|secret_access_key|secret_key|api_key|private_key|access_key_id|token)\b["']?\s*[:=]\s*(?P<value>[^\n#]*)""")
URL_USERINFO = re.compile(r"""[a-z][a-z0-9+.-]*://[^/\s:@<>"']+:(?P<password>[^@\s/]+)@""")
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}\b")
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def find_credentials(text: str) -> list[str]:
    found = []
    for m in CREDENTIAL_KEY.finditer(text):
        value = m.group("value").strip().rstrip(",;")
        if value.lower().strip("\"'") in ("true", "false", "") or PLACEHOLDER.match(value):
            continue
        if value.startswith(("valueFrom", "{secretKeyRef", "secretKeyRef")):
            continue
        found.append(m.group(0))
    for m in URL_USERINFO.finditer(text):
        if not PLACEHOLDER.match(m.group("password")) and not m.group("password").startswith("$"):
            found.append(m.group(0))
    found += AWS_KEY_ID.findall(text) + PRIVATE_KEY.findall(text)
    # a 40-character base64 run with upper, lower and digits (AWS secret keys look like that)
    found += [s for s in AWS_SECRET.findall(text) if re.search(r"[a-z]", s) and re.search(r"[A-Z]", s) and re.search(r"\d", s)]
    return found


def test_credential_scanner_catches_credentials():
    fake_id = "AKIA" + "Q" * 8 + "7" * 8
    fake_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    for bad in (f"AWS_ACCESS_KEY_ID: {fake_id}", f"aws_secret_access_key = {fake_secret}", "POSTGRES_PASSWORD: hunter2hunter2",
                "uri: postgresql://mlflow:s3cr3t@db:5432/mlflow", "-----BEGIN RSA PRIVATE KEY-----", "export MLFLOW_TRACKING_TOKEN=abc123"):
        assert find_credentials(bad), bad
    for fine in ('POSTGRES_PASSWORD: "<a long random password>"', "postgresql://mlflow:<password>@db/mlflow", "automountServiceAccountToken: false",
                 "- name: AWS_SECRET_ACCESS_KEY", "valueFrom: {secretKeyRef: {name: srpo-s3, key: AWS_SECRET_ACCESS_KEY}}",
                 'AWS_SECRET_ACCESS_KEY: "$AWS_SECRET_ACCESS_KEY"', "--from-literal=AWS_ACCESS_KEY_ID=..."):
        assert not find_credentials(fine), fine


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_literal_credentials(path):
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        pytest.fail(f"{path}: binary file in a text-only directory")
    assert not find_credentials(text), f"{path}: looks like a credential: {find_credentials(text)}"


# --- the Metaflow configuration template ----------------------------------------------------------------
def rendered_metaflow_config(**values: str) -> dict:
    template = string.Template((INFRA / "metaflow" / "config.json.template").read_text())
    defaults = {"SRPO_S3_BUCKET": "bucket", "SRPO_S3_ENDPOINT_URL": "", "SRPO_IMAGE": "registry.example/srpo:0.1.0-cuda"}
    return json.loads(template.substitute({**defaults, **values}))  # substitute: a missing placeholder fails


def test_metaflow_config_template():
    import metaflow.metaflow_config as mf

    config = rendered_metaflow_config()
    for key in config:
        assert key.startswith("METAFLOW_") and hasattr(mf, key[len("METAFLOW_"):]), f"{key}: not a Metaflow setting"
    assert config["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert config["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://bucket/metaflow"
    assert config["METAFLOW_KUBERNETES_NAMESPACE"] == NAMESPACE
    assert config["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"] == RUNNER_SA
    assert set(config["METAFLOW_KUBERNETES_SECRETS"].split(",")) <= secret_keys().keys()
    pvcs = {d["metadata"]["name"] for _, d in all_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert set(json.loads(config["METAFLOW_KUBERNETES_PERSISTENT_VOLUME_CLAIMS"])) <= pvcs
    assert isinstance(json.loads(config["METAFLOW_KUBERNETES_TOLERATIONS"]), list)
    assert isinstance(config["METAFLOW_KUBERNETES_SHARED_MEMORY"], int)  # @kubernetes rejects a string
    # the step pods get the artifact root and MLflow URI through the secrets
    runtime = next(d for _, d in all_docs() if d["kind"] == "Secret" and d["metadata"]["name"] == "srpo-runtime")
    assert {"SRPO_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI"} <= runtime["stringData"].keys()
    # ... and the Metaflow settings themselves, for the runs the training launches from inside a pod:
    # the string-valued ones, all of them, with the same values where they are not placeholders
    in_pods = next(d for _, d in all_docs() if d["kind"] == "Secret" and d["metadata"]["name"] == "srpo-metaflow")["stringData"]
    strings = {k: v for k, v in config.items() if isinstance(v, str)}
    assert in_pods.keys() == strings.keys()
    for key, value in in_pods.items():
        if "<" not in value:
            assert value == strings[key], key
    assert "srpo-metaflow" in config["METAFLOW_KUBERNETES_SECRETS"].split(",")


def test_metaflow_reads_the_rendered_config(tmp_path, monkeypatch):
    """The rendered file, as ~/.metaflowconfig/config.json, is what Metaflow's settings resolve to."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(rendered_metaflow_config(SRPO_S3_BUCKET="b1", SRPO_S3_ENDPOINT_URL="http://minio:9000")))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("METAFLOW_")}
    env["METAFLOW_HOME"] = str(tmp_path)
    code = ("import metaflow.metaflow_config as c; print(c.DATASTORE_SYSROOT_S3, c.KUBERNETES_NAMESPACE, c.KUBERNETES_SERVICE_ACCOUNT, "
            "c.S3_ENDPOINT_URL, c.KUBERNETES_SHARED_MEMORY)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["s3://b1/metaflow", NAMESPACE, RUNNER_SA, "http://minio:9000", "16384"]


# --- the images -------------------------------------------------------------------------------------------
def dockerfile_stages(text: str) -> list[list[str]]:
    lines, current = [], []
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = []
            lines.append(current)
        current.append(line)
    return lines


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.mlflow"])
def test_images_run_as_non_root_without_secrets(name):
    text = (INFRA / name).read_text()
    stages = dockerfile_stages(text)
    final = stages[-1]
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users, f"{name}: the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER must be a numeric non-root uid (runAsNonRoot checks it), got {uid}"
    for line in (l for stage in stages for l in stage):
        if line.upper().startswith(("ENV ", "ARG ")):
            names = re.findall(r"(\w+)=", line) or [line.split()[1]]
            for var in names:
                assert not re.search(r"SECRET|PASSWORD|PASSWD|ACCESS_KEY|(^|_)TOKEN($|_)", var.upper()), f"{name}: {var} in {line}"
        assert not re.search(r"(?i)\bCOPY\b.*(\.aws|\.kube|\.env|credentials)", line), f"{name}: {line}"


def test_gpu_image_definition():
    text = (INFRA / "Dockerfile").read_text()
    stages = dockerfile_stages(text)
    assert all(re.match(r"FROM \$\{CUDA_IMAGE\}", s[0]) for s in stages)
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+", text)
    assert 'pip install ".[vllm]"' in text and "kubernetes" in text
    ignore = [line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**", "the build context is an allowlist"
    # what the image copies must be let through the allowlist
    for src in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+)", text, re.M):
        assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is copied but excluded from the context"
    # the MLflow image pins the version the project's client uses
    import mlflow

    assert f"ARG MLFLOW_VERSION={mlflow.__version__}" in (INFRA / "Dockerfile.mlflow").read_text()
    mlflow_deploy = (K8S / "40-mlflow.yaml").read_text()
    assert f"srpo-mlflow:{mlflow.__version__}" in mlflow_deploy


# --- the MLflow Deployment's command line, for real --------------------------------------------------------
@pytest.mark.slow
def test_mlflow_deployment_command_leaves_s3_to_its_clients(s3_server, s3_bucket, tmp_path, monkeypatch):
    """MLflow runs without S3 keys and without the artifact proxy; a client with its own keys
    (a step pod: srpo-s3, MLFLOW_S3_ENDPOINT_URL of srpo-runtime) writes the artifacts to S3."""
    import boto3

    from tests.conftest_servers import MLFLOW_READY_TIMEOUT_S, _executable, free_port, start_server, stop_server, wait_ready

    deployment = next(d for _, d in all_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "srpo-mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secret_values = {  # what the Secrets would hold
        ("srpo-mlflow-db", "MLFLOW_BACKEND_STORE_URI"): f"sqlite:///{tmp_path / 'mlflow.db'}",
        ("srpo-runtime", "MLFLOW_ARTIFACTS_DESTINATION"): f"s3://{s3_bucket}/mlflow",
        ("srpo-runtime", "SRPO_S3_ENDPOINT_URL"): s3_server,
        ("srpo-runtime", "AWS_DEFAULT_REGION"): "us-east-1",
        ("srpo-s3", "AWS_ACCESS_KEY_ID"): "testing",
        ("srpo-s3", "AWS_SECRET_ACCESS_KEY"): "testing",
    }
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = str(tmp_path / "home") if item["name"] == "HOME" else str(tmp_path) if item["name"] == "TMPDIR" else item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_values[(ref["name"], ref["key"])]
    (tmp_path / "home").mkdir()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    overrides = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    args = []
    for arg in container["args"]:
        name = arg.split("=", 1)[0]
        arg = f"{name}={overrides[name]}" if name in overrides else arg
        args.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg))
    cmd = [_executable(container["command"][0]), *container["command"][1:], *args]
    url = f"http://127.0.0.1:{port}"
    server = start_server("mlflow (40-mlflow.yaml)", cmd, url, tmp_path / "mlflow.log", tmp_path)
    try:
        wait_ready(server, url + "/health", MLFLOW_READY_TIMEOUT_S)

        def status(host: str) -> int:
            req = urllib.request.Request(url + "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        def status_of(target: str) -> int:
            try:
                with urllib.request.urlopen(target, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("srpo-mlflow.srpo.svc:5000") == 200  # in-cluster clients (srpo-runtime's URI)
        assert status("srpo-mlflow:5000") == 200
        assert status("evil.example.com") in (400, 403)   # DNS-rebinding protection still on

        assert status_of(url + "/api/2.0/mlflow-artifacts/artifacts") != 200  # no proxy to S3 for any caller

        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)  # the client's own S3 access
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("infra-test")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "hello", "note.txt")
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert any(k.startswith("mlflow/") and k.endswith("/note.txt") for k in keys), keys
    finally:
        stop_server(server)
