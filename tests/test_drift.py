"""Process tests of proof and drift: the canary that tells a working adapter from an
inert one, and the report of what changed on the server behind the sidecar's back (adapters
foreign to the config, adapters lost without the sidecar's unload, a server restart).

sidecar.py runs as a process against the vLLM look-alike (tests/fake_vllm.py): make_adapter(...,
inert=True) makes an adapter whose completions are the base model's, fault "no_completions" a
server that cannot complete (an embedding model), set_adapters() and a direct unload another
client's changes. What is checked is what a user sees: /status, /metrics, /readyz, the JSON log
and the requests the server received.

Every wait is on a condition, with a generous deadline that measures nothing. Where a test shows
that something does NOT happen (no unload of a foreign adapter, no canary while in sync, no second
log line), it waits for a number of reconcile cycles, counted by the sidecar's own metric.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from fake_vllm import FakeVLLM, make_adapter
from sidecar_process import Sidecar, converge, loads, lora_config, unloads

StartSidecar = Callable[..., Sidecar]

COMPLETIONS = "/v1/completions"
FOREIGN = "lora_sidecar_foreign_adapters"
LOST = "lora_sidecar_adapter_lost_total"
CANARIES = "lora_sidecar_canary_total"
RECONCILES = "lora_sidecar_reconcile_total"


# --------------------------------------------------------------------------------- helpers


def run(start_sidecar: StartSidecar, config: Path, *flags: object) -> Sidecar:
    """A sidecar with JSON logs (so tests can count lines exactly) on `config`, a cycle every 0.2 s."""
    return start_sidecar(["--config", config, "--log-format", "json", "--reconcile-trigger", "0.2", *flags])


def said(sidecar: Sidecar, prefix: str) -> list[dict[str, Any]]:
    """The JSON log lines whose message starts with `prefix`."""
    return [line for line in sidecar.json_lines() if line["msg"].startswith(prefix)]


def wait_reconciles(sidecar: Sidecar, count: int) -> None:
    """Until `count` more reconcile cycles have ended, by the sidecar's own counter."""
    start = sidecar.metrics().total(RECONCILES)
    sidecar.wait_for(lambda: sidecar.metrics().total(RECONCILES) >= start + count, what=f"{count} more cycles")


def completions(fake: FakeVLLM, since: float = 0.0) -> list[dict[str, Any]]:
    """The bodies of the completions the server received since `since`."""
    return [e["body"] for e in fake.requests() if e["path"] == COMPLETIONS and e["t"] >= since]


def canary_result(sidecar: Sidecar, name: str) -> str | None:
    proof = sidecar.status()["adapters"][name]["canary"]
    return proof["result"] if proof else None


def wait_canaries(sidecar: Sidecar, results: dict[str, str]) -> None:
    sidecar.wait_for(lambda: all(canary_result(sidecar, k) == v for k, v in results.items()),
                     what=f"canary results {results}")


def canary_config(port: int, models: dict[str, str], **canary: Any) -> str:
    return lora_config(port, models, canary={"enabled": True, **canary})


# ============================================================ foreign adapters


def test_a_foreign_adapter_is_never_touched_shown_counted_and_logged_once_each_time_it_appears(
    fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a", "x"])
    kubelet.write(lora_config(fake.port, {"a": paths["a"]}))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, {"a": paths["a"]}, sidecar=sidecar)
    sidecar.wait_ready()
    assert sidecar.status()["foreign"] == [] and sidecar.metrics().value(FOREIGN) == 0

    fake.set_adapters({"x": paths["x"]})  # loaded by hand, behind the sidecar's back
    sidecar.wait_for(lambda: sidecar.status()["foreign"] == ["x"], what="x in /status foreign")
    assert sidecar.metrics().value(FOREIGN) == 1
    # Cycles by the period, by SIGHUP and by a config change: x stays, and is not logged again.
    wait_reconciles(sidecar, 3)
    sidecar.send_signal(signal.SIGHUP)
    wait_reconciles(sidecar, 2)
    kubelet.write(lora_config(fake.port, {"a": paths["a"]}, name="touched"))
    sidecar.wait_for(lambda: sidecar.status()["config"]["name"] == "touched", what="the touched config adopted")
    wait_reconciles(sidecar, 2)

    assert fake.adapters() == {"a": paths["a"], "x": paths["x"]}
    assert not unloads(fake.requests()) and not loads(fake.requests(), "x")
    status = sidecar.status()
    assert status["foreign"] == ["x"] and "x" not in status["adapters"] and status["in_sync"] is True
    assert sidecar.metrics().value(FOREIGN) == 1
    assert not sidecar.metrics().find("lora_sidecar_adapter_state", adapter="x")
    lines = said(sidecar, "foreign:")
    assert [(line["msg"].split()[1], line["adapter"], line["source"]) for line in lines] == [("x", "x", paths["x"])]
    assert not said(sidecar, "lost:"), "an adapter the sidecar never loaded cannot be lost"

    fake.set_adapters({"x": None})  # gone again: no longer foreign
    sidecar.wait_for(lambda: sidecar.status()["foreign"] == [], what="x gone from /status foreign")
    sidecar.wait_for(lambda: sidecar.metrics().value(FOREIGN) == 0, what="the foreign gauge back at 0")
    fake.set_adapters({"x": paths["x"]})  # back: news again, said once more
    sidecar.wait_for(lambda: len(said(sidecar, "foreign:")) == 2, what="x reported again when it comes back")
    assert not said(sidecar, "lost:")


