"""The Dockerfile's structure, checked without a Docker engine.

For each value of the DEVICE build argument: every stage it builds from exists (or is an external
image), every `COPY --from` names an earlier stage, every file it copies from the context exists
and passes .dockerignore, and the final stage runs `radixserve` as a non-root user.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field

import pytest

from services.cli import build_parser
from tests.deploy.compose import DOCKERFILE, ROOT

INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "WORKDIR",
    "USER",
    "EXPOSE",
    "ENTRYPOINT",
    "CMD",
    "VOLUME",
    "LABEL",
}
DEVICES = ["cpu", "cuda"]


@dataclass
class Stage:
    base: str
    name: str | None
    lines: list[tuple[str, str]] = field(default_factory=list)  # (instruction, arguments)


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages(build_args: dict[str, str]) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG values, stages) with `${VAR}` in FROM expanded as BuildKit does."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, rest in instructions():
        assert keyword in INSTRUCTIONS, f"unexpected instruction {keyword}"
        if keyword == "ARG" and not result:
            name, _, default = rest.partition("=")
            global_args[name] = build_args.get(name, default)
        elif keyword == "FROM":
            ref = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], rest)
            parts = ref.split()
            result.append(
                Stage(parts[0], parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None)
            )
        else:
            result[-1].lines.append((keyword, rest))
    return global_args, result


def needed(all_stages: list[Stage]) -> list[Stage]:
    """The stages the last one depends on (what BuildKit builds), in file order."""
    by_name = {s.name: s for s in all_stages if s.name}
    wanted, todo = set(), [all_stages[-1]]
    while todo:
        stage = todo.pop()
        if id(stage) in wanted:
            continue
        wanted.add(id(stage))
        refs = [stage.base] + [
            m.group(1)
            for k, a in stage.lines
            if k == "COPY"
            for m in [re.search(r"--from=(\S+)", a)]
            if m
        ]
        todo += [by_name[r] for r in refs if r in by_name]
    return [s for s in all_stages if id(s) in wanted]


def ignored(path: str) -> bool:
    """.dockerignore semantics for the patterns used there: last match wins, `!` re-includes."""
    result = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(
            path, pattern.replace("**/", "*")
        ):
            result = not negate
    return result


@pytest.mark.parametrize("device", DEVICES)
def test_stages_resolve_for_each_device(device: str) -> None:
    global_args, all_stages = stages({"DEVICE": device})
    names = [s.name for s in all_stages]
    assert len(set(names)) == len(names)
    built = needed(all_stages)
    assert f"base-{device}" in [s.name for s in built]
    other = {f"base-{d}" for d in DEVICES} - {f"base-{device}"}
    assert not other & {s.name for s in built}, "the other device's base is not built"
    seen: set[str] = set()
    for stage in all_stages:
        assert stage.base in seen or "/" in stage.base or ":" in stage.base, stage.base
        for keyword, args in stage.lines:
            source = re.search(r"--from=(\S+)", args) if keyword == "COPY" else None
            if source:
                assert source.group(1) in seen, f"COPY --from={source.group(1)} before it is built"
        if stage.name:
            seen.add(stage.name)
    assert global_args["CUDA_BASE"].startswith("nvidia/cuda:")


def test_context_files_exist_and_are_not_ignored() -> None:
    _, all_stages = stages({})
    for stage in all_stages:
        for keyword, args in stage.lines:
            if keyword == "COPY" and "--from=" not in args:
                *sources, _ = shlex.split(args)
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert not ignored(source), f"{source} is excluded by .dockerignore"
    for private in (".venv", ".git", "tests", "deploy", ".cache"):
        assert ignored(private), f"{private} would be sent to the build"


def test_final_stage_runs_radixserve_as_a_non_root_user() -> None:
    _, all_stages = stages({})
    final = dict(all_stages[-1].lines)
    assert final["ENTRYPOINT"] == '["radixserve"]'
    build_parser().parse_args(json.loads(final["CMD"]))  # the default command parses
    assert final["USER"].split(":")[0] == "${UID}"
    uid = re.search(r"ARG UID=(\d+)", DOCKERFILE.read_text()).group(1)
    assert int(uid) > 0
    torch_indexes = [
        a for s in all_stages for k, a in s.lines if k == "ARG" and a.startswith("TORCH_INDEX=")
    ]
    assert any(a.endswith("/whl/cpu") for a in torch_indexes), "the CPU image takes the CPU wheels"
