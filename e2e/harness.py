"""Helpers for driving sidecar.py as a process: a kubelet-style config folder, the sidecar
process with its log and status endpoints, and a poll-with-deadline helper.

Standard library plus PyYAML (a runtime dependency of the sidecar).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from e2e.vllm_server import REPO, free_port

SIDECAR = REPO / "sidecar.py"


# ---- waiting ---------------------------------------------------------------------------
def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
    diagnostics: Callable[[], str] | None = None,
) -> Any:
    """Poll `predicate` until it returns a truthy value (returned), or fail after `timeout`.

    Exceptions from the predicate count as "not yet"; the last one is shown on failure.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:
            last = e
        if time.monotonic() >= deadline:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}{extra}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


# ---- the config, updated the kubelet's way ---------------------------------------------
class KubeletConfig:
    """A folder laid out and updated like a mounted ConfigMap (see configmap-facts.md).

    root/..2026_11_28_01_02_03.123456789/configmap.yaml   the real file of one version
    root/..data -> ..2026_...                             swapped atomically (symlink + rename)
    root/configmap.yaml -> ..data/configmap.yaml          the key symlink the sidecar reads
    """

    def __init__(self, root: Path, key: str = "configmap.yaml"):
        self.root = Path(root)
        self.key = key
        self.root.mkdir(parents=True, exist_ok=True)
        self.versions = 0

    @property
    def path(self) -> Path:
        return self.root / self.key

    def write(self, content: str | dict) -> None:
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        data = text.encode()
        # 1. byte-identical content: the kubelet does nothing
        if self.path.exists() and self.path.read_bytes() == data:
            return
        # 2. a new timestamped folder with the new files
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S")
        self.versions += 1
        new = self.root / f"..{stamp}.{time.monotonic_ns() % 10**9:09d}{self.versions}"
        new.mkdir()
        (new / self.key).write_bytes(data)
        old = self.root / os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        # 3. ..data_tmp -> new folder, renamed over ..data: the atomic switch
        tmp = self.root / "..data_tmp"
        os.symlink(new.name, tmp)
        os.rename(tmp, self.root / "..data")
        # 4. the per-key symlink
        if not self.path.is_symlink():
            os.symlink(f"..data/{self.key}", self.path)
        # 5. the old folder goes last
        if old is not None and old != new:
            shutil.rmtree(old, ignore_errors=True)


def lora_config(
    server_port: int,
    exist: Iterable[tuple[str, str] | dict] = (),
    not_exist: Iterable[tuple[str, str] | dict] = (),
    default_base: str | None = "tiny",
    host: str = "127.0.0.1",
    name: str = "e2e",
) -> dict:
    """The inner vLLMLoRAConfig document. Models are (id, source) pairs or full dicts."""

    def model(m):
        return dict(m) if isinstance(m, dict) else {"id": m[0], "source": str(m[1])}

    body: dict[str, Any] = {"host": host, "port": server_port, "name": name}
    if default_base is not None:
        body["defaultBaseModel"] = default_base
    body["ensureExist"] = {"models": [model(m) for m in exist]}
    body["ensureNotExist"] = {"models": [model(m) for m in not_exist]}
    return {"vLLMLoRAConfig": body}


# ---- Prometheus text ---------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(_LABEL.findall(m.group(3) or ""))
        with contextlib.suppress(ValueError):
            out[(m.group(1), labels)] = float(m.group(4))
    return out


def metric_sum(metrics: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


# ---- the sidecar as a process ------------------------------------------------------------
def sidecar_env(api_key: str | None = None, **extra: str) -> dict[str, str]:
    """os.environ without anything that configures the sidecar, plus what the test wants."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("LORA_SIDECAR_") and k not in ("DYNAMIC_LORA_ROLLOUT_CONFIG", "VLLM_API_KEY")
    }
    env["PYTHONUNBUFFERED"] = "1"
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env.update(extra)
    return env


def run_sidecar(args: list[str], api_key: str | None = None, timeout: float = 60,
                **env: str) -> subprocess.CompletedProcess:
    """Run a one-shot sidecar (--once / --dry-run / --validate) to completion."""
    return subprocess.run(
        [sys.executable, str(SIDECAR), *args],
        capture_output=True, text=True, timeout=timeout, env=sidecar_env(api_key, **env), cwd=REPO,
    )


class Sidecar:
    """`python sidecar.py` running in the background, its stderr in a log file."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        *,
        period: float = 1.0,
        api_key: str | None = None,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ):
        self.config = Path(config)
        self.period = period
        self.metrics_port = free_port()
        self.log_path = Path(workdir) / f"sidecar-{self.metrics_port}.log"
        self.args = [
            "--config", str(self.config),
            "--reconcile-trigger", str(period),
            "--health-check-interval", "0.5",
            "--metrics-port", str(self.metrics_port),
            "--metrics-address", "127.0.0.1",
            *args,
        ]
        self.env = sidecar_env(api_key, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self) -> Sidecar:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SIDECAR), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=REPO, start_new_session=True,
            )
        wait_for(lambda: self.get("/healthz")[0] == 200 or not self.alive(), 15,
                 "the sidecar's /healthz", diagnostics=self.log_tail)
        assert self.alive(), f"sidecar exited with {self.proc.returncode}\n{self.log_tail()}"
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    # -- what it reports
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- last {lines} lines of sidecar log {self.log_path} ---\n{text}"

    def get(self, path: str) -> tuple[int | None, str]:
        try:
            return http_get(self.url + path, timeout=3)
        except OSError as e:
            return None, str(e)

    def status(self) -> dict:
        code, body = self.get("/status")
        assert code == 200, f"/status -> {code}: {body}"
        return json.loads(body)

    def metrics(self) -> dict:
        code, body = self.get("/metrics")
        assert code == 200, f"/metrics -> {code}: {body}"
        return parse_metrics(body)

    def adapter_status(self, adapter_id: str) -> dict:
        return self.status().get("adapters", {}).get(adapter_id, {})
