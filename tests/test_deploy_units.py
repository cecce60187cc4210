"""deploy/: the systemd units' exposure scores and `verify`, the tmpfiles and logrotate snippets, the env example.

Every check runs the real tools offline (systemd 252 on Debian 12). A missing tool is installed with apt-get
or the test fails: a deployment check that skips when its tool is absent proves nothing.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shared.audit import AuditLog
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT_DIR = DEPLOY / "systemd"
API_UNIT = UNIT_DIR / "overlord-agent-api.service"
WORKER_UNIT = UNIT_DIR / "overlord-agent-worker@.service"
WORKERS_TARGET = UNIT_DIR / "overlord-agent-workers.target"
TMPFILES = DEPLOY / "tmpfiles.d" / "overlord-agent.conf"
LOGROTATE = DEPLOY / "logrotate.d" / "overlord-agent"
ENV_EXAMPLE = DEPLOY / "agent.env.example"
EXEC_START_BIN = "/opt/overlord-agent/venv/bin/overlord-agent"

# Highest accepted `systemd-analyze security` exposure (the original unit scored 3.1).
EXPOSURE_LIMITS = {API_UNIT.name: 0.9, WORKER_UNIT.name: 1.0}
# The worker may reach loopback and the public internet; these IPv4 ranges must stay unreachable.
PRIVATE_V4 = [ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/3")]
SERVICE_UID, ADM_GID = 990, 4

Unit = dict[str, dict[str, list[str]]]


# --- tools ----------------------------------------------------------------------------------------

def ensure_tool(tool: str, package: str) -> str:
    """The tool's path; installs `package` with apt-get when it is missing, fails when that is impossible."""
    found = shutil.which(tool)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"{tool} is missing and cannot be installed here (needs root and apt-get): install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = shutil.which(tool)
    if not found:
        pytest.fail(f"installed {package} but {tool} is still not on PATH")
    return found


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    return ensure_tool("systemd-analyze", "systemd")


@pytest.fixture(scope="session")
def systemd_tmpfiles() -> str:
    return ensure_tool("systemd-tmpfiles", "systemd")


@pytest.fixture(scope="session")
def logrotate() -> str:
    return ensure_tool("logrotate", "logrotate")


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool with a fixed, colourless, pager-less environment; output is compared as text."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env.update({"SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0", "LC_ALL": "C.UTF-8"})
    return subprocess.run(cmd, env=env, cwd=cwd or Path("/"), capture_output=True, text=True, errors="replace",
                          timeout=120)


def parse_unit(path: Path) -> Unit:
    """Sections to keys to every value assigned (systemd keys may repeat); comments and blank lines dropped."""
    unit: Unit = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        unit.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set once, found {values}"
    return values[0]


def words(unit: Unit, section: str, key: str) -> list[str]:
    return [w for value in unit.get(section, {}).get(key, []) for w in value.split()]


# --- systemd-analyze security ---------------------------------------------------------------------

def exposure(systemd_analyze: str, unit: Path) -> tuple[float, str]:
    """The overall exposure `systemd-analyze security --offline=true` gives the unit file (0.0-10.0)."""
    done = run([systemd_analyze, "security", "--offline=true", "--no-pager", str(unit)])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, f"no overall exposure in the output (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return float(match.group(1)), done.stdout


@pytest.mark.parametrize("unit", [API_UNIT, WORKER_UNIT], ids=lambda p: p.name)
def test_exposure_within_limit(systemd_analyze: str, unit: Path) -> None:
    score, report = exposure(systemd_analyze, unit)
    limit = EXPOSURE_LIMITS[unit.name]
    open_items = "\n".join(line for line in report.splitlines() if line.startswith("✗"))
    assert score <= limit, f"{unit.name}: exposure {score} > {limit}; what is still open:\n{open_items}"
    print(f"{unit.name}: exposure {score} (limit {limit})")


# --- systemd-analyze verify -----------------------------------------------------------------------
#
# `systemd-analyze verify` exits 0 on unknown keys and unparsable values (it only warns), so any output is a
# failure here. Offline on systemd 252 it needs two things that a bare checkout lacks:
#  - the ExecStart= binary must exist and be executable, or it prints "Command ... is not executable";
#  - every unit pulled in by Requires= must load: DefaultDependencies= adds Requires=sysinit.target, and
#    without it verify prints "Failed to create ...: Unit sysinit.target not found".
# Both are provided inside a scratch directory given as --root= (verify then looks up units and the
# ExecStart= path below it, not on the host): our units in <root>/etc/systemd/system, a stub executable at
# <root>/opt/overlord-agent/venv/bin/overlord-agent, and one-line stubs for the targets the units name
# (only sysinit.target is strictly needed; the rest keep the check independent of the host's unit files).
# --man=no skips man-page lookups for Documentation=, --generators=no keeps host generators out.