# ============================================================ lost adapters and restarts


def test_an_adapter_another_client_unloads_is_reported_lost_alone_and_loaded_again(
    fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a", "b"])
    kubelet.write(canary_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, paths, sidecar=sidecar)
    sidecar.wait_ready()  # both seen loaded in /v1/models
    wait_canaries(sidecar, {"a": "verified", "b": "verified"})

    since = time.monotonic()
    gone = requests.post(f"{fake.url}/v1/unload_lora_adapter", json={"lora_name": "b"}, timeout=5)
    assert gone.status_code == 200, gone.text
    sidecar.wait_for(lambda: loads(fake.requests(), "b", since), what="b loaded again")
    converge(fake, paths, sidecar=sidecar)
    sidecar.wait_for(lambda: len(said(sidecar, "verified: b ")) == 2, what="b proven again after its reload")

    status = sidecar.status()["adapters"]
    assert (status["a"]["lost"], status["b"]["lost"]) == (0, 1)
    assert (status["a"]["state"], status["b"]["state"]) == ("loaded", "loaded")
    metrics = sidecar.metrics()
    assert (metrics.total(LOST, adapter="a"), metrics.value(LOST, adapter="b")) == (0, 1)
    [line] = said(sidecar, "lost:")
    assert line["level"] == "warning" and line["adapters"] == ["b"] and line["server_restarted"] is False
    assert line["msg"].startswith("lost: 1 of the 2 adapters loaded vanished without an unload")
    assert "restarted" not in line["msg"]
    assert not loads(fake.requests(), "a", since), "a stayed loaded: nothing to do for it"
    # The reload is a load like any other: b proven again (once, against the base model), a not.
    assert sorted(body["model"] for body in completions(fake, since)) == ["b", "base"]


def test_a_server_restart_loses_every_adapter_at_once_and_all_are_loaded_again(
    fake, adapter_paths, kubelet, start_sidecar
):
    paths = adapter_paths(["a", "b", "c"])
    kubelet.write(lora_config(fake.port, paths))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, paths, sidecar=sidecar)
    sidecar.wait_ready()

    since = time.monotonic()
    fake.restart(down_seconds=0.5)  # a real restart: the port closed a while, every adapter forgotten
    sidecar.wait_for(lambda: all(loads(fake.requests(), name, since) for name in paths), what="all loaded again")
    converge(fake, paths, sidecar=sidecar)
    sidecar.wait_for(lambda: sidecar.metrics().value("lora_sidecar_in_sync") == 1, what="in sync again")

    [line] = said(sidecar, "lost:")
    assert line["msg"] == ("lost: 3 of the 3 adapters loaded vanished without an unload; "
                           "all of them at once: the server restarted; loading them again"), line
    assert sorted(line["adapters"]) == ["a", "b", "c"] and line["server_restarted"] is True
    status = sidecar.status()
    assert {k: (v["state"], v["lost"]) for k, v in status["adapters"].items()} == dict.fromkeys(paths, ("loaded", 1))
    assert status["in_sync"] is True and status["foreign"] == []
    metrics = sidecar.metrics()
    assert {name: metrics.value(LOST, adapter=name) for name in paths} == dict.fromkeys(paths, 1)
    answered = [e["body"]["lora_name"] for e in loads(fake.requests(), since=since) if e["status"] == 200]
    assert sorted(answered) == sorted(paths), f"one successful load each: {answered}"


