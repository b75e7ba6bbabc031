"""Fixtures for the end-to-end tests against a real (CPU) vLLM server.

- E2E=0 skips the whole e2e suite with a printed notice (outside CI; with CI=true it runs).
- Outside CI a missing vLLM venv, or a server that cannot start, skips with the reason
  and the server log printed. With CI=true both FAIL: CI never skips silently.
- `vllm`: one server for the session (API key, free loopback port); most tests share it
  and use their own adapter names, so they do not see each other's adapters.
- `vllm_factory`: servers of a test's own (restart, freeze), stopped at the end.
- `s3_server`: moto's S3 server (tests/remote_sources.py) for the remote-source test, one per session.

The sidecar side (kubelet-style config folder, the sidecar process) is the process tests' own
harness, tests/kubelet.py and tests/sidecar_process.py (importable through pytest's `pythonpath`).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from remote_sources import MotoS3  # standard library and requests: moto runs as a child process
from vllm_server import (
    DEFAULT_PYTHON,
    MODELS,
    REPO,
    VLLMServer,
    VLLMServerError,
)

E2E_DIR = Path(__file__).resolve().parent
CI = os.environ.get("CI", "").lower() == "true"
E2E_OFF = os.environ.get("E2E", "").strip().lower() in ("0", "false", "no", "off")
SKIP_NOTICE = "E2E=0: real-vLLM end-to-end tests skipped (unset E2E to run them)"


def _in_e2e(item: pytest.Item) -> bool:
    return E2E_DIR in Path(item.path).resolve().parents


def pytest_report_header(config):
    if E2E_OFF and not CI:
        return [SKIP_NOTICE]
    if E2E_OFF and CI:
        return ["E2E=0 ignored: CI=true always runs the real-vLLM tests"]
    return [f"e2e: real vLLM from {DEFAULT_PYTHON}, models in {MODELS}"]


def pytest_collection_modifyitems(config, items):
    if E2E_OFF and not CI:
        marker = pytest.mark.skip(reason=SKIP_NOTICE)
        for item in items:
            if _in_e2e(item):
                item.add_marker(marker)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if E2E_OFF and not CI:
        terminalreporter.write_line(SKIP_NOTICE, yellow=True)
    for reason in dict.fromkeys(_unavailable):
        first = reason.splitlines()[0] if reason else ""
        terminalreporter.write_line(f"e2e tests SKIPPED (outside CI): {first}", yellow=True)
    for line in _timings:
        terminalreporter.write_line(f"e2e: {line}")


_timings: list[str] = []
_unavailable: list[str] = []


def note_timing(line: str) -> None:
    """A line printed in the terminal summary (server start times and the like)."""
    _timings.append(line)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(getattr(node, f"rep_{w}", None) is not None and getattr(node, f"rep_{w}").failed
               for w in ("setup", "call"))


def unavailable(reason: str) -> None:
    """Fail in CI, skip (with the reason printed) elsewhere."""
    print(reason)
    _unavailable.append(reason)
    if CI:
        pytest.fail(f"CI=true and the e2e environment is not usable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def models() -> Path:
    """The tiny model and adapters (built by e2e/build_model.py, cached by a stamp)."""
    if not Path(DEFAULT_PYTHON).exists():
        unavailable(f"no vLLM venv at {DEFAULT_PYTHON.parent.parent}: run `make e2e-env` "
                    "(or bash e2e/setup_vllm.sh)")
    proc = subprocess.run([str(DEFAULT_PYTHON), str(E2E_DIR / "build_model.py")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        unavailable(f"e2e/build_model.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return MODELS


def _wait(server: VLLMServer, what: str) -> VLLMServer:
    try:
        server.wait_started()
    except VLLMServerError as e:
        unavailable(f"{what} did not start: {e}")
    note_timing(f"{what} on port {server.port} started in {server.start_seconds:.1f} s")
    return server


def _launch(server: VLLMServer, what: str) -> VLLMServer:
    try:
        return server.launch()
    except VLLMServerError as e:
        unavailable(f"{what} did not start: {e}")


class VLLMFactory:
    """Servers of a test's own. factory(**VLLMServer kwargs) starts one and waits for it;
    factory.launch(...) returns at once (wait with factory.wait(server))."""

    def __init__(self, models: Path, tmp: Path):
        self.models = models
        self.tmp = tmp
        self.servers: list[VLLMServer] = []

    def launch(self, what: str = "own vLLM", **kwargs) -> VLLMServer:
        kwargs.setdefault("log_path", self.tmp / f"vllm-{len(self.servers)}.log")
        server = VLLMServer(self.models / "base", **kwargs)
        self.servers.append(server)
        server.what = what
        return _launch(server, what)

    def wait(self, server: VLLMServer) -> VLLMServer:
        return _wait(server, server.what)

    def __call__(self, what: str = "own vLLM", **kwargs) -> VLLMServer:
        return self.wait(self.launch(what, **kwargs))

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="session")
def vllm_factory(models, tmp_path_factory):
    """Start servers of a test's own; all stopped at the end of the session."""
    factory = VLLMFactory(models, tmp_path_factory.mktemp("vllm-own"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def _disposable_launched(vllm_factory) -> VLLMServer:
    return vllm_factory.launch("disposable vLLM (restart/freeze)")


@pytest.fixture(scope="session")
def vllm(models, tmp_path_factory, request):
    """The shared server: --api-key, a free port on 127.0.0.1.

    When the session also needs the disposable server, it is launched first so that both
    boot in parallel (start-up is mostly single-threaded imports: ~65 s for both instead
    of ~50 s each, one after the other).
    """
    if any("own_vllm" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("_disposable_launched")
    log = tmp_path_factory.mktemp("vllm-shared") / "vllm.log"
    server = VLLMServer(models / "base", api_key="e2e-" + secrets.token_hex(8), log_path=log)
    _wait(_launch(server, "shared vLLM"), "shared vLLM")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _vllm_log_on_failure(request):
    """Print the tail of every server log this test used when it failed."""
    yield
    if not failed(request):
        return
    for name in ("vllm", "own_vllm"):
        if name in request.fixturenames:
            try:
                server = request.getfixturevalue(name)
            except BaseException:  # its set-up failed: that report already has the log
                continue
            print(server.log_tail(80))


@pytest.fixture(scope="session")
def _disposable_vllm(_disposable_launched, vllm_factory) -> VLLMServer:
    return vllm_factory.wait(_disposable_launched)


@pytest.fixture
def own_vllm(_disposable_vllm):
    """A server no other test uses at the same time: tests may stop, restart or freeze it.

    One process serves every such test in turn (a start costs 40-60 s); each test gets it
    healthy, and anything a test left frozen or stopped is repaired here.
    """
    server = _disposable_vllm
    if server.frozen:
        server.thaw()
    if not server.running():
        server.start()
    else:
        server.wait_healthy(60)
    yield server
    if server.frozen:
        server.thaw()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server (tests/remote_sources.py), one child process for the session: the
    remote-source test uploads a real adapter folder to it and gives the sidecar `s3_server.env`."""
    try:
        server = MotoS3().start()
    except (RuntimeError, OSError) as e:
        unavailable(f"moto's S3 server did not start ({e}): pip install -r requirements-dev.txt")
    yield server
    server.stop()
