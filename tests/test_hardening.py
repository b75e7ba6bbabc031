"""Hardening: hostile input and unusual environments, one section per kind.

sidecar.py runs as a process against the vLLM look-alike wherever a user could see the behaviour
(exit codes, stderr, the log, /status, /metrics, the fake's request log); only the text log
formatter is also checked in-process. Configs that need exact bytes (duplicate keys, escapes such as
"\\ud800", line numbers) are written as raw YAML or JSON text.

The IPv6 tests need the loopback ::1: on a machine without it they fail, they do not skip.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from unittest import mock

import prometheus_client as prom
import pytest
import requests
import yaml
from fake_vllm import FakeVLLM
from kubelet import KubeletConfigDir
from sidecar_process import (
    FAST_FLAGS,
    MODELS_GET,
    REPO,
    SIDECAR,
    Sidecar,
    configmap_manifest,
    converge,
    loads,
    lora_config,
    posts,
    run_sidecar,
    vllm_calls,
)

StartSidecar = Callable[..., Sidecar]
MODELS = MODELS_GET
TIMESTAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def config_doc(port: int, models: list[dict], *, key: str = "ensureExist", host: str = "127.0.0.1") -> dict:
    return {"vLLMLoRAConfig": {"host": host, "port": port, key: {"models": models}}}


def write_json(path: Path, document: object) -> Path:
    """JSON text with every non-ASCII character as an escape: a lone surrogate becomes the text \\ud800."""
    path.write_text(json.dumps(document, ensure_ascii=True), encoding="ascii")
    return path


def error_lines(stderr: str, fragment: str) -> list[str]:
    return [line for line in stderr.splitlines() if fragment in line]


# ===================================================================== the API key is masked everywhere


def test_an_api_key_echoed_by_the_server_is_masked_in_status_metrics_log_and_one_shots(
    adapter_paths, kubelet, start_sidecar
):
    key = "sk-hardening-" + secrets.token_hex(12)
    with FakeVLLM(port=0, api_key=key) as fake:
        fake.set_fault("echo_auth")  # every load answers 500 quoting "Authorization: Bearer <key>"
        paths = adapter_paths(["a"])
        kubelet.write(lora_config(fake.port, paths))
        env = {"VLLM_API_KEY": key}
        seen: list[str] = []

        sidecar = start_sidecar(["--config", kubelet.path, "--log-level", "debug"], env)
        last_error = sidecar.wait_for(lambda: sidecar.status()["adapters"]["a"]["last_error"],
                                      what="adapter a failed with the echoed header")
        assert [e for e in loads(fake.requests()) if e["status"] == 500], "the echo fault answered"
        status_text, metrics_text = sidecar.get("/status").text, sidecar.get("/metrics").text
        assert key not in status_text, f"/status shows the API key: {last_error}"
        assert "Authorization" in last_error and "***" in last_error, last_error
        assert key not in metrics_text
        sidecar.stop()
        seen += sidecar.lines()
        assert any("Authorization" in line for line in sidecar.lines()), sidecar.log_text()

        for mode in ("--dry-run", "--once"):
            result = run_sidecar(["--config", kubelet.path, mode, "--health-check-timeout", "5",
                                  "--log-level", "debug"], env)
            assert result.code == 1, result.stderr
            seen += [result.stdout, result.stderr]
    assert [text for text in seen if key in text] == []


# ===================================================================== ids and sources are printable Unicode


NOT_PRINTABLE = {
    "lone-surrogate": "a\ud800b",
    "newline": "a\nb",
    "tab": "a\tb",
    "escape": "\x1b[31mred",
    "delete": "a\x7fb",
    "c1-control": "a\x85b",
    "line-separator": "a\u2028b",
}


NOT_PRINTABLE_CASES = [
    *((kind, "ensureExist.id") for kind in NOT_PRINTABLE),
    *((kind, "ensureExist.source") for kind in ("lone-surrogate", "newline", "escape")),
    ("tab", "ensureNotExist.id"), ("lone-surrogate", "ensureNotExist.source"),
]


@pytest.mark.parametrize("kind, where", NOT_PRINTABLE_CASES)
def test_validate_refuses_a_non_printable_id_or_source(kind, where, tmp_path):
    listing, field = where.split(".")
    model = {"id": "good", "source": "/adapters/good"}
    model[field] = NOT_PRINTABLE[kind] if field == "id" else "/adapters/" + NOT_PRINTABLE[kind]
    path = write_json(tmp_path / "adapters.json", config_doc(8000, [model], key=listing))
    result = run_sidecar(["--config", path, "--validate"])
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    named = error_lines(result.stderr, f"vLLMLoRAConfig.{listing}.models[0].{field}")
    assert named, result.stderr
    assert str(path) in named[0] and "printable" in named[0], named[0]


def test_a_running_sidecar_keeps_the_last_good_config_and_metrics_answer(
    fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a"])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = start_sidecar(["--config", kubelet.path])
    converge(fake, paths, sidecar=sidecar)
    sidecar.wait_metric("lora_sidecar_adapter_loaded", 1, adapter="a")

    since = time.monotonic()
    bad = config_doc(fake.port, [{"id": "a", "source": paths["a"]}, {"id": "x\ud800", "source": paths["a"]}])
    kubelet.write(json.dumps(bad, ensure_ascii=True))
    sidecar.wait_for(lambda: "printable" in (sidecar.status()["config"]["error"] or ""),
                     what="/status config.error says the id is not printable")
    sidecar.wait_for(lambda: "models[1].id" in sidecar.status()["config"]["error"], what="the error names the field")
    m = sidecar.metrics()  # asserts 200
    assert m.value("lora_sidecar_config_valid") == 0
    assert m.value("lora_sidecar_adapter_loaded", adapter="a") == 1
    assert m.label_values("lora_sidecar_adapter_loaded", "adapter") == {"a"}
    assert m.value("lora_sidecar_server_up") == 1
    assert set(sidecar.status()["adapters"]) == {"a"}
    assert not posts(fake.requests(), since)
    assert sidecar.running


# ===================================================================== no forged lines in the text log


def sidecar_under_test() -> ModuleType:
    """The sidecar module the process tests run (SIDECAR_SCRIPT or the repo's), imported in-process."""
    if SIDECAR.resolve() == (REPO / "sidecar.py").resolve():
        import sidecar

        return sidecar
    name = "sidecar_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SIDECAR)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with mock.patch.object(prom.REGISTRY, "register"):  # its metrics would clash with the repo copy's
            spec.loader.exec_module(module)
    return sys.modules[name]


def text_line(msg: str, fields: dict) -> str:
    formatter = sidecar_under_test().LogFormatter(False)
    record = logging.LogRecord("lora-sidecar", logging.WARNING, __file__, 1, msg, None, None)
    record.fields = fields
    return formatter.format(record)


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x1b", "\x00", "\x7f", "\x85"],
                         ids=["LF", "CR", "TAB", "ESC", "NUL", "DEL", "NEL"])