STUB_TARGETS = ("sysinit.target", "basic.target", "shutdown.target", "network-online.target", "multi-user.target")


def make_verify_root(root: Path, units: list[Path]) -> Path:
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    for unit in units:
        shutil.copy2(unit, unit_dir / unit.name)
    for target in STUB_TARGETS:
        (unit_dir / target).write_text(f"[Unit]\nDescription=stub {target} for offline verify\n")
    stub = root / EXEC_START_BIN.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_verify_root(tmp_path_factory.mktemp("verify-root"), [API_UNIT, WORKER_UNIT, WORKERS_TARGET])


def verify(systemd_analyze: str, root: Path, unit_name: str) -> str:
    done = run([systemd_analyze, "verify", f"--root={root}", "--man=no", "--generators=no", unit_name])
    return (done.stdout + done.stderr).strip() + (f"\n(exit {done.returncode})" if done.returncode else "")


@pytest.mark.parametrize("unit_name", [
    API_UNIT.name, WORKER_UNIT.name, "overlord-agent-worker@1.service", WORKERS_TARGET.name,
])
def test_verify_prints_nothing(systemd_analyze: str, verify_root: Path, unit_name: str) -> None:
    output = verify(systemd_analyze, verify_root, unit_name)
    assert output == "", f"systemd-analyze verify {unit_name}:\n{output}"


def test_verify_harness_catches_mistakes(systemd_analyze: str, tmp_path: Path) -> None:
    """The scratch root must not hide errors: a bad key, a bad value and a missing binary all show."""
    broken = tmp_path / WORKER_UNIT.name
    text = WORKER_UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd").replace("[Service]", "[Service]\nBogus=1")
    broken.write_text(text.replace(EXEC_START_BIN, "/opt/nowhere/overlord-agent"))
    output = verify(systemd_analyze, make_verify_root(tmp_path / "root", [broken, WORKERS_TARGET]),
                    "overlord-agent-worker@1.service")
    for expected in ("Unknown key 'Bogus'", "mixd", "/opt/nowhere/overlord-agent"):
        assert expected in output, f"verify did not report {expected!r}:\n{output}"


# --- what the units promise ---------------------------------------------------------------------

def test_worker_stop_lets_the_job_finish() -> None:
    """SIGTERM to the worker alone (RQ warm shutdown), and time for the longest job before SIGKILL."""
    unit = parse_unit(WORKER_UNIT)
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "Restart") == "always"
    job_timeout_s = Settings.model_fields["job_timeout_s"].default
    rq_backstop_s = job_timeout_s + 30  # Settings.rq_job_timeout_s: RQ's own timeout behind the wall clock
    stop_s = int(one(unit, "Service", "TimeoutStopSec"))
    assert stop_s > rq_backstop_s, f"TimeoutStopSec={stop_s} must exceed the longest job ({rq_backstop_s} s)"
    assert "%i" in one(unit, "Service", "ExecStart")
    assert one(unit, "Unit", "PartOf") == WORKERS_TARGET.name
    assert one(unit, "Install", "WantedBy") == WORKERS_TARGET.name


@pytest.mark.parametrize("path", [API_UNIT, WORKER_UNIT], ids=lambda p: p.name)
def test_no_hup_reload_and_eperm_filter(path: Path) -> None:
    """RQ and uvicorn have no SIGHUP reload; a filtered call must fail with EPERM, not kill claude."""
    unit = parse_unit(path)
    assert "ExecReload" not in unit["Service"]
    assert one(unit, "Service", "SystemCallErrorNumber") == "EPERM"
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service", "the first filter line is the allow-list"
    assert one(unit, "Service", "User") == "overlord"


def test_write_execute_denied_on_api_only() -> None:
    """The claude binary JIT-compiles: MemoryDenyWriteExecute= would kill it, so only the API has it."""
    assert one(parse_unit(API_UNIT), "Service", "MemoryDenyWriteExecute") == "yes"
    assert "MemoryDenyWriteExecute" not in parse_unit(WORKER_UNIT)["Service"]


