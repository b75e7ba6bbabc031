"""Security checks, sidecar.py as a process against the vLLM look-alike.

- The sidecar's own HTTP server answers only GET on its four paths (404 elsewhere, 405 for other
  methods), and slow or stuck clients (half a request, never reading) do not block the probes.
- The config is read with a safe loader: Python tags are refused and never run, in any mode.
- Adapter ids and sources full of shell metacharacters, quotes, newlines and `../` reach vLLM
  verbatim as JSON values, and nothing on the sidecar's side runs or writes anything because of them.
(The API key's absence from every output is checked in test_hardening.py; a running sidecar given a
Python tag is one of test_process.py's bad configs.)
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
import requests
import yaml
from fake_vllm import FakeVLLM, make_adapter
from kubelet import KubeletConfigDir
from sidecar_process import DEADLINE, Sidecar, converge, lora_config, run_sidecar, wait_until

import sidecar as sidecar_module

PATHS = ("/metrics", "/healthz", "/readyz", "/status")
# The status server drops a connection that sends nothing for 5 s (StatusHandler.timeout in sidecar.py). A
# probe queued behind a slow client would wait that long: one answered sooner was not held up by it.
HELD_UP = 5.0


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """A sidecar in sync with one adapter, its HTTP server on 127.0.0.1, shared by the module's tests:
    they only probe it (and check that it still answers afterwards)."""
    root = tmp_path_factory.mktemp("serving")
    paths = {"a": str(make_adapter(root / "adapters" / "a"))}
    with FakeVLLM(port=0) as fake:
        folder = KubeletConfigDir(root / "config")
        folder.write(lora_config(fake.port, paths))
        with Sidecar(["--config", folder.path]) as sidecar:
            converge(fake, paths, sidecar=sidecar)
            sidecar.wait_ready()
            yield sidecar


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> tuple[int | None, bytes]:
    """Send bytes as they are; return the status code and the whole answer (the server closes).
    The status is None for an answer without a status line: the stdlib answers a request it cannot
    parse the HTTP/0.9 way, with a bare error page."""
    with closing(socket.create_connection(("127.0.0.1", port), timeout=timeout)) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # the server may answer and close before taking it all (an oversized header)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    answer = b"".join(chunks)
    return (int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None), answer


@pytest.mark.parametrize("path", [*PATHS, "/metrics?x=1"])
def test_get_on_each_path_answers(serving, path):
    response = serving.get(path)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", PATHS)
def test_other_methods_on_known_paths_are_405(serving, method, path):
    response = serving.get(path, method=method)
    assert response.status_code == 405
    assert response.headers.get("Allow") == "GET"
    assert b"lora_sidecar" not in response.content and b'"adapters"' not in response.content


def test_head_is_refused_without_a_body(serving):
    request = b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, answer = raw_request(serving.metrics_port, request)
    assert status == 405
    assert answer.split(b"\r\n\r\n", 1)[1] == b""


@pytest.mark.parametrize("path", [
    # (Not "//metrics": the stdlib folds leading slashes into one, so it is /metrics, a GET like any other.)
    "/", "/metric", "/metrics/", "/metrics.txt", "/METRICS", "/status/..", "/../status",
    "/%2e%2e/status", "/status%00", "/healthz/../status", "/static/../../etc/passwd", "/readyz;x", "/" + "a" * 4000,
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_other_paths_are_404_whatever_the_method(serving, path, method):
    status, answer = raw_request(serving.metrics_port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                                       f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
    assert status == 404, answer[:200]
    assert b"lora_sidecar" not in answer and b'"adapters"' not in answer


@pytest.mark.parametrize("request_line", [b"TRACE /metrics HTTP/1.1", b"CONNECT /status HTTP/1.1",
                                          b"FOO /healthz HTTP/1.1", b"GARBAGE", b"GET /metrics HTTP/9.9",
                                          b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 70_000])
def test_odd_requests_get_no_content_and_leave_the_server_working(serving, request_line):
    status, answer = raw_request(serving.metrics_port, request_line + b"\r\nHost: x\r\n\r\n")
    assert status is None or status >= 400, answer[:200]
    assert b"lora_sidecar" not in answer and b'"adapters"' not in answer
    assert serving.healthz() == 200


def probe_not_held_up(sidecar: Sidecar, path: str) -> None:
    """The probe answers 200 before any slow client could have been dropped to make way for it."""
    response = requests.get(sidecar.base_url + path, timeout=HELD_UP * 0.8)  # ReadTimeout: held up
    assert response.status_code == 200, path


def test_half_sent_requests_do_not_block_the_probes(serving):
    with ExitStack() as stack:
        for i in range(64):
            s = stack.enter_context(closing(socket.create_connection(("127.0.0.1", serving.metrics_port), 5)))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GE")  # never finished
        for path in PATHS:
            probe_not_held_up(serving, path)


def test_a_client_that_never_reads_does_not_block_the_probes(serving):
    with ExitStack() as stack:
        for _ in range(8):
            s = stack.enter_context(closing(socket.socket()))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(("127.0.0.1", serving.metrics_port))
            s.setblocking(False)
            pipelined = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
            with contextlib.suppress(BlockingIOError):
                s.send(pipelined)  # as much as fits; nothing is ever read back
        time.sleep(0.3)  # let the server fill its send buffers
        for path in PATHS:
            probe_not_held_up(serving, path)


@pytest.mark.slow  # waits out the status server's 5 s handler timeout
def test_a_half_sent_request_is_dropped(serving):
    with closing(socket.create_connection(("127.0.0.1", serving.metrics_port), 5)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(HELD_UP + DEADLINE)  # socket.timeout: the server held the half request
        try:
            leftover = s.recv(1024)  # b"" once the server gives up on us, or a 408 first
        except ConnectionResetError:
            leftover = b""
    assert b"lora_sidecar" not in leftover


# ------------------------------------------------------------------ safe loading


PYTHON_TAGS = [
    "vLLMLoRAConfig: !!python/object/apply:os.system ['touch {marker}']\n",
    "vLLMLoRAConfig:\n  name: !!python/object/apply:subprocess.call [['touch', '{marker}']]\n",
    "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: !!python/object/new:str ['a']\n      source: /x\n",
    "!!python/object:sidecar.DesiredState {{host: x, port: 1, scheme: http}}\n",
    "vLLMLoRAConfig: {{name: !!python/name:os.system ''}}\n",
    "kind: ConfigMap\ndata:\n  configmap.yaml: |\n"
    "    vLLMLoRAConfig: !!python/object/apply:os.system ['touch {marker}']\n",
]


@pytest.mark.parametrize("text", PYTHON_TAGS)
def test_python_tags_are_config_errors_and_never_run(tmp_path, text):
    marker = tmp_path / "ran"
    raw = text.format(marker=marker).encode()
    with pytest.raises(sidecar_module.ConfigError) as caught:
        sidecar_module.parse_config(raw, "cfg.yaml")
    assert all(error.startswith("cfg.yaml") for error in caught.value.errors)
    config = tmp_path / "cfg.yaml"
    config.write_bytes(raw)
    result = run_sidecar(["--config", config, "--validate"])
    assert result.code == 2, result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ ids and sources go out verbatim


# Control and format characters (a newline, a tab, U+202E) and ids over 256 characters are refused
# by the config rules (tests/test_hardening.py); everything printable must reach vLLM verbatim.
NASTY = [
    "$(touch {marker}-subst)", "`touch {marker}-tick`", "a; touch {marker}-semi", "a && touch {marker}-and",
    "a | tee {marker}-pipe", "a\\ntouch {marker}-newline", "quote'single", 'quote"double', "back\\slash",
    "../../../../tmp/{name}-dots", "/etc/passwd", "~root", "*", "?", "[a-z]", "{{a,b}}", "%s%n%x", "${{HOME}}",
    "a b  c", "ünï-cödé-🙂", "évil", "x" * 240, "-rf", "--help", "null", "", "Header: injected",
]


@pytest.fixture
def nasty_world(tmp_path) -> Iterator[tuple[FakeVLLM, KubeletConfigDir, dict[str, str], dict[str, str], Path]]:
    marker = tmp_path / "marker"
    ids = [t.format(marker=marker, name="id") for t in NASTY if t]
    sources = [t.format(marker=marker, name="src") for t in NASTY if t]
    keep = {f"k{i}-{text}": sources[(i + 3) % len(sources)] for i, text in enumerate(ids)}
    drop = {f"d{i}-{text}": "/irrelevant" for i, text in enumerate(ids[:10])}
    fake = FakeVLLM(port=0, accept_any_path=True).start()  # any non-empty path "loads": the point is what is sent
    fake.set_adapters(dict(drop))
    folder = KubeletConfigDir(tmp_path / "config")
    folder.write(lora_config(fake.port, keep, drop))
    try:
        yield fake, folder, keep, drop, marker
    finally:
        fake.stop()


def test_ids_and_sources_reach_vllm_verbatim_as_json_values(nasty_world, tmp_path, start_sidecar):
    fake, folder, keep, drop, _ = nasty_world
    assert yaml.safe_load(folder.path.read_text())["vLLMLoRAConfig"]["ensureExist"]["models"][0]["id"] in keep
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    sidecar = start_sidecar(["--config", folder.path], cwd=workdir)
    wait_until(lambda: fake.adapters() == keep, 15,
               message=lambda: f"server {sorted(fake.adapters())}\nlog:\n{sidecar.log_text()}")
    log = fake.requests()
    loads = [e["body"] for e in log if e["path"] == "/v1/load_lora_adapter"]
    unloads = [e["body"] for e in log if e["path"] == "/v1/unload_lora_adapter"]
    assert sorted(loads, key=repr) == sorted(({"lora_name": k, "lora_path": v} for k, v in keep.items()), key=repr)
    assert sorted(unloads, key=repr) == sorted(({"lora_name": d} for d in drop), key=repr)
    assert not list(tmp_path.glob("marker*")), "a metacharacter ran something"
    assert not list(workdir.iterdir()), "the sidecar wrote into its working directory"
    assert not list(Path("/tmp").glob("*-dots")), "a ../ path was followed"
    assert sidecar.running


def test_the_plan_prints_nasty_ids_without_running_them(nasty_world):
    fake, folder, _, _, marker = nasty_world
    fake.set_adapters({}, replace=True)
    result = run_sidecar(["--config", folder.path, "--dry-run"])
    assert result.code == 1, result.stderr
    assert not list(marker.parent.glob("marker*"))
    assert [e for e in fake.requests() if e["method"] == "POST"] == []

