"""The fake vLLM server against what a real vLLM 0.32 server was observed to answer, route by route,
plus its faults and the /_fake/ controls the benchmark uses.

Each test asserts what a client of vLLM would see: the status code and the body.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from fake_vllm import FakeVLLM, make_adapter
from sidecar_process import wait_until

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
MODEL_KEYS = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
ALREADY_LOADED = (
    "The lora adapter '{}' has already been loaded. "
    "If you want to load the adapter in place, set 'load_inplace' to True."
)


@dataclass(frozen=True)
class Paths:
    good: str  # adapter folder, r=8
    other: str  # a second good adapter folder, for in-place reloads
    big: str  # adapter folder, r=16 (above --max-lora-rank 8)
    file: str  # a plain file
    empty_dir: str  # a folder without adapter_config.json
    missing: str  # nothing there


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    (tmp_path / "plain.txt").write_text("not an adapter")
    (tmp_path / "empty").mkdir()
    return Paths(
        good=str(make_adapter(tmp_path / "good", rank=8)),
        other=str(make_adapter(tmp_path / "other", rank=4)),
        big=str(make_adapter(tmp_path / "big", rank=16)),
        file=str(tmp_path / "plain.txt"),
        empty_dir=str(tmp_path / "empty"),
        missing=str(tmp_path / "missing"),
    )


@pytest.fixture
def server():
    fake = FakeVLLM().start()
    yield fake
    fake.stop()


def load(server: FakeVLLM, name: str, path: str, **extra: object) -> requests.Response:
    return requests.post(server.url + LOAD, json={"lora_name": name, "lora_path": path, **extra}, timeout=5)


def unload(server: FakeVLLM, name: str) -> requests.Response:
    return requests.post(server.url + UNLOAD, json={"lora_name": name}, timeout=5)


def models(server: FakeVLLM, **kwargs: object) -> list[dict]:
    response = requests.get(server.url + "/v1/models", timeout=5, **kwargs)
    assert response.status_code == 200
    return response.json()["data"]


def assert_error(response: requests.Response, status: int, message: str, err_type: str) -> None:
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": {"message": message, "type": err_type, "param": None, "code": status}}


def assert_plain_200(response: requests.Response, text: str) -> None:
    assert response.status_code == 200
    assert response.text == text
    assert "Content-Type" not in response.headers


# --- the routes ---------------------------------------------------------------------------------


def test_health_answers_200_with_an_empty_body(server):
    response = requests.get(server.url + "/health", timeout=5)
    assert response.status_code == 200
    assert response.content == b""


def test_health_answers_503_when_the_engine_died(server):
    server.set_fault("health503")
    response = requests.get(server.url + "/health", timeout=5)
    assert (response.status_code, response.content) == (503, b"")



def test_models_lists_the_base_model_with_every_field(server):
    response = requests.get(server.url + "/v1/models", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["object"] == "list"
    [base] = body["data"]
    assert set(base) == MODEL_KEYS
    assert (base["id"], base["root"], base["parent"], base["object"], base["owned_by"]) == (
        "base", "/models/base", None, "model", "vllm")
    assert isinstance(base["created"], int)
    assert base["max_model_len"] == 128



def test_adapter_entry_keeps_the_path_exactly_as_sent(server, paths):
    as_sent = paths.good + "/"
    assert load(server, "a1", as_sent).status_code == 200
    _base, adapter = models(server)
    assert set(adapter) == MODEL_KEYS
    assert (adapter["id"], adapter["root"], adapter["parent"], adapter["max_model_len"]) == (
        "a1", as_sent, "base", None)


def test_load_answers_plain_text_without_content_type(server, paths):
    assert_plain_200(load(server, "a1", paths.good), "Success: LoRA adapter 'a1' added successfully.")
    assert server.adapters() == {"a1": paths.good}


def test_loading_a_loaded_name_is_400(server, paths):
    load(server, "a1", paths.good)
    assert_error(load(server, "a1", paths.other), 400, ALREADY_LOADED.format("a1"), "InvalidUserInput")
    assert server.adapters() == {"a1": paths.good}


def test_load_inplace_replaces_the_weights(server, paths):
    load(server, "a1", paths.good)
    assert_plain_200(load(server, "a1", paths.other, load_inplace=True),
                     "Success: LoRA adapter 'a1' added successfully.")
    assert [m["root"] for m in models(server) if m["id"] == "a1"] == [paths.other]
    completion = requests.post(server.url + "/v1/completions", json={"model": "a1", "prompt": "hi"}, timeout=5)
    assert paths.other in completion.json()["choices"][0]["text"]


@pytest.mark.parametrize("which", ["missing", "empty_dir"])
def test_load_of_a_path_that_is_no_adapter_is_404(server, paths, which):
    path = getattr(paths, which)
    assert_error(load(server, "a1", path), 404, f"Loading lora a1 failed: No adapter found for {path}", "NotFoundError")
    assert server.adapters() == {}


def test_load_of_an_adapter_above_max_lora_rank_is_500(server, paths):
    response = load(server, "big", paths.big)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["message"].endswith("LoRA rank 16 is greater than max_lora_rank 8.")
    assert (error["type"], error["code"]) == ("InternalServerError", 500)
    assert server.adapters() == {}


def test_load_of_a_file_is_500(server, paths):
    response = load(server, "f", paths.file)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == 500
    assert server.adapters() == {}


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        ('{"lora_name": "a1"}', {"Content-Type": "application/json"}),  # field missing
        ('{"lora_path": "/x"}', {"Content-Type": "application/json"}),  # field missing
        ("lora_name=a1", {"Content-Type": "application/json"}),  # not JSON
        ("", {"Content-Type": "application/json"}),  # no body
        ('["a1", "/x"]', {"Content-Type": "application/json"}),  # JSON, not an object
        ('{"lora_name": 1, "lora_path": "/x"}', {"Content-Type": "application/json"}),  # wrong type
        ('{"lora_name": "a1", "lora_path": "/x"}', {"Content-Type": "text/plain"}),  # not application/json
        ('{"lora_name": "a1", "lora_path": "/x"}', {}),  # no Content-Type
    ],
)
def test_load_with_a_malformed_request_is_400(server, data, headers):
    response = requests.post(server.url + LOAD, data=data, headers=headers, timeout=5)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (400, "Bad Request")
    assert error["message"]
    assert server.adapters() == {}


@pytest.mark.parametrize(("name", "path"), [("", "/x"), ("a1", ""), ("", "")])
def test_load_with_an_empty_name_or_path_is_400(server, name, path):
    assert_error(load(server, name, path), 400, "Both 'lora_name' and 'lora_path' must be provided.",
                 "InvalidUserInput")


def test_load_named_like_a_served_base_model_is_400(server, paths):
    message = "The lora adapter name 'base' conflicts with a served base model."
    assert_error(load(server, "base", paths.good), 400, message, "InvalidUserInput")


def test_unload_answers_plain_text(server, paths):
    load(server, "a1", paths.good)
    assert_plain_200(unload(server, "a1"), "Success: LoRA adapter 'a1' removed successfully.")
    assert server.adapters() == {}
    assert [m["id"] for m in models(server)] == ["base"]


def test_unload_of_an_unknown_name_is_404(server):
    assert_error(unload(server, "nope"), 404, "The lora adapter 'nope' cannot be found.", "NotFoundError")


def test_completion_with_an_adapter_uses_it(server, paths):
    load(server, "a1", paths.good)
    response = requests.post(server.url + "/v1/completions", json={"model": "a1", "prompt": "hi"}, timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "a1"
    assert "a1" in body["choices"][0]["text"]
    base = requests.post(server.url + "/v1/completions", json={"model": "base", "prompt": "hi"}, timeout=5).json()
    assert base["choices"][0]["text"] != body["choices"][0]["text"]


def test_completion_with_an_unknown_adapter_is_404(server):
    response = requests.post(server.url + "/v1/completions", json={"model": "ghost", "prompt": "hi"}, timeout=5)
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The model 'ghost' does not exist.", "type": "NotFoundError",
                                         "param": "model", "code": 404}}


# --- other behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [LOAD, UNLOAD])
def test_lora_routes_are_404_without_runtime_lora(path):
    with FakeVLLM(runtime_lora=False) as fake:
        response = requests.post(fake.url + path, json={"lora_name": "a1", "lora_path": "/x"}, timeout=5)
        assert requests.get(fake.url + "/v1/models", timeout=5).status_code == 200
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


def test_api_key_guards_v1_but_not_health(paths):
    with FakeVLLM(api_key="sekret") as fake:
        good = {"Authorization": "Bearer sekret"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            for method, path in (("GET", "/v1/models"), ("POST", LOAD), ("POST", UNLOAD), ("GET", "/v1/nothing")):
                response = requests.request(method, fake.url + path, headers=headers, json={}, timeout=5)
                assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"})
        assert requests.get(fake.url + "/health", timeout=5).status_code == 200
        assert requests.get(fake.url + "/v1/models", headers=good, timeout=5).status_code == 200
        response = requests.post(fake.url + LOAD, headers=good, json={"lora_name": "a1", "lora_path": paths.good},
                                 timeout=5)
        assert response.status_code == 200


def test_created_changes_on_every_call(server):
    first, second = models(server)[0]["created"], models(server)[0]["created"]
    assert first != second


def test_base_model_name_in_the_load_body_is_ignored(server, paths):
    assert load(server, "a1", paths.good, base_model_name="some-other-model").status_code == 200
    assert models(server)[1]["parent"] == "base"


def test_loads_run_one_at_a_time_while_models_still_answers(paths, tmp_path):
    second = str(make_adapter(tmp_path / "second"))
    with FakeVLLM(load_delay=0.3) as fake:
        started = time.monotonic()
        threads = [threading.Thread(target=load, args=(fake, name, path))
                   for name, path in (("a1", paths.good), ("a2", second))]
        for thread in threads:
            thread.start()
        wait_until(lambda: [e for e in fake.requests() if e["path"] == LOAD and e["status"] is None])
        assert len(models(fake)) < 3  # /v1/models is not blocked by the engine
        for thread in threads:
            thread.join()
        assert time.monotonic() - started >= 0.6  # a lower bound: a busy machine only adds to it
        assert set(fake.adapters()) == {"a1", "a2"}


def test_an_older_vllm_ignores_load_inplace(paths):
    with FakeVLLM(inplace_supported=False) as fake:
        load(fake, "a1", paths.good)
        response = load(fake, "a1", paths.other, load_inplace=True)
        assert response.status_code == 400
        assert "has already been loaded" in response.json()["error"]["message"]
        assert fake.adapters() == {"a1": paths.good}


def test_accept_any_path_loads_anything_non_empty():
    with FakeVLLM(accept_any_path=True) as fake:
        assert load(fake, "x", "/does/not/exist").status_code == 200
        assert load(fake, "y", "").status_code == 400
        assert fake.adapters() == {"x": "/does/not/exist"}


def test_relative_paths_resolve_against_the_server_working_directory(server, tmp_path, monkeypatch):
    make_adapter(tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    assert load(server, "rel", "rel").status_code == 200
    assert models(server)[1]["root"] == "rel"


def test_unknown_routes_and_wrong_methods(server):
    response = requests.get(server.url + "/v1/nothing", timeout=5)
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    response = requests.get(server.url + LOAD, timeout=5)
    assert (response.status_code, response.json()) == (405, {"detail": "Method Not Allowed"})


@pytest.mark.parametrize("version", ["0.32.0", "0.33.1", "0.32.0+cpu"])
def test_version_answers_without_a_key(paths, version):
    with FakeVLLM(api_key="sekret", version=version) as fake:
        response = requests.get(fake.url + "/version", timeout=5)
        assert (response.status_code, response.json()) == (200, {"version": version})
        assert response.headers["Content-Type"] == "application/json"
        assert [(e["method"], e["path"], e["status"]) for e in fake.requests()] == [("GET", "/version", 200)]


def test_a_server_without_version_answers_404(server):
    assert requests.get(server.url + "/version", timeout=5).json() == {"version": "0.32.0"}  # the default
    with FakeVLLM(version=None) as fake:
        response = requests.get(fake.url + "/version", timeout=5)
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


@pytest.mark.parametrize(
    ("version", "sticks"),
    [("0.32.0", True), ("0.32.0+cpu", True), ("0.31.2", True), (None, True), ("unknown", True),
     ("0.33.0", False), ("0.33.1", False), ("0.33.0rc1", False), ("1.0.0", False)],
)
def test_load_inplace_sticks_up_to_0_32(paths, version, sticks):
    with FakeVLLM(version=version) as fake:
        load(fake, "a1", paths.good)
        load(fake, "a2", paths.good)
        assert fake.inplace_sticky() == []  # fresh loads
        assert load(fake, "a2", paths.other, load_inplace=True).status_code == 200
        assert load(fake, "a1", paths.other, load_inplace=True).status_code == 200
        expected = ["a1", "a2"] if sticks else []
        assert fake.inplace_sticky() == expected
        assert fake.state()["inplace_sticky"] == expected
        assert requests.get(fake.url + "/_fake/state", timeout=5).json()["inplace_sticky"] == expected
        assert fake.adapters() == {"a1": paths.other, "a2": paths.other}


def test_a_fresh_load_or_an_unload_clears_a_sticky_flag(server, paths):
    load(server, "a1", paths.good, load_inplace=True)  # in place on a new name: the flag is stored too
    load(server, "a2", paths.good)
    load(server, "a2", paths.other, load_inplace=True)
    assert server.inplace_sticky() == ["a1", "a2"]
    assert unload(server, "a1").status_code == 200
    assert server.inplace_sticky() == ["a2"]
    load(server, "a1", paths.good)
    assert server.inplace_sticky() == ["a2"]
    assert load(server, "a2", paths.good, load_inplace=False).status_code == 400  # refused: the flag stays
    assert server.inplace_sticky() == ["a2"]
    server.set_adapters({"a2": paths.good})  # reloaded fresh behind the sidecar's back
    assert server.inplace_sticky() == []
    load(server, "a1", paths.other, load_inplace=True)
    server.restart()
    assert server.inplace_sticky() == []


def test_an_older_vllm_never_sticks(paths):
    with FakeVLLM(inplace_supported=False) as fake:
        load(fake, "a1", paths.good, load_inplace=True)
        assert fake.inplace_sticky() == []


def test_normalize_root_strips_the_trailing_slash_in_models_only(paths):
    with FakeVLLM(normalize_root=True) as fake:
        load(fake, "slash", paths.good + "/")
        load(fake, "plain", paths.other)
        assert [(m["id"], m["root"]) for m in models(fake)] == [
            ("base", "/models/base"), ("slash", paths.good), ("plain", paths.other)]
        assert fake.adapters() == {"slash": paths.good + "/", "plain": paths.other}


# --- the request log, the controls and the faults ---------------------------------------------


def test_request_log_records_every_vllm_request(server, paths):
    before = time.monotonic()
    load(server, "a1", paths.good)
    requests.get(server.url + "/health", timeout=5)
    requests.get(server.url + "/_fake/state", timeout=5)  # control routes are not logged
    log = requests.get(server.url + "/_fake/requests", timeout=5).json()
    assert log == server.requests()
    assert [set(entry) for entry in log] == [{"t", "method", "path", "body", "status"}] * 2
    assert [(e["method"], e["path"], e["body"], e["status"]) for e in log] == [
        ("POST", LOAD, {"lora_name": "a1", "lora_path": paths.good}, 200),
        ("GET", "/health", None, 200),
    ]
    assert before <= log[0]["t"] <= log[1]["t"] <= time.monotonic()
    requests.post(server.url + LOAD, data="not json", headers={"Content-Type": "application/json"}, timeout=5)
    assert server.requests()[-1]["body"] == "not json"
    assert requests.post(server.url + "/_fake/reset", timeout=5).status_code == 200
    assert server.requests() == []


def test_adapters_can_be_set_behind_the_sidecars_back(server):
    url = server.url + "/_fake/adapters"
    assert requests.put(url, json={"theirs": "/t", "mine": "/m"}, timeout=5).json() == {
        "adapters": {"theirs": "/t", "mine": "/m"}}
    assert requests.put(url, json={"only": "/o"}, timeout=5).status_code == 200
    assert requests.get(server.url + "/_fake/state", timeout=5).json()["adapters"] == {"only": "/o"}
    assert [m["id"] for m in models(server)] == ["base", "only"]
    server.set_adapters({"x": "/x", "only": None})
    assert server.adapters() == {"x": "/x"}


def in_flight(server: FakeVLLM, count: int = 1) -> list[dict]:
    """Until `count` requests are held without an answer; those requests."""
    return wait_until(lambda: (held := [e for e in server.requests() if e["status"] is None]) and
                      len(held) >= count and held, message=f"{count} requests in flight")


def test_hang_answers_nothing_until_cleared_without_blocking_controls(server):
    server.set_fault("hang")
    with pytest.raises(requests.ReadTimeout):
        requests.get(server.url + "/health", timeout=0.3)
    answers: list[int] = []
    health = server.url + "/health"
    waiter = threading.Thread(target=lambda: answers.append(requests.get(health, timeout=10).status_code))
    waiter.start()
    in_flight(server, 2)
    assert requests.get(server.url + "/_fake/state", timeout=5).json()["fault"]["mode"] == "hang"
    server.clear_fault()
    waiter.join(10)
    assert answers == [200]


def test_stop_cuts_the_connections_of_hung_requests(server):
    server.set_fault("hang")
    errors: list[Exception] = []

    def call() -> None:
        try:
            requests.get(server.url + "/v1/models", timeout=30)
        except requests.RequestException as e:
            errors.append(e)

    clients = [threading.Thread(target=call) for _ in range(5)]
    for client in clients:
        client.start()
    in_flight(server, 5)
    server.stop()
    for client in clients:
        client.join(10)
    # Cut, as when a process dies: refused or reset, not left to time out.
    assert len(errors) == 5 and all(isinstance(e, requests.ConnectionError) for e in errors), errors
    assert all(entry["status"] is None for entry in server.requests())


def test_load500_fails_every_load(server, paths):
    server.set_fault("load500")
    response = load(server, "a1", paths.good)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "InternalServerError"
    assert server.adapters() == {}


@pytest.mark.parametrize("variant", ["not_json", "wrong_type", "missing_keys"])
def test_garbage_models_answers_200_with_an_unusable_body(server, variant):
    server.set_fault("garbage_models", variant=variant)
    response = requests.get(server.url + "/v1/models", timeout=5)
    assert response.status_code == 200
    if variant == "not_json":
        with pytest.raises(ValueError):
            response.json()
    elif variant == "wrong_type":
        assert not isinstance(response.json()["data"], list)
    else:
        assert all("id" not in entry and "root" not in entry for entry in response.json()["data"])


def test_slow_load_makes_each_load_take_that_long(server, paths):
    server.set_fault("slow_load", seconds=0.3)
    started = time.monotonic()
    assert load(server, "a1", paths.good).status_code == 200
    assert time.monotonic() - started >= 0.3  # a lower bound: a busy machine only adds to it


@pytest.mark.parametrize("fault", [{"mode": "bogus"}, {"mode": "garbage_models", "variant": "bogus"},
                                   {"mode": "slow_load"}, {"mode": "load_status"},
                                   {"mode": "load_status", "status": 200}, {"mode": "load_status", "status": "503"},
                                   {"mode": "load_status", "status": True}, {"mode": ""}])
def test_an_unknown_fault_is_refused(server, fault):
    with pytest.raises(ValueError):
        server.set_fault(**fault)
    assert server.fault().mode == "none"


def test_load_noop_answers_200_and_changes_nothing(server, paths):
    load(server, "a1", paths.good)
    server.set_fault("load_noop")
    assert_plain_200(load(server, "a2", paths.good), "Success: LoRA adapter 'a2' added successfully.")
    assert_plain_200(load(server, "a1", paths.other, load_inplace=True),
                     "Success: LoRA adapter 'a1' added successfully.")
    assert [(m["id"], m["root"]) for m in models(server)] == [("base", "/models/base"), ("a1", paths.good)]
    assert server.inplace_sticky() == []


def test_unload_noop_answers_200_and_the_adapter_stays_listed(server, paths):
    load(server, "a1", paths.good)
    server.set_fault("unload_noop")
    assert_plain_200(unload(server, "a1"), "Success: LoRA adapter 'a1' removed successfully.")
    assert [m["id"] for m in models(server)] == ["base", "a1"]
    assert unload(server, "nope").status_code == 404  # an unknown name is still unknown


@pytest.mark.parametrize(("status", "phrase"), [(429, "Too Many Requests"), (503, "Service Unavailable")])
def test_load_status_answers_that_status_with_a_vllm_error_body(server, paths, status, phrase):
    load(server, "a1", paths.good)
    fault = server.set_fault("load_status", status=status)
    assert fault.to_json() == {"mode": "load_status", "variant": None, "seconds": None, "status": status}
    assert_error(load(server, "a2", paths.good), status, f"{phrase} (injected fault load_status)", phrase)
    assert load(server, "a1", paths.other, load_inplace=True).status_code == status
    assert server.adapters() == {"a1": paths.good}
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert unload(server, "a1").status_code == 200  # only loads are refused


def test_models_drop_closes_the_connection_while_health_answers(server):
    server.set_fault("models_drop")
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/v1/models", timeout=5)
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert [(e["path"], e["status"]) for e in server.requests()] == [("/v1/models", None), ("/health", 200)]
    server.clear_fault()
    assert [m["id"] for m in models(server)] == ["base"]


def test_echo_auth_puts_the_authorization_header_in_a_500(paths):
    with FakeVLLM(api_key="sekret") as fake:
        fake.set_fault("echo_auth")
        response = requests.post(fake.url + LOAD, headers={"Authorization": "Bearer sekret"},
                                 json={"lora_name": "a1", "lora_path": paths.good}, timeout=5)
        assert_error(response, 500, "upstream rejected request with Authorization: Bearer sekret",
                     "InternalServerError")
        assert fake.adapters() == {}


@pytest.mark.parametrize("keep", [True, False])
def test_restart_refuses_connections_while_down_and_drops_adapters_unless_kept(server, paths, keep):
    session = requests.Session()  # a kept-alive connection: the client must reconnect after the restart
    assert session.post(server.url + LOAD, json={"lora_name": "a1", "lora_path": paths.good}, timeout=5).ok
    server.restart(down_seconds=0.5, keep_adapters=keep)  # returns once the port is closed
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=1)
    assert server.wait_up(10)
    assert session.get(server.url + "/health", timeout=5).status_code == 200
    listed = [m["id"] for m in session.get(server.url + "/v1/models", timeout=5).json()["data"]]
    assert listed == (["base", "a1"] if keep else ["base"])


@pytest.mark.parametrize("keep", [True, False])
def test_stop_and_start_rebind_the_same_port(server, paths, keep):
    port = server.port
    load(server, "a1", paths.good)
    server.stop(keep_adapters=keep)
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=1)
    server.start()
    assert server.port == port
    assert [m["id"] for m in models(server)] == (["base", "a1"] if keep else ["base"])


@pytest.mark.parametrize(("version", "status"), [("0.33.1", 200), ("", 404)])
def test_runs_as_a_process_with_the_benchmarks_flags_and_exits_on_sigterm(version, status):
    script = Path(__file__).with_name("fake_vllm.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--accept-any-path", "--load-delay", "0.01",
         "--version-string", version],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("LISTENING ")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        assert requests.get(url + "/health", timeout=5).status_code == 200
        assert requests.get(url + "/version", timeout=5).status_code == status
        response = requests.post(url + LOAD, json={"lora_name": "x", "lora_path": "/not/there"}, timeout=5)
        assert response.status_code == 200  # --accept-any-path
        assert requests.get(url + "/_fake/state", timeout=5).json()["adapters"] == {"x": "/not/there"}
        requests.put(url + "/_fake/adapters", json={"y": "/y"}, timeout=5)
        assert [m["id"] for m in requests.get(url + "/v1/models", timeout=5).json()["data"]] == ["base", "y"]
        assert [e["path"] for e in requests.get(url + "/_fake/requests", timeout=5).json()] == [
            "/health", "/version", LOAD, "/v1/models"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""  # exactly one line
    finally:
        proc.kill()
        proc.wait()
