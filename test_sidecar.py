"""Unit tests: config rules, the plan, the client's reading of every vLLM answer, one reconcile cycle.

HTTP is mocked with `responses`, shaped after what a real vLLM 0.32 answers (the same
answers tests/fake_vllm.py gives, checked by tests/test_fake_vllm.py). Behaviour across processes is in tests/.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import responses
from fake_vllm import make_adapter, model_card
from kubelet import KubeletConfigDir
from remote_sources import UNSAFE_KINDS, tar_gz, unsafe_archive

import sidecar
from sidecar import (
    Action,
    Adapter,
    ConfigError,
    ConfigSource,
    DesiredState,
    Op,
    Plan,
    Reconciler,
    ServerError,
    ServerState,
    ServerUnreachable,
    Skip,
    VLLMClient,
    backoff_delay,
    inplace_is_safe,
    parse_config,
    parse_model_list,
    plan,
)

URL = "http://vllm.test:8000"


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        time.sleep(0.005)

BASE = "tiny"
BASE_ROOT = "/models/tiny"


def config(body: str) -> bytes:
    return body.encode()


def parse(text: str, validate: bool = True) -> DesiredState:
    return parse_config(text.encode(), "cfg.yaml", validate)


def errors_of(text: str, validate: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, validate)
    return caught.value.errors


GOOD = """
vLLMLoRAConfig:
  name: fleet-a
  host: vllm.test
  port: 8000
  defaultBaseModel: tiny
  ensureExist:
    models:
    - id: a1
      source: /adapters/a1
    - id: a2
      source: /adapters/a2
      base-model: other
    - id: old
      source: /adapters/old
      toRemove: true
  ensureNotExist:
    models:
    - id: gone
      source: /adapters/gone
"""


# ------------------------------------------------------------------ config


def test_good_config_is_read_with_defaults_and_base_models():
    desired = parse(GOOD)
    assert desired.name == "fleet-a"
    assert desired.server_url == "http://vllm.test:8000"
    assert desired.ensure_exist == (Adapter("a1", "/adapters/a1", "tiny"), Adapter("a2", "/adapters/a2", "other"))
    assert [a.id for a in desired.ensure_not_exist] == ["old", "gone"]
    assert len(desired.sha256) == 64


def test_minimal_config_takes_documented_defaults():
    desired = parse("vLLMLoRAConfig: {}")
    assert (desired.host, desired.port, desired.scheme) == ("localhost", 8000, "http")
    assert desired.ensure_exist == () and desired.ensure_not_exist == ()


def test_https_scheme_and_ipv6_host_make_a_valid_url():
    desired = parse("vLLMLoRAConfig: {scheme: https, host: '::1', port: 8443}")
    assert desired.server_url == "https://[::1]:8443"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("other: 1", "cfg.yaml: vLLMLoRAConfig: required field is missing"),
        ("vLLMLoRAConfig: {ensureExists: {models: []}}", "cfg.yaml: vLLMLoRAConfig.ensureExists: unknown field"),
        ("vLLMLoRAConfig: {ensureExist: {models: [{id: a, source: s, base_model: b}]}}",
         "cfg.yaml: vLLMLoRAConfig.ensureExist.models[0].base_model: unknown field"),
        ("vLLMLoRAConfig: {ensureExist: {model: []}}", "cfg.yaml: vLLMLoRAConfig.ensureExist.model: unknown field"),
        ("vLLMLoRAConfig: {ensureExist: {}}", "cfg.yaml: vLLMLoRAConfig.ensureExist.models: required field is missing"),
        ("vLLMLoRAConfig: {}\nextra: 1", "cfg.yaml: extra: unknown field"),
        ("vLLMLoRAConfig: {port: 0}", "cfg.yaml: vLLMLoRAConfig.port: 0 is less than the minimum of 1"),
        ("vLLMLoRAConfig: {port: 65536}", "cfg.yaml: vLLMLoRAConfig.port: 65536 is greater than the maximum"),
        ("vLLMLoRAConfig: {port: '8000'}", "cfg.yaml: vLLMLoRAConfig.port: expected integer, got"),
        ("vLLMLoRAConfig: {scheme: ftp}", "cfg.yaml: vLLMLoRAConfig.scheme: 'ftp' is not one of"),
        ("vLLMLoRAConfig: {host: 5}", "cfg.yaml: vLLMLoRAConfig.host: expected string, got int 5"),
        ("vLLMLoRAConfig: {ensureExist: {models: [{id: a}]}}",
         "cfg.yaml: vLLMLoRAConfig.ensureExist.models[0].source: required field is missing"),
        ("vLLMLoRAConfig: {ensureExist: {models: [{id: '', source: s}]}}",
         "cfg.yaml: vLLMLoRAConfig.ensureExist.models[0].id: must not be empty"),
        ("vLLMLoRAConfig: {ensureNotExist: {models: [{id: a, source: ''}]}}",
         "cfg.yaml: vLLMLoRAConfig.ensureNotExist.models[0].source: must not be empty"),
        ("vLLMLoRAConfig: {ensureExist: {models: [{id: a, source: s, toRemove: 'yes'}]}}",
         "cfg.yaml: vLLMLoRAConfig.ensureExist.models[0].toRemove: expected boolean"),
        ("vLLMLoRAConfig: {ensureExist: {models: [{id: 7, source: s}]}}",
         "cfg.yaml: vLLMLoRAConfig.ensureExist.models[0].id: expected string, got int 7"),
        ("vLLMLoRAConfig: {ensureExist: {models: {id: a}}}",
         "cfg.yaml: vLLMLoRAConfig.ensureExist.models: expected array"),
        ("[1, 2]", "cfg.yaml: (top level): expected object, got list"),
        ("vLLMLoRAConfig: [1]", "cfg.yaml: vLLMLoRAConfig: expected object"),
        ("vLLMLoRAConfig: {defaultBaseModel: ''}", "cfg.yaml: vLLMLoRAConfig.defaultBaseModel: must not be empty"),
    ],
)
def test_schema_errors_name_the_file_and_the_field(text, expected):
    assert any(e.startswith(expected) for e in errors_of(text)), errors_of(text)


def test_every_schema_error_is_reported_at_once():
    errors = errors_of("vLLMLoRAConfig: {port: 0, scheme: ftp, ensureExists: {}}")
    assert len(errors) == 3


def test_unknown_field_error_lists_what_is_allowed():
    (error,) = errors_of("vLLMLoRAConfig: {ensureExists: {}}")
    assert "expected one of: canary, defaultBaseModel, ensureExist, ensureNotExist, host, name, port, scheme" in error


@pytest.mark.parametrize("validate", [True, False])
def test_id_listed_twice_in_one_list_names_both_entries(validate):
    text = "vLLMLoRAConfig: {ensureExist: {models: [{id: a, source: s}, {id: b, source: s}, {id: a, source: t}]}}"
    assert errors_of(text, validate) == [
        "cfg.yaml: vLLMLoRAConfig.ensureExist.models[0] and vLLMLoRAConfig.ensureExist.models[2] both name adapter 'a'"
    ]


@pytest.mark.parametrize("validate", [True, False])
def test_id_in_both_lists_names_both_entries(validate):
    text = """
vLLMLoRAConfig:
  ensureExist: {models: [{id: a, source: s}]}
  ensureNotExist: {models: [{id: b, source: s}, {id: a, source: s}]}
"""
    assert errors_of(text, validate) == [
        "cfg.yaml: vLLMLoRAConfig.ensureExist.models[0] and vLLMLoRAConfig.ensureNotExist.models[1]"
        " both name adapter 'a'"
    ]


def test_to_remove_entry_counts_as_ensure_not_exist_for_conflicts():
    text = """
vLLMLoRAConfig:
  ensureExist: {models: [{id: a, source: s, toRemove: true}]}
  ensureNotExist: {models: [{id: a, source: s}]}
