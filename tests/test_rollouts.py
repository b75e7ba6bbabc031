"""Process tests of real rollouts: slow loads applied one at a time, vLLM's version
semantics, 200s without effect, and a status that tells the truth.

sidecar.py runs as a process against the vLLM look-alike (tests/fake_vllm.py) given realistic
behaviour: loads of seconds held under one engine lock, a server without load_inplace, a server
where load_inplace sticks (0.32), loads and unloads answered 200 that change nothing, a server
that normalises `root`.

Every wait is on a condition, with a generous deadline that measures nothing (the slow-load rollout
and the version swap are timed by `make bench`); the only plain sleeps are where a test must show
that something does NOT happen over a window (a retry not sent, a log line not repeated).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from fake_vllm import FakeVLLM, make_adapter
from sidecar_process import (
    Sidecar,
    converge,
    free_port,
    loads,
    lora_config,
    models_calls,
    posts,
    unloads,
    wait_cycles,
    wait_until,
)

StartSidecar = Callable[..., Sidecar]

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
DOWN = "vLLM server is down"


# --------------------------------------------------------------------------------- helpers


def run(start_sidecar: StartSidecar, config: Path, *flags: object, env: dict[str, str] | None = None) -> Sidecar:
    """A sidecar with JSON logs (so tests can count lines exactly) on `config`."""
    return start_sidecar(["--config", config, "--log-format", "json", *flags], env)


def adapter(sidecar: Sidecar, name: str) -> dict[str, Any]:
    return sidecar.status()["adapters"][name]


def wait_failed(sidecar: Sidecar, name: str, *fragments: str) -> dict[str, Any]:
    """Until /status shows `name` failed with a last_error holding every fragment; return the record."""

    def failed() -> dict[str, Any] | None:
        record = adapter(sidecar, name)
        error = record["last_error"] or ""
        return record if record["state"] == "failed" and all(f in error for f in fragments) else None

    return sidecar.wait_for(failed, what=f"{name} failed with {fragments} in last_error")


def completion_text(fake: FakeVLLM, model: str, api_key: str | None = None) -> str:
    """A completion through `model`; the fake's text names the weights (root) it ran with."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.post(f"{fake.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 8},
                             headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def backing_off(times: list[float], period: float) -> bool:
    """Whether the sends at `times` back off: the third gap between them is at least two periods (a
    sidecar that re-sends every cycle has gaps of one period; a busy machine only makes gaps longer)."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return len(gaps) >= 3 and gaps[2] >= 1.8 * period


def readiness_until(sidecar: Sidecar, until: float, every: float = 0.05) -> list[int]:
    """/readyz, sampled until time.monotonic() reaches `until` (a window in which something must NOT happen)."""
    codes = []
    while time.monotonic() < until:
        codes.append(sidecar.readyz())
        time.sleep(every)
    return codes


def down_lines(sidecar: Sidecar) -> list[str]:
    return sidecar.log_matching(DOWN)


def post_summary(entries: list[dict[str, Any]]) -> list[tuple[str, str, str | None, bool, int | None]]:
    """(load|unload, lora_name, lora_path, load_inplace, status) of each load and unload, in arrival order
    (the tests' own completions are left out)."""
    out = []
    for e in entries:
        if e["path"] not in (LOAD_PATH, UNLOAD_PATH):
            continue
        body = e["body"] if isinstance(e["body"], dict) else {}
        op = "load" if e["path"] == LOAD_PATH else "unload"
        out.append((op, body.get("lora_name"), body.get("lora_path"), bool(body.get("load_inplace")), e["status"]))
    return out


# ============================================================ version updates and load_inplace

STAGING = "a~staging"
STAGE = ("load", STAGING, "NEW", False, 200)  # the new files proven under the staging name
UNSTAGE = ("unload", STAGING, None, False, 200)
DROP = ("unload", "a", None, False, 200)
FRESH = ("load", "a", "NEW", False, 200)
IN_PLACE = ("load", "a", "NEW", True, 200)
REFUSED = ("load", "a", "NEW", True, 400)  # a server that does not know load_inplace

# case: (vLLM version or None for a server without GET /version, whether it knows load_inplace,
#        the acceptable sequences of loads and unloads, leaving out UNSTAGE, which may come anywhere after STAGE)
SWAPS = {
    "0.32-sticky": ("0.32.0", True, [[STAGE, DROP, FRESH]]),
    "0.33": ("0.33.0", True, [[IN_PLACE], [STAGE, IN_PLACE]]),
    "no-version-no-inplace": (None, False, [[STAGE, DROP, FRESH]]),
    "0.33-refuses-inplace": ("0.33.0", False, [[REFUSED, STAGE, DROP, FRESH], [STAGE, REFUSED, DROP, FRESH]]),
}


@pytest.mark.parametrize("case", list(SWAPS))
def test_version_update_leaves_no_sticky_load_inplace_and_drops_nothing_before_the_new_version_loaded(
    case, make_fake, adapter_paths, kubelet, start_sidecar
):
    version, inplace_supported, acceptable = SWAPS[case]
    fake = make_fake(version=version, inplace_supported=inplace_supported)
    paths = adapter_paths(["v1", "v2"])
    kubelet.write(lora_config(fake.port, {"a": paths["v1"]}))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    converge(fake, {"a": paths["v1"]})
    assert completion_text(fake, "a").endswith(paths["v1"])

    swapped = time.monotonic()
    kubelet.write(lora_config(fake.port, {"a": paths["v2"]}))
    converge(fake, {"a": paths["v2"]})  # the new version listed, and no staging name left behind
    wait_cycles(fake, 2)  # nothing more to do afterwards

    new = paths["v2"]
    calls = [(op, name, "NEW" if path == new else path, inplace, status)
             for op, name, path, inplace, status in post_summary(posts(fake.requests(), swapped))]
    swap = [c for c in calls if c != UNSTAGE]
    assert swap in acceptable, f"sent {calls}; acceptable (leaving out {UNSTAGE}): {acceptable}"
    if STAGE in calls:  # the staging copy is dropped once, after it loaded
        assert calls.count(UNSTAGE) == 1 and calls.index(UNSTAGE) > calls.index(STAGE), calls
    else:
        assert UNSTAGE not in calls, calls
    if version is None or version.startswith("0.32"):
        assert not [e for e in posts(fake.requests()) if isinstance(e["body"], dict) and e["body"].get("load_inplace")]

    assert fake.inplace_sticky() == [], "vLLM 0.32 would reload this adapter from disk on every step"
    assert completion_text(fake, "a").endswith(new)
    record = sidecar.wait_for(lambda: (r := adapter(sidecar, "a"))["observed_source"] == new and r)
    assert (record["state"], record["source"], record["last_error"]) == ("loaded", new, None)
    assert record["last_action"] == "reload"
    assert sidecar.metrics().value("lora_sidecar_operations_total", op="reload", result="success") == 1
    assert sidecar.status()["server"].get("version") == version


# ============================================================ a new version that cannot load

@pytest.mark.parametrize("inplace_supported", [False, True], ids=["no-inplace", "0.32-sticky"])
def test_a_new_version_that_cannot_load_leaves_the_old_one_serving(
    inplace_supported, make_fake, adapter_paths, kubelet, start_sidecar, tmp_path
):
    fake = make_fake(version="0.32.0", inplace_supported=inplace_supported)
    old = adapter_paths(["v1"])["v1"]
    bad = str(tmp_path / "no-such-adapter")
    kubelet.write(lora_config(fake.port, {"a": old}))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    converge(fake, {"a": old})

    swapped = time.monotonic()
    kubelet.write(lora_config(fake.port, {"a": bad}))
    wait_failed(sidecar, "a", "No adapter found")
    wait_cycles(fake, 3)

    assert fake.adapters() == {"a": old}, "the serving version must never be taken down for one that cannot load"
    assert completion_text(fake, "a").endswith(old)
    calls = post_summary(posts(fake.requests(), swapped))
    assert calls and set(calls) == {("load", STAGING, bad, False, 404)}, \
        f"only the staging load may be tried: {calls}"
    assert not unloads(fake.requests(), "a"), "no unload of the serving adapter, ever"
    record = adapter(sidecar, "a")
    assert (record["state"], record["source"], record["observed_source"]) == ("failed", bad, old)
    assert record["next_retry"] is not None


# ============================================================ serial loads vs. the request timeout


@pytest.mark.slow  # 6 loads of 1.5 s, one at a time
def test_slow_serial_loads_are_not_charged_the_request_timeout_or_time_queued(
    make_fake, adapter_paths, kubelet, start_sidecar
):
    fake = make_fake(load_delay=1.5)  # 6 x 1.5 s applied one at a time: 9 s, with 4 sent at once
    paths = adapter_paths([f"a{i}" for i in range(6)])
    kubelet.write(lora_config(fake.port, paths))
    # --load-timeout 2 through its env fallback (today's main, without the flag, then shows the real failure).
    sidecar = run(start_sidecar, kubelet.path, "--request-timeout", "1", env={"LORA_SIDECAR_LOAD_TIMEOUT": "2"})
    converge(fake, paths, timeout=40.0)
    sidecar.wait_metric("lora_sidecar_in_sync", 1, timeout=5.0)

    log = fake.requests()
    # When several loads are sent at once, the server may apply them in any order.
    order = (f"arrived {[e['body']['lora_name'] for e in loads(log)]}, "
             f"applied {list(fake.adapters())}; timed out: {sidecar.log_matching('no answer within')}")
    for name in paths:
        assert [e["status"] for e in loads(log, name)] == [200], f"{name} loaded exactly once; {order}"
    assert not down_lines(sidecar), sidecar.log_text()
    assert not sidecar.log_matching("no answer within"), order
    m = sidecar.metrics()
    assert m.total("lora_sidecar_operations_total", op="load", result="timeout") == 0
    assert m.value("lora_sidecar_operations_total", op="load", result="success") == len(paths)
    assert all(adapter(sidecar, name)["state"] == "loaded" for name in paths)


# ============================================================ liveness during a long rollout


@pytest.mark.slow  # 12 loads of 0.6-1 s, one at a time
@pytest.mark.parametrize(("request_timeout", "load_delay"), [(1, 0.6), (5, 1.0)],
                         ids=["request-timeout-1", "request-timeout-5"])
def test_healthz_stays_200_through_a_long_steady_rollout(
    request_timeout, load_delay, make_fake, adapter_paths, kubelet, start_sidecar
):
    # 12 loads applied serially: 7-12 s, far longer than today's /healthz window of
    # 3 periods + the request timeout (2.5 s and 6.5 s).
    fake = make_fake(load_delay=load_delay)
    paths = adapter_paths([f"a{i:02d}" for i in range(12)])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.5", "--request-timeout", request_timeout)
    sidecar.wait_serving()

    codes: list[int | str] = []

    def probe_then_converged() -> bool:
        try:
            codes.append(sidecar.healthz())
        except requests.RequestException as e:
            codes.append(f"no answer: {e!r}")
        return fake.adapters() == paths

    wait_until(probe_then_converged, 12 * load_delay + 30, interval=0.1,
               message=lambda: f"all 12 loaded; server has {sorted(fake.adapters())}\n{sidecar.diagnose()}")
    assert len(codes) >= 20, "polled throughout the rollout"
    assert [c for c in codes if c != 200] == [], f"/healthz answered {sorted(set(map(str, codes)))}"
    log = fake.requests()
    assert all(len(loads(log, name)) == 1 for name in paths), "no load timed out and was sent again"
    assert not down_lines(sidecar)


# ============================================================ readiness latches only on the truth

TRANSIENT = {
    # kind: (how to make loads fail, env, a fragment of the adapter's last_error)
    "load-503": (lambda fake: fake.set_fault("load_status", status=503), {}, "503"),
    "load-429": (lambda fake: fake.set_fault("load_status", status=429), {}, "429"),
    "load-timeout": (lambda fake: fake.set_fault("slow_load", seconds=3.0), {"LORA_SIDECAR_LOAD_TIMEOUT": "0.5"},
                     "no answer within"),
}


@pytest.mark.slow  # a 1.5 s window, then a backoff
@pytest.mark.parametrize("kind", list(TRANSIENT))
def test_readyz_stays_503_while_loads_fail_transiently_then_turns_200(
    kind, make_fake, kubelet, start_sidecar, tmp_path
):
    fake = make_fake()
    inject, env, fragment = TRANSIENT[kind]
    # The adapter's files appear only when the fault is cleared: a load that timed out on the
    # sidecar's side but goes on in the server cannot land meanwhile (it ends in a 404 nobody hears).
    source = tmp_path / "adapters" / "late"
    kubelet.write(lora_config(fake.port, {"a": str(source)}))
    inject(fake)
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3", env=env)
    sidecar.wait_serving()

    readiness: list[int] = []

    def sample_then_failed() -> bool:
        readiness.append(sidecar.readyz())
        record = adapter(sidecar, "a")
        return record["state"] == "failed" and fragment in (record["last_error"] or "")

    sidecar.wait_for(sample_then_failed, what=f"a failed with {fragment!r}", interval=0.05)
    # Five more periods: retries, backoff; a readiness latch would show.
    readiness += readiness_until(sidecar, time.monotonic() + 1.5)
    assert set(readiness) == {503}, f"/readyz answered {sorted(set(readiness))} with nothing loaded"
    assert fake.adapters() == {}
    assert not down_lines(sidecar), "a load that failed or timed out is not the server going down"

    make_adapter(source)
    fake.clear_fault()
    sidecar.wait_ready(timeout=30.0)  # the retry is due after the backoff of the failures so far
    assert fake.adapters() == {"a": str(source)}
    wait_until(lambda: adapter(sidecar, "a")["state"] == "loaded")


# ============================================================ a 200 is not taken on faith


@pytest.mark.slow  # three growing backoffs
def test_load_answered_200_but_not_listed_fails_and_backs_off(make_fake, adapter_paths, kubelet, start_sidecar):
    period = 0.3
    fake = make_fake()
    fake.set_fault("load_noop")
    kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", period)

    readiness: list[int] = []

    def sample_then_sent_four_times() -> bool:
        readiness.append(sidecar.readyz())
        return len(loads(fake.requests(), "a")) >= 4

    sidecar.wait_for(sample_then_sent_four_times, what="four loads of a", interval=0.05)
    attempts = loads(fake.requests(), "a")
    assert backing_off([e["t"] for e in attempts], period), f"loads at {[e['t'] for e in attempts]}: not backing off"
    assert all(e["status"] == 200 for e in attempts)
    assert set(readiness) == {503}, f"/readyz answered {sorted(set(readiness))} with nothing loaded"
    # Between a 200 and the next /v1/models the record may say "loaded"; the check then says otherwise.
    record = wait_failed(sidecar, "a", "200", "not list")
    assert record["failures"] >= 2
    sidecar.wait_for(lambda: sidecar.status()["in_sync"] is False, what="not in sync")
    assert fake.adapters() == {}


@pytest.mark.slow  # three growing backoffs
def test_unload_answered_200_but_still_listed_fails_and_backs_off(make_fake, adapter_paths, kubelet, start_sidecar):
    period = 0.3
    fake = make_fake()
    paths = adapter_paths(["a", "x"])
    fake.set_adapters({"x": paths["x"]})
    fake.set_fault("unload_noop")
    kubelet.write(lora_config(fake.port, {"a": paths["a"]}, {"x": paths["x"]}))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", period)

    sidecar.wait_for(lambda: len(unloads(fake.requests(), "x")) >= 4, what="four unloads of x")
    attempts = unloads(fake.requests(), "x")
    assert backing_off([e["t"] for e in attempts], period), f"unloads at {[e['t'] for e in attempts]}: not backing off"
    assert all(e["status"] == 200 for e in attempts)
    assert wait_failed(sidecar, "x", "200", "still lists")["failures"] >= 2
    assert adapter(sidecar, "a")["state"] == "loaded"
    sidecar.wait_for(lambda: sidecar.status()["in_sync"] is False, what="not in sync")
    assert "x" in fake.adapters()


def test_a_server_that_normalises_root_gets_one_load_and_no_reloads(
    make_fake, adapter_paths, kubelet, start_sidecar
):
    fake = make_fake(normalize_root=True)
    source = adapter_paths(["a"])["a"] + "/"  # listed back as ".../a-r8"
    kubelet.write(lora_config(fake.port, {"a": source}))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3")
    wait_until(lambda: "a" in fake.adapters())
    wait_cycles(fake, 3)

    calls = post_summary(posts(fake.requests()))
    assert calls == [("load", "a", source, False, 200)], f"a trailing '/' is no reason to reload: {calls}"
    record = sidecar.wait_for(lambda: (r := adapter(sidecar, "a"))["state"] == "loaded" and r)
    assert record["last_error"] is None
    sidecar.wait_ready()
    assert sidecar.status()["in_sync"] is True


# ============================================================ /v1/models dropped while /health is fine


@pytest.mark.slow  # a 3.5 s window
def test_models_dropped_while_health_is_fine_is_one_error_polled_once_a_period(
    make_fake, adapter_paths, kubelet, start_sidecar
):
    period = 1.0
    fake = make_fake()
    paths = adapter_paths(["a"])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", period, "--health-check-interval", "0.1")
    converge(fake, paths)
    wait_cycles(fake, 1)
    log_mark = len(sidecar.lines())

    dropped_at = time.monotonic()
    fake.set_fault("models_drop")
    # A window of three and a half periods, 35 health-check intervals: the number of GETs in it tells
    # polling once a period (3-5) from polling once a health check (35). Its upper bound only gets easier
    # on a slow machine.
    time.sleep(3.5)
    window = time.monotonic() - dropped_at
    gets = models_calls(fake, dropped_at)
    new_lines = sidecar.json_lines()[log_mark:]
    fake.clear_fault()

    assert 1 <= gets <= window / period + 2, f"{gets} GET /v1/models in {window:.1f} s: polled per health interval"
    downs = [line for line in new_lines if line["msg"] == DOWN]
    assert len(downs) <= 1, f"{len(downs)} '{DOWN}' lines while /health answered 200"
    problems = [line for line in new_lines if line["level"] in ("warning", "error") and line["msg"] != DOWN]
    assert len(problems) == 1, f"the error is logged once per distinct error: {problems}"

    wait_cycles(fake, 1)
    assert fake.adapters() == paths


# ============================================================ waiting on a server that cannot answer


def server_error(sidecar: Sidecar) -> str:
    return sidecar.status()["server"].get("error") or ""


@pytest.mark.slow  # a 1 s window each
@pytest.mark.parametrize("where", ["https-against-http", "refused", "unresolvable"])
def test_while_waiting_status_says_why_the_server_is_not_reachable(
    where, make_fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a"])
    if where == "https-against-http":
        config, wanted = lora_config(make_fake().port, paths, scheme="https"), ("TLS", "SSL")
    elif where == "refused":
        config, wanted = lora_config(free_port(), paths), ("refused",)
    else:
        config, wanted = lora_config(80, paths, host="nonexistent.invalid"), ("resolve",)
    kubelet.write(config)
    sidecar = run(start_sidecar, kubelet.path)
    sidecar.wait_serving()

    error = sidecar.wait_for(lambda: (e := server_error(sidecar)) and any(w in e for w in wanted) and e,
                             what=f"/status server.error naming one of {wanted}")
    assert "does not answer 200" not in error
    assert sidecar.status()["server"]["up"] is False
    assert sidecar.readyz() == 503

    time.sleep(1.0)  # a window of five health-check intervals: the reason is logged once, not once per try
    waiting = [line for line in sidecar.json_lines() if "waiting for vLLM" in line["msg"]]
    assert len(waiting) == 1, waiting
    assert any(w in waiting[0].get("error", "") for w in wanted), waiting


@pytest.mark.parametrize("via", ["VLLM_API_KEY", "--api-key-file"])
def test_an_api_key_with_a_control_character_inside_is_refused_at_start(
    via, make_fake, adapter_paths, kubelet, start_sidecar, tmp_path
):
    fake = make_fake(api_key="secret")
    kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
    if via == "VLLM_API_KEY":
        sidecar = run(start_sidecar, kubelet.path, env={"VLLM_API_KEY": "sec\nret"})
    else:
        key_file = tmp_path / "api-key"
        key_file.write_text("sec\nret\n")
        sidecar = run(start_sidecar, kubelet.path, "--api-key-file", key_file)
    sidecar.wait_for(lambda: not sidecar.running, what="the sidecar refuses to start")
    assert sidecar.wait(5) == 2
    assert via in sidecar.log_text()
    assert not posts(fake.requests())


# ============================================================ every call counted


def test_a_load_that_times_out_is_counted_and_every_request_has_a_series(
    make_fake, adapter_paths, kubelet, start_sidecar
):
    fake = make_fake()
    fake.set_fault("slow_load", seconds=1.5)
    kubelet.write(lora_config(fake.port, adapter_paths(["a"])))
    sidecar = run(start_sidecar, kubelet.path, "--reconcile-trigger", "0.3", "--load-timeout", "0.5")

    sidecar.wait_for(
        lambda: sidecar.metrics().total("lora_sidecar_operations_total", op="load", result="timeout") >= 1,
        what='lora_sidecar_operations_total{op="load",result="timeout"} >= 1')
    m = sidecar.metrics()
    timeouts = m.total("lora_sidecar_operations_total", op="load", result="timeout")
    assert m.value("lora_sidecar_operation_duration_seconds_count", op="load") >= timeouts
    assert "no answer within" in (adapter(sidecar, "a")["last_error"] or "")
    assert not down_lines(sidecar), "a load that timed out is not the server going down"

    routes = m.label_values("lora_sidecar_http_requests_total", "route")
    sent = {e["path"] for e in fake.requests()}
    assert "/v1/models" in routes
    assert sent <= routes, f"requests sent but never counted: {sent - routes}"
    assert m.total("lora_sidecar_http_requests_total", route="/v1/models", code="200") >= 1
    assert m.total("lora_sidecar_http_requests_total", route=LOAD_PATH, code="timeout") >= 1