def test_worker_egress_is_loopback_and_public_internet() -> None:
    """The IPv4 allow-list is exactly 0.0.0.0/0 minus PRIVATE_V4: no gap, no private address, no typo."""
    unit = parse_unit(WORKER_UNIT)
    assert one(unit, "Service", "IPAddressDeny") == "any"
    allowed = words(unit, "Service", "IPAddressAllow")
    assert "localhost" in allowed
    v4 = [ipaddress.IPv4Network(a) for a in allowed if re.fullmatch(r"[0-9./]+", a)]
    v6 = [ipaddress.IPv6Network(a) for a in allowed if ":" in a]
    assert v6 == [ipaddress.IPv6Network("2000::/3")], "IPv6: global unicast only"
    for net in v4:
        assert not any(net.overlaps(private) for private in PRIVATE_V4), f"{net} reaches a private range"
    for a, b in zip(v4, v4[1:], strict=False):
        assert not a.overlaps(b), f"{a} and {b} overlap"
    total = sum(n.num_addresses for n in v4) + sum(p.num_addresses for p in PRIVATE_V4)
    assert total == 2**32, f"allow-list plus private ranges cover {total} addresses, not all 2**32"


def test_writable_paths_are_created_by_tmpfiles() -> None:
    """ReadWritePaths= exist after boot (a missing one fails the unit) and match the settings' defaults."""
    created = {line.split()[1] for line in TMPFILES.read_text().splitlines()
               if line.strip() and not line.startswith("#") and line.split()[0] in {"d", "D"}}
    fields = Settings.model_fields
    assert str(fields["audit_log"].default.parent) in created
    assert str(fields["claude_config_dir"].default) in created
    assert str(fields["claude_cwd"].default) in created
    for path in (API_UNIT, WORKER_UNIT):
        for writable in words(parse_unit(path), "Service", "ReadWritePaths"):
            assert writable.lstrip("-") in created, f"{path.name}: ReadWritePaths {writable} is not in {TMPFILES.name}"


# --- tmpfiles.d ---------------------------------------------------------------------------------

