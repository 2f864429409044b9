"""The Kubernetes manifests of deploy/k8s: the files, their kustomize builds, and views over them."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
# name -> kustomization directory
VARIANTS = {
    "gpu": K8S,
    "cpu": K8S / "overlays" / "cpu",
    "prometheus-adapter": K8S / "overlays" / "prometheus-adapter",
    "tp": K8S / "overlays" / "tp",
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def resource_files() -> list[Path]:
    """Every file some kustomization lists under `resources` (patches and values excluded)."""
    files = set()
    for kfile in kustomizations():
        for entry in yaml.safe_load(kfile.read_text()).get("resources", []):
            path = (kfile.parent / entry).resolve()
            if path.is_file():
                files.add(path)
    return sorted(files)


def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def build(variant: str) -> tuple[dict, ...]:
    """`kubectl kustomize` of a variant (kubectl bundles kustomize)."""
    exe = kubectl()
    assert exe is not None, "kubectl is needed to build the kustomizations"
    out = subprocess.run(
        [exe, "kustomize", str(VARIANTS[variant])], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kustomize {variant}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def base_docs() -> tuple[dict, ...]:
    """The base's resources straight from its files (no kustomize needed)."""
    docs = []
    for entry in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]:
        docs += load_docs(BASE / entry)
    return tuple(docs)


class Cluster:
    """Lookups over one set of manifests."""

    def __init__(self, docs: tuple[dict, ...] | list[dict]) -> None:
        self.docs = list(docs)

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def containers(self) -> Iterator[tuple[dict, dict]]:
        """(workload, container) for every container, init containers included."""
        for w in self.workloads():
            spec = w["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield w, c

    def selected(self, selector: dict) -> list[dict]:
        """Workloads whose pod labels match a label selector (matchLabels or a plain map)."""
        wanted = selector.get("matchLabels", selector) if selector else {}
        return [
            w
            for w in self.workloads()
            if wanted.items() <= w["spec"]["template"]["metadata"].get("labels", {}).items()
        ]

    def config_value(self, ref: dict) -> str:
        cm = self.get("ConfigMap", ref["name"])
        assert cm is not None, f"ConfigMap {ref['name']} is not in the manifests"
        assert ref["key"] in cm["data"], f"ConfigMap {ref['name']} has no key {ref['key']}"
        return cm["data"][ref["key"]]

    def env(self, container: dict) -> dict[str, str]:
        """The container's environment as the kubelet resolves it (absent optional secrets skipped)."""
        out = {}
        for var in container.get("env", []):
            if "value" in var:
                out[var["name"]] = str(var["value"])
            elif "configMapKeyRef" in var["valueFrom"]:
                out[var["name"]] = self.config_value(var["valueFrom"]["configMapKeyRef"])
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref.get("optional"), (
                    f"{var['name']}: a required Secret cannot be checked here"
                )
        return out


def command_of(container: dict) -> list[str]:
    """What the container runs after the image's ENTRYPOINT (`radixserve`)."""
    assert "command" not in container, "containers keep the image's ENTRYPOINT"
    return [str(a) for a in container["args"]]


def probes(container: dict) -> Iterator[tuple[str, dict]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def http_probes(subcommand: str) -> list[dict]:
    cluster = Cluster(base_docs())
    return [
        probe
        for _, c in cluster.containers()
        if command_of(c)[0] == subcommand
        for _, probe in probes(c)
        if "httpGet" in probe
    ]


def flag_values(argv: list[str], flag: str) -> list[str]:
    """The values after `flag` up to the next flag (nargs='+')."""
    if flag not in argv:
        return []
    values = []
    for arg in argv[argv.index(flag) + 1 :]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a gRPC target such as `dns:///name:30001` or `name:30001`."""
    host, _, port = address.removeprefix("dns:///").rpartition(":")
    return host, int(port)