"""
    assert "both name adapter 'a'" in errors_of(text)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vLLMLoRAConfig: {port: '80'}", "vLLMLoRAConfig.port: expected integer"),
        ("vLLMLoRAConfig: {scheme: ftp}", "vLLMLoRAConfig.scheme: 'ftp' is not one of ['http', 'https']"),
        ("vLLMLoRAConfig: {ensureExist: {models: [{id: a}]}}",
         "vLLMLoRAConfig.ensureExist.models[0].source: required field is missing"),
        ("vLLMLoRAConfig: {ensureExist: 3}", "vLLMLoRAConfig.ensureExist: expected object"),
        ("vLLMLoRAConfig: {ensureExist: {models: [5]}}", "vLLMLoRAConfig.ensureExist.models[0]: expected object"),
        ("vLLMLoRAConfig: {ensureExist: {models: [{id: a, source: s, toRemove: 'yes'}]}}",
         "vLLMLoRAConfig.ensureExist.models[0].toRemove: expected boolean, got yes"),
        ("- 1", "(top level): expected object"),
    ],
)
def test_without_schema_validation_the_types_hold_in_the_same_words(text, expected):
    assert expected in errors_of(text, validate=False)[0]
    assert errors_of(text, validate=False) == errors_of(text, validate=True)


def test_without_schema_validation_unknown_keys_pass():
    desired = parse("vLLMLoRAConfig: {ensureExist: {models: [{id: a, source: s, extra: 1}]}, more: 2}", False)
    assert [a.id for a in desired.ensure_exist] == ["a"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "cfg.yaml: the file is empty"),
        ("   \n\n", "cfg.yaml: the file is empty"),
        ("vLLMLoRAConfig: {port: 8000\n", "cfg.yaml: invalid YAML at line 2"),
        ("vLLMLoRAConfig:\n  - a\n b: c", "cfg.yaml: invalid YAML at line 3"),
        ("{? [a, b] : 1}", "cfg.yaml: invalid YAML"),
        ("1: {vLLMLoRAConfig: {}}", "cfg.yaml: mapping key '1' at line 1 is read as int, not a string; quote it"),
        ("[" * 5000 + "]" * 5000, "cfg.yaml: "),
        ("a: " + "[" * 80 + "]" * 80, "cfg.yaml: the document nests deeper than 64 levels"),
        ("---\na: 1\n---\nb: 2\n", "cfg.yaml: invalid YAML"),
    ],
)
def test_unparseable_documents_are_config_errors(text, expected):
    assert errors_of(text)[0].startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes: 1\nvLLMLoRAConfig: {}", "cfg.yaml: mapping key 'yes' at line 1 is read as bool, not a string"),
        ("k: &k 7\nvLLMLoRAConfig: {}\n*k : 2", "cfg.yaml: mapping key '*k' at line 3 is read as int"),
        ("vLLMLoRAConfig: {port: 1234567890123456789}", "cfg.yaml: a number has more than 18 digits"),
        ('{"vLLMLoRAConfig": {"port": 1234567890123456789}}', "cfg.yaml: a number has more than 18 digits"),
        ('{"a": ' * 65 + "1" + "}" * 65, "cfg.yaml: the document nests deeper than 64 levels"),
        ('{"a": [' + "0, " * 100_000 + "0]}", "cfg.yaml: the document expands to more than 100000 values"),
    ],
)
def test_json_and_yaml_meet_the_same_bounds(text, expected):
    assert errors_of(text)[0].startswith(expected)


@pytest.mark.parametrize(
    ("name", "json_text"),
    [
        ("😀", r'"\ud83d\ude00"'),  # an escaped surrogate pair: the YAML parser refuses the escape
        ("\\ud800x", r'"\\ud800x"'),  # an escaped backslash, then text that looks like an escape
    ],
)
def test_json_the_yaml_parser_cannot_read_is_still_read(name, json_text):
    text = '{\n\t"vLLMLoRAConfig": {\n\t\t"name": ' + json_text + "\n\t}\n}"  # tabs: not YAML
    assert parse(text).name == name


def test_yaml_alias_bomb_is_refused_quickly():
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    assert "expands to more than 100000 values" in errors_of("\n".join(lines))[0]


def test_configmap_manifest_is_unwrapped():
    manifest = Path(__file__).with_name("configmap.yaml").read_bytes()
    desired = parse_config(manifest, "configmap.yaml")
    assert [a.id for a in desired.ensure_exist] == ["qwen-uncensored-1", "qwen-uncensored-2"]
    assert desired.ensure_exist[0].base_model == "Qwen/Qwen3-32B"


def test_configmap_errors_name_the_data_key():
    manifest = "kind: ConfigMap\ndata:\n  lora.yaml: |\n    vLLMLoRAConfig: {port: 0}\n"
    assert errors_of(manifest)[0].startswith("cfg.yaml (data.lora.yaml): vLLMLoRAConfig.port:")


@pytest.mark.parametrize(
    "manifest", ["kind: ConfigMap\n", "kind: ConfigMap\ndata: {}\n", "kind: ConfigMap\ndata: {a: 'x: 1'}\n"]
)
def test_configmap_without_our_document_is_an_error(manifest):
    assert "data:" in errors_of(manifest)[0]


def test_read_config_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the file"):
        sidecar.read_config(tmp_path / "nope.yaml")


def test_oversized_file_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (sidecar.MAX_CONFIG_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than"):
        sidecar.read_config(big)


def test_schema_is_found_next_to_the_script_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sidecar.config_schema.cache_clear()
    assert errors_of("vLLMLoRAConfig: {port: 0}")


# -------------------------------------------------------------------- plan

A1 = Adapter("a1", "/adapters/a1")
A2 = Adapter("a2", "/adapters/a2")
GONE = Adapter("gone", "/adapters/gone")


def desired_state(keep=(), drop=(), default_base=None) -> DesiredState:
    return DesiredState("vllm.test", 8000, "http", "t", default_base, tuple(keep), tuple(drop))


def server_state(adapters=None, bases=(BASE,), roots=(BASE_ROOT,)) -> ServerState:
    return ServerState(tuple(bases), frozenset(roots), dict(adapters or {}))


@pytest.mark.parametrize(
    ("name", "desired", "server", "actions", "skipped"),
    [
        ("nothing wanted, nothing there", desired_state(), server_state(), [], []),
        ("missing adapter is loaded", desired_state([A1]), server_state(), [(Op.LOAD, "a1")], []),
        ("listed adapter is left alone", desired_state([A1]), server_state({"a1": "/adapters/a1"}), [], []),
        ("other source is reloaded", desired_state([A1]), server_state({"a1": "/old"}), [(Op.RELOAD, "a1")], []),
        ("unknown source is left alone", desired_state([A1]), server_state({"a1": None}), [], []),
        ("listed ensureNotExist is unloaded", desired_state(drop=[GONE]), server_state({"gone": "/x"}),
         [(Op.UNLOAD, "gone")], []),
        ("absent ensureNotExist needs nothing", desired_state(drop=[GONE]), server_state(), [], []),
        ("adapters the config does not name are never touched", desired_state([A1]),
         server_state({"a1": "/adapters/a1", "theirs": "/t"}), [], []),
        ("unloads come first, then reloads, then loads",
         desired_state([A1, A2], [GONE]), server_state({"gone": "/g", "a2": "/old"}),
         [(Op.UNLOAD, "gone"), (Op.RELOAD, "a2"), (Op.LOAD, "a1")], []),
        ("base model served by id", desired_state([Adapter("a1", "/s", "tiny")]), server_state(),
         [(Op.LOAD, "a1")], []),
        ("base model served by root", desired_state([Adapter("a1", "/s", BASE_ROOT)]), server_state(),
         [(Op.LOAD, "a1")], []),
        ("adapter for another base model is skipped", desired_state([Adapter("a1", "/s", "big")]), server_state(),
         [], ["a1"]),
        ("skipped even if loaded with another source", desired_state([Adapter("a1", "/s", "big")]),
         server_state({"a1": "/old"}), [], ["a1"]),
        ("a server with no base model serves no wanted base", desired_state([Adapter("a1", "/s", "tiny")]),
         server_state(bases=(), roots=()), [], ["a1"]),
        ("ensureNotExist is unloaded whatever its base model", desired_state(drop=[Adapter("g", "/s", "big")]),
         server_state({"g": "/s"}), [(Op.UNLOAD, "g")], []),
        ("a root listed with a trailing slash is the same source", desired_state([A1]),
         server_state({"a1": "/adapters/a1/"}), [], []),
        ("a source written with a trailing slash is the same source", desired_state([Adapter("a1", "/a/")]),
         server_state({"a1": "/a"}), [], []),
        ("a leftover staging copy of a named adapter is unloaded", desired_state([A1]),
         server_state({"a1": "/adapters/a1", "a1~staging": "/new"}), [(Op.UNLOAD, "a1~staging")], []),
        ("a staging-like name of an adapter the config does not name is left alone", desired_state([A1]),
         server_state({"a1": "/adapters/a1", "b~staging": "/new"}), [], []),
    ],
)
def test_plan(name, desired, server, actions, skipped):
    planned = plan(desired, server)
    assert [(a.op, a.adapter.id) for a in planned.actions] == actions, name
    assert [s.adapter.id for s in planned.skipped] == skipped, name


def test_skip_reason_names_wanted_and_served_base_models():
    (skip,) = plan(desired_state([Adapter("a1", "/s", "big")]), server_state()).skipped
    assert skip.reason == "wants base model 'big'; the server serves tiny"


def test_reload_reason_names_the_servers_source():
    (action,) = plan(desired_state([A1]), server_state({"a1": "/old"})).actions
    assert action == Action(Op.RELOAD, A1, "the server has source '/old'")


# ------------------------------------------------- what an answer or a list does to a record


def record(**fields) -> sidecar.AdapterRecord:
    return sidecar.AdapterRecord(fields.pop("adapter", A1), wanted=fields.pop("wanted", True), **fields)


State = sidecar.State
NOTHING, FAILED, LOST = sidecar.Seen.NOTHING, sidecar.Seen.FAILED, sidecar.Seen.LOST
CANARY = sidecar.Canary("Once upon a time", 8, 30.0)


@pytest.mark.parametrize(
    ("name", "before", "listed", "planned", "skip", "after", "seen"),
    [
        ("listed as wanted: loaded, failures forgotten", record(state=State.FAILED, failures=3, last_error="x"),
         "/adapters/a1", False, None, dict(state=State.LOADED, failures=0, last_error=None), NOTHING),
        ("an ensureNotExist adapter not listed: absent", record(wanted=False), None, False, None,
         dict(state=State.ABSENT), NOTHING),
        ("still to do, never failed: pending", record(), None, True, None,
         dict(state=State.PENDING), NOTHING),
        ("still to do after a failure: stays failed", record(state=State.FAILED, failures=1), None, True, None,
         dict(state=State.FAILED, failures=1), NOTHING),
        ("a 200 not borne out once: pending, one doubt", record(state=State.LOADED, unconfirmed=Op.LOAD), None,
         True, None, dict(state=State.PENDING, doubts=1, failures=0), NOTHING),
        ("a 200 not borne out twice: failed", record(state=State.LOADED, unconfirmed=Op.LOAD, doubts=1), None,
         True, None, dict(state=State.FAILED, doubts=2, failures=1,
                          last_error="load answered 200 but /v1/models does not list it"), FAILED),
        ("a reload not borne out twice names what is listed", record(unconfirmed=Op.RELOAD, doubts=1), "/old",
         True, None, dict(last_error="reload answered 200 but /v1/models still lists source '/old'"), FAILED),
        ("a 200 borne out: doubts forgotten", record(unconfirmed=Op.LOAD, doubts=1), "/adapters/a1", False, None,
         dict(state=State.LOADED, doubts=0, unconfirmed=None), NOTHING),
        ("not for this server: skipped, with the reason", record(state=State.FAILED, last_error="x"), None, False,
         "wants base model 'big'", dict(state=State.SKIPPED, skip_reason="wants base model 'big'", last_error=None),
         NOTHING),
        ("loaded and seen so, now gone without an unload: lost", record(state=State.LOADED), None, True, None,
         dict(state=State.PENDING, lost=1), LOST),
        ("inert and gone: lost too", record(state=State.INERT), None, True, None, dict(lost=1), LOST),
        ("answered 200, not listed yet: not lost", record(state=State.LOADED, unconfirmed=Op.LOAD), None, True, None,
         dict(lost=0), NOTHING),
        ("a load seen through after a change: the canary is due",
         record(state=State.LOADED, unconfirmed=Op.LOAD, adapter=replace(A1, canary=CANARY)), "/adapters/a1", False,
         None, dict(canary_due=True, state=State.LOADED), NOTHING),
        ("no canary configured: none due", record(state=State.LOADED, unconfirmed=Op.LOAD), "/adapters/a1", False,
         None, dict(canary_due=False), NOTHING),
        ("inert stays inert while nothing changes", record(state=State.INERT), "/adapters/a1", False, None,
         dict(state=State.INERT), NOTHING),
    ],
)
def test_what_a_model_list_does_to_a_record(name, before, listed, planned, skip, after, seen):
    assert before.observe(listed, planned, skip, now=100.0, period=5.0) is seen, name
    assert {k: getattr(before, k) for k in after} == after, name


def test_a_failure_backs_off_doubling_and_is_news_only_when_the_error_changes():
    r = record()
    assert r.fail(Op.LOAD, "500: bad", now=0.0, period=5.0, permanent=True)
    assert (r.state, r.retry_at, r.permanent, r.last_action) == (State.FAILED, 5.0, True, Op.LOAD)
    assert not r.fail(Op.LOAD, "500: bad", now=5.0, period=5.0) and r.retry_at == 15.0 and not r.permanent
    assert r.fail(Op.LOAD, "503: busy", now=15.0, period=5.0)


def test_a_download_starts_once_and_its_failure_counts_as_the_adapters():
    r = record()
    assert r.start_download(now=0.0) and r.download["state"] == "downloading"
    assert not r.start_download(now=1.0)  # under way: not started twice
    broken = sidecar.Download(r.adapter, Path("/d/a@0"), sidecar.FetchError("sha256 mismatch", permanent=True),
                              10, 0.5, "ab")
    assert r.take_download(broken, now=2.0, period=5.0)  # news: report it
    assert (r.state, r.permanent, r.last_action, r.retry_at) == (State.FAILED, True, Op.DOWNLOAD, 7.0)
    assert r.download["state"] == "failed" and not r.start_download(now=3.0)  # backing off
    assert not r.take_download(broken, now=7.0, period=5.0)  # the same error again: not news
    good = sidecar.Download(r.adapter, Path("/d/a@0"), None, 10, 0.5, "ab")
    assert not r.take_download(good, now=8.0, period=5.0) and r.download["state"] == "done"


def test_a_200_after_200s_to_no_effect_does_not_clear_the_failure():
    r = record(state=State.FAILED, failures=2, doubts=2, last_error="load answered 200 but ...")
    assert not r.succeed(Op.LOAD) and r.state is State.FAILED and r.failures == 2 and r.unconfirmed is Op.LOAD
    fresh = record(state=State.FAILED, failures=2, last_error="404: none")
    assert fresh.succeed(Op.LOAD) and fresh.state is State.LOADED and fresh.last_error is None


@pytest.mark.parametrize(("records", "ready"), [
    ({}, True),
    ({"a": record(state=State.LOADED)}, True),
    ({"a": record(state=State.LOADED, unconfirmed=Op.LOAD)}, False),  # not until the list bears it out
    ({"a": record(state=State.SKIPPED)}, True),
    ({"a": record(state=State.FAILED, permanent=True)}, True),
    ({"a": record(state=State.FAILED, permanent=False)}, False),
    ({"a": record(state=State.PENDING)}, False),
    ({"a": record(state=State.PENDING, wanted=False)}, True),  # ensureNotExist never holds readiness
])
def test_readiness(records, ready):
    assert sidecar.is_ready(records) is ready


TWO_LOADS = Plan((Action(Op.LOAD, A1, ""), Action(Op.LOAD, A2, "")))


@pytest.mark.parametrize(("name", "actions", "succeeded", "fetching", "in_sync"), [
    ("nothing to do", Plan(), 0, (), True),
    ("only a skipped adapter", Plan(skipped=(Skip(A1, "not for this server"),)), 0, (), True),
    ("every action answered 200", TWO_LOADS, 2, (), True),
    ("one failed or is backing off", TWO_LOADS, 1, (), False),
    ("nothing to send, but an adapter waits for its files", Plan(), 0, ("r",), False),
])
def test_in_sync(name, actions, succeeded, fetching, in_sync):
    assert sidecar.is_in_sync(actions, succeeded, fetching) is in_sync, name


def test_due_actions_skip_those_backing_off():
    waiting, free = record(retry_at=50.0), record(retry_at=10.0)
    actions = [Action(Op.LOAD, Adapter("w", "/w"), ""), Action(Op.LOAD, Adapter("f", "/f"), ""),
               Action(Op.UNLOAD, Adapter("x~staging", "/x"), "")]
    due = sidecar.due_actions(actions, {"w": waiting, "f": free}, now=20.0)
    assert [a.adapter.id for a in due] == ["f", "x~staging"]


def test_plan_after_applying_it_is_empty():
    desired = desired_state([A1, A2, Adapter("x", "/x", "big")], [GONE])
    adapters = {"gone": "/g", "a2": "/old", "theirs": "/t"}
    for action in plan(desired, server_state(adapters)).actions:
        if action.op is Op.UNLOAD:
            del adapters[action.adapter.id]
        else:
            adapters[action.adapter.id] = action.adapter.source
    assert plan(desired, server_state(adapters)).actions == ()
    assert adapters["theirs"] == "/t"
    assert plan(desired, server_state(adapters)).skipped == (Skip(Adapter("x", "/x", "big"),
                                                                  "wants base model 'big'; the server serves tiny"),)


@pytest.mark.parametrize(("failures", "delay"), [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (1000, 300)])
def test_backoff_doubles_from_the_period_up_to_five_minutes(failures, delay):
    assert backoff_delay(failures, 5) == delay


# ------------------------------------------------------------------ client


def models_body(*adapters: tuple[str, str]) -> dict:
    data = [{"id": BASE, "object": "model", "created": 1, "owned_by": "vllm", "root": BASE_ROOT, "parent": None,
             "max_model_len": 128, "permission": []}]
    data += [{"id": name, "object": "model", "created": 1, "owned_by": "vllm", "root": root, "parent": BASE,
              "max_model_len": None, "permission": []} for name, root in adapters]
    return {"object": "list", "data": data}


def vllm_error(message: str, code: int, kind: str = "BadRequestError") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def loaded_message(name: str) -> str:
    return (f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
            "set 'load_inplace' to True.")


LOAD = f"{URL}/v1/load_lora_adapter"
UNLOAD = f"{URL}/v1/unload_lora_adapter"
MODELS = f"{URL}/v1/models"


@pytest.fixture
def client() -> VLLMClient:
    c = VLLMClient(requests.Session(), timeout=2.0)
    c.base_url = URL
    return c


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def plain_text(rsps, method, url, status, text):
    """vLLM's success answers are plain text with no Content-Type header at all."""
    rsps.add(method, url, status=status, body=text, content_type=None)


