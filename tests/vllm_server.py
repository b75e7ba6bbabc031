"""Start and control a real (CPU) vLLM OpenAI server for the e2e tests and demos.

Standard library only, so both the project venv (tests) and the vLLM venv can import it.

    from vllm_server import VLLMServer   # tests/ is on the path (pyproject's pythonpath)
    with VLLMServer(model_dir, port=free_port(), api_key="k") as srv:
        ...                     # srv.url, srv.stop(), srv.restart(), srv.freeze(), srv.thaw()

Command line (runs one server until Ctrl-C):

    python tests/vllm_server.py [--port P] [--api-key K] [--model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))
DEFAULT_PYTHON = Path(os.environ.get("VLLM_PYTHON", VENV / "bin" / "python"))
MODELS = Path(os.environ.get("E2E_MODELS", REPO / ".e2e" / "models"))
SERVED_MODEL_NAME = "tiny"

SERVER_ENV = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # without it start-up fails on a memory check
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class VLLMServerError(RuntimeError):
    """The server did not start, or died; the message ends with the log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0, headers: dict | None = None) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


class VLLMServer:
    """One vLLM server process (and its children) in its own process group."""

    def __init__(
        self,
        model_dir: str | os.PathLike = MODELS / "base",
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        served_model_name: str = SERVED_MODEL_NAME,
        max_lora_rank: int = 8,
        max_loras: int = 2,
        log_path: str | os.PathLike | None = None,
        python: str | os.PathLike = DEFAULT_PYTHON,
        extra_args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.model_dir = str(Path(model_dir).resolve())
        self.host = host
        self.port = port or free_port(host)
        self.api_key = api_key
        self.served_model_name = served_model_name
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"vllm-{self.port}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.python = str(python)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.frozen = False
        self.what = "vLLM"  # a label for reports
        self.start_seconds: float | None = None  # last start-to-healthy time
        self._launched_at = 0.0

    # ---- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir,
            "--served-model-name", self.served_model_name,
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras),
            "--dtype", "float32",
            "--max-model-len", "128",
            "--max-num-seqs", "4",
            "--host", self.host,
            "--port", str(self.port),
        ]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    # ---- life cycle ------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> VLLMServer:
        """Start the server and wait until /health answers 200."""
        self.launch()
        return self.wait_started(timeout)

    def launch(self) -> VLLMServer:
        """Start the process and return at once; wait_started() waits for /health 200."""
        if self.running():
            raise VLLMServerError(f"server on port {self.port} is already running")
        if not Path(self.python).exists():
            raise VLLMServerError(
                f"no vLLM interpreter at {self.python}; run e2e/setup_vllm.sh first"
            )
        if not (Path(self.model_dir) / "config.json").exists():
            raise VLLMServerError(
                f"no model in {self.model_dir}; run "
                f"{self.python} e2e/build_model.py first"
            )
        # Not the caller's PYTHONPATH either: `make bench` and `make demo` point it at this repository's
        # harness, which is no business of vLLM's.
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "PYTHONPATH")}
        env.update(SERVER_ENV)
        env.update(self.extra_env)
        self._launched_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n"
                      .encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO),
                start_new_session=True,  # own process group: signals reach the engine too
            )
        self.frozen = False
        return self

    def wait_started(self, timeout: float = 240.0) -> VLLMServer:
        """After launch(): wait for /health 200; on failure stop the process and raise."""
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - self._launched_at
        return self

    def wait_healthy(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise VLLMServerError(
                    f"vLLM exited with code {code} before /health answered 200\n"
                    + self.log_tail()
                )
            if http_status(self.url + "/health", timeout=2.0) == 200:
                return
            if time.monotonic() > deadline:
                raise VLLMServerError(
                    f"vLLM /health not 200 within {timeout:.0f} s\n" + self.log_tail()
                )
            time.sleep(0.25)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
            os.killpg(pgid, signal.SIGCONT)  # a stopped process only sees SIGTERM once resumed
        self.frozen = False
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        # children (the engine core) may outlive the leader for a moment
        while self._group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        end = time.monotonic() + 5
        while self._group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.05)

    def restart(self, timeout: float = 240.0) -> VLLMServer:
        """Stop, then start again on the same port with the same arguments."""
        self.stop()
        # the port is released when the process exits; wait until nothing listens
        end = time.monotonic() + 10
        while http_status(self.url + "/health", timeout=0.5) is not None:
            if time.monotonic() > end:
                break
            time.sleep(0.1)
        return self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP the whole process group: it keeps its port but answers nothing."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT the whole process group."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- diagnostics and small client helpers -----------------------------------
    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log at {self.log_path}: {e})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float = 30.0) -> tuple[int, str]:
        """(status, body text) of a call to the server, with the API key if any."""
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.auth_headers())
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def models(self) -> dict[str, dict]:
        """GET /v1/models as {id: entry}."""
        status, text = self.request("GET", "/v1/models", timeout=10)
        if status != 200:
            raise VLLMServerError(f"GET /v1/models -> {status}: {text}")
        return {m["id"]: m for m in json.loads(text)["data"]}

    def complete(self, model: str, prompt: str = "Once upon a time",
                 max_tokens: int = 8) -> tuple[int, str]:
        """Greedy completion. (200, generated text) or (status, error body)."""
        status, text = self.request("POST", "/v1/completions", {
            "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "seed": 0,
        })
        if status == 200:
            return status, json.loads(text)["choices"][0]["text"]
        return status, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run one vLLM server for manual tests.")
    ap.add_argument("--model", default=str(MODELS / "base"))
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key")
    ap.add_argument("--log", help="log file (default: a temp file)")
    args = ap.parse_args(argv)
    srv = VLLMServer(args.model, port=args.port, api_key=args.api_key, log_path=args.log)
    print(f"starting vLLM on {srv.url} (log {srv.log_path}) ...", flush=True)
    try:
        srv.start()
        print(f"ready after {srv.start_seconds:.1f} s: {srv.url}; Ctrl-C stops it", flush=True)
        while srv.running():
            time.sleep(1)
        print(srv.log_tail(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