# ============================================================ the canary


@pytest.mark.parametrize("blocks", [False, True], ids=["inert-serves", "inert-blocks-readiness"])
def test_the_canary_tells_a_working_adapter_from_an_inert_one_once_and_then_stays_quiet(
    blocks, fake, kubelet, start_sidecar, tmp_path
):
    good = str(make_adapter(tmp_path / "good"))
    dull = str(make_adapter(tmp_path / "dull", inert=True))
    plain = str(make_adapter(tmp_path / "plain"))
    models = [{"id": "good", "source": good}, {"id": "dull", "source": dull},
              {"id": "plain", "source": plain, "canary": {"enabled": False}}]  # opted out
    kubelet.write(lora_config(fake.port, models, canary={"enabled": True, "prompt": "Ticket #1:",
                                                         "inertBlocksReadiness": blocks}))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, {"good": good, "dull": dull, "plain": plain}, sidecar=sidecar)
    wait_canaries(sidecar, {"good": "verified", "dull": "inert"})

    adapters = sidecar.status()["adapters"]
    assert [adapters[k]["state"] for k in ("good", "dull", "plain")] == ["loaded", "inert", "loaded"]
    assert adapters["good"]["canary"]["detail"] is None and adapters["plain"]["canary"] is None
    assert "dull and base answer" in adapters["dull"]["canary"]["detail"]
    metrics = sidecar.metrics()
    assert (metrics.state_of("good"), metrics.state_of("dull"), metrics.state_of("plain")) == \
        ("loaded", "inert", "loaded")
    assert {r: metrics.value(CANARIES, result=r) for r in ("verified", "inert", "unavailable")} == \
        {"verified": 1, "inert": 1, "unavailable": 0}
    assert [line["msg"] for line in said(sidecar, "verified:")] == ["verified: good answers unlike its base model"]
    [inert] = said(sidecar, "inert:")
    assert inert["msg"].startswith("inert: dull ") and inert["level"] == "warning"

    # One completion through each proven adapter and one (shared) through the base model, all at temperature 0.
    sent = completions(fake)
    assert sorted(body["model"] for body in sent) == ["base", "dull", "good"]
    assert all(body["temperature"] == 0 and body["prompt"] == "Ticket #1:" for body in sent)

    # In sync: no canary traffic however many cycles pass; the verdicts and readiness hold.
    wait_reconciles(sidecar, 4)
    assert completions(fake) == sent
    assert [canary_result(sidecar, k) for k in ("good", "dull")] == ["verified", "inert"]
    if blocks:
        assert sidecar.readyz() == 503, "an inert adapter must hold the pod out of rotation"
    else:
        sidecar.wait_ready()
    assert len(said(sidecar, "inert:")) == 1


def test_a_server_that_cannot_complete_leaves_the_adapter_loaded_and_the_canary_skipped_once(
    fake, adapter_paths, kubelet, start_sidecar
):
    fake.set_fault("no_completions")  # an embedding model: POST /v1/completions is 404
    paths = adapter_paths(["a"])
    kubelet.write(canary_config(fake.port, paths, inertBlocksReadiness=True))
    sidecar = run(start_sidecar, kubelet.path)
    converge(fake, paths, sidecar=sidecar)
    wait_canaries(sidecar, {"a": "unavailable"})
    sidecar.wait_ready()  # nothing to compare is no verdict: it does not hold readiness

    record = sidecar.status()["adapters"]["a"]
    assert record["state"] == "loaded" and "404" in record["canary"]["detail"]
    assert sidecar.metrics().value(CANARIES, result="unavailable") == 1
    tried = completions(fake)
    assert tried, "the canary must have been tried"
    wait_reconciles(sidecar, 4)
    assert completions(fake) == tried, "no retry while nothing changes"

    fake.set_adapters({"a": None})  # lost and loaded again: a new canary, skipped for the same reason
    sidecar.wait_for(lambda: sidecar.metrics().value(CANARIES, result="unavailable") == 2, what="a second canary")
    assert len(completions(fake)) > len(tried) and sidecar.status()["adapters"]["a"]["state"] == "loaded"
    [line] = said(sidecar, "canary skipped")  # the same reason is said once
    assert line["level"] == "warning" and line["adapter"] == "a" and "404" in line["error"]