def test_models_are_split_into_base_models_and_adapters(client, mocked):
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1")))
    state = client.server_state()
    assert state.base_models == (BASE,)
    assert state.serves(BASE_ROOT)
    assert dict(state.adapters) == {"a1": "/adapters/a1"}


@pytest.mark.parametrize(
    "body",
    [[], {"data": 5}, {"object": "list"}, {"data": [5]}, {"data": [{"root": "x"}]},
     {"data": [{"id": 3}]}, {"data": [{"id": "a", "root": 5, "parent": None}]},
     {"data": [{"id": "a", "root": "r", "parent": ["x"]}]}],
)
def test_unexpected_model_lists_are_refused_whole(body):
    with pytest.raises(ValueError):
        parse_model_list(body)


def test_model_list_that_is_not_json_is_a_server_error(client, mocked):
    plain_text(mocked, "GET", MODELS, 200, "<html>oops</html>")
    with pytest.raises(ServerError, match="unexpected body"):
        client.server_state()


def vllm_list(adapters: dict[str, str], created: int) -> bytes:
    """A list as vLLM writes it: compact, every `created` and permission id new on each answer."""
    cards = [model_card(BASE, BASE_ROOT, None, 128, created)]
    cards += [model_card(name, root, BASE, None, created) for name, root in adapters.items()]
    return json.dumps({"object": "list", "data": cards}, separators=(",", ":")).encode()


def states_of(client, mocked, *bodies: bytes) -> list[ServerState]:
    for body in bodies:
        mocked.get(MODELS, body=body, content_type="application/json")
    return [client.server_state() for _ in bodies]


@pytest.mark.parametrize(("before", "after"), [
    ({"a1": "/a/1"}, {"a1": "/a/1", "a2": "/a/2"}),  # an adapter appeared
    ({"a1": "/a/1", "a2": "/a/2"}, {"a1": "/a/1"}),  # one went (a vLLM restart looks like this)
    ({"a1": "/a/1"}, {"a1": "/a/1v2"}),  # a new version
    ({"modelperm-0a": "/a/1"}, {"modelperm-0b": "/a/1"}),  # ids that look like permission ids
])
def test_every_change_to_the_adapters_is_seen_though_all_stamps_changed_too(client, mocked, before, after):
    _, state = states_of(client, mocked, vllm_list(before, 100), vllm_list(after, 101))
    assert dict(state.adapters) == after


def test_a_broken_copy_of_a_good_list_is_still_an_error(client, mocked):
    good = vllm_list({"a1": "/a/1"}, 100)
    mocked.get(MODELS, body=good, content_type="application/json")
    mocked.get(MODELS, body=good + b'"created":1', content_type="application/json")
    client.server_state()
    with pytest.raises(ServerError, match="unexpected body"):
        client.server_state()