def test_text_log_escapes_control_characters_in_message_and_values(char):
    forged = f"{char}2030-01-01T00:00:00.000Z INFO load done: forged"
    line = text_line(f"load failed: x{forged}", {"error": f"boom{forged}", "server": f"h{char}x"})
    assert len(line.splitlines()) == 1 and not CONTROL.search(line), repr(line)
    assert line.count("forged") == 2, line  # escaped, not dropped
    assert TIMESTAMPED.match(line), line
    if char == "\n":
        assert "\\n" in line, line


def test_a_config_path_with_control_characters_forges_no_log_line(fake, adapter_paths, tmp_path, start_sidecar):
    # No space, "=" or quote in it: the old text log quoted only values holding one of those.
    folder = KubeletConfigDir(tmp_path / "odd\rFORGED\x1b[0m\tx")
    paths = adapter_paths(["a"])
    folder.write(lora_config(fake.port, paths))
    sidecar = start_sidecar(["--config", folder.path, "--reconcile-trigger", "0.3"])
    converge(fake, paths, sidecar=sidecar)
    folder.remove_key()  # the "config rejected" line carries the path too
    sidecar.wait_for(lambda: sidecar.status()["config"]["error"], what="the missing key is reported")
    sidecar.stop()
    lines = sidecar.lines()  # the reader splits at \r too: a raw one shows as a line of its own
    assert lines and all(TIMESTAMPED.match(line) for line in lines), sidecar.log_text()
    assert not [line for line in lines if CONTROL.search(line)], [line for line in lines if CONTROL.search(line)]
    assert any("odd\\rFORGED" in line for line in lines), sidecar.log_text()


# ===================================================================== IPv6


