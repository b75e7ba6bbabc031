"""Process tests: sidecar.py as a real process against the vLLM look-alike, config in a kubelet-style folder.

What a user would check, from the outside: the fake's request log (the server-side truth), the
sidecar's exit codes, its log lines, and its /metrics, /healthz, /readyz and /status. Every wait is on
a condition, with a generous deadline that measures nothing (speed is `make bench`'s business); the
only plain sleeps are where a test must show that something does NOT happen over a window.

The core (following the config) first, then operations (metrics, status, probes, logs).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_vllm import FakeVLLM
from sidecar_process import (
    MODELS_GET,
    Sidecar,
    converge,
    free_port,
    loads,
    lora_config,
    posts,
    run_sidecar,
    unloads,
    vllm_calls,
    wait_cycles,
    wait_until,
)

StartSidecar = Callable[..., Sidecar]

MODELS = MODELS_GET
HEALTH = ("GET", "/health")
VERSION = ("GET", "/version")
LOAD = ("POST", "/v1/load_lora_adapter")


def run(start_sidecar: StartSidecar, config: Path, *flags: object, env: dict[str, str] | None = None) -> Sidecar:
    """A sidecar with JSON logs (so tests can count lines exactly) on `config`."""
    return start_sidecar(["--config", config, "--log-format", "json", *flags], env)


def errors_in_log(sidecar: Sidecar, fragment: str) -> list[dict]:
    """JSON log lines at warning or error level whose message or error mentions `fragment`."""
    return [
        line for line in sidecar.json_lines()
        if line["level"] in ("warning", "error") and fragment in f"{line['msg']} {line.get('error', '')}"
    ]


@pytest.fixture
def keyed_fake() -> Iterator[tuple[FakeVLLM, str]]:
    """A fake that requires an API key, and the key."""
    key = "sk-test-" + secrets.token_hex(12)
    server = FakeVLLM(port=0, api_key=key).start()
    try:
        yield server, key
    finally:
        server.stop()


# ===================================================================== following the config


def test_converges_from_start_with_one_load_each(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b", "c"])
    kubelet.write(lora_config(fake.port, paths))
    run(start_sidecar, kubelet.path)

    converge(fake, paths)
    wait_cycles(fake, 2)  # later cycles must find nothing to do
    log = fake.requests()
    # Up to four loads are in flight at once, so they may arrive in any order: one each, exactly.
    bodies = sorted((e["body"] for e in loads(log)), key=lambda b: b["lora_name"])
    assert bodies == sorted(({"lora_name": k, "lora_path": v} for k, v in paths.items()), key=lambda b: b["lora_name"])
    assert all(e["status"] == 200 for e in log)
    assert not unloads(log)
    assert set(vllm_calls(log)) <= {HEALTH, VERSION, MODELS, LOAD}


def test_kubelet_config_swaps_are_acted_on_without_waiting_for_the_period(fake, adapter_paths, kubelet,
                                                                          start_sidecar):
    paths = adapter_paths(["a", "b", "c"])
    moved = adapter_paths(["b2"])["b2"]
    kubelet.write(lora_config(fake.port, {"a": paths["a"]}))
    # A 30 s period: only noticing the swap itself can explain an action before it is up (each wait's
    # deadline is a third of it). How fast a swap is noticed is the bench's reaction row.
    run(start_sidecar, kubelet.path, "--reconcile-trigger", "30")
    converge(fake, {"a": paths["a"]})

    first_swap = time.monotonic()
    steps = [
        (lora_config(fake.port, {"a": paths["a"], "b": paths["b"]}), lambda log, t: loads(log, "b", t)),
        (lora_config(fake.port, {"b": paths["b"], "c": paths["c"]}, {"a": paths["a"]}),
         lambda log, t: unloads(log, "a", t)),
        (lora_config(fake.port, {"b": moved, "c": paths["c"]}, {"a": paths["a"]}),
         lambda log, t: [e for e in loads(log, "b", t) if e["body"]["lora_path"] == moved]),
    ]
    for text, acted in steps:  # three swaps in a row: the watch survives the old folder's deletion
        swapped = time.monotonic()
        kubelet.write(text)
        wait_until(lambda acted=acted, swapped=swapped: acted(fake.requests(), swapped),
                   message=f"the swap to {text!r} acted on")

    converge(fake, {"b": moved, "c": paths["c"]})
    # One cycle per swap, and no extra period-driven cycle or health probe.
    assert vllm_calls(fake.requests(), first_swap).count(MODELS) == 3
    assert HEALTH not in vllm_calls(fake.requests(), first_swap)


BAD_CONFIGS = {
    # kind: (how to break it, what the log must say)
    "invalid-yaml": (lambda k, port, p: k.write("vLLMLoRAConfig:\n  ensureNotExist: {models: [{id: a}\n  port: ["),
                     "invalid YAML"),
    "schema-error": (lambda k, port, p: k.write(lora_config(
        port, [{"id": "x", "source": p["x"], "base_model": "base"}], {"a": p["a"], "b": p["b"]})),
        "vLLMLoRAConfig.ensureExist.models[0].base_model"),
    "empty-file": (lambda k, port, p: k.write(""), "is empty"),
    "missing-key": (lambda k, port, p: k.remove_key(), "does not exist"),
    "dangling-symlink": (lambda k, port, p: k.dangle(), "does not exist"),
    # A plain YAML loader would let the second ensureExist replace the first without a word.
    "duplicate-keys": (lambda k, port, p: k.write(
        f"vLLMLoRAConfig:\n  port: {port}\n  ensureExist: {{models: [{{id: a, source: {p['a']}}}]}}\n"
        f"  ensureExist: {{models: [{{id: x, source: {p['x']}}}]}}\n"), "duplicate key 'ensureExist'"),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_changes_nothing_is_logged_once_and_a_good_one_follows(
    kind, fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a", "b", "d", "x"])
    good = {"a": paths["a"], "b": paths["b"]}
    kubelet.write(lora_config(fake.port, good))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    converge(fake, good)

    breaking, fragment = BAD_CONFIGS[kind]
    broken_at = time.monotonic()
    breaking(kubelet, fake.port, paths)
    wait_until(lambda: errors_in_log(sidecar, fragment),
               message=lambda: f"an error naming {fragment!r} in the log:\n{sidecar.log_text()}")
    time.sleep(0.8)  # a window of two periods and fifteen stat ticks: no action, no repeated error

    assert not posts(fake.requests(), broken_at), "a bad config must not unload or load anything"
    assert fake.adapters() == good
    assert len(errors_in_log(sidecar, fragment)) == 1, sidecar.log_text()

    fixed = {**good, "d": paths["d"]}
    kubelet.write(lora_config(fake.port, fixed))
    converge(fake, fixed)
    assert not unloads(fake.requests())
    sidecar.wait_for_log("config is valid again")
    assert len(errors_in_log(sidecar, fragment)) == 1


@pytest.mark.parametrize("kind", ["missing", "empty-file"])
def test_without_a_good_config_yet_it_waits_says_why_once_and_starts_when_one_arrives(
    kind, fake, adapter_paths, kubelet, start_sidecar
):
    fragment = {"missing": "does not exist", "empty-file": "is empty"}[kind]
    if kind == "empty-file":
        kubelet.write("")
    else:
        kubelet.root.mkdir(parents=True, exist_ok=True)  # the volume is there, the key is not
    sidecar = run(start_sidecar, kubelet.path)
    sidecar.wait_serving()
    wait_until(lambda: errors_in_log(sidecar, fragment),
               message=lambda: f"an error naming {fragment!r} in the log:\n{sidecar.log_text()}")
    time.sleep(0.6)  # a window of three health-check intervals, each forcing a re-read: no repeated error
    assert len(errors_in_log(sidecar, fragment)) == 1
    assert fragment in (sidecar.status()["config"]["error"] or "")
    assert sidecar.metrics().value("lora_sidecar_config_valid") == 0
    assert sidecar.readyz() == 503
    assert fake.requests() == []

    paths = adapter_paths(["a"])
    kubelet.write(lora_config(fake.port, paths))
    converge(fake, paths)
    sidecar.wait_ready()


def test_vllm_restart_is_repaired_without_a_config_change(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b", "c"])
    kubelet.write(lora_config(fake.port, paths))
    run(start_sidecar, kubelet.path)
    converge(fake, paths)

    restarted = time.monotonic()
    fake.restart()  # back at once, with every runtime adapter gone
    assert fake.adapters() == {}
    converge(fake, paths)
    again = loads(fake.requests(), since=restarted)
    assert sorted(e["body"]["lora_name"] for e in again) == sorted(paths), "each loaded again, once"
    assert all(e["status"] == 200 for e in again)


def test_one_adapter_failing_with_500_does_not_hold_up_nine_and_backs_off(
    fake, adapter_paths, kubelet, start_sidecar
):
    period = 0.2
    good = adapter_paths([f"ok{i}" for i in range(9)])
    big = adapter_paths(["big"], rank=16)["big"]  # rank 16 > the server's max_lora_rank 8: a 500
    names = list(good)
    configured = {**{n: good[n] for n in names[:4]}, "big": big, **{n: good[n] for n in names[4:]}}
    kubelet.write(lora_config(fake.port, configured))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", period)
    converge(fake, good)

    # Same cycle: all ten first attempts come before the second GET /v1/models.
    log = fake.requests()
    gets = [e["t"] for e in log if (e["method"], e["path"]) == MODELS]
    second_cycle = gets[1] if len(gets) > 1 else float("inf")
    first_attempts = {}
    for e in loads(log):
        first_attempts.setdefault(e["body"]["lora_name"], e)
    assert set(first_attempts) == set(configured)
    assert all(e["t"] < second_cycle for e in first_attempts.values())
    assert first_attempts["big"]["status"] == 500
    assert all(e["status"] == 200 for name, e in first_attempts.items() if name != "big"), "the others go on"

    # Retried with exponential backoff: the n-th retry waits at least period x 2^(n-1) after the
    # failure before it (a busy machine can only make the waits longer).
    sidecar.wait_for(lambda: len(loads(fake.requests(), "big")) >= 4, what="three retries of big")
    attempts = [e["t"] for e in loads(fake.requests(), "big")][:4]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.9 * period * 2**n for n, gap in enumerate(gaps)), f"gaps {gaps}, period {period}"
    assert all(e["status"] in (500, None) for e in loads(fake.requests(), "big"))  # None: a retry in flight
    assert "big" not in fake.adapters()
    # The server's reason is logged, once per distinct error rather than once per retry.
    assert len(errors_in_log(sidecar, "rank 16 is greater than max_lora_rank 8")) == 1


@pytest.mark.parametrize("via", ["--api-key-file", "VLLM_API_KEY"])
def test_api_key_is_sent(via, keyed_fake, adapter_paths, kubelet, start_sidecar, tmp_path):
    fake, key = keyed_fake
    paths = adapter_paths(["a", "b"])
    kubelet.write(lora_config(fake.port, paths))
    # Either way with a trailing newline: a Secret mounted as a file, or put into the environment from
    # one, often ends with one. (That the key is never shown is tests/test_hardening.py's business.)
    if via == "--api-key-file":
        key_file = tmp_path / "api-key"
        key_file.write_text(key + "\n")
        sidecar = run(start_sidecar, kubelet.path, "--api-key-file", key_file)
    else:
        sidecar = run(start_sidecar, kubelet.path, env={"VLLM_API_KEY": key + "\n"})

    converge(fake, paths)
    v1 = [e for e in fake.requests() if e["path"].startswith("/v1")]
    assert v1 and all(e["status"] == 200 for e in v1), "every /v1 call carried the right Bearer key"
    sidecar.wait_ready()


def test_api_key_required_without_one_the_log_names_vllm_api_key(keyed_fake, adapter_paths, kubelet, start_sidecar):
    fake, _ = keyed_fake
    kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")

    sidecar.wait_for_log("VLLM_API_KEY")
    wait_cycles(fake, 3)
    log = fake.requests()
    assert {e["status"] for e in log if (e["method"], e["path"]) == MODELS} == {401}
    assert not posts(log)
    assert fake.adapters() == {}
    assert len(errors_in_log(sidecar, "VLLM_API_KEY")) == 1, "once, not once per tick"


# --------------------------------------------------------------------- one-shot modes


def test_once_exits_0_after_loading(fake, adapter_paths, kubelet):
    paths = adapter_paths(["a", "b"])
    kubelet.write(lora_config(fake.port, paths))
    result = run_sidecar(["--config", kubelet.path, "--once", "--health-check-timeout", "5"])
    assert result.code == 0, result.stderr
    assert fake.adapters() == paths
    assert len(loads(fake.requests())) == 2
    assert result.stdout.strip() == "in sync"


def test_once_exits_1_when_an_adapter_fails(fake, adapter_paths, kubelet):
    paths = {**adapter_paths(["a"]), **adapter_paths(["big"], rank=16)}
    kubelet.write(lora_config(fake.port, paths))
    result = run_sidecar(["--config", kubelet.path, "--once", "--health-check-timeout", "5"])
    assert result.code == 1, result.stderr
    assert fake.adapters() == {"a": paths["a"]}
    assert "rank 16 is greater than max_lora_rank 8" in result.stderr


def test_once_exits_1_when_the_server_never_becomes_healthy(adapter_paths, kubelet):
    kubelet.write(lora_config(free_port(), adapter_paths(["a"])))
    result = run_sidecar(["--config", kubelet.path, "--once", "--health-check-timeout", "0.5"])
    assert result.code == 1, result.stderr  # and within run_sidecar's deadline: it stopped waiting


def test_once_exits_2_on_an_invalid_config_without_network(fake, adapter_paths, kubelet):
    kubelet.write(lora_config(fake.port, [{"id": "a"}]))  # no source
    result = run_sidecar(["--config", kubelet.path, "--once", "--health-check-timeout", "5"])
    assert result.code == 2
    assert "vLLMLoRAConfig.ensureExist.models[0].source" in result.stderr
    assert fake.requests() == []


def test_dry_run_prints_the_plan_and_sends_no_post(fake, adapter_paths, kubelet):
    paths = adapter_paths(["a", "b", "b-new", "c"])
    fake.set_adapters({"b": paths["b"], "c": paths["c"]})
    kubelet.write(lora_config(fake.port, {"a": paths["a"], "b": paths["b-new"]}, {"c": paths["c"]}))
    result = run_sidecar(["--config", kubelet.path, "--dry-run", "--health-check-timeout", "5"])
    assert result.code == 1, result.stderr
    plan = {tuple(line.split()[:2]) for line in result.stdout.splitlines()}
    assert plan == {("load", "a"), ("reload", "b"), ("unload", "c")}, result.stdout
    assert not posts(fake.requests())
    assert fake.adapters() == {"b": paths["b"], "c": paths["c"]}


def test_dry_run_in_sync_exits_0(fake, adapter_paths, kubelet):
    paths = adapter_paths(["a", "b"])
    fake.set_adapters(paths)
    kubelet.write(lora_config(fake.port, paths, {"gone": paths["a"] + "-old"}))
    result = run_sidecar(["--config", kubelet.path, "--dry-run", "--health-check-timeout", "5"])
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == "in sync"
    assert not posts(fake.requests())


def test_validate_exits_0_on_a_good_config_without_network(fake, adapter_paths, kubelet):
    kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
    result = run_sidecar(["--config", kubelet.path, "--validate"])
    assert result.code == 0, result.stderr
    assert fake.requests() == []


def test_validate_exits_2_naming_file_and_every_field(fake, kubelet):
    kubelet.write(lora_config(fake.port, [{"id": "a", "source": "/x", "base_model": "m"}, {"id": "b"}]))
    result = run_sidecar(["--config", kubelet.path, "--validate"])
    assert result.code == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2, result.stderr
    assert all(str(kubelet.path) in line for line in errors)
    assert "vLLMLoRAConfig.ensureExist.models[0].base_model" in errors[0]
    assert "vLLMLoRAConfig.ensureExist.models[1].source" in errors[1]
    assert fake.requests() == []


# --------------------------------------------------------------------- signals


# How long a signalled sidecar is given to exit before the test kills it (and fails). How long it
# really takes is the bench's "SIGTERM to exit" row.
EXIT_DEADLINE = 10.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_and_unloads_nothing(signum, fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b"])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, paths)

    code, _ = sidecar.stop(signum, timeout=EXIT_DEADLINE)
    assert code == 0, sidecar.log_text()
    assert fake.adapters() == paths
    assert not unloads(fake.requests())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_without_waiting_out_a_hung_request(signum, fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b"])
    kubelet.write(lora_config(fake.port, paths))
    # A request timeout three times the exit deadline: a sidecar that waits for the hung request is killed.
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3", "--request-timeout", 3 * EXIT_DEADLINE)
    converge(fake, paths)

    fake.set_fault("hang")
    try:
        hung_at = time.monotonic()
        wait_until(lambda: [e for e in fake.requests() if e["t"] >= hung_at and e["status"] is None],
                   message="a request held by the hanging server")
        code, _ = sidecar.stop(signum, timeout=EXIT_DEADLINE)
    finally:
        fake.clear_fault()
    assert code == 0, sidecar.log_text()
    assert fake.adapters() == paths
    assert not unloads(fake.requests())


# --------------------------------------------------------------------- the plan against the server


def test_in_sync_one_cycle_is_exactly_one_get(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths([f"a{i:02d}" for i in range(20)])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    converge(fake, paths)
    wait_cycles(fake, 1)

    since, log_lines = time.monotonic(), len(sidecar.lines())
    wait_cycles(fake, 4)  # four cycles in sync: one GET each, nothing else (one per period: the bench's idle rows)
    calls = vllm_calls(fake.requests(), since)
    assert calls == [MODELS] * len(calls), calls
    assert sidecar.lines()[log_lines:] == [], "in sync the sidecar logs nothing per cycle"


def test_ensure_not_exist_is_unloaded_and_unnamed_adapters_are_never_touched(
    fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a", "x", "t", "y", "z", "w"])
    fake.set_adapters({"x": paths["x"], "t": paths["t"], "y": paths["y"], "z": paths["z"]})
    kubelet.write(lora_config(
        fake.port,
        [{"id": "a", "source": paths["a"]}, {"id": "t", "source": paths["t"], "toRemove": True}],
        {"x": paths["x"], "w": paths["w"]},  # w is not on the server: nothing to do
    ))
    run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    converge(fake, {"y": paths["y"], "z": paths["z"], "a": paths["a"]})
    wait_cycles(fake, 3)

    log = fake.requests()
    assert sorted(e["body"]["lora_name"] for e in unloads(log)) == ["t", "x"]
    assert [e["body"]["lora_name"] for e in loads(log)] == ["a"]
    mentioned = {e["body"].get("lora_name") for e in posts(log)}
    assert not mentioned & {"y", "z", "w"}
    assert fake.adapters() == {"y": paths["y"], "z": paths["z"], "a": paths["a"]}


# ===================================================================== operations: metrics, status, probes, logs


def test_metrics_and_status_after_convergence(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b", "c"])
    kubelet.write(lora_config(fake.port, paths, name="fleet-a"))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, paths)
    sidecar.wait_ready()
    sidecar.wait_metric("lora_sidecar_in_sync", 1)

    m = sidecar.metrics()
    for name in paths:
        assert m.value("lora_sidecar_adapter_loaded", adapter=name) == 1
        assert m.state_of(name) == "loaded"
        assert m.value("lora_syncer_adapter_status", adapter_name=name) == 1
    assert m.value("lora_sidecar_server_up") == 1
    assert m.value("lora_sidecar_config_valid") == 1
    assert m.value("lora_sidecar_operations_total", op="load", result="success") == 3
    assert m.total("lora_sidecar_operations_total", result="error") == 0
    assert m.value("lora_sidecar_operation_duration_seconds_count", op="load") == 3
    assert m.value("lora_sidecar_reconcile_total", result="success") >= 1
    assert m.value("lora_sidecar_reconcile_duration_seconds_count") >= 1
    assert abs(m.value("lora_sidecar_config_last_change_timestamp_seconds") - time.time()) < 60

    status = sidecar.status()
    assert status["config"]["name"] == "fleet-a"
    assert status["config"]["path"] == str(kubelet.path)
    assert status["config"]["sha256"] == hashlib.sha256(kubelet.path.read_bytes()).hexdigest()
    assert status["config"]["error"] is None
    assert status["config"]["last_read"]
    assert status["server"] == {"url": fake.url, "up": True, "version": "0.32.0", "error": None}
    assert status["in_sync"] is True
    for name, source in paths.items():
        a = status["adapters"][name]
        assert (a["desired"], a["state"], a["source"], a["observed_source"]) == ("present", "loaded", source, source)
        assert (a["last_action"], a["last_error"], a["failures"], a["next_retry"]) == ("load", None, 0, None)
    assert sidecar.healthz() == 200


def test_metrics_and_status_with_one_failing_adapter(fake, adapter_paths, kubelet, start_sidecar):
    paths = {**adapter_paths(["a"]), **adapter_paths(["big"], rank=16)}
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    converge(fake, {"a": paths["a"]})
    sidecar.wait_ready()  # a permanent failure does not hold readiness back

    wait_until(lambda: sidecar.metrics().state_of("big") == "failed")
    m = sidecar.metrics()
    assert m.state_of("a") == "loaded"
    assert m.value("lora_sidecar_adapter_loaded", adapter="big") == 0
    assert m.value("lora_syncer_adapter_status", adapter_name="big") == 0
    assert m.value("lora_sidecar_operations_total", op="load", result="error") >= 1
    assert m.value("lora_sidecar_in_sync") == 0
    assert m.value("lora_sidecar_reconcile_total", result="error") >= 1

    big = sidecar.status()["adapters"]["big"]
    assert big["state"] == "failed"
    assert "rank 16 is greater than max_lora_rank 8" in big["last_error"]
    assert big["failures"] >= 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", big["next_retry"]), big["next_retry"]
    assert big["last_action"] == "load"
    assert sidecar.status()["in_sync"] is False
    assert sidecar.readyz() == 200


def test_metrics_and_status_with_an_invalid_config(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b", "x"])
    good = {"a": paths["a"], "b": paths["b"]}
    kubelet.write(lora_config(fake.port, good))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, good)
    sidecar.wait_ready()
    good_sha = sidecar.status()["config"]["sha256"]

    kubelet.write(lora_config(fake.port, [{"id": "x", "source": paths["x"], "base_model": "base"}]))
    sidecar.wait_metric("lora_sidecar_config_valid", 0)
    status = sidecar.status()
    assert "vLLMLoRAConfig.ensureExist.models[0].base_model" in status["config"]["error"]
    assert status["config"]["sha256"] == good_sha, "the last good config stays in force"
    assert set(status["adapters"]) == {"a", "b"}
    m = sidecar.metrics()
    assert m.state_of("a") == m.state_of("b") == "loaded"
    assert sidecar.readyz() == 200 and sidecar.healthz() == 200
    assert fake.adapters() == good

    kubelet.write(lora_config(fake.port, good, name="fixed"))
    sidecar.wait_metric("lora_sidecar_config_valid", 1)
    assert sidecar.status()["config"]["error"] is None
    assert sidecar.status()["config"]["name"] == "fixed"


@pytest.mark.slow  # a 2 s window
def test_metrics_and_probes_while_the_server_is_down_and_back(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b"])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3", "--request-timeout", "0.5")
    converge(fake, paths)
    sidecar.wait_ready()

    down_at = time.monotonic()
    fake.stop(keep_adapters=False)  # the pod's vLLM container died
    sidecar.wait_metric("lora_sidecar_server_up", 0)
    assert sidecar.status()["server"]["up"] is False
    # A window longer than /healthz's (3 periods + the request timeout): the loop keeps ticking meanwhile.
    while time.monotonic() - down_at < 2.0:
        assert sidecar.healthz() == 200
        assert sidecar.readyz() == 200
        time.sleep(0.2)

    fake.start()
    converge(fake, paths)
    sidecar.wait_metric("lora_sidecar_server_up", 1)
    sidecar.wait_metric("lora_sidecar_in_sync", 1)
    m = sidecar.metrics()
    assert all(m.value("lora_sidecar_adapter_loaded", adapter=n) == 1 for n in paths)
    assert sidecar.status()["server"]["up"] is True
    assert m.value("lora_sidecar_operations_total", op="load", result="success") == 4
    # Each up/down transition is one log line, not one per tick of the outage.
    transitions = [line["msg"] for line in sidecar.json_lines() if line["msg"].startswith("vLLM server is")]
    assert transitions == ["vLLM server is up", "vLLM server is down", "vLLM server is up"], transitions


def test_series_of_an_adapter_that_leaves_the_config_disappear(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a", "b"])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, paths)
    sidecar.wait_metric("lora_sidecar_adapter_loaded", 1, adapter="b")

    kubelet.write(lora_config(fake.port, {"a": paths["a"]}))
    wait_until(lambda: "b" not in sidecar.metrics().label_values("lora_sidecar_adapter_loaded", "adapter"))
    m = sidecar.metrics()
    assert m.label_values("lora_sidecar_adapter_state", "adapter") == {"a"}
    assert m.label_values("lora_syncer_adapter_status", "adapter_name") == {"a"}
    assert set(sidecar.status()["adapters"]) == {"a"}
    assert fake.adapters() == paths, "leaving the config is not a request to unload"


def test_readyz_is_503_until_the_server_is_healthy(adapter_paths, kubelet, start_sidecar):
    port = free_port()
    paths = adapter_paths(["a"])
    kubelet.write(lora_config(port, paths))
    sidecar = run(start_sidecar, kubelet.path)
    sidecar.wait_serving()
    # the gauge is 0 before the first cycle too: wait for a cycle that found the server down
    wait_until(lambda: sidecar.metrics().value("lora_sidecar_server_up") == 0 and "a" in sidecar.status()["adapters"])
    assert sidecar.readyz() == 503
    assert sidecar.healthz() == 200
    status = sidecar.status()
    assert status["server"]["up"] is False
    assert status["adapters"]["a"]["state"] == "pending"

    with FakeVLLM(port=port) as fake:
        sidecar.wait_ready()
        assert fake.adapters() == paths
        assert sidecar.metrics().value("lora_sidecar_server_up") == 1


def test_json_log_lines(fake, adapter_paths, kubelet, start_sidecar):
    paths = {**adapter_paths(["a", "x"]), **adapter_paths(["big"], rank=16)}
    fake.set_adapters({"x": paths["x"]})
    kubelet.write(lora_config(fake.port, {"a": paths["a"], "big": paths["big"]}, {"x": paths["x"]}))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, {"a": paths["a"]})
    sidecar.wait_for_log("big")
    sidecar.stop()

    lines = sidecar.json_lines()  # every line parses
    for line in lines:
        assert {"ts", "level", "msg"} <= set(line), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line
        assert line["level"] in ("debug", "info", "warning", "error")
    actions = [line for line in lines if "action" in line]
    for line in actions:
        assert {"adapter", "action", "result", "duration_s", "reconcile_id"} <= set(line), line
        assert isinstance(line["duration_s"], int | float)
    done = {(line["adapter"], line["action"], line["result"]) for line in actions}
    assert done == {("a", "load", "success"), ("x", "unload", "success"), ("big", "load", "error")}
    failed = next(line for line in actions if line["result"] == "error")
    assert "rank 16 is greater than max_lora_rank 8" in failed["error"]
    assert any("config_sha256" in line for line in lines)


def test_text_log_lines_carry_the_same_fields(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a"])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = start_sidecar(["--config", kubelet.path])
    converge(fake, paths)
    line = sidecar.wait_for_log("action=load")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO ", line), line
    for key in ("adapter=a", "result=success", "duration_s=", "reconcile_id="):
        assert key in line, line


def test_a_load_that_times_out_is_an_action_line_with_duration(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["a"])
    kubelet.write(lora_config(fake.port, paths))
    fake.set_fault("slow_load", seconds=1.5)
    try:
        sidecar = run(start_sidecar, kubelet.path, "--load-timeout", "0.5")
        line = json.loads(sidecar.wait_for_log(lambda text: '"action"' in text and '"error"' in text, 5.0))
    finally:
        fake.clear_fault()
    assert (line["adapter"], line["action"], line["result"]) == ("a", "load", "timeout")
    assert "duration_s" in line, line


# --------------------------------------------------------------------- more of what a user would see


def test_fixing_a_failing_adapter_in_the_config_skips_its_backoff(fake, adapter_paths, kubelet, start_sidecar):
    big = adapter_paths(["big"], rank=16)["big"]
    fixed = adapter_paths(["big"])["big"]
    kubelet.write(lora_config(fake.port, {"big": big}))
    # A 30 s period: the failed entry's first retry is due 30 s later, three times the wait below.
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "30")
    sidecar.wait_for_log("rank 16 is greater than max_lora_rank 8")

    kubelet.write(lora_config(fake.port, {"big": fixed}))
    converge(fake, {"big": fixed})  # a changed entry is no retry: its backoff starts over


def test_adapters_for_another_base_model_are_skipped(fake, adapter_paths, kubelet, start_sidecar):
    paths = adapter_paths(["mine", "by-root", "other"])
    kubelet.write(lora_config(fake.port, [
        {"id": "mine", "source": paths["mine"]},  # defaultBaseModel "base": the served name
        {"id": "by-root", "source": paths["by-root"], "base-model": "/models/base"},  # the served root
        {"id": "other", "source": paths["other"], "base-model": "Qwen/Qwen3-32B"},
    ], defaultBaseModel="base"))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    converge(fake, {"mine": paths["mine"], "by-root": paths["by-root"]})
    sidecar.wait_ready()
    wait_cycles(fake, 2)

    assert not loads(fake.requests(), "other")
    assert sidecar.metrics().state_of("other") == "skipped"
    assert sidecar.metrics().value("lora_sidecar_in_sync") == 1, "a skipped adapter is not out of sync"
    other = sidecar.status()["adapters"]["other"]
    assert other["state"] == "skipped"
    assert "Qwen/Qwen3-32B" in other["skip_reason"] and "base" in other["skip_reason"]


def test_runtime_lora_off_is_reported_naming_the_variable(adapter_paths, kubelet, start_sidecar):
    with FakeVLLM(port=0, runtime_lora=False) as fake:
        kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
        sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
        sidecar.wait_for_log("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        wait_cycles(fake, 3)
        assert sidecar.readyz() == 503, "nothing could be loaded"
    assert len(errors_in_log(sidecar, "VLLM_ALLOW_RUNTIME_LORA_UPDATING")) == 1