def test_model_list_5xx_is_a_server_error(client, mocked):
    mocked.get(MODELS, status=500, json=vllm_error("boom", 500))
    with pytest.raises(ServerError, match="answered 500: boom"):
        client.server_state()


def test_401_without_key_says_a_key_is_needed(client, mocked):
    mocked.get(MODELS, status=401, json={"error": "Unauthorized"})
    with pytest.raises(ServerError, match="requires an API key; set VLLM_API_KEY or --api-key-file"):
        client.server_state()


def test_401_with_key_says_it_was_refused(mocked):
    c = VLLMClient(requests.Session(), 2.0, api_key="wrong-key")
    c.base_url = URL
    mocked.get(MODELS, status=401, json={"error": "Unauthorized"})
    with pytest.raises(ServerError) as caught:
        c.server_state()
    assert "refused" in str(caught.value) and "wrong-key" not in str(caught.value)


def test_api_key_is_sent_as_bearer_on_every_call(mocked):
    c = VLLMClient(requests.Session(), 2.0, api_key="k-123")
    c.base_url = URL
    mocked.get(MODELS, json=models_body())
    plain_text(mocked, "POST", LOAD, 200, "Success: LoRA adapter 'a1' added successfully.")
    c.server_state()
    c.load(A1)
    assert [call.request.headers["Authorization"] for call in mocked.calls] == ["Bearer k-123"] * 2


def test_load_success_is_plain_text_without_content_type(client, mocked):
    plain_text(mocked, "POST", LOAD, 200, "Success: LoRA adapter 'a1' added successfully.")
    outcome = client.load(A1)
    assert outcome.ok and outcome.message == "Success: LoRA adapter 'a1' added successfully."
    assert json.loads(mocked.calls[0].request.body) == {"lora_name": "a1", "lora_path": "/adapters/a1"}


def test_load_already_loaded_counts_as_loaded(client, mocked):
    mocked.post(LOAD, status=400, json=vllm_error(loaded_message("a1"), 400))
    assert client.load(A1).ok


def test_inplace_load_sends_the_flag(client, mocked):
    plain_text(mocked, "POST", LOAD, 200, "Success: LoRA adapter 'a1' added successfully.")
    assert client.load(A1, inplace=True).ok
    assert json.loads(mocked.calls[0].request.body)["load_inplace"] is True


def test_inplace_load_refused_by_older_vllm_is_flagged(client, mocked):
    mocked.post(LOAD, status=400, json=vllm_error(loaded_message("a1"), 400))
    outcome = client.load(A1, inplace=True)
    assert not outcome.ok and outcome.inplace_refused


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (404, "Loading lora a1 failed: No adapter found for <path>"),
        (500, "Loading lora a1 failed: LoRA rank 16 is greater than max_lora_rank 8."),
        (400, "Both 'lora_name' and 'lora_path' must be provided."),
        (400, "The lora adapter name 'tiny' conflicts with a served base model."),
    ],
)
def test_load_failures_carry_the_servers_reason(client, mocked, status, message):
    mocked.post(LOAD, status=status, json=vllm_error(message, status))
    outcome = client.load(A1)
    assert (outcome.ok, outcome.status, outcome.message) == (False, status, message)


def test_load_500_without_json_body_still_fails_with_its_text(client, mocked):
    plain_text(mocked, "POST", LOAD, 500, "Internal Server Error")
    assert client.load(A1).message == "Internal Server Error"