@pytest.fixture(scope="module")
def ipv6_loopback() -> None:
    """Fail (not skip) when the machine has no ::1: these tests then prove nothing."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.fail(f"this machine has no IPv6 loopback ::1 ({e}); the IPv6 tests cannot run here")


def probe(host: str, port: int, path: str = "/healthz") -> int:
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    return requests.get(url, timeout=2).status_code


def flags_without_metrics_address() -> list[str]:
    flags = list(FAST_FLAGS)
    at = flags.index("--metrics-address")
    del flags[at:at + 2]
    return flags


@pytest.mark.parametrize("address", ["::", None], ids=["--metrics-address ::", "default"])
def test_probes_answer_on_ipv6_and_ipv4(address, ipv6_loopback, fake, adapter_paths, kubelet, start_sidecar):
    kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
    flags = flags_without_metrics_address() + (["--metrics-address", address] if address else [])
    sidecar = start_sidecar([*flags, "--config", kubelet.path], fast=False)
    sidecar.wait_for(lambda: probe("::1", sidecar.metrics_port) == 200, what="/healthz at [::1]")
    sidecar.wait_for(lambda: probe("127.0.0.1", sidecar.metrics_port) == 200, what="/healthz at 127.0.0.1")
    assert probe("::1", sidecar.metrics_port, "/metrics") == 200
    assert sidecar.running


def test_an_ipv6_literal_metrics_address_works(ipv6_loopback, fake, adapter_paths, kubelet, start_sidecar):
    kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
    sidecar = start_sidecar(["--config", kubelet.path, "--metrics-address", "::1"])
    sidecar.wait_for(lambda: probe("::1", sidecar.metrics_port) == 200, what="/healthz at [::1]")
    assert probe("::1", sidecar.metrics_port, "/status") == 200
    assert sidecar.running


def test_an_ipv6_vllm_host_bare_or_bracketed(ipv6_loopback, adapter_paths, kubelet, start_sidecar, tmp_path):
    paths = adapter_paths(["a", "b"])
    with FakeVLLM(port=0, host="::1") as fake:
        kubelet.write(lora_config(fake.port, {"a": paths["a"]}, host="::1"))
        sidecar = start_sidecar(["--config", kubelet.path])
        converge(fake, {"a": paths["a"]}, sidecar=sidecar)
        kubelet.write(lora_config(fake.port, paths, host="[::1]"))
        converge(fake, paths, sidecar=sidecar)
        sidecar.wait_for(lambda: sidecar.status()["server"]["url"] == f"http://[::1]:{fake.port}",
                         what="/status server.url is the bracketed address")
        assert sidecar.status()["server"]["up"] is True
    for host in ("::1", "[::1]", "[fd00::1]", "fd00::1"):
        path = tmp_path / "v6.yaml"
        path.write_text(lora_config(8000, {"a": "/x"}, host=host))
        result = run_sidecar(["--config", path, "--validate"])
        assert result.code == 0, (host, result.stderr)


# ===================================================================== SIGHUP


def test_sighup_rereads_the_config_reconciles_at_once_and_keeps_running(
    fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a", "b"])
    kubelet.write(lora_config(fake.port, {"a": paths["a"]}))
    # A 30 s period and a 30 s watch: only the signal can explain anything happening soon after it.
    sidecar = start_sidecar(["--config", kubelet.path, "--reconcile-trigger", "30", "--watch-interval", "30"])
    converge(fake, {"a": paths["a"]}, sidecar=sidecar)
    sidecar.wait_for(lambda: vllm_calls(fake.requests()).count(MODELS) >= 1, what="the first cycle")

    since = time.monotonic()
    sidecar.send_signal(signal.SIGHUP)
    sidecar.wait_for(lambda: MODELS in vllm_calls(fake.requests(), since), what="a GET /v1/models after SIGHUP")
    assert sidecar.running

    kubelet.write(lora_config(fake.port, paths))
    since = time.monotonic()
    sidecar.send_signal(signal.SIGHUP)
    sidecar.wait_for(lambda: loads(fake.requests(), "b", since), what="b loaded after the second SIGHUP")
    converge(fake, paths, sidecar=sidecar)
    assert sidecar.running
    code, _ = sidecar.stop()
    assert code == 0, sidecar.log_text()


# ===================================================================== duplicate keys


DUPLICATE_YAML = """\
vLLMLoRAConfig:
  host: 127.0.0.1
  port: 8000
  ensureExist:
    models:
    - id: a
      source: /adapters/a
  name: dup
  ensureExist:
    models:
    - id: b
      source: /adapters/b
