"""Run sidecar.py as a real process and observe it the way a user would.

The harness of the process, fault, soak, e2e and benchmark code (importable through pytest's
`pythonpath`, and through PYTHONPATH=.:tests for the scripts the Makefile runs):

    from sidecar_process import Sidecar, free_port, wait_until, lora_config

    sidecar = Sidecar(["--config", path, "--reconcile-trigger", "0.5"]).start()
    sidecar.wait_ready()                       # /readyz answers 200
    sidecar.metrics().value("lora_sidecar_in_sync")
    sidecar.status()["adapters"]["a"]["state"]
    code, seconds = sidecar.stop()             # SIGTERM, then the exit code and how long it took

    result = run_sidecar(["--config", path, "--once"])   # result.code, result.stdout, result.stderr

    converge(fake, {"a": path})                # until the fake vLLM holds exactly these adapters
    wait_cycles(fake, 2)                       # until two more reconcile cycles (GET /v1/models)

Every HTTP read uses a short timeout; every wait has a deadline and fails with what it saw. The
deadlines are generous (DEADLINE): they bound how long a broken sidecar is waited for, they do not
measure speed (`make bench` does), so a busy 2-core CI machine does not make them fail.
The child gets a clean environment: no LORA_SIDECAR_*, VLLM_API_KEY or DYNAMIC_LORA_ROLLOUT_CONFIG
leaks in from the caller unless passed in `env`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from vllm_server import free_port  # standard library only; re-exported for the tests

REPO = Path(__file__).resolve().parent.parent

# SIDECAR_SCRIPT runs these tests against another copy (validation.yaml must sit next to it).
SIDECAR = Path(os.environ.get("SIDECAR_SCRIPT") or REPO / "sidecar.py")
PYTHON = sys.executable

# Flags that keep a test fast; a test passes its own to override any of them (later flags win in argparse).
FAST_FLAGS = (
    "--reconcile-trigger", "0.5",
    "--watch-interval", "0.05",
    "--health-check-interval", "0.2",
    "--request-timeout", "2",
    "--metrics-address", "127.0.0.1",
)

# How long a wait gives something that takes a few reconcile cycles on a quiet machine. Only a broken
# sidecar ever waits it out; a slow machine uses some of it.
DEADLINE = 10.0

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = DEADLINE, interval: float = 0.02,
    message: str | Callable[[], str] = "",
) -> T:
    """Poll `predicate` until it returns something truthy; return that. On timeout fail with `message`.

    Exceptions from the predicate (a port not open yet, a key not there yet) count as "not yet";
    the last one is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # "not yet"
            last_error = e
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            extra = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"not true within {timeout} s: {text or predicate}{extra}")
        time.sleep(interval)


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without the sidecar's own variables, plus `env`."""
    out = {
        k: v for k, v in os.environ.items()
        if not k.startswith("LORA_SIDECAR_") and k not in ("VLLM_API_KEY", "DYNAMIC_LORA_ROLLOUT_CONFIG")
    }
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


# ------------------------------------------------------------------ config files


def lora_config(
    port: int,
    ensure_exist: Mapping[str, str] | Iterable[Mapping[str, Any]] = (),
    ensure_not_exist: Mapping[str, str] | Iterable[Mapping[str, Any]] = (),
    *,
    host: str = "127.0.0.1",
    name: str = "test",
    **extra: Any,
) -> str:
    """The YAML text of a vLLMLoRAConfig. Lists are {id: source} or a list of model dicts."""

    def models(entries: Mapping[str, str] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if isinstance(entries, Mapping):
            return [{"id": k, "source": str(v)} for k, v in entries.items()]
        return [dict(e) for e in entries]

    body: dict[str, Any] = {"host": host, "port": port, "name": name, **extra}
    if ensure_exist:
        body["ensureExist"] = {"models": models(ensure_exist)}
    if ensure_not_exist:
        body["ensureNotExist"] = {"models": models(ensure_not_exist)}
    return yaml.safe_dump({"vLLMLoRAConfig": body}, sort_keys=False)


def configmap_manifest(inner_yaml: str, name: str = "adapters", key: str = "configmap.yaml") -> str:
    """A whole `kind: ConfigMap` manifest holding `inner_yaml` under data.<key>."""
    return yaml.safe_dump(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {key: inner_yaml}},
        sort_keys=False,
    )


# ------------------------------------------------------------------ /metrics