def test_runtime_lora_off_names_the_variable(client, mocked):
    mocked.post(LOAD, status=404, json={"detail": "Not Found"})
    with pytest.raises(ServerError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"):
        client.load(A1)


def test_unload_success_and_unknown_both_mean_gone(client, mocked):
    plain_text(mocked, "POST", UNLOAD, 200, "Success: LoRA adapter 'a1' removed successfully.")
    mocked.post(UNLOAD, status=404, json=vllm_error("The lora adapter 'a1' cannot be found.", 404, "NotFoundError"))
    assert client.unload("a1").ok
    assert client.unload("a1").ok


def test_unload_with_runtime_lora_off_names_the_variable(client, mocked):
    mocked.post(UNLOAD, status=404, json={"detail": "Not Found"})
    with pytest.raises(ServerError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        client.unload("a1")


def test_unload_500_fails(client, mocked):
    mocked.post(UNLOAD, status=500, json=vllm_error("boom", 500))
    assert not client.unload("a1").ok


def test_health_is_none_when_200_else_the_reason(client, mocked):
    mocked.get(f"{URL}/health", status=200, body="")
    mocked.get(f"{URL}/health", status=503, body="")
    assert client.health() is None
    assert client.health() == "GET /health answered 503: no message"


@pytest.mark.parametrize(("error", "reason"), [
    (requests.ConnectionError("[Errno 111] Connection refused"), "connection refused"),
    (requests.ConnectionError("Failed to resolve 'x.invalid' (Name or service not known)"),
     "cannot resolve the host name"),
    (requests.exceptions.SSLError("[SSL: WRONG_VERSION_NUMBER] wrong version number"), "TLS handshake failed"),
    (requests.ConnectionError("('Connection aborted.', RemoteDisconnected('closed'))"), "closed without an answer"),
])
def test_health_says_why_the_server_cannot_be_reached(client, mocked, error, reason):
    mocked.get(f"{URL}/health", body=error)
    assert reason in client.health()


def test_version_is_read_from_the_version_route_or_none(client, mocked):
    mocked.get(f"{URL}/version", json={"version": "0.32.0"})
    mocked.get(f"{URL}/version", status=404, json={"detail": "Not Found"})
    assert client.version() == "0.32.0"
    assert client.version() is None


@pytest.mark.parametrize(("version", "safe"), [
    ("0.32.0", False), ("0.32.0+cpu", False), ("0.8.5", False), (None, False), ("nonsense", False),
    ("0.33.0", True), ("0.34.1rc1", True), ("1.0.0", True),
])
def test_load_inplace_is_used_only_where_vllm_resets_the_flag(version, safe):
    assert inplace_is_safe(version) is safe


def test_connection_refused_is_unreachable(client, mocked):
    mocked.get(MODELS, body=requests.ConnectionError("refused"))
    with pytest.raises(ServerUnreachable) as caught:
        client.server_state()
    assert not caught.value.timed_out


def test_timeout_is_unreachable_and_marked(client, mocked):
    mocked.post(LOAD, body=requests.ReadTimeout("slow"))
    with pytest.raises(ServerUnreachable, match="no answer within 600 s") as caught:
        client.load(A1)
    assert caught.value.timed_out


def test_a_load_sent_alongside_others_gets_an_allowance_for_each(client, mocked):
    plain_text(mocked, "POST", LOAD, 200, "Success")
    client.load(A1)
    client.load(A1, alongside=4)
    assert [call.request.req_kwargs["timeout"] for call in mocked.calls] == [600.0, 2400.0]


def test_loads_sent_together_each_get_an_allowance_for_the_whole_batch(client, mocked):
    mocked.get(MODELS, json=models_body())
    plain_text(mocked, "POST", LOAD, 200, "Success")
    reconciler(client).reconcile(desired_for(*(Adapter(f"a{i}", f"/a{i}") for i in range(6))))
    reconciler(client).reconcile(desired_for(A1))
    timeouts = [c.request.req_kwargs["timeout"] for c in mocked.calls if c.request.method == "POST"]
    assert timeouts == [2400.0] * 6 + [600.0]  # four in flight at most; a lone load gets exactly one


def test_every_call_has_a_timeout(client, mocked):
    mocked.get(MODELS, json=models_body())
    plain_text(mocked, "POST", LOAD, 200, "ok")
    plain_text(mocked, "POST", UNLOAD, 200, "ok")
    mocked.get(f"{URL}/health", status=200)
    client.server_state()
    client.load(A1)
    client.unload("a1")
    client.health()
    assert [call.request.req_kwargs["timeout"] for call in mocked.calls] == [2.0, 600.0, 2.0, 2.0]


# -------------------------------------------------------------- reconciler


def reconciler(client: VLLMClient, period: float = 5.0) -> Reconciler:
    r = Reconciler(client, period, health_check_timeout=300)
    r.server_up = True
    r._server_url = URL
    return r


def desired_for(*keep: Adapter, drop: tuple[Adapter, ...] = ()) -> DesiredState:
    return DesiredState("vllm.test", 8000, "http", "t", None, keep, drop)


def test_in_sync_cycle_sends_exactly_one_get(client, mocked):
    many = [Adapter(f"a{i}", f"/adapters/a{i}") for i in range(50)]
    mocked.get(MODELS, json=models_body(*[(a.id, a.source) for a in many]))
    result = reconciler(client).reconcile(desired_for(*many, drop=(GONE,)))
    assert result.in_sync and result.completed
    assert [(c.request.method, c.request.url) for c in mocked.calls] == [("GET", MODELS)]


def test_unknown_server_checks_health_first(client, mocked):
    mocked.get(f"{URL}/health", status=200)
    mocked.get(f"{URL}/version", json={"version": "0.32.0"})
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1")))
    r = Reconciler(client, 5.0, 300)
    r.reconcile(desired_for(A1))
    r.reconcile(desired_for(A1))
    assert [c.request.url for c in mocked.calls] == [f"{URL}/health", f"{URL}/version", MODELS, MODELS]
    assert r.status()["server"] == {"url": URL, "up": True, "version": "0.32.0", "error": None}


def test_one_failing_adapter_does_not_stop_the_others(client, mocked):
    bad = Adapter("bad", "/adapters/bad")
    mocked.get(MODELS, json=models_body())
    mocked.add_callback(
        "POST", LOAD,
        callback=lambda req: (500, {}, json.dumps(vllm_error("rank too big", 500)))
        if json.loads(req.body)["lora_name"] == "bad" else (200, {}, "Success"),
    )
    r = reconciler(client)
    result = r.reconcile(desired_for(bad, A1, A2))
    assert not result.in_sync and result.completed
    loads = [json.loads(c.request.body)["lora_name"] for c in mocked.calls if c.request.url == LOAD]
    assert sorted(loads) == ["a1", "a2", "bad"]
    assert r.records["bad"].state == "failed" and r.records["bad"].last_error == "500: rank too big"
    assert r.records["a1"].state == "loaded"
    assert not r.ready  # not before /v1/models bears the loads out
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1"), ("a2", "/adapters/a2")))
    r.reconcile(desired_for(bad, A1, A2))
    assert r.ready  # a permanent failure does not hold readiness back


def test_failed_adapter_waits_out_its_backoff(client, mocked, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(sidecar, "clock", lambda: now[0])
    mocked.get(MODELS, json=models_body())
    mocked.post(LOAD, status=404, json=vllm_error("No adapter found for <path>", 404))
    r = reconciler(client, period=5.0)
    desired = desired_for(A1)

    def loads_after(t: float) -> int:
        now[0] = t
        r.reconcile(desired)
        return sum(1 for c in mocked.calls if c.request.url == LOAD)

    assert loads_after(1000) == 1
    assert loads_after(1004.9) == 1  # backoff 5 s
    assert loads_after(1005) == 2
    assert loads_after(1014.9) == 2  # backoff 10 s
    assert loads_after(1015) == 3
    assert r.records["a1"].failures == 3


def test_changed_entry_resets_its_backoff(client, mocked):
    mocked.get(MODELS, json=models_body())
    mocked.post(LOAD, status=404, json=vllm_error("No adapter found for <path>", 404))
    r = reconciler(client)
    r.reconcile(desired_for(A1))
    r.reconcile(desired_for(Adapter("a1", "/adapters/fixed")))
    loads = [json.loads(c.request.body)["lora_path"] for c in mocked.calls if c.request.url == LOAD]
    assert loads == ["/adapters/a1", "/adapters/fixed"]


def sent_posts(mocked) -> list[tuple[str, dict]]:
    return [(c.request.url, json.loads(c.request.body)) for c in mocked.calls if c.request.method == "POST"]


STAGED_SWAP = [
    (LOAD, {"lora_name": "a1~staging", "lora_path": "/adapters/a1"}),
    (UNLOAD, {"lora_name": "a1~staging"}),
    (UNLOAD, {"lora_name": "a1"}),
    (LOAD, {"lora_name": "a1", "lora_path": "/adapters/a1"}),
]


@pytest.mark.parametrize("version", ["0.32.0", None])
def test_new_version_on_vllm_0_32_is_staged_then_unloaded_and_loaded_never_in_place(client, mocked, version):
    mocked.get(MODELS, json=models_body(("a1", "/old")))
    plain_text(mocked, "POST", LOAD, 200, "Success")
    plain_text(mocked, "POST", UNLOAD, 200, "Success")
    r = reconciler(client)
    r.server_version = version
    assert r.reconcile(desired_for(A1)).in_sync
    assert sent_posts(mocked) == STAGED_SWAP


def test_new_version_on_vllm_0_33_is_loaded_in_place(client, mocked):
    mocked.get(MODELS, json=models_body(("a1", "/old")))
    plain_text(mocked, "POST", LOAD, 200, "Success")
    r = reconciler(client)
    r.server_version = "0.33.0"
    assert r.reconcile(desired_for(A1)).in_sync
    assert sent_posts(mocked) == [(LOAD, {"lora_name": "a1", "lora_path": "/adapters/a1", "load_inplace": True})]


def test_in_place_refused_falls_back_to_the_staged_swap(client, mocked):
    mocked.get(MODELS, json=models_body(("a1", "/old")))
    mocked.post(LOAD, status=400, json=vllm_error(loaded_message("a1"), 400))
    plain_text(mocked, "POST", LOAD, 200, "Success")
    plain_text(mocked, "POST", UNLOAD, 200, "Success")
    r = reconciler(client)
    r.server_version = "0.33.0"
    assert r.reconcile(desired_for(A1)).in_sync
    inplace = (LOAD, {"lora_name": "a1", "lora_path": "/adapters/a1", "load_inplace": True})
    assert sent_posts(mocked) == [inplace, *STAGED_SWAP]


def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving(client, mocked):
    mocked.get(MODELS, json=models_body(("a1", "/old")))
    mocked.post(LOAD, status=404, json=vllm_error("Loading lora a1~staging failed: No adapter found", 404))
    r = reconciler(client)
    assert not r.reconcile(desired_for(A1)).in_sync
    assert sent_posts(mocked) == STAGED_SWAP[:1]  # the serving version was never unloaded
    record = r.records["a1"]
    assert record.state == "failed" and "the old one keeps serving" in record.last_error


def test_connection_error_mid_cycle_ends_it_without_guessing(client, mocked):
    many = [Adapter(f"a{i}", f"/adapters/a{i}") for i in range(20)]
    mocked.get(MODELS, json=models_body())
    mocked.post(LOAD, body=requests.ConnectionError("reset"))
    r = reconciler(client)
    result = r.reconcile(desired_for(*many))
    assert not result.completed and result.unreachable
    # Only the calls already in flight went out; nothing after the first failure.
    assert 1 <= sum(1 for c in mocked.calls if c.request.url == LOAD) <= sidecar.MAX_REQUESTS_IN_FLIGHT
    assert r.server_up is False
    assert all(record.failures == 0 for record in r.records.values())  # the adapters are not to blame


def test_an_unexpected_error_in_one_load_is_logged_and_retried_without_stopping_the_others(
        client, mocked, monkeypatch, caplog):
    mocked.get(MODELS, json=models_body())
    mocked.post(LOAD, body="Success")
    real_load = client.load

    def load(adapter, inplace=False, alongside=1):
        if adapter.id == "bad":
            raise KeyError("a bug")
        return real_load(adapter, inplace, alongside)

    monkeypatch.setattr(client, "load", load)
    r = reconciler(client)
    with caplog.at_level(logging.ERROR, logger="lora-sidecar"):
        result = r.reconcile(desired_for(Adapter("bad", "/adapters/bad"), A1, A2))
    assert result.completed and not result.in_sync
    assert r.records["a1"].state == r.records["a2"].state == "loaded"
    assert r.records["bad"].state == "failed" and r.records["bad"].retry_at is not None
    assert "KeyError" in r.records["bad"].last_error
    assert any(rec.getMessage() == "unexpected error" and rec.exc_info for rec in caplog.records)


def test_timed_out_load_is_blamed_so_the_others_go_first_next_time(client, mocked):
    mocked.get(MODELS, json=models_body())
    mocked.get(MODELS, json=models_body(("a2", "/adapters/a2")))
    mocked.add_callback(
        "POST", LOAD,
        callback=lambda req: (_ for _ in ()).throw(requests.ReadTimeout("slow"))
        if json.loads(req.body)["lora_name"] == "a1" else (200, {}, "Success"),
    )
    mocked.get(f"{URL}/health", status=200)
    r = reconciler(client)
    result = r.reconcile(desired_for(A1, A2))
    assert not result.unreachable and r.server_up  # a slow load is not a server that is down
    r.reconcile(desired_for(A1, A2))
    loads = [json.loads(c.request.body)["lora_name"] for c in mocked.calls if c.request.url == LOAD]
    assert loads.count("a1") == 1 and "a2" in loads  # a1 waits out its backoff; a2 went ahead
    assert r.records["a1"].state == "failed" and r.records["a2"].state == "loaded"
    assert "no answer within" in r.records["a1"].last_error


def test_a_load_answered_200_that_is_not_listed_fails_and_backs_off(client, mocked):
    mocked.get(MODELS, json=models_body())
    plain_text(mocked, "POST", LOAD, 200, "Success")
    r = reconciler(client, period=5.0)
    r.reconcile(desired_for(A1))
    assert r.records["a1"].state == "loaded"  # as far as the answer goes
    r.reconcile(desired_for(A1))  # once could be a restart in between: sent again
    assert r.records["a1"].state == "loaded" and len(sent_posts(mocked)) == 2
    result = r.reconcile(desired_for(A1))
    record = r.records["a1"]
    assert record.state == "failed" and record.last_error == "load answered 200 but /v1/models does not list it"
    assert not result.in_sync and len(sent_posts(mocked)) == 2  # backing off, not re-sent at once
    assert record.retry_at is not None and not sidecar.is_ready(r.records)


def test_an_unload_answered_200_that_stays_listed_fails(client, mocked):
    mocked.get(MODELS, json=models_body(("gone", "/g")))
    plain_text(mocked, "POST", UNLOAD, 200, "Success")
    r = reconciler(client)
    for _ in range(3):
        r.reconcile(desired_for(drop=(GONE,)))
    assert r.records["gone"].last_error == "unload answered 200 but /v1/models still lists it"


def test_a_reload_that_changes_nothing_listed_is_not_repeated_every_period(client, mocked):
    mocked.get(MODELS, json=models_body(("a1", "/old")))
    plain_text(mocked, "POST", LOAD, 200, "Success")
    r = reconciler(client)
    r.server_version = "0.33.0"
    for _ in range(4):
        r.reconcile(desired_for(A1))
    assert r.records["a1"].last_error == "reload answered 200 but /v1/models still lists source '/old'"
    assert len(sent_posts(mocked)) == 2


@pytest.mark.parametrize(("status", "ready"), [(404, True), (500, True), (400, True), (503, False), (429, False)])
def test_readiness_lets_only_permanent_failures_through(client, mocked, status, ready):
    mocked.get(MODELS, json=models_body())
    mocked.post(LOAD, status=status, json=vllm_error("failed", status))
    r = reconciler(client)
    r.reconcile(desired_for(A1))
    assert r.records["a1"].state == "failed" and r.ready is ready


def test_a_timed_out_load_does_not_make_the_sidecar_ready(client, mocked):
    mocked.get(MODELS, json=models_body())
    mocked.post(LOAD, body=requests.ReadTimeout("slow"))
    r = reconciler(client)
    r.reconcile(desired_for(A1))
    assert r.records["a1"].state == "failed" and not r.ready


def test_model_list_without_answer_while_health_is_fine_keeps_the_server_up(client, mocked):
    mocked.get(MODELS, body=requests.ConnectionError("('Connection aborted.', RemoteDisconnected('x'))"))
    mocked.get(f"{URL}/health", status=200)
    r = reconciler(client)
    result = r.reconcile(desired_for(A1))
    assert r.server_up and not result.unreachable and "closed without an answer" in result.error
    assert r.next_delay(0.1) == r.period


def test_every_action_is_counted_whatever_its_outcome(client, mocked):
    before = {result: metric("lora_sidecar_operations_total", op="load", result=result)
              for result in ("timeout", "error", "success")}
    mocked.get(MODELS, json=models_body())
    mocked.get(f"{URL}/health", status=200)
    mocked.add_callback("POST", LOAD, callback=lambda req: {
        "a1": lambda: (_ for _ in ()).throw(requests.ReadTimeout("slow")),
        "a2": lambda: (500, {}, json.dumps(vllm_error("bad", 500))),
    }.get(json.loads(req.body)["lora_name"], lambda: (200, {}, "Success"))())
    reconciler(client).reconcile(desired_for(A1, A2, Adapter("a3", "/adapters/a3")))
    after = {result: metric("lora_sidecar_operations_total", op="load", result=result)
             for result in ("timeout", "error", "success")}
    assert {k: after[k] - before[k] for k in after} == {"timeout": 1, "error": 1, "success": 1}


def metric(name: str, **labels: str) -> float:
    return sidecar.prom.REGISTRY.get_sample_value(name, labels) or 0.0


def test_garbage_model_list_changes_nothing(client, mocked):
    plain_text(mocked, "GET", MODELS, 200, "not json")
    r = reconciler(client)
    result = r.reconcile(desired_for(A1, drop=(GONE,)))
    assert result.error and "unexpected body" in result.error
    assert len(mocked.calls) == 1


def test_a_bug_in_a_cycle_is_logged_and_survived(client, mocked, monkeypatch, caplog):
    mocked.get(MODELS, json=models_body())
    monkeypatch.setattr(sidecar, "plan", lambda *_: 1 / 0)
    r = reconciler(client)
    result = r.reconcile(desired_for(A1))
    assert result.error and "ZeroDivisionError" in result.error


def test_loads_overlap_up_to_the_limit_and_no_further(client, mocked):
    in_flight, most = [0], [0]
    lock = threading.Lock()
    release = threading.Event()

    def slow_load(request):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            if in_flight[0] == sidecar.MAX_REQUESTS_IN_FLIGHT:
                release.set()
        release.wait(2)
        with lock:
            in_flight[0] -= 1
        return 200, {}, "Success"

    mocked.get(MODELS, json=models_body())
    mocked.add_callback("POST", LOAD, callback=slow_load)
    many = [Adapter(f"a{i}", f"/adapters/a{i}") for i in range(12)]
    r = reconciler(client)
    assert r.reconcile(desired_for(*many)).in_sync
    assert most[0] == sidecar.MAX_REQUESTS_IN_FLIGHT
    assert sum(1 for c in mocked.calls if c.request.url == LOAD) == 12


def test_unloads_finish_before_any_load_starts(client, mocked):
    mocked.get(MODELS, json=models_body(*[(f"g{i}", "/g") for i in range(6)]))
    plain_text(mocked, "POST", UNLOAD, 200, "Success")
    plain_text(mocked, "POST", LOAD, 200, "Success")
    drops = tuple(Adapter(f"g{i}", "/g") for i in range(6))
    reconciler(client).reconcile(desired_for(*[Adapter(f"a{i}", "/s") for i in range(6)], drop=drops))
    urls = [c.request.url for c in mocked.calls[1:]]
    assert urls == [UNLOAD] * 6 + [LOAD] * 6


def test_status_reports_each_adapter(client, mocked):
    mocked.get(MODELS, json=models_body(("gone", "/g")))
    mocked.post(LOAD, status=500, json=vllm_error("LoRA rank 16 is greater than max_lora_rank 8.", 500))
    plain_text(mocked, "POST", UNLOAD, 200, "Success")
    r = reconciler(client)
    r.reconcile(desired_for(A1, Adapter("x", "/x", "big"), drop=(GONE,)))
    adapters = r.status()["adapters"]
    assert adapters["a1"]["state"] == "failed"
    assert adapters["a1"]["last_error"] == "500: LoRA rank 16 is greater than max_lora_rank 8."
    assert adapters["a1"]["failures"] == 1 and adapters["a1"]["next_retry"]
    assert adapters["gone"] == {**adapters["gone"], "state": "absent", "last_action": "unload", "desired": "absent"}
    assert adapters["x"]["state"] == "skipped" and "'big'" in adapters["x"]["skip_reason"]


# ---------------------------------------------------------- config source


def test_config_source_follows_kubelet_swaps_and_keeps_last_good(tmp_path, caplog):
    folder = KubeletConfigDir(tmp_path / "config")
    folder.write("vLLMLoRAConfig: {ensureExist: {models: [{id: a1, source: /s}]}}")
    source = ConfigSource(folder.path)
    assert source.poll()
    assert not source.poll()  # nothing changed: no read
    first = source.desired
    for bad in ["vLLMLoRAConfig: {port: 0}", "", "{{{", "vLLMLoRAConfig: {port: 0}"]:
        folder.write(bad)
        assert not source.poll()
        assert source.desired == first and source.error
    folder.write("vLLMLoRAConfig: {ensureExist: {models: [{id: a2, source: /s}]}}")
    assert source.poll()
    assert [a.id for a in source.desired.ensure_exist] == ["a2"] and source.error is None


def test_config_errors_are_logged_once_each(tmp_path, caplog):
    folder = KubeletConfigDir(tmp_path / "config")
    folder.write("vLLMLoRAConfig: {port: 0}")
    source = ConfigSource(folder.path)
    with caplog.at_level(logging.ERROR, logger="lora-sidecar"):
        for _ in range(5):
            source.poll(force=True)
    assert len(caplog.records) == 1


def test_missing_file_keeps_last_good_and_is_reported_when_it_persists(tmp_path):
    folder = KubeletConfigDir(tmp_path / "config")
    folder.write("vLLMLoRAConfig: {}")
    source = ConfigSource(folder.path)
    source.poll()
    folder.dangle()
    assert not source.poll()
    assert source.error is None  # a swap in progress is not an error yet
    assert not source.poll()
    assert "does not exist" in source.error and source.desired is not None
    folder.write("vLLMLoRAConfig: {port: 9000}")
    assert source.poll() and source.desired.port == 9000


def test_in_place_edit_is_noticed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vLLMLoRAConfig: {}")
    source = ConfigSource(path)
    source.poll()
    path.write_text("vLLMLoRAConfig: {port: 1234}")
    os.utime(path, ns=(1, 1))  # even with an old mtime, the size differs
    assert source.poll() and source.desired.port == 1234


# ------------------------------------------------------------ command line


def test_flags_fall_back_to_environment(monkeypatch, tmp_path):
    key = tmp_path / "key"
    key.write_text("secret-from-file\n")
    monkeypatch.setenv("DYNAMIC_LORA_ROLLOUT_CONFIG", "/etc/c.yaml")
    monkeypatch.setenv("LORA_SIDECAR_RECONCILE_TRIGGER", "7.5")
    monkeypatch.setenv("LORA_SIDECAR_CONFIG_VALIDATION", "false")
    monkeypatch.setenv("LORA_SIDECAR_API_KEY_FILE", str(key))
    monkeypatch.setenv("LORA_SIDECAR_LOG_FORMAT", "json")
    settings = sidecar.parse_settings([])
    assert settings.config_path == Path("/etc/c.yaml")
    assert settings.reconcile_period == 7.5 and settings.config_validation is False
    assert settings.api_key == "secret-from-file" and settings.log_format == "json"
    assert "secret" not in repr(settings)
    for on, off in (("true", "false"), ("1", "0"), ("Yes", "NO"), ("on", "off")):
        monkeypatch.setenv("LORA_SIDECAR_CONFIG_VALIDATION", on)
        assert sidecar.parse_settings([]).config_validation is True, on
        monkeypatch.setenv("LORA_SIDECAR_CONFIG_VALIDATION", off)
        assert sidecar.parse_settings([]).config_validation is False, off
    assert sidecar.parse_settings(["--reconcile-trigger", "2"]).reconcile_period == 2


def test_defaults_match_the_original_sidecar(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LORA_SIDECAR_") or name in ("DYNAMIC_LORA_ROLLOUT_CONFIG", "VLLM_API_KEY"):
            monkeypatch.delenv(name)
    s = sidecar.parse_settings([])
    assert (s.config_path, s.health_check_timeout, s.health_check_interval, s.reconcile_period) == (
        Path("/config/configmap.yaml"), 300, 2, 5)
    assert (s.config_validation, s.metrics_port, s.request_timeout, s.api_key, s.mode) == (True, 8080, 10, None, "run")


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "env-key")
    assert sidecar.parse_settings([]).api_key == "env-key"


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [("LORA_SIDECAR_RECONCILE_TRIGGER", "soon", "--reconcile-trigger: expected a number of seconds, got 'soon'"
                                                " (LORA_SIDECAR_RECONCILE_TRIGGER='soon')"),
     ("LORA_SIDECAR_ADAPTER_DIR_MAX_BYTES", "-1", "--adapter-dir-max-bytes: must be 0 (no budget) or more"),
     ("LORA_SIDECAR_HEALTH_CHECK_INTERVAL", "nan", "--health-check-interval: must be positive"),
     ("LORA_SIDECAR_LOG_FORMAT", "xml", "--log-format: invalid choice: 'xml' (choose from 'text', 'json')"
                                        " (LORA_SIDECAR_LOG_FORMAT='xml')"),
     ("LORA_SIDECAR_REQUEST_TIMEOUT", "0", "must be positive"),
     # not silently "on": a value that is neither true nor false is refused, naming the variable
     ("LORA_SIDECAR_CONFIG_VALIDATION", "disabled", "(LORA_SIDECAR_CONFIG_VALIDATION='disabled')")],
)
def test_bad_environment_values_are_usage_errors(monkeypatch, capsys, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as caught:
        sidecar.parse_settings([])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_help_names_every_environment_variable(capsys):
    with pytest.raises(SystemExit):
        sidecar.parse_settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ["DYNAMIC_LORA_ROLLOUT_CONFIG", "HEALTH_CHECK_TIMEOUT", "HEALTH_CHECK_INTERVAL", "RECONCILE_TRIGGER",
                 "CONFIG_VALIDATION", "METRICS_PORT", "REQUEST_TIMEOUT", "API_KEY_FILE", "VLLM_API_KEY",
                 "LOG_LEVEL", "LOG_FORMAT", "--once", "--dry-run", "--validate", "--version"]:
        assert name in text


# ------------------------------------------------------------------- logs


def log_line(json_lines: bool, secrets=(), **fields) -> str:
    record = logging.LogRecord("lora-sidecar", logging.INFO, __file__, 1, "load done: a1", None, None)
    record.fields = fields
    saved = sidecar.SECRETS[:]
    sidecar.SECRETS[:] = list(secrets)
    try:
        return sidecar.LogFormatter(json_lines).format(record)
    finally:
        sidecar.SECRETS[:] = saved


def test_json_log_line_has_the_documented_fields():
    line = json.loads(log_line(True, adapter="a1", action="load", result="success", duration_s=0.01))
    assert line["level"] == "info" and line["msg"] == "load done: a1" and line["ts"].endswith("Z")
    assert (line["adapter"], line["action"], line["result"], line["duration_s"]) == ("a1", "load", "success", 0.01)


def test_text_log_line_carries_the_same_fields():
    line = log_line(False, adapter="a1", error="404: No adapter found")
    assert line.endswith('INFO    load done: a1 adapter=a1 error="404: No adapter found"')


def test_secrets_are_masked_in_any_log_line():
    assert "k-9" not in log_line(True, ["k-9"], error="header Bearer k-9 rejected")
    assert "k-9" not in log_line(False, ["k-9"], error="header Bearer k-9 rejected")


# ------------------------------------------------------- environment, metrics


def test_ca_bundle_and_proxies_come_from_the_environment_once(monkeypatch, tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not really a CA")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "")
    c = VLLMClient(requests.Session(), 2.0)
    c.use_server("https://vllm.test:8443")
    assert c.session.verify == str(bundle)
    assert c.session.proxies["https"] == "http://proxy.test:3128"
    assert c.session.trust_env is False


def test_empty_file_after_a_good_one_is_reported(tmp_path):
    folder = KubeletConfigDir(tmp_path / "config")
    folder.write("vLLMLoRAConfig: {}")
    source = ConfigSource(folder.path)
    source.poll()
    folder.write("")
    assert not source.poll()
    assert "the file is empty" in source.error and source.desired is not None


def test_adapter_series_follow_the_records(client, mocked):
    from prometheus_client import CollectorRegistry, generate_latest

    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1")))
    r = reconciler(client)
    registry = CollectorRegistry()
    registry.register(sidecar.AdapterMetrics(r))
    r.reconcile(desired_for(A1, Adapter("x", "/x", "big")))
    text = generate_latest(registry).decode()
    assert 'lora_sidecar_adapter_loaded{adapter="a1"} 1.0' in text
    assert 'lora_syncer_adapter_status{adapter_name="a1"} 1.0' in text
    assert 'lora_sidecar_adapter_state{adapter="x",state="skipped"} 1.0' in text
    assert 'lora_sidecar_adapter_state{adapter="x",state="loaded"} 0.0' in text
    r.reconcile(desired_for(A1))
    assert 'adapter="x"' not in generate_latest(registry).decode()


# ------------------------------------------------------- canary and drift

COMPLETIONS = f"{URL}/v1/completions"


def test_canary_from_the_top_level_with_each_adapter_able_to_override_it():
    desired = parse("""
vLLMLoRAConfig:
  canary: {enabled: true, maxTokens: 4, inertBlocksReadiness: true}
  ensureExist:
    models:
    - {id: a, source: /a}
    - {id: b, source: /b, canary: {prompt: "Translate: hello"}}
    - {id: c, source: /c, canary: {enabled: false}}
""")
    a, b, c = desired.ensure_exist
    assert a.canary == sidecar.Canary("Once upon a time", 4, 30.0, True)
    assert b.canary == sidecar.Canary("Translate: hello", 4, 30.0, True)
    assert c.canary is None
    assert parse("vLLMLoRAConfig: {ensureExist: {models: [{id: a, source: /a}]}}").ensure_exist[0].canary is None


def completions_by_model(mocked, texts: dict[str, str | int]) -> list[str]:
    """Answer /v1/completions per model: a text, or a status code; returns the models asked, in order."""
    asked = []

    def answer(request):
        model = json.loads(request.body)["model"]
        asked.append(model)
        given = texts[model]
        if isinstance(given, int):
            return given, {}, json.dumps(vllm_error(f"The model '{model}' does not exist.", given))
        return 200, {}, json.dumps({"choices": [{"index": 0, "text": given}]})

    mocked.add_callback("POST", COMPLETIONS, callback=answer)
    return asked


def canary_cycles(client, mocked, texts, canary=CANARY, cycles=3):
    """a1 loaded in cycle 1, seen in cycle 2 (the canary runs), in sync in cycle 3."""
    a1 = replace(A1, canary=canary)
    mocked.get(MODELS, json=models_body())
    for _ in range(cycles - 1):
        mocked.get(MODELS, json=models_body(("a1", "/adapters/a1")))
    plain_text(mocked, "POST", LOAD, 200, "Success")
    asked = completions_by_model(mocked, texts)
    r = reconciler(client)
    for _ in range(cycles):
        r.reconcile(desired_for(a1))
    return r, asked


def test_an_adapter_whose_output_differs_from_its_base_is_verified_once(client, mocked):
    r, asked = canary_cycles(client, mocked, {BASE: " the base", "a1": " the adapter"}, cycles=4)
    assert asked == [BASE, "a1"]  # once, after the load was seen; nothing while in sync
    record = r.records["a1"]
    assert record.state is State.LOADED and record.proof["result"] == "verified" and r.ready


@pytest.mark.parametrize(("blocks", "ready"), [(False, True), (True, False)])
def test_an_adapter_that_answers_as_its_base_is_inert(client, mocked, blocks, ready):
    canary = replace(CANARY, inert_blocks_readiness=blocks)
    r, _ = canary_cycles(client, mocked, {BASE: " same", "a1": " same"}, canary)
    record = r.records["a1"]
    assert record.state is State.INERT and record.proof["result"] == "inert" and "' same'" in record.proof["detail"]
    assert r.status()["adapters"]["a1"]["state"] == "inert" and r.ready is ready


def test_a_server_that_cannot_complete_leaves_the_adapter_loaded_and_says_why(client, mocked):
    r, _ = canary_cycles(client, mocked, {BASE: 404, "a1": " x"})
    record = r.records["a1"]
    assert record.state is State.LOADED and record.proof["result"] == "unavailable"
    assert "answered 404" in record.proof["detail"] and r.ready


def test_adapters_that_vanish_without_an_unload_are_lost_and_loaded_again(client, mocked, caplog):
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1"), ("a2", "/adapters/a2")))
    mocked.get(MODELS, json=models_body())  # the server restarted
    plain_text(mocked, "POST", LOAD, 200, "Success")
    r = reconciler(client)
    r.reconcile(desired_for(A1, A2))
    with caplog.at_level(logging.WARNING, logger="lora-sidecar"):
        r.reconcile(desired_for(A1, A2))
    assert [r.records[i].lost for i in ("a1", "a2")] == [1, 1]
    assert sorted(json.loads(c.request.body)["lora_name"] for c in mocked.calls if c.request.url == LOAD) == [
        "a1", "a2"]
    (line,) = [m for m in caplog.messages if m.startswith("lost")]
    assert "2 of the 2" in line and "the server restarted" in line


def test_adapters_the_config_does_not_name_are_foreign_and_left_alone(client, mocked, caplog):
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1"), ("theirs", "/t"), ("a1~staging", "/n")))
    r = reconciler(client)
    with caplog.at_level(logging.INFO, logger="lora-sidecar"):
        r.reconcile(desired_for(A1))
        r.reconcile(desired_for(A1))
    assert r.status()["foreign"] == ["theirs"] and metric("lora_sidecar_foreign_adapters") == 1
    assert len([m for m in caplog.messages if m.startswith("foreign: theirs")]) == 1
    assert not [c for c in mocked.calls if c.request.method == "POST" and "theirs" in c.request.body.decode()]


def test_a_new_canary_setting_proves_a_loaded_adapter_again_without_reloading_it(client, mocked):
    r, asked = canary_cycles(client, mocked, {BASE: " same", "a1": " same"},
                             replace(CANARY, inert_blocks_readiness=True))
    assert r.records["a1"].state is State.INERT and not r.ready
    r.records["a1"].lost = 2
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1")))
    new_prompt = replace(A1, canary=replace(CANARY, prompt="Ticket #1:", inert_blocks_readiness=True))
    r.reconcile(desired_for(new_prompt))  # the README's cure for a wrong `inert`: a prompt of the adapter's own
    record = r.records["a1"]
    assert asked == [BASE, "a1", BASE, "a1"] and record.canary_due is False and record.lost == 2
    assert [c.request.url for c in mocked.calls].count(LOAD) == 1  # the same files: no reload
    assert record.state is State.INERT and not r.ready  # still the base model's text: still inert


def test_each_adapter_that_cannot_be_proven_says_so_once(client, mocked, caplog):
    a1, a2 = replace(A1, canary=CANARY), replace(A2, canary=CANARY)
    mocked.get(MODELS, json=models_body())
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1"), ("a2", "/adapters/a2")))
    plain_text(mocked, "POST", LOAD, 200, "Success")
    completions_by_model(mocked, {BASE: 404, "a1": " x", "a2": " y"})
    r = reconciler(client)
    with caplog.at_level(logging.WARNING, logger="lora-sidecar"):
        for _ in range(3):
            r.reconcile(desired_for(a1, a2))
    assert sorted(m.split(":")[1].split()[0] for m in caplog.messages if m.startswith("canary skipped")) == [
        "a1", "a2"]


def test_a_restarted_sidecar_proves_the_adapters_it_finds_loaded(client, mocked):
    mocked.get(MODELS, json=models_body(("a1", "/adapters/a1")))  # loaded before this sidecar started
    asked = completions_by_model(mocked, {BASE: " same", "a1": " same"})
    r = reconciler(client)
    a1 = replace(A1, canary=replace(CANARY, inert_blocks_readiness=True))
    for _ in range(3):
        r.reconcile(desired_for(a1))
    assert asked == [BASE, "a1"] and r.records["a1"].state is State.INERT and not r.ready


def test_a_base_model_that_cannot_answer_is_asked_once_per_round(client, mocked):
    adapters = [replace(Adapter(f"a{i}", f"/adapters/a{i}"), canary=CANARY) for i in range(4)]
    mocked.get(MODELS, json=models_body(*[(a.id, a.source) for a in adapters]))
    asked = completions_by_model(mocked, {BASE: 503})
    r = reconciler(client)
    r.reconcile(desired_for(*adapters))
    assert asked == [BASE]
    assert {r.records[a.id].proof["result"] for a in adapters} == {"unavailable"}
    assert all("answered 503" in r.records[a.id].proof["detail"] for a in adapters)


# ------------------------------------------------------------ remote sources

REMOTE = Adapter("a1", "s3://bucket/adapters/a1/", sha256="ab" * 32)


def test_a_version_folder_is_named_by_id_and_pinned_digest_else_by_source(tmp_path):
    assert sidecar.version_folder(tmp_path, REMOTE) == tmp_path / f"a1@{'ab' * 8}"
    unpinned = Adapter("org/a 1", "https://h/a.tar.gz")
    other = replace(unpinned, source="https://h/b.tar.gz")
    assert sidecar.version_folder(tmp_path, unpinned).name.startswith("org_a_1@")
    assert sidecar.version_folder(tmp_path, unpinned) != sidecar.version_folder(tmp_path, other)
    assert sidecar.VERSION_FOLDER.fullmatch(sidecar.version_folder(tmp_path, Adapter("x" * 256, "s3://b/p")).name)


def test_localize_points_staged_versions_at_their_folder_and_holds_back_the_rest(tmp_path):
    local = Adapter("local", "/models/a")
    staged = Adapter("staged", "https://h/s.tar.gz")
    missing = Adapter("missing", "s3://b/m/")
    elsewhere = Adapter("elsewhere", "s3://b/e/", base_model="other")
    desired = DesiredState("h", 8000, "http", ensure_exist=(local, staged, missing, elsewhere))
    server = ServerState(base_models=("base",))
    folder = sidecar.version_folder(tmp_path, staged)
    result, fetch = sidecar.localize(desired, server, tmp_path, {folder.name})
    assert result.ensure_exist == (local, replace(staged, source=str(folder)), elsewhere)
    assert fetch == (missing,)
    # no --adapter-dir: every remote source is fetched, and that fetch fails naming the flag
    assert sidecar.localize(desired, server, None, {folder.name})[1] == (staged, missing)


@pytest.mark.parametrize(("budget", "need", "expected"), [
    (0, 0, ["old", "new"]),  # no budget: every version in no use goes
    (1000, 0, []),  # within the budget: kept for a quick rollback
    (250, 0, ["old"]),  # over it: oldest first, only as many as it takes
    (300, 100, ["old"]),  # room for a download of 100 bytes
    (300, 500, ["old", "new"]),  # cannot fit anyway: the caller says so
])
def test_evictions_take_unused_versions_oldest_first(budget, need, expected):
    folders = [sidecar.VersionFolder("new", 100, 20.0), sidecar.VersionFolder("listed", 100, 1.0),
               sidecar.VersionFolder("old", 100, 10.0)]
    assert sidecar.evictions(folders, {"listed"}, budget, need) == expected


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "\\\\host\\x", "C:/x"])
def test_a_path_that_could_leave_the_folder_fails_the_download(name):
    with pytest.raises(sidecar.FetchError, match="unsafe path") as caught:
        sidecar.safe_relative(name, "archive")
    assert caught.value.permanent


def test_object_keys_with_empty_parts_are_refused_and_archive_names_are_cleaned():
    assert sidecar.safe_relative("./top/adapter_config.json", "archive") == "top/adapter_config.json"
    with pytest.raises(sidecar.FetchError, match="unsafe path in the object key"):
        sidecar.safe_relative("a//adapter_config.json", "the object key", strict=True)


def test_the_tree_digest_is_what_sha256sum_of_sha256sum_prints(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "sub" / "b").write_bytes(b"B")
    lines = "".join(f"{sidecar.file_sha256(tmp_path / p)}  {p}\n" for p in ("adapter_config.json", "sub/b"))
    assert sidecar.folder_digest(tmp_path) == sidecar.hashlib.sha256(lines.encode()).hexdigest()


def test_an_archive_with_one_top_folder_unpacks_to_that_folder(tmp_path):
    folder = make_adapter(tmp_path / "src")
    (tmp_path / "a.tar.gz").write_bytes(tar_gz(folder, top="my-adapter"))
    sidecar.extract(tmp_path / "a.tar.gz", tmp_path / "out", budget=0)
    assert sidecar.adapter_root(tmp_path / "out") == tmp_path / "out" / "my-adapter"


@pytest.mark.parametrize("kind", UNSAFE_KINDS)
def test_an_archive_entry_that_could_escape_fails_it(tmp_path, kind):
    target = tmp_path / "evil"
    data, entry = unsafe_archive(kind, str(target))
    (tmp_path / "archive").write_bytes(data)
    with pytest.raises(sidecar.FetchError, match="unsafe path in archive") as caught:
        sidecar.extract(tmp_path / "archive", tmp_path / "out", budget=0)
    assert repr(entry) in str(caught.value)
    if kind.endswith("link"):
        assert "link or device" in str(caught.value)
    assert not target.exists()


def test_a_zip_bomb_stops_at_the_budget(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "b.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("adapter_config.json", b"0" * 10_000_000)
    with pytest.raises(sidecar.FetchError, match="more than --adapter-dir-max-bytes"):
        sidecar.extract(tmp_path / "b.zip", tmp_path / "b", budget=1_000_000)


@pytest.mark.parametrize(("files", "error"), [
    ({}, "no adapter_config.json"),
    ({"adapter_config.json": b"[1]"}, "not a JSON object"),
    ({"adapter_config.json": b"{"}, "unreadable"),
])
def test_a_download_without_a_readable_adapter_config_fails(tmp_path, files, error):
    for name, data in {"weights": b"w", **files}.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(sidecar.FetchError, match=error):
        sidecar.adapter_root(tmp_path)


def test_credentials_and_signatures_in_urls_are_masked():
    text = 'source="https://user:pw@h.example/a.tar.gz?X-Amz-Signature=abc&X-Amz-Credential=k" s3://b/p/'
    assert sidecar.mask(text) == 'source="https://***@h.example/a.tar.gz?***" s3://b/p/'


def test_the_sha256_pin_is_checked_by_the_schema(tmp_path):
    config = """vLLMLoRAConfig:
  ensureExist:
    models:
    - {id: a1, source: "s3://b/a1/", sha256: "ABC"}
"""
    with pytest.raises(ConfigError, match=r"models\[0\]\.sha256"):
        parse_config(config.encode(), "c.yaml")
    good = config.replace('"ABC"', '"' + "ab" * 32 + '"')
    assert parse_config(good.encode(), "c.yaml").ensure_exist[0] == Adapter("a1", "s3://b/a1/", sha256="ab" * 32)


def test_a_staged_version_is_loaded_from_its_folder_and_a_missing_one_keeps_the_old_serving(client, mocked, tmp_path):
    old = sidecar.version_folder(tmp_path, REMOTE)
    new = replace(REMOTE, sha256="cd" * 32)
    old.mkdir()
    mocked.get(MODELS, json=models_body(("a1", str(old))))
    r = Reconciler(client, 5.0, 300, sidecar.AdapterStore(tmp_path))
    r.server_up, r._server_url = True, URL
    assert r.reconcile(desired_for(REMOTE)).in_sync  # the listed root is the staged folder: nothing to do
    started = []
    r.store.start = started.append  # the download itself is the process tests' (tests/test_remote_sources.py)
    result = r.reconcile(desired_for(new))
    assert started == [new] and not result.in_sync
    assert [c.request.method for c in mocked.calls] == ["GET", "GET"]  # the old version is left serving
    assert r.records["a1"].state == "pending" and r.records["a1"].download["state"] == "downloading"
    assert old.is_dir()  # listed: never deleted
    r.reconcile(desired_for(new))
    assert started == [new]  # one download at a time per version


def test_without_adapter_dir_a_remote_source_fails_naming_the_flag(client, mocked):
    mocked.get(MODELS, json=models_body())
    r = reconciler(client)
    mocked.post(LOAD, body="Success")
    r.reconcile(desired_for(REMOTE, A2))
    r.store.wait(30)
    r.reconcile(desired_for(REMOTE, A2))
    record = r.records["a1"]
    assert record.state == "failed" and "--adapter-dir" in record.last_error and record.permanent
    assert record.last_action == "download"
    loads = [json.loads(c.request.body)["lora_name"] for c in mocked.calls if c.request.url == LOAD]
    assert set(loads) == {"a2"}  # the local adapter loads; nothing is sent for the remote one