"""


def test_duplicate_yaml_keys_are_refused_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATE_YAML)
    result = run_sidecar(["--config", path, "--validate"])
    assert result.code == 2, (result.stdout, result.stderr)
    named = error_lines(result.stderr, "duplicate key 'ensureExist'")
    assert named, result.stderr
    assert str(path) in named[0] and "lines 4 and 9" in named[0], named[0]


@pytest.mark.parametrize("text, key", [
    ('{"vLLMLoRAConfig": {"host": "127.0.0.1", "port": 8000, "port": 8001}}', "port"),
    ('{"vLLMLoRAConfig": {"ensureExist": {"models": [{"id": "a", "source": "/a", "id": "b"}]}}}', "id"),
    ("vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n      source: /a\n      source: /b\n", "source"),
], ids=["json-top", "json-model", "yaml-model"])
def test_duplicate_keys_anywhere_are_refused(text, key, tmp_path):
    path = tmp_path / "dup.cfg"
    path.write_text(text)
    result = run_sidecar(["--config", path, "--validate"])
    assert result.code == 2, (result.stdout, result.stderr)
    assert error_lines(result.stderr, f"duplicate key '{key}'"), result.stderr


# (A running sidecar given duplicate keys: test_process.py's bad-config test, kind "duplicate-keys".)


# ===================================================================== host holds only a host


@pytest.mark.parametrize("host", ["http://127.0.0.1", "https://vllm", "127.0.0.1:8000", "vllm/x", "vllm:8000/v1",
                                  "[::1]:8000", "http://[::1]"])
def test_validate_refuses_scheme_path_or_port_in_host(host, tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text(lora_config(8000, {"a": "/x"}, host=host))
    result = run_sidecar(["--config", path, "--validate"])
    assert result.code == 2, (host, result.stdout, result.stderr)
    named = error_lines(result.stderr, "vLLMLoRAConfig.host")
    assert named, result.stderr
    assert str(path) in named[0] and "scheme" in named[0] and "port" in named[0], named[0]


# ===================================================================== types hold without the schema

# In-process, in test_sidecar.py's config tests ("without schema validation").


# ===================================================================== two ConfigMap keys


def two_key_manifest(first: tuple[str, str], second: tuple[str, str]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "adapters"},
                           "data": dict([first, second])}, sort_keys=False)


def test_two_config_keys_none_named_like_the_file_are_refused_naming_both(fake, adapter_paths, tmp_path):
    paths = adapter_paths(["a", "z"])
    path = tmp_path / "adapters.yaml"
    path.write_text(two_key_manifest(("one.yaml", lora_config(fake.port, {"a": paths["a"]})),
                                     ("two.yaml", lora_config(fake.port, {"z": paths["z"]}))))
    result = run_sidecar(["--config", path, "--validate"])
    assert result.code == 2, (result.stdout, result.stderr)
    assert [line for line in result.stderr.splitlines()
            if str(path) in line and "one.yaml" in line and "two.yaml" in line], result.stderr
    result = run_sidecar(["--config", path, "--once", "--health-check-timeout", "5"])
    assert result.code == 2, result.stderr
    assert fake.requests() == []


def test_the_key_named_like_the_file_is_used_and_reported(fake, adapter_paths, tmp_path, start_sidecar):
    paths = adapter_paths(["a", "z"])
    path = tmp_path / "zeta.yaml"  # sorts after alpha.yaml: only the name can pick it
    path.write_text(two_key_manifest(("alpha.yaml", lora_config(fake.port, {"a": paths["a"]})),
                                     ("zeta.yaml", lora_config(fake.port, {"z": paths["z"]}))))
    assert run_sidecar(["--config", path, "--validate"]).code == 0
    sidecar = start_sidecar(["--config", path, "--log-format", "json"])
    converge(fake, {"z": paths["z"]}, sidecar=sidecar)
    sidecar.wait_for(lambda: sidecar.status()["config"].get("key") == "data.zeta.yaml", what="/status config.key")
    loaded = [line for line in sidecar.json_lines() if line["msg"] == "config loaded"]
    assert loaded and loaded[0].get("key") == "data.zeta.yaml", loaded
    assert not loads(fake.requests(), "a")


def test_a_single_key_manifest_and_a_plain_file_report_their_key(fake, adapter_paths, tmp_path, kubelet,
                                                                 start_sidecar):
    paths = adapter_paths(["a"])
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(configmap_manifest(lora_config(fake.port, paths), key="adapters.yaml"))
    sidecar = start_sidecar(["--config", manifest])
    converge(fake, paths, sidecar=sidecar)
    assert sidecar.status()["config"]["key"] == "data.adapters.yaml"
    kubelet.write(lora_config(fake.port, paths))
    plain = start_sidecar(["--config", kubelet.path])
    plain.wait_for(lambda: plain.status()["config"]["sha256"], what="the plain file is loaded")
    status = plain.status()["config"]
    assert "key" in status and status["key"] is None, status


# ===================================================================== length limits


@pytest.mark.parametrize("field, limit", [("id", 256), ("source", 4096)])
def test_ids_and_sources_longer_than_their_limit_are_refused(field, limit, tmp_path):
    path = tmp_path / "long.yaml"
    for length in (limit + 1, 200_000):
        model = {"id": "a", "source": "/a"}
        model[field] = ("/" if field == "source" else "") + "x" * (length - (field == "source"))
        path.write_text(lora_config(8000, [model]))
        result = run_sidecar(["--config", path, "--validate"])
        assert result.code == 2, (length, result.stdout)
        named = error_lines(result.stderr, f"vLLMLoRAConfig.ensureExist.models[0].{field}")
        assert named and str(path) in named[0] and str(limit) in named[0], result.stderr[:2000]
    model = {"id": "a", "source": "/a"}
    model[field] = ("/" if field == "source" else "") + "x" * (limit - (field == "source"))
    path.write_text(lora_config(8000, [model]))
    result = run_sidecar(["--config", path, "--validate"])
    assert result.code == 0, f"exactly {limit} characters is allowed: {result.stderr}"


# ===================================================================== the same good bytes clear an error


@pytest.mark.parametrize("bad", ["directory", "larger-than-1MiB", "missing-key"])
def test_the_same_good_bytes_after_a_bad_version_clear_the_error(bad, fake, adapter_paths, kubelet,
                                                                start_sidecar):
    paths = adapter_paths(["a"])
    good = lora_config(fake.port, paths).encode()
    kubelet.write(good)
    sidecar = start_sidecar(["--config", kubelet.path])
    converge(fake, paths, sidecar=sidecar)
    sidecar.wait_metric("lora_sidecar_config_valid", 1)
    good_sha = sidecar.status()["config"]["sha256"]

    since = time.monotonic()
    if bad == "missing-key":  # the key leaves the ConfigMap for a while, then the identical one is published
        kubelet.remove_key()
    elif bad == "directory":
        kubelet.write_directory()
    else:
        kubelet.write(good + b"#" + b"x" * (1024 * 1024) + b"\n")
    sidecar.wait_metric("lora_sidecar_config_valid", 0)
    assert sidecar.status()["config"]["error"]

    kubelet.write(good)  # the same bytes as the last good version
    sidecar.wait_metric("lora_sidecar_config_valid", 1)
    status = sidecar.status()["config"]
    assert status["error"] is None and status["sha256"] == good_sha, status
    assert not posts(fake.requests(), since)
    assert fake.adapters() == paths


# ===================================================================== skipped adapters are logged


def skip_lines(sidecar: Sidecar, adapter: str) -> list[str]:
    return [line for line in sidecar.lines() if "skipped" in line.lower() and adapter in line]


def test_a_skipped_adapter_is_logged_once_and_again_when_it_clears(adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["mine", "qwen-lora"])
    with FakeVLLM(port=0, served_model_name="llama-served", model="/models/llama") as fake:
        wanted = [{"id": "mine", "source": paths["mine"]},
                  {"id": "qwen-lora", "source": paths["qwen-lora"], "base-model": "Qwen/Qwen3-32B"}]
        kubelet.write(lora_config(fake.port, wanted))
        sidecar = start_sidecar(["--config", kubelet.path, "--log-format", "json", "--reconcile-trigger", "0.2"])
        converge(fake, {"mine": paths["mine"]}, sidecar=sidecar)
        line = sidecar.wait_for(lambda: skip_lines(sidecar, "qwen-lora"), what="a log line about the skip")[0]
        assert "Qwen/Qwen3-32B" in line and "llama-served" in line, line
        start = vllm_calls(fake.requests()).count(MODELS)
        sidecar.wait_for(lambda: vllm_calls(fake.requests()).count(MODELS) >= start + 4, what="four more cycles")
        assert len(skip_lines(sidecar, "qwen-lora")) == 1, "once, not once per cycle:\n" + sidecar.log_text()
        assert sidecar.status()["adapters"]["qwen-lora"]["state"] == "skipped"

        before = len(sidecar.lines())
        wanted[1]["base-model"] = "llama-served"  # the config's base model is fixed
        kubelet.write(lora_config(fake.port, wanted))
        converge(fake, paths, sidecar=sidecar)
        # Not the action line ("load done"): a line of its own says the adapter is no longer skipped.
        sidecar.wait_for(lambda: [text for text in sidecar.lines()[before:]
                                  if "qwen-lora" in text and '"action"' not in text],
                         what="a log line saying the skip cleared")
        assert len(skip_lines(sidecar, "qwen-lora")) <= 2, sidecar.log_text()
