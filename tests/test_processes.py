"""The child processes grpo-agent starts (a vLLM server, torchrun) never outlive it: tied to this process they
get SIGTERM when it dies, even killed, and stop_session ends a whole session and waits for all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from grpo_agent.hub import stop_session, tied_to_this_process

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the tie is Linux's PR_SET_PDEATHSIG")


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


PARENT = """
import subprocess, sys, time
from grpo_agent.hub import tied_to_this_process
child = subprocess.Popen(tied_to_this_process([sys.executable, "-c", "import time; time.sleep(60)"]))
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_tied_child_is_stopped_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)  # the launcher has made the tie and exec'd the child
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)  # no clean-up code runs in the parent
        parent.wait(timeout=10)
        assert wait_gone(child), "the child outlived its killed parent"
    finally:
        parent.kill()
        parent.wait()
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_tied_command_runs_as_given():
    out = subprocess.run(tied_to_this_process([sys.executable, "-c", "import os, sys; print(sys.argv[1:], os.getcwd())",
                                               "a b", "c"]), capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "['a b', 'c'] /"


def test_stop_session_ends_every_process_of_the_session_and_waits_for_them():
    # the grandchild ignores SIGTERM, as a busy engine process may: it is killed after the grace period
    script = "trap '' TERM; sleep 60 & echo $!; wait"
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(proc.stdout.readline())
    started = time.monotonic()
    stop_session(proc, grace=2.0)
    assert proc.returncode is not None and not alive(grandchild)
    assert time.monotonic() - started < 10
