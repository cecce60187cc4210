"""docker-compose.test.yml, checked offline (no Docker engine needed): schema, commands, settings, paths."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.cli import build_parser
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.test.yml"
DOCKERFILE = ROOT / "Dockerfile.test"
SUBCOMMANDS = {"api", "worker", "status", "drain", "run"}
SERVICES = {"redis", "api", "worker1", "worker2", "tests"}
# Where Dockerfile.test puts the repository inside the image (its WORKDIR): /app/x is the repo's x.
APP_DIR = "/app"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # resolves the x-* anchors and `<<` merges as compose does
    assert isinstance(data, dict)
    return data


def strings(node: Any) -> Iterator[str]:
    """Every string anywhere in the document (keys excepted)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def commands(compose: dict[str, Any]) -> Iterator[tuple[str, list[str] | str]]:
    """(service, command) for every service with a command: a list (exec form) or a string (shell form)."""
    for name, service in compose["services"].items():
        for key in ("command", "entrypoint"):
            if key in service:
                yield name, service[key]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_file_matches_the_compose_spec() -> None:
    """check-jsonschema ships the compose-spec schema (`vendor.compose-spec`): no network needed."""
    tool = Path(sys.executable).parent / "check-jsonschema"
    assert tool.is_file(), f"{tool} is missing: pip install -e '.[dev]'"
    done = subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert SERVICES <= set(services), sorted(services)
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("api", "worker1", "worker2", "tests"):
        assert services[name]["build"]["dockerfile"] == DOCKERFILE.name, name
    for name in ("worker1", "worker2"):
        claude = environment(services[name])["AGENT_CLAUDE_BIN"]
        assert claude == f"{APP_DIR}/tests/fake_claude.py", f"{name} must run the stand-in claude"
        assert os.access(ROOT / "tests" / "fake_claude.py", os.X_OK), "tests/fake_claude.py must be executable"
        assert environment(services[name])["AGENT_REDIS_URL"].startswith("redis://redis:")
    names = [service["command"][service["command"].index("--name") + 1] for name, service in services.items()
             if name.startswith("worker")]
    assert len(set(names)) == len(names), f"worker names must be unique: {names}"


def test_overlord_agent_subcommands_exist(compose: dict[str, Any]) -> None:
    """Every `overlord-agent ...` the file runs names a real subcommand with options the CLI accepts."""
    parser = build_parser()
    known = {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
             for name in action.choices}
    assert known >= SUBCOMMANDS, f"the CLI lost a subcommand: {sorted(SUBCOMMANDS - known)}"
    invocations: list[list[str]] = []
    for _, command in commands(compose):
        if isinstance(command, list) and command and command[0] == "overlord-agent":
            invocations.append(command[1:])
        for text in ([command] if isinstance(command, str) else command):
            for line in text.splitlines():
                if "overlord-agent " in line and not line.lstrip().startswith("#"):
                    words = shlex.split(line.split("overlord-agent ", 1)[1].split("&&")[0].split(";")[0])
                    invocations.append(words)
    assert invocations, "the compose file runs no overlord-agent command"
    for args in invocations:
        assert args and args[0] in SUBCOMMANDS, f"overlord-agent {' '.join(args)}: unknown subcommand"
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"overlord-agent {' '.join(args)}: the CLI refuses these arguments")


def test_agent_variables_are_settings(compose: dict[str, Any]) -> None:
    """AGENT_* names set anywhere (environment blocks, `env X=...` in commands) are Settings fields, except
    AGENT_TEST_*, the suite's own knobs, which must be read somewhere under tests/."""
    fields = {f"AGENT_{name.upper()}" for name in Settings.model_fields}
    suite = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name)
    names: set[str] = set()
    for service in compose["services"].values():
        names |= {k for k in environment(service) if k.startswith("AGENT_")}
    for text in strings(compose["services"]):
        names |= set(re.findall(r"\b(AGENT_[A-Z0-9_]+)=", text))
    assert names, "no AGENT_* settings found: the parser above is broken"
    for name in sorted(names):
        if name.startswith("AGENT_TEST_"):
            assert f'"{name}"' in suite, f"{name} is read by nothing under tests/"
        else:
            assert name in fields, f"{name} is not a setting (shared.settings.Settings)"


def test_worker_stop_grace_outlasts_a_job(compose: dict[str, Any]) -> None:
    """Like the systemd units: a stop waits for the job in flight (job timeout + RQ's 30 s backstop)."""
    for name in ("worker1", "worker2"):
        service = compose["services"][name]
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace, service["stop_grace_period"]
        job_timeout_s = int(environment(service).get("AGENT_JOB_TIMEOUT_S",
                                                     Settings.model_fields["job_timeout_s"].default))
        assert int(grace.group(1)) > job_timeout_s + 30, name


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    """Build contexts, Dockerfiles, bind mounts, /app/... paths and the Dockerfile's COPY sources."""
    services = compose["services"]
    missing: list[str] = []
    for name, service in services.items():
        build = service.get("build")
        if isinstance(build, dict):
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            if not context.is_dir():
                missing.append(f"{name}: build context {context}")
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                missing.append(f"{name}: dockerfile {build.get('dockerfile')}")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")) and not (COMPOSE.parent / source).exists():
                missing.append(f"{name}: bind mount {source}")
    for text in strings(services):
        for path in re.findall(rf"{APP_DIR}/[\w./-]+", text):
            if not (ROOT / path.removeprefix(APP_DIR + "/")).exists():
                missing.append(f"{path} (repo: {path.removeprefix(APP_DIR + '/')})")
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^WORKDIR {APP_DIR}$", dockerfile, re.M), f"{DOCKERFILE.name} must work in {APP_DIR}"
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        for source in line.split()[:-1]:
            if not (ROOT / source).exists():
                missing.append(f"{DOCKERFILE.name}: COPY {source}")
    assert not missing, "referenced but missing:\n" + "\n".join(missing)
