"""The child processes of `overlord-agent run`: started, their output prefixed, watched, restarted, stopped.

Single-threaded on purpose: one selector loop reads every child's output and wakes on signals, so
`preexec_fn` (which sets the parent-death signal) runs in a process without other threads.
Linux only (prctl, /proc), like the workers themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TextIO

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
QUICK_DEATH_S = 10.0  # a worker that dies sooner than this after starting counts as crash-looping
MAX_QUICK_DEATHS = 5
KILL_WAIT_S = 3.0


def _prctl() -> Callable[..., int]:
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def become_subreaper() -> None:
    """Orphans of our children (a work-horse whose worker was killed) are re-parented to us, not to init,
    so the final sweep can find and reap them."""
    _prctl()(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process, read from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(") ", 1)[1].split()[:2]
        table[int(entry.name)] = (int(ppid), state)
    return table


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in process_table().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


class Child:
    """One supervised process in its own session (a terminal's Ctrl-C reaches only the supervisor, which
    stops the children in order); it gets SIGTERM if the supervisor dies without stopping it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], *, restart: bool = False,
                 before_restart: Callable[[], None] | None = None, stop_after_s: float = 3.0, order: int = 0) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.restart = restart
        self.before_restart = before_restart
        self.stop_after_s = stop_after_s  # SIGTERM, this long, then SIGINT (RQ and uvicorn: "now"), then SIGKILL
        self.order = order  # stopped in increasing order: the API and workers before what they depend on
        self.popen: subprocess.Popen[bytes] | None = None
        self.lines: deque[str] = deque(maxlen=200)
        self.partial = b""
        self.started_at = 0.0
        self.quick_deaths = 0
        self.restart_at: float | None = None
        self.stopping = False

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        supervisor_pid = os.getpid()
        prctl = _prctl()

        def die_with_supervisor() -> None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != supervisor_pid:  # the supervisor died before prctl ran
                os._exit(1)

        self.popen = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=die_with_supervisor)
        assert self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), False)
        self.started_at = time.monotonic()
        self.restart_at = None
        self.partial = b""

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_all(self) -> None:
        """SIGKILL the child, every descendant (the RQ work-horse, claude) and what is left of its process group.

        Descendants are looked up only while the child is unreaped (its pid cannot be reused then); once it is
        gone, its orphans are ours (subreaper) and `Supervisor.reap_orphans` ends them."""
        if self.popen is None:
            return
        if self.popen.returncode is None:
            for pid in [*descendants(self.pid), self.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # a group id stays reserved while the group has members
        self.popen.wait()


class Supervisor:
    """Owns the children and the terminal: prefixes their output, restarts workers, stops everything."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.children: list[Child] = []
        self.signals = 0
        self.selector = selectors.DefaultSelector()
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    # --- signals and output ---------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.signals += 1

        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def emit(self, name: str, text: str) -> None:
        try:
            self.out.write(f"{name} | {text}\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass  # nobody is reading any more; keep supervising

    def say(self, text: str) -> None:
        self.emit("run", text)

    def pump(self, timeout_s: float) -> None:
        """Forward whatever the children printed, for up to `timeout_s` (a signal wakes it at once)."""
        for key, _ in self.selector.select(timeout_s):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            self._read(key.data)

    def _read(self, child: Child, final: bool = False) -> None:
        stream = child.popen.stdout if child.popen else None
        if stream is None or stream.closed:
            return
        while True:
            try:
                data = os.read(stream.fileno(), 65536)
            except BlockingIOError:
                data = None
            if not data:
                break
            *lines, child.partial = (child.partial + data).split(b"\n")
            for raw in lines:
                self._line(child, raw)
        if data == b"" or final:  # EOF (or the child is gone and a grandchild still holds the pipe)
            if child.partial:
                self._line(child, child.partial)
                child.partial = b""
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(stream)
            stream.close()

    def _line(self, child: Child, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        child.lines.append(text)
        self.emit(child.name, text)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, child: Child) -> Child:
        child.start()
        if child not in self.children:
            self.children.append(child)
        assert child.popen is not None and child.popen.stdout is not None
        self.selector.register(child.popen.stdout, selectors.EVENT_READ, child)
        return child

    def forget(self, child: Child) -> None:
        """A one-shot child that has exited: print the rest of its output and stop watching it."""
        self._read(child, final=True)
        self.children.remove(child)

    def check(self) -> str | None:
        """Restart workers that died and are due; the reason to stop everything when something else died."""
        now = time.monotonic()
        for child in self.children:
            if child.stopping or child.popen is None:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.say(f"restarting {child.name}")
                    if child.before_restart:
                        child.before_restart()
                    self.start(child)
                continue
            code = child.popen.poll()
            if code is None:
                continue
            self._read(child, final=True)
            child.kill_all()
            self.reap_orphans(kill=True)  # a dead worker's horse and claude must not outlive it
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if not child.restart:
                return f"{child.name} exited unexpectedly ({how}); the stack cannot go on without it"
            quick = now - child.started_at < QUICK_DEATH_S
            child.quick_deaths = child.quick_deaths + 1 if quick else 0
            if child.quick_deaths >= MAX_QUICK_DEATHS:
                return f"{child.name} died {MAX_QUICK_DEATHS} times in a row right after starting; giving up"
            delay_s = min(30.0, 2.0 ** child.quick_deaths)
            self.say(f"{child.name} exited unexpectedly ({how}); restarting it in {delay_s:.0f} s")
            child.restart_at = now + delay_s
        self.reap_orphans()
        return None

    def reap_orphans(self, kill: bool = False) -> None:
        """Reap processes re-parented to us (we are a subreaper); with `kill`, end the live ones first."""
        own = {c.pid for c in self.children}
        me = os.getpid()
        for pid, (ppid, state) in process_table().items():
            if ppid != me or pid in own:
                continue
            if kill and state != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0 if kill else os.WNOHANG)

    def wait(self, children: list[Child], timeout_s: float) -> bool:
        """Pump output until all `children` exited; False on timeout or when another Ctrl-C asks to hurry."""
        signals = self.signals
        deadline = time.monotonic() + timeout_s
        while any(c.alive() for c in children):
            left = deadline - time.monotonic()
            if left <= 0 or self.signals > signals:
                return False
            self.pump(min(left, 0.2))
        return True

    def shutdown(self) -> None:
        """Stop every child, in order: SIGTERM (warm), then SIGINT (RQ: kill the horse; uvicorn: drop the
        connections it was waiting for), then SIGKILL."""
        for child in self.children:
            child.stopping = True
        for order in sorted({c.order for c in self.children}):
            group = [c for c in self.children if c.order == order and c.alive()]
            for child in group:
                child.send(signal.SIGTERM)
            if group and not self.wait(group, max(c.stop_after_s for c in group)):
                late = [c for c in group if c.alive()]
                self.say(f"still running: {', '.join(c.name for c in late)}; asking them to stop now")
                for child in late:
                    child.send(signal.SIGINT)
                if not self.wait(late, KILL_WAIT_S):
                    for child in late:
                        if child.alive():
                            self.say(f"killing {child.name}")
                            child.kill_all()
            for child in group:
                child.kill_all()  # whatever the child left behind in its group or below it
                self._read(child, final=True)
        self.reap_orphans(kill=True)