class Metrics:
    """Parsed /metrics: samples by full sample name (with _total, _bucket ... suffixes)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called `name` whose labels include `labels`."""
        return [
            (sl, v) for n, sl, v in self.samples
            if n == name and all(sl.get(k) == want for k, want in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample matching; None if there is none. Fails if several match."""
        found = self.find(name, **labels)
        if not found:
            return None
        assert len(found) == 1, f"{name}{labels} matches {len(found)} samples: {found}"
        return found[0][1]

    def total(self, name: str, **labels: str) -> float:
        """The sum over matching samples (0 when none): for counters split by labels."""
        return sum(v for _, v in self.find(name, **labels))

    def label_values(self, name: str, label: str) -> set[str]:
        return {sl[label] for sl, _ in self.find(name) if label in sl}

    def state_of(self, adapter: str) -> str | None:
        """The one state of lora_sidecar_adapter_state that is 1 (asserts one-hot)."""
        found = self.find("lora_sidecar_adapter_state", adapter=adapter)
        if not found:
            return None
        on = [sl["state"] for sl, v in found if v == 1]
        off = [sl["state"] for sl, v in found if v == 0]
        assert len(on) == 1 and len(on) + len(off) == len(found), f"state of {adapter} is not one-hot: {found}"
        return on[0]


# ------------------------------------------------------------------ the process


@dataclass
class LogLine:
    t: float  # time.monotonic() when the line was read
    text: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.text)


class Sidecar:
    """sidecar.py as a child process; stderr (the log) and stdout are collected line by line in threads."""

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        env: Mapping[str, str] | None = None,
        *,
        metrics_port: int | None = None,
        fast: bool = True,
        cwd: str | os.PathLike[str] | None = None,
        script: str | os.PathLike[str] | None = None,
        as_module: bool = False,
    ) -> None:
        """`script`: the sidecar.py to run, SIDECAR (SIDECAR_SCRIPT or the repo's) unless given.
        `as_module`: run it the way the image does, `python -m sidecar` from the script's folder."""
        self.metrics_port = free_port() if metrics_port is None else metrics_port
        flags = [*(FAST_FLAGS if fast else ()), "--metrics-port", str(self.metrics_port)]
        script = Path(script or SIDECAR)
        program = ["-m", script.stem] if as_module else [str(script)]
        self.argv = [PYTHON, *program, *flags, *map(str, args)]
        self.env = clean_env(env)
        self.cwd = script.parent if as_module else cwd
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[LogLine] = []
        self.out: list[LogLine] = []
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self.http = requests.Session()

    # -- lifecycle

    def start(self) -> Sidecar:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
        )
        for stream, sink in ((self.proc.stderr, self.log), (self.proc.stdout, self.out)):
            reader = threading.Thread(target=self._collect, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _collect(self, stream: Any, sink: list[LogLine]) -> None:
        for line in stream:
            with self._lock:
                sink.append(LogLine(time.monotonic(), line.rstrip("\n")))

    def __enter__(self) -> Sidecar:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int | None, float]:
        """Send `signum`; return (exit code, seconds until exit). Kills it if it outlives `timeout`."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            code = None
        seconds = time.monotonic() - started
        self._join_readers()
        return code, seconds

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._join_readers()
        return code

    def close(self) -> None:
        """Make sure the child is gone (used by fixtures at teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._join_readers()
        self.http.close()

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(2)

    # -- the log

    def lines(self) -> list[str]:
        with self._lock:
            return [line.text for line in self.log]

    def stdout_lines(self) -> list[str]:
        with self._lock:
            return [line.text for line in self.out]

    def json_lines(self) -> list[dict[str, Any]]:
        """Every log line parsed as JSON (the sidecar must run with --log-format json)."""
        return [json.loads(text) for text in self.lines()]

    def log_matching(self, predicate: Callable[[str], bool] | str) -> list[str]:
        test = (lambda text: predicate in text) if isinstance(predicate, str) else predicate
        return [text for text in self.lines() if test(text)]

    def wait_for_log(self, predicate: Callable[[str], bool] | str, timeout: float = DEADLINE) -> str:
        found = wait_until(lambda: self.log_matching(predicate), timeout,
                           message=lambda: f"log line {predicate!r}; log:\n" + self.log_text())
        return found[0]

    def log_text(self) -> str:
        return "\n".join(self.lines())

    # -- the HTTP endpoints

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def get(self, path: str, method: str = "GET", timeout: float = 2.0) -> requests.Response:
        return self.http.request(method, self.base_url + path, timeout=timeout)

    def metrics(self) -> Metrics:
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        return Metrics(response.text)

    def status(self) -> dict[str, Any]:
        response = self.get("/status")
        assert response.status_code == 200, response.text
        return response.json()

    def healthz(self) -> int:
        return self.get("/healthz").status_code

    def readyz(self) -> int:
        return self.get("/readyz").status_code

    def wait_serving(self, timeout: float = DEADLINE) -> None:
        """Until the sidecar's HTTP server answers (any status)."""
        wait_until(lambda: self.healthz() in (200, 503), timeout, message=self.diagnose)

    def wait_ready(self, timeout: float = DEADLINE) -> None:
        wait_until(lambda: self.readyz() == 200, timeout, message=self.diagnose)

    def wait_metric(self, name: str, expected: float, timeout: float = DEADLINE, **labels: str) -> None:
        wait_until(lambda: self.metrics().value(name, **labels) == expected, timeout,
                   message=lambda: f"{name}{labels} == {expected}\n" + self.diagnose())

    def wait_for(self, predicate: Callable[[], T], timeout: float = DEADLINE, what: str = "",
                 interval: float = 0.02) -> T:
        """wait_until(predicate), failing with `what`, whether the sidecar still runs, and its log."""
        return wait_until(predicate, timeout, interval, message=lambda: f"{what or predicate}\n{self.diagnose()}")

    def diagnose(self) -> str:
        """Whether the sidecar runs (or its exit code), and its whole log: for failure messages."""
        alive = "running" if self.running else f"exited with {self.proc.returncode if self.proc else None}"
        return f"sidecar {alive}; log:\n{self.log_text()}"


@dataclass
class Result:
    code: int | None
    stdout: str
    stderr: str
    seconds: float


def run_sidecar(
    args: Sequence[str | os.PathLike[str]], env: Mapping[str, str] | None = None, timeout: float = 30.0,
    *, fast: bool = True,
) -> Result:
    """Run sidecar.py to completion (--once, --dry-run, --validate, --version) with the metrics server off."""
    flags = [*(FAST_FLAGS if fast else ()), "--metrics-port", "0"]
    started = time.monotonic()
    proc = subprocess.run(
        [PYTHON, str(SIDECAR), *flags, *map(str, args)], env=clean_env(env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


# ------------------------------------------------------------------ the fake's request log


def vllm_calls(log: Iterable[Mapping[str, Any]], since: float = 0.0) -> list[tuple[str, str]]:
    """(method, path) of every request in a FakeVLLM request log that arrived at or after `since`."""
    return [(e["method"], e["path"]) for e in log if e["t"] >= since]


def loads(log: Iterable[Mapping[str, Any]], name: str | None = None, since: float = 0.0) -> list[Mapping[str, Any]]:
    return [
        e for e in log
        if e["path"] == "/v1/load_lora_adapter" and e["t"] >= since
        and (name is None or (isinstance(e["body"], dict) and e["body"].get("lora_name") == name))
    ]


def unloads(log: Iterable[Mapping[str, Any]], name: str | None = None, since: float = 0.0) -> list[Mapping[str, Any]]:
    return [
        e for e in log
        if e["path"] == "/v1/unload_lora_adapter" and e["t"] >= since
        and (name is None or (isinstance(e["body"], dict) and e["body"].get("lora_name") == name))
    ]


def posts(log: Iterable[Mapping[str, Any]], since: float = 0.0) -> list[Mapping[str, Any]]:
    return [e for e in log if e["method"] == "POST" and e["t"] >= since]


MODELS_GET = ("GET", "/v1/models")


def converge(fake: Any, expected: Mapping[str, str], timeout: float = DEADLINE, sidecar: Sidecar | None = None) -> None:
    """Until the fake vLLM (anything with .adapters()) holds exactly `expected` ({name: path})."""
    wanted = dict(expected)
    wait_until(lambda: fake.adapters() == wanted, timeout,
               message=lambda: f"server adapters {fake.adapters()} == {wanted}"
                               + (f"\n{sidecar.diagnose()}" if sidecar else ""))


def models_calls(fake: Any, since: float = 0.0) -> int:
    """How many GET /v1/models (one per reconcile cycle) the fake has received since `since`."""
    return vllm_calls(fake.requests(), since).count(MODELS_GET)


def wait_cycles(fake: Any, count: int, timeout: float = DEADLINE) -> None:
    """Until `count` more reconcile cycles (GET /v1/models) have reached the fake."""
    start = models_calls(fake)
    wait_until(lambda: models_calls(fake) >= start + count, timeout, message=f"{count} more GET /v1/models")


# ------------------------------------------------------------------ availability, polled from outside


Poll = tuple[float, float, int | None]  # (sent, answered, HTTP status or None for no answer)


class Poller(threading.Thread):
    """Calls `probe` (returns an HTTP status) every `interval` seconds until stop(); keeps every Poll.
    An OSError from the probe (refused, reset, timed out) is a poll without an answer."""

    def __init__(self, probe: Callable[[], int | None], interval: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.polls: list[Poll] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            sent = time.monotonic()
            try:
                status = self.probe()
            except OSError:
                status = None
            self.polls.append((sent, time.monotonic(), status))
            self._halt.wait(self.interval)

    def stop(self) -> list[Poll]:
        self._halt.set()
        self.join(15)
        return self.polls


def outages(polls: Iterable[Poll]) -> list[float]:
    """Seconds of each run of non-200 answers, from the last 200 answer before it to the first 200 answer
    after it (an upper bound on the outage, within one poll's time); inf if no 200 came after it."""
    windows: list[float] = []
    last_ok: float | None = None
    outage = False
    for sent, answered, status in polls:
        if status == 200:
            if outage:
                windows.append(answered - (last_ok if last_ok is not None else sent))
            last_ok, outage = answered, False
        else:
            outage = True
    if outage:
        windows.append(float("inf"))
    return windows