def test_tmpfiles_creates_the_directories(systemd_tmpfiles: str, tmp_path: Path) -> None:
    """systemd 252 has no --dry-run: create for real under --root, with the users in the root's own passwd."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        f"root:x:0:0:root:/root:/bin/sh\noverlord:x:{SERVICE_UID}:{SERVICE_UID}::/srv/overlord:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text(f"root:x:0:\nadm:x:{ADM_GID}:\noverlord:x:{SERVICE_UID}:\n")
    done = run([systemd_tmpfiles, "--create", f"--root={root}", str(TMPFILES)])
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    expected = {
        "var/log/overlord-agent": (0o2750, SERVICE_UID, ADM_GID, stat.S_ISDIR),
        "var/log/overlord-agent/audit.jsonl": (0o640, SERVICE_UID, ADM_GID, stat.S_ISREG),
        "srv/overlord": (0o750, 0, SERVICE_UID, stat.S_ISDIR),
        "srv/overlord/claude": (0o700, SERVICE_UID, SERVICE_UID, stat.S_ISDIR),
        "srv/overlord/work": (0o700, SERVICE_UID, SERVICE_UID, stat.S_ISDIR),
    }
    for rel, (mode, uid, gid, is_kind) in expected.items():
        st = (root / rel).lstat()
        assert is_kind(st.st_mode), rel
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), rel


# --- logrotate ----------------------------------------------------------------------------------

@pytest.fixture
def rotate_conf(tmp_path: Path) -> tuple[Path, Path]:
    """deploy/logrotate.d with the log moved into tmp_path and `overlord adm` replaced by whoever runs this
    (logrotate refuses unknown users, and only root may switch to another); returns (config, log path)."""
    text = LOGROTATE.read_text()
    audit = str(Settings.model_fields["audit_log"].default)
    for needle in (audit, "su overlord adm", "nocreate"):
        assert needle in text, f"{LOGROTATE.name} no longer contains {needle!r}"
    me, my_group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    log = tmp_path / "audit.jsonl"
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text.replace(audit, str(log)).replace("overlord adm", f"{me} {my_group}"))
    conf.chmod(0o644)
    return conf, log


def test_logrotate_config_parses(logrotate: str, rotate_conf: tuple[Path, Path]) -> None:
    conf, log = rotate_conf
    log.write_text('{"event": "probe"}\n')
    done = run([logrotate, "-d", "-s", str(conf.parent / "state"), str(conf)])
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if re.search(r"\berror\b|unknown|bad ", line, re.I)]
    assert done.returncode == 0 and not problems, output


def test_plain_rotation_loses_no_audit_line(logrotate: str, rotate_conf: tuple[Path, Path]) -> None:
    """The audit writer reopens the file per line with O_APPEND, so rename-and-create (no copytruncate, no
    signal) keeps every line: those before the rename in the rotated file, the rest in the new one."""
    conf, log = rotate_conf
    audit = AuditLog(log)
    written = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal written
        while not stop.is_set():
            audit.write("probe", n=written)
            written += 1

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 30
        while written < count:
            assert time.monotonic() < deadline, f"the writer is stuck at {written} lines"
            time.sleep(0.001)

    thread = threading.Thread(target=writer)
    umask = os.umask(0o077)  # the units' UMask=
    thread.start()
    try:
        wait_for(200)
        done = run([logrotate, "-f", "-s", str(conf.parent / "state"), str(conf)])
        wait_for(written + 200)
    finally:
        stop.set()
        thread.join(30)
        os.umask(umask)
    assert done.returncode == 0, done.stdout + done.stderr

    rotated = [p for p in conf.parent.iterdir() if p.name.startswith("audit.jsonl-")]
    # Exactly one: with logrotate's own `create`, a line that created the file between its rename and its
    # create made it move that file aside too (`audit.jsonl-<date>.backup`, lines out of order).
    assert len(rotated) == 1, sorted(p.name for p in conf.parent.iterdir())
    assert not rotated[0].name.endswith(".gz"), "delaycompress: the newest rotated file stays uncompressed"
    before, after = rotated[0].read_text().splitlines(), log.read_text().splitlines()
    assert len(before) >= 200 and len(after) >= 200, (len(before), len(after))
    seen = [json.loads(line)["n"] for line in before + after]
    assert seen == list(range(written)), "lines lost, duplicated or reordered across the rotation"
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


def test_audit_writer_creates_the_log_0640_in_the_directorys_group_whatever_the_umask(tmp_path: Path) -> None:
    """After a rotation (`nocreate`) the next line creates the file: readable by group adm, as tmpfiles made it."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    # A group other than the writer's own (root may pick any; others need a supplementary group).
    groups = [4242] if os.geteuid() == 0 else [g for g in os.getgroups() if g != os.getgid()]
    assert groups, "needs root or a supplementary group to tell the directory's group from the writer's"
    os.chown(log_dir, -1, groups[0])
    log_dir.chmod(0o2750)
    umask = os.umask(0o077)
    try:
        AuditLog(log_dir / "audit.jsonl").write("probe", n=0)
    finally:
        os.umask(umask)
    st = (log_dir / "audit.jsonl").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, groups[0])
    assert json.loads((log_dir / "audit.jsonl").read_text())["n"] == 0


# --- the env file example -----------------------------------------------------------------------

def env_example_lines() -> list[tuple[bool, str, str]]:
    """(active, name, value) for every KEY=value line, commented-out (`#KEY=...`) or not."""
    out = []
    for raw in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", raw)
        if match:
            out.append((match.group(1) == "", match.group(2), match.group(3)))
    return out


def test_env_example_names_every_setting_and_nothing_else() -> None:
    named = {name for _, name, _ in env_example_lines() if name.startswith("AGENT_")}
    fields = {f"AGENT_{field.upper()}" for field in Settings.model_fields}
    assert not named - fields, f"not settings: {sorted(named - fields)}"
    assert not fields - named, f"settings missing from {ENV_EXAMPLE.name}: {sorted(fields - named)}"


def test_env_example_reads_the_same_in_systemd_and_pydantic() -> None:
    """Active lines are bare KEY=value (no quotes, spaces or `export`), and their values validate."""
    values: dict[str, Any] = {}
    for active, name, value in env_example_lines():
        if active:
            assert re.fullmatch(r"[^\s\"'$`\\]*", value), f"{name}: quote or space in {value!r}"
            if name.startswith("AGENT_"):
                values[name.removeprefix("AGENT_").lower()] = value
    assert values.pop("session_secret") == "change-me", "the example secret must be a refused placeholder"
    Settings(_env_file=None, session_secret="x" * 32, **values)
