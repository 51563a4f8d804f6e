"""SIGTERM stops a busy server within seconds: waiting requests get a 503 and the store stays whole."""

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from test_server import free_port

from grpo_agent.store import TrajectoryStore

HERE = Path(__file__).resolve().parent


def ask(url: str, content: str, max_tokens: int) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})


def wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.05)


def health(url: str) -> dict | None:
    try:
        return httpx.get(url + "/health", timeout=2).json()
    except httpx.HTTPError:
        return None


def test_sigterm_stops_a_busy_server_within_seconds_with_the_store_intact(tiny_model_dir, tmp_path):
    port, store = free_port(), tmp_path / "store.sqlite"
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_tiny.py"), str(tiny_model_dir), str(store), str(port),
                             "0.1"], stdout=log, stderr=subprocess.STDOUT)
    pool = ThreadPoolExecutor(2)
    try:
        wait_for(lambda: health(url) is not None or proc.poll() is not None, 60, "the server started")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        first = ask(url, "Why protect tigers?", 2)
        assert first.status_code == 200, first.text  # one group logged

        # One request holds the worker (200 steps of 0.1 s) and another waits behind it.
        slow = pool.submit(ask, url, "How many tigers are left?", 200)
        wait_for(lambda: health(url)["batches"] == 2, 10, "the long request reached the worker")
        queued = pool.submit(ask, url, "Where do most tigers live?", 2)
        time.sleep(0.3)

        # Meanwhile a 20,000-word message is refused without the worker, in well under a second.
        start = time.monotonic()
        r = ask(url, " ".join(["wildlife"] * 20_000), 16)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert time.monotonic() - start < 1.0

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.monotonic() - start < 5.0  # the grace is 1 s
        for answer in (slow.result(timeout=5), queued.result(timeout=5)):
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "server_shutting_down"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        pool.shutdown(wait=False, cancel_futures=True)
        log.close()

    (group,) = TrajectoryStore(store).groups()  # the answered request's group, whole
    assert len(group.completions) == 2 and all(c.token_ids for c in group.completions)
