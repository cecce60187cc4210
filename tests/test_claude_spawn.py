"""claude dies with the work-horse that started it, whichever way worker/claude.py spawns it.

The work-horse here is a small Python process that spawns `sleep` exactly as ClaudeRunner spawns claude
(`spawn_options`, its own session) and is then SIGKILLed, as the OOM killer would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import wait_until
from worker.claude import spawn_options

HORSE = """
import subprocess, sys, time
from worker.claude import spawn_options
argv, options = spawn_options([sys.argv[1], "600"], sys.argv[2])
child = subprocess.Popen(argv, start_new_session=True, **options)
print(child.pid, argv[0], sorted(options), flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # dead; a zombie only waits for whoever adopted it to reap it


@pytest.mark.parametrize("spawn", ["setpriv", "preexec_fn"])
def test_claude_is_killed_when_the_work_horse_is_sigkilled(spawn: str, tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep and shutil.which("setpriv"), "needs coreutils' sleep and util-linux's setpriv"
    # Without setpriv on the PATH the runner falls back to prctl(PR_SET_PDEATHSIG) in a preexec_fn.
    path = os.environ["PATH"] if spawn == "setpriv" else str(tmp_path)
    horse = subprocess.Popen([sys.executable, "-c", HORSE, sleep, path], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent)
    try:
        assert horse.stdout is not None
        pid_text, program, options = horse.stdout.readline().split(" ", 2)
        child = int(pid_text)
        assert Path(program).name == ("setpriv" if spawn == "setpriv" else "sleep")
        assert ("preexec_fn" in options) == (spawn == "preexec_fn")
        wait_until(lambda: Path(f"/proc/{child}/exe").resolve() == Path(sleep).resolve(), 5, what="sleep to run")
        assert not gone(child)
    finally:
        horse.send_signal(signal.SIGKILL)
        horse.wait()
        if horse.stdout is not None:
            horse.stdout.close()
    wait_until(lambda: gone(child), 5, what=f"the child {child} to die with its parent")


def test_spawn_goes_through_setpriv_when_it_is_on_the_path() -> None:
    argv, options = spawn_options(["/usr/bin/claude", "-p"], os.environ["PATH"])
    assert argv[1:] == ["--pdeathsig", "KILL", "--", "/usr/bin/claude", "-p"] and options == {}
