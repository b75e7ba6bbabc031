#!/usr/bin/env python3
"""Keep a vLLM server's LoRA adapters equal to a mounted config.

The sidecar reads the desired state from a YAML file (usually a ConfigMap that
the kubelet swaps atomically), reads what the server holds from
`GET /v1/models`, computes a plan with the pure function `plan()`, and sends
only the load, reload and unload requests that plan needs. It reconciles at
start, every `--reconcile-trigger` seconds, and within a tick of the config
file changing. A bad config never unloads anything: the last good one stays
in force. A failing adapter is retried with backoff without holding up the
others, and a hung or absent server only delays the next cycle.

Reading order: settings and metrics, data types, config loading, the vLLM
client, `plan()`, the reconciler, the triggers, the status server, `main()`.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import prometheus_client as prom
import requests
import yaml
from prometheus_client.core import GaugeMetricFamily

VERSION = "1.0.0"
SCHEMA_PATH = Path(__file__).resolve().with_name("validation.yaml")
CONFIG_KEY = "vLLMLoRAConfig"
DEFAULT_CONFIG_PATH = "/config/configmap.yaml"
BACKOFF_CAP_SECONDS = 300.0
# Kubernetes caps a ConfigMap at 1 MiB; anything bigger is not a config.
MAX_CONFIG_BYTES = 1024 * 1024
# Bounds on a parsed document: YAML aliases can make a small file expand
# into a huge tree, and deep nesting can exhaust the stack.
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 64
MAX_MESSAGE_CHARS = 300
# vLLM takes calls for different adapters at once and applies them one by one; a few in
# flight hide each round trip behind the engine's own work.
MAX_REQUESTS_IN_FLIGHT = 4
# vLLM stamps every answer to GET /v1/models with a new `created` time and new permission ids,
# neither of which the sidecar reads. With both set to 0, an unchanged list is byte-equal to the
# last one and needs no JSON decoding, which is most of an idle cycle at 1000 adapters. Only a
# JSON integer after "created" and the hex digits of a permission's id are replaced, each by a
# value of the same kind, so two answers that match afterwards list the same adapters.
VOLATILE_FIELDS = (re.compile(rb'("created":)(?:0|[1-9][0-9]*)'),
                   re.compile(rb'("permission":\[\{"id":"modelperm-)[0-9a-f]+'))
RUNTIME_LORA_HINT = (
    "vLLM has runtime LoRA updating turned off: start it with "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and --enable-lora"
)

log = logging.getLogger("lora-sidecar")
# libyaml's safe loader when PyYAML has it (10x faster on large configs); both are safe.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The metric inventory: everything the sidecar reports, in one place.
prom.disable_created_metrics()  # *_created series only add noise to every counter and histogram
# Per-adapter series are built from the reconciler's records at scrape time (AdapterMetrics),
# so they cost nothing per cycle and leave with the adapter when it leaves the config.
ADAPTER_STATES = ("loaded", "pending", "failed", "absent", "skipped")
ADAPTER_LOADED = ("lora_sidecar_adapter_loaded",
                  "1 when the server lists an ensureExist adapter with the desired source, else 0.")
ADAPTER_STATE = ("lora_sidecar_adapter_state", "One-hot state of each adapter named in the config.")
LEGACY_ADAPTER_STATUS = ("lora_syncer_adapter_status",
                         "1 when the adapter is loaded (kept for dashboards built for the original lora-syncer).")
OPERATIONS = prom.Counter(
    "lora_sidecar_operations", "Load, reload and unload requests sent.", ["op", "result"]
)
OPERATION_SECONDS = prom.Histogram(
    "lora_sidecar_operation_duration_seconds",
    "Duration of load, reload and unload requests.",
    ["op"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RECONCILES = prom.Counter("lora_sidecar_reconcile", "Reconcile cycles.", ["result"])
RECONCILE_SECONDS = prom.Histogram(
    "lora_sidecar_reconcile_duration_seconds", "Duration of reconcile cycles."
)
CONFIG_VALID = prom.Gauge("lora_sidecar_config_valid", "1 when the config file is valid.")
CONFIG_LAST_CHANGE = prom.Gauge(
    "lora_sidecar_config_last_change_timestamp_seconds",
    "Unix time at which a new valid config was adopted.",
)
SERVER_UP = prom.Gauge("lora_sidecar_server_up", "1 when the vLLM server answered its last call.")
IN_SYNC = prom.Gauge("lora_sidecar_in_sync", "1 when the server matched the config after the last cycle.")

# One clock for every decision; wall time is derived from it for display.
clock: Callable[[], float] = time.monotonic
_MONO_AT_START = time.monotonic()
_WALL_AT_START = time.time()


def wall_time(monotonic: float) -> float:
    return _WALL_AT_START + (monotonic - _MONO_AT_START)


def iso_time(monotonic: float | None) -> str | None:
    if monotonic is None:
        return None
    stamp = time.gmtime(wall_time(monotonic))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", stamp)


# ---------------------------------------------------------------- data types


@dataclass(frozen=True)
class Adapter:
    """One adapter as the config names it; base_model already falls back to defaultBaseModel."""

    id: str
    source: str
    base_model: str | None = None


@dataclass(frozen=True)
class DesiredState:
    """A valid config: which server, which adapters to hold and which to drop."""

    host: str
    port: int
    scheme: str
    name: str = ""
    default_base_model: str | None = None
    ensure_exist: tuple[Adapter, ...] = ()
    ensure_not_exist: tuple[Adapter, ...] = ()
    sha256: str = ""

    @property
    def server_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class ServerState:
    """What `GET /v1/models` said: served base models and loaded adapters (id -> source)."""

    base_models: tuple[str, ...] = ()
    base_model_roots: frozenset[str] = frozenset()
    adapters: Mapping[str, str | None] = field(default_factory=dict)

    def serves(self, base_model: str) -> bool:
        return base_model in self.base_models or base_model in self.base_model_roots


class Op(enum.StrEnum):
    LOAD = "load"
    RELOAD = "reload"
    UNLOAD = "unload"


@dataclass(frozen=True)
class Action:
    op: Op
    adapter: Adapter
    reason: str


@dataclass(frozen=True)
class Skip:
    """An ensureExist adapter that is not for this server (its base model is not served)."""

    adapter: Adapter
    reason: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    skipped: tuple[Skip, ...] = ()


@dataclass(frozen=True)
class Settings:
    """Everything the command line and environment can set, read once at start."""

    config_path: Path
    health_check_timeout: float
    health_check_interval: float
    reconcile_period: float
    watch_interval: float
    config_validation: bool
    metrics_port: int
    metrics_address: str
    request_timeout: float
    api_key: str | None = field(default=None, repr=False)
    log_level: str = "info"
    log_format: str = "text"
    mode: str = "run"  # run | once | dry-run | validate

    @property
    def alive_window(self) -> float:
        # A cycle can block for one request timeout; allow for it on top of 3 periods.
        return 3 * self.reconcile_period + self.request_timeout


# ------------------------------------------------------------ config loading


class ConfigError(Exception):
    """A config that must not be acted on; each error names the file and the field."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = list(errors)


@cache
def config_schema() -> dict[str, Any]:
    with SCHEMA_PATH.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def schema_default(key: str) -> Any:
    return config_schema()["properties"][CONFIG_KEY]["properties"][key]["default"]


def field_path(parts: Sequence[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def read_config(path: Path, validate_schema: bool = True) -> DesiredState:
    """Read, parse and check one config file; raises ConfigError, never anything else."""
    try:
        raw = _read_bytes(path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the file: {e.strerror or e}"]) from None
    return parse_config(raw, str(path), validate_schema)


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: file is larger than {MAX_CONFIG_BYTES} bytes"])
    return raw


def parse_config(raw: bytes, label: str, validate_schema: bool = True) -> DesiredState:
    document = _parse_yaml(raw, label)
    if isinstance(document, dict) and document.get("kind") == "ConfigMap":
        label, document = _unwrap_configmap(document, label)
    errors = _schema_errors(document, label) if validate_schema else []
    if errors:
        raise ConfigError(errors)
    desired = _build_desired_state(document, label)
    return replace(desired, sha256=hashlib.sha256(raw).hexdigest())


def _parse_yaml(raw: bytes | str, label: str) -> Any:
    if not raw.strip():
        raise ConfigError([f"{label}: the file is empty; expected a {CONFIG_KEY} document"])
    try:
        document = json.loads(raw)  # JSON is YAML; json reads escaped astral characters right
    except (ValueError, RecursionError):
        document = _load_yaml(raw, label)
    _check_bounds(document, label)
    return document


def _load_yaml(raw: bytes | str, label: str) -> Any:
    try:
        _check_events(raw, label)
        return yaml.load(raw, Loader=SAFE_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{label}: invalid YAML{where}: {problem}"]) from None
    except ConfigError:
        raise
    except Exception as e:  # PyYAML's constructors raise plain errors too (`name: 2024-13-45`)
        raise ConfigError([f"{label}: invalid YAML: {type(e).__name__}: {_short(str(e))}"]) from None


def _check_events(raw: bytes | str, label: str) -> None:
    """Bound depth and expanded size on the parser's event stream, before anything is built:
    building first would let a merge-key or alias bomb, or deep nesting, exhaust time, memory
    or (in libyaml's composer) the C stack."""
    depth = total = 0
    sizes: dict[str, int] = {}  # anchor -> how many values it stands for
    starts: list[tuple[str | None, int]] = []
    for event in yaml.parse(raw, Loader=SAFE_LOADER):
        if isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            total, depth = total + 1, depth + 1
            starts.append((event.anchor, total))
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError([f"{label}: the document nests deeper than {MAX_CONFIG_DEPTH} levels"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, start = starts.pop()
            if anchor:
                sizes[anchor] = total - start + 1
        if total > MAX_CONFIG_NODES:
            raise ConfigError([f"{label}: the document expands to more than {MAX_CONFIG_NODES} values"])


def _check_bounds(document: Any, label: str) -> None:
    """Refuse what the event check cannot see: deep or huge JSON, non-string keys, giant numbers."""
    budget = MAX_CONFIG_NODES
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError([f"{label}: the document expands to more than {MAX_CONFIG_NODES} values"])
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError([f"{label}: the document nests deeper than {MAX_CONFIG_DEPTH} levels"])
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise ConfigError([f"{label}: mapping key {_short(key)} is not a string"])
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, int) and not -(10**18) < node < 10**18:
            # Python refuses to print integers past 4300 digits; no field takes one this big anyway.
            raise ConfigError([f"{label}: a number has more than 18 digits"])


def _unwrap_configmap(manifest: dict[str, Any], label: str) -> tuple[str, Any]:
    """Accept the very manifest `kubectl apply` takes: pick the data key that holds our document."""
    data = manifest.get("data")
    if not isinstance(data, dict) or not data:
        raise ConfigError([f"{label}: data: a ConfigMap must have a data mapping holding a {CONFIG_KEY} document"])
    keys = sorted(data, key=lambda k: (k != "configmap.yaml", k))
    for key in keys:
        value = data[key]
        if isinstance(value, str) and CONFIG_KEY in value:
            inner_label = f"{label} (data.{key})"
            return inner_label, _parse_yaml(value, inner_label)
    raise ConfigError([f"{label}: data: no key holds a {CONFIG_KEY} document (keys: {', '.join(map(str, keys))})"])


def _schema_errors(document: Any, label: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(config_schema())
    errors: list[str] = []
    for error in sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path]):
        errors.extend(f"{label}: {text}" for text in _describe_schema_error(error))
    return errors


def _describe_schema_error(error: jsonschema.ValidationError) -> Iterator[str]:
    path = list(error.absolute_path)
    instance = error.instance
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        for key in sorted(set(instance) - set(allowed)):
            yield f"{field_path([*path, key])}: unknown field; expected one of: {', '.join(allowed)}"
    elif error.validator == "required" and isinstance(instance, dict):
        for key in error.validator_value:
            if key not in instance:
                yield f"{field_path([*path, key])}: required field is missing"
    elif error.validator == "type":
        yield f"{field_path(path)}: expected {error.validator_value}, got {_short(instance)}"
    elif error.validator == "minLength":
        yield f"{field_path(path)}: must not be empty"
    else:
        yield f"{field_path(path)}: {_short(error.message)}"


def _short(value: Any) -> str:
    try:
        text = value if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    except ValueError:  # an integer past Python's 4300-digit printing limit
        text = f"{type(value).__name__} too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _build_desired_state(document: Any, label: str) -> DesiredState:
    """Turn a parsed document into a DesiredState. Shape checks repeat the schema's essentials
    so that `--no-config-validation` still fails with a ConfigError, never a crash."""
    top = _expect(document, dict, [], label)
    body = _expect(top.get(CONFIG_KEY), dict, [CONFIG_KEY], label)
    default_base = body.get("defaultBaseModel")
    entries = _entries(body, "ensureExist", default_base, label) + _entries(body, "ensureNotExist", default_base, label)
    _check_unique(entries, label)
    scheme = body.get("scheme", schema_default("scheme"))
    if scheme not in ("http", "https"):
        raise ConfigError([f"{label}: {CONFIG_KEY}.scheme: expected http or https, got {_short(scheme)}"])
    return DesiredState(
        host=str(body.get("host", schema_default("host"))),
        port=_expect_port(body.get("port", schema_default("port")), label),
        scheme=scheme,
        name=str(body.get("name") or ""),
        default_base_model=default_base if isinstance(default_base, str) else None,
        ensure_exist=tuple(entry.adapter for entry in entries if not entry.remove),
        ensure_not_exist=tuple(entry.adapter for entry in entries if entry.remove),
    )


@dataclass(frozen=True)
class Entry:
    """One model entry of the file, with where it stands, for error messages."""

    where: str
    adapter: Adapter
    remove: bool


def _entries(body: dict[str, Any], key: str, default_base: Any, label: str) -> list[Entry]:
    """The entries of one list in file order; `toRemove: true` marks an ensureExist entry for removal."""
    if body.get(key) is None:
        return []
    where = [CONFIG_KEY, key, "models"]
    models = _expect(_expect(body[key], dict, where[:2], label).get("models"), list, where, label)
    entries = []
    for index, model in enumerate(models):
        path = [*where, index]
        model = _expect(model, dict, path, label)
        adapter_id = _expect_text(model.get("id"), [*path, "id"], label)
        source = _expect_text(model.get("source"), [*path, "source"], label)
        base = model.get("base-model") or default_base
        adapter = Adapter(adapter_id, source, base if isinstance(base, str) else None)
        remove = key == "ensureNotExist" or model.get("toRemove") is True
        entries.append(Entry(field_path(path), adapter, remove))
    return entries


def _check_unique(entries: list[Entry], label: str) -> None:
    first_seen: dict[str, str] = {}
    errors = []
    for entry in entries:
        adapter_id = entry.adapter.id
        if adapter_id in first_seen:
            errors.append(f"{label}: {first_seen[adapter_id]} and {entry.where} both name adapter {adapter_id!r}")
        else:
            first_seen[adapter_id] = entry.where
    if errors:
        raise ConfigError(errors)


def _expect(value: Any, kind: type, path: list[str | int], label: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigError([f"{label}: {field_path(path)}: expected {kind.__name__}, got {_short(value)}"])
    return value


def _expect_text(value: Any, path: list[str | int], label: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError([f"{label}: {field_path(path)}: expected a non-empty string, got {_short(value)}"])
    return value


def _expect_port(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError([f"{label}: {CONFIG_KEY}.port: expected an integer 1-65535, got {_short(value)}"])
    return value


# ------------------------------------------------------------ the vLLM client


class ServerUnreachable(Exception):
    """No answer: connection refused, reset or timed out. The cycle ends; nothing is guessed."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ServerError(Exception):
    """An answer that stops the whole cycle: unauthorized, runtime LoRA off, a broken model list."""


@dataclass(frozen=True)
class Outcome:
    """The server's answer to one load or unload, judged."""

    ok: bool
    message: str = ""
    status: int | None = None
    inplace_refused: bool = False


class VLLMClient:
    """Thin HTTP layer: one session, one timeout on every call, answers turned into outcomes."""

    def __init__(self, session: requests.Session, timeout: float, api_key: str | None = None) -> None:
        self.session = session
        self.timeout = timeout
        self.base_url = ""
        self.has_api_key = bool(api_key)
        self._last_list: tuple[bytes, ServerState] | None = None  # the stable part of the last list, parsed
        if api_key:
            session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        url = self.base_url + path
        try:
            return self.session.request(method, url, json=body, timeout=self.timeout)
        except requests.Timeout:
            raise ServerUnreachable(f"{method} {url}: no answer within {self.timeout:g} s", timed_out=True) from None
        except requests.RequestException as e:
            raise ServerUnreachable(f"{method} {url}: {type(e).__name__}: {_first_line(e)}") from None

    def is_healthy(self) -> bool:
        try:
            return self._call("GET", "/health").status_code == 200
        except ServerUnreachable:
            return False

    def use_server(self, base_url: str) -> None:
        """Point at a server. Proxy and CA-bundle settings (HTTPS_PROXY, NO_PROXY,
        REQUESTS_CA_BUNDLE) are read from the environment once here, not on every request."""
        self.base_url, self._last_list = base_url, None
        self.session.trust_env = True
        found = self.session.merge_environment_settings(base_url, {}, None, None, None)
        self.session.proxies, self.session.verify = found["proxies"], found["verify"]
        self.session.trust_env = False  # also keeps a ~/.netrc from replacing the API key

    def server_state(self) -> ServerState:
        response = self._call("GET", "/v1/models")
        self._raise_for_auth(response)
        if response.status_code != 200:
            raise ServerError(f"GET /v1/models answered {response.status_code}: {_server_message(response)}")
        stable = _stable_part(response.content)
        if self._last_list and self._last_list[0] == stable:
            return self._last_list[1]
        try:
            state = parse_model_list(json.loads(response.content))
        except (ValueError, RecursionError) as e:
            raise ServerError(f"GET /v1/models answered an unexpected body: {e}") from None
        self._last_list = stable, state
        return state

    def load(self, adapter: Adapter, inplace: bool = False) -> Outcome:
        body: dict[str, Any] = {"lora_name": adapter.id, "lora_path": adapter.source}
        if inplace:
            body["load_inplace"] = True
        response = self._call("POST", "/v1/load_lora_adapter", body)
        self._raise_for_route(response)
        message = _server_message(response)
        if response.status_code == 200:
            return Outcome(True, message, 200)
        if response.status_code == 400 and "already been loaded" in message:
            # Without load_inplace this means the goal is met; with it, an older vLLM that ignores the flag.
            return Outcome(not inplace, message, 400, inplace_refused=inplace)
        return Outcome(False, message, response.status_code)

    def unload(self, adapter_id: str) -> Outcome:
        response = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": adapter_id})
        self._raise_for_route(response)
        message = _server_message(response)
        if response.status_code == 200 or response.status_code == 404:
            return Outcome(True, message, response.status_code)  # 404: already gone
        return Outcome(False, message, response.status_code)

    def _raise_for_auth(self, response: requests.Response) -> None:
        if response.status_code == 401:
            hint = (
                "the API key was refused; check VLLM_API_KEY / --api-key-file"
                if self.has_api_key
                else "the server requires an API key; set VLLM_API_KEY or --api-key-file"
            )
            raise ServerError(f"401 Unauthorized: {hint}")

    def _raise_for_route(self, response: requests.Response) -> None:
        self._raise_for_auth(response)
        if response.status_code == 404 and _json_body(response) == {"detail": "Not Found"}:
            raise ServerError(RUNTIME_LORA_HINT)


def parse_model_list(body: Any) -> ServerState:
    """Validate the whole body before trusting any of it: a partial view could hide adapters."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError("expected an object with a 'data' list")
    base_models: list[str] = []
    roots: set[str] = set()
    adapters: dict[str, str | None] = {}
    for index, entry in enumerate(body["data"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ValueError(f"data[{index}] has no string 'id'")
        root, parent = entry.get("root"), entry.get("parent")
        if not isinstance(root, (str, type(None))) or not isinstance(parent, (str, type(None))):
            raise ValueError(f"data[{index}]: 'root' and 'parent' must be strings or null")
        if parent is None:
            base_models.append(entry["id"])
            if root:
                roots.add(root)
        else:
            adapters.setdefault(entry["id"], root)
    return ServerState(tuple(base_models), frozenset(roots), adapters)


def _stable_part(model_list: bytes) -> bytes:
    for volatile in VOLATILE_FIELDS:
        model_list = volatile.sub(rb"\g<1>0", model_list)
    return model_list


def _text(response: requests.Response) -> str:
    # vLLM's plain-text answers carry no Content-Type; decoding directly skips charset guessing.
    return response.content.decode("utf-8", errors="replace")


def _json_body(response: requests.Response) -> Any:
    try:
        return json.loads(_text(response))
    except (ValueError, RecursionError):
        return None


def _server_message(response: requests.Response) -> str:
    body = _json_body(response)
    message: Any = _text(response)
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message", error) if isinstance(error, dict) else error or body.get("detail") or message
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:MAX_MESSAGE_CHARS] if text else ""


# ---------------------------------------------------------------------- plan


def plan(desired: DesiredState, server: ServerState) -> Plan:
    """The rules, with no I/O and no clock: unloads first, then reloads, then loads.

    An adapter the config does not name is never touched. An adapter whose base
    model this server does not serve is skipped, so one config can serve a fleet.
    """
    unloads = [
        Action(Op.UNLOAD, adapter, "listed in ensureNotExist")
        for adapter in desired.ensure_not_exist
        if adapter.id in server.adapters
    ]
    reloads: list[Action] = []
    loads: list[Action] = []
    skipped: list[Skip] = []
    for adapter in desired.ensure_exist:
        served_source = server.adapters.get(adapter.id)
        if adapter.base_model and not server.serves(adapter.base_model):
            served = ", ".join(server.base_models) or "none"
            skipped.append(Skip(adapter, f"wants base model {adapter.base_model!r}; the server serves {served}"))
        elif adapter.id not in server.adapters:
            loads.append(Action(Op.LOAD, adapter, "not loaded on the server"))
        elif served_source is not None and served_source != adapter.source:
            reloads.append(Action(Op.RELOAD, adapter, f"the server has source {served_source!r}"))
    return Plan(tuple(unloads + reloads + loads), tuple(skipped))


def backoff_delay(failures: int, period: float) -> float:
    """Seconds before retrying an adapter that failed `failures` times in a row."""
    return min(period * 2 ** min(failures - 1, 20), BACKOFF_CAP_SECONDS)


# ---------------------------------------------------------------- reconciler


@dataclass
class AdapterRecord:
    """What the sidecar remembers of one configured adapter between cycles."""

    adapter: Adapter
    desired: str  # present | absent
    state: str = "pending"
    observed_source: str | None = None
    last_action: str | None = None
    last_error: str | None = None
    failures: int = 0
    retry_at: float | None = None

    def status(self) -> dict[str, Any]:
        return {
            "desired": self.desired,
            "state": self.state,
            "source": self.adapter.source,
            "base_model": self.adapter.base_model,
            "observed_source": self.observed_source,
            "last_action": self.last_action,
            "last_error": self.last_error,
            "failures": self.failures,
            "next_retry": iso_time(self.retry_at),
        }


@dataclass(frozen=True)
class Sent:
    """One action's answer (or the exception that stopped it) and how long it took."""

    result: Outcome | ServerUnreachable | ServerError
    seconds: float


@dataclass(frozen=True)
class CycleResult:
    completed: bool  # the server answered and every due action was tried
    in_sync: bool  # nothing left to do but skipped adapters
    error: str | None = None
    unreachable: bool = False  # no answer at all: the server up/down line already says so


class Reconciler:
    """Executes plans and remembers per-adapter backoff; the only code that changes the server."""

    def __init__(self, client: VLLMClient, period: float, health_check_timeout: float) -> None:
        self.client = client
        self.period = period
        self.health_check_timeout = health_check_timeout
        self.records: dict[str, AdapterRecord] = {}
        self.server_up: bool | None = None
        self.ready = False
        self.cycles = 0
        self.last_cycle: CycleResult | None = None
        self._server_url = ""
        self._adopted: DesiredState | None = None
        self._started = clock()
        self._reported_error: str | None = None
        self._waiting_reported = False

    def reconcile(self, desired: DesiredState) -> CycleResult:
        """One cycle: health (only while the server is not known up), one GET /v1/models, the due actions."""
        self.cycles += 1
        started = clock()
        self._adopt(desired)
        try:
            result = self._cycle(desired, started)
        except Exception as e:  # a bug in one cycle must not stop the next one
            log.exception("reconcile failed unexpectedly", extra={"fields": {"reconcile_id": self.cycles}})
            result = CycleResult(False, False, f"internal error: {e!r}")
        RECONCILES.labels("success" if result.completed and result.in_sync else "error").inc()
        RECONCILE_SECONDS.observe(clock() - started)
        IN_SYNC.set(1 if result.in_sync else 0)
        self._report_cycle_error(result)
        self.last_cycle = result
        return result

    def next_delay(self, health_check_interval: float) -> float:
        return self.period if self.server_up else health_check_interval

    def _cycle(self, desired: DesiredState, now: float) -> CycleResult:
        try:
            if not self.server_up and not self._wait_step(now):
                return CycleResult(False, False, "vLLM /health does not answer 200", unreachable=True)
            server = self.client.server_state()
        except ServerUnreachable as e:
            self._set_server_up(False, str(e))
            return CycleResult(False, False, str(e), unreachable=True)
        except ServerError as e:
            return CycleResult(False, False, str(e))
        the_plan = plan(desired, server)
        self._observe(server, the_plan)
        return self._execute(the_plan, now)

    def _wait_step(self, now: float) -> bool:
        """Check /health once; say so once if the server stays away past the health-check timeout."""
        healthy = self.client.is_healthy()
        self._set_server_up(healthy)
        if not healthy and not self._waiting_reported and now - self._started > self.health_check_timeout:
            self._waiting_reported = True
            log.error(
                "vLLM is still not healthy; waiting on",
                extra={"fields": {"server": self.client.base_url, "waited_s": round(now - self._started)}},
            )
        return healthy

    def _execute(self, the_plan: Plan, now: float) -> CycleResult:
        due = [a for a in the_plan.actions if self.records[a.adapter.id].retry_at is None
               or now >= self.records[a.adapter.id].retry_at]
        pending = len(due) < len(the_plan.actions)  # some are still backing off
        unloads = [a for a in due if a.op is Op.UNLOAD]
        changes = [a for a in due if a.op is not Op.UNLOAD]
        for batch in (unloads, changes):  # unloads first, so their slots are free for the loads
            error: ServerUnreachable | ServerError | None = None
            for action, sent in zip(batch, self._send_all(batch), strict=True):
                if sent is None:
                    pending = True  # not sent: an earlier call got no answer
                elif isinstance(sent.result, Outcome):
                    pending = not self._record(action, sent.result, sent.seconds, now) or pending
                else:
                    error = error or sent.result
                    if isinstance(sent.result, ServerUnreachable) and sent.result.timed_out:
                        # Blame the adapter whose load hung, so it cannot block the others forever.
                        self._fail(self.records[action.adapter.id], action, str(sent.result), now,
                                   self._fields(action, sent.seconds))
            if isinstance(error, ServerUnreachable):
                self._set_server_up(False, str(error))
                return CycleResult(False, False, str(error), unreachable=True)
            if error:
                return CycleResult(False, False, str(error))
        # Ready once every loadable adapter was loaded; a permanent failure must not hold a pod back.
        settled = ("loaded", "failed", "skipped")
        self.ready = self.ready or all(r.state in settled for r in self.records.values() if r.desired == "present")
        return CycleResult(True, not pending, None)

    def _send_all(self, actions: list[Action]) -> list[Sent | None]:
        """Send up to MAX_REQUESTS_IN_FLIGHT requests at once: vLLM accepts calls for different
        names concurrently, which hides each round trip behind the engine's own work. After
        a call that gets no answer or stops the cycle, nothing more is sent (None)."""
        results: list[Sent | None] = [None] * len(actions)
        queue = iter(enumerate(actions))
        lock = threading.Lock()
        stopped = threading.Event()

        def worker() -> None:
            while not stopped.is_set():
                with lock:
                    index, action = next(queue, (-1, None))
                if action is None:
                    return
                started = clock()
                try:
                    results[index] = Sent(self._send(action), clock() - started)
                except (ServerUnreachable, ServerError) as e:
                    results[index] = Sent(e, clock() - started)
                    stopped.set()
                except Exception as e:  # a bug costs this adapter a retry, not the thread and the others
                    seconds = clock() - started
                    log.exception("unexpected error", extra={"fields": self._fields(action, seconds)})
                    results[index] = Sent(Outcome(False, f"internal error: {e!r}"), seconds)

        workers = [threading.Thread(target=worker, daemon=True)
                   for _ in range(min(MAX_REQUESTS_IN_FLIGHT, len(actions)))]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        return results

    def _send(self, action: Action) -> Outcome:
        if action.op is Op.UNLOAD:
            return self.client.unload(action.adapter.id)
        if action.op is Op.LOAD:
            return self.client.load(action.adapter)
        outcome = self.client.load(action.adapter, inplace=True)
        if not outcome.inplace_refused:
            return outcome
        # This vLLM does not know load_inplace: swap by unload then load.
        unloaded = self.client.unload(action.adapter.id)
        return self.client.load(action.adapter) if unloaded.ok else unloaded

    def _fields(self, action: Action, seconds: float) -> dict[str, Any]:
        return {"adapter": action.adapter.id, "action": action.op.value, "duration_s": round(seconds, 4),
                "reconcile_id": self.cycles}

    def _record(self, action: Action, outcome: Outcome, seconds: float, now: float) -> bool:
        """Remember what the server answered to one action; True if it succeeded."""
        OPERATIONS.labels(action.op.value, "success" if outcome.ok else "error").inc()
        OPERATION_SECONDS.labels(action.op.value).observe(seconds)
        record = self.records[action.adapter.id]
        record.last_action = action.op.value
        fields = self._fields(action, seconds)
        if not outcome.ok:
            self._fail(record, action, f"{outcome.status}: {outcome.message}", now, fields)
            return False
        log.info(f"{action.op.value} done: {action.adapter.id}", extra={"fields": {**fields, "result": "success"}})
        record.failures, record.retry_at, record.last_error = 0, None, None
        record.state = "absent" if action.op is Op.UNLOAD else "loaded"
        record.observed_source = None if action.op is Op.UNLOAD else action.adapter.source
        return True

    def _fail(self, record: AdapterRecord, action: Action, error: str, now: float, fields: dict[str, Any]) -> None:
        record.failures += 1
        record.retry_at = now + backoff_delay(record.failures, self.period)
        record.state = "failed"
        record.last_action = action.op.value
        if error != record.last_error:  # once per distinct error, not once per retry
            log.warning(
                f"{action.op.value} failed: {action.adapter.id}",
                extra={"fields": {**fields, "result": "error", "error": error, "retry_in_s": record.retry_at - now}},
            )
        record.last_error = error

    def _adopt(self, desired: DesiredState) -> None:
        """Follow config changes: new records for new or changed entries, none for dropped ones."""
        if desired is self._adopted:
            return  # the same config as last cycle: nothing to follow
        self._adopted = desired
        if desired.server_url != self._server_url:
            self.client.use_server(desired.server_url)
            self._server_url, self.server_up = desired.server_url, None
        wanted = {a.id: (a, "present") for a in desired.ensure_exist}
        wanted.update({a.id: (a, "absent") for a in desired.ensure_not_exist})
        for adapter_id in set(self.records) - set(wanted):
            del self.records[adapter_id]
        for adapter_id, (adapter, goal) in wanted.items():
            record = self.records.get(adapter_id)
            if record is None or record.adapter != adapter or record.desired != goal:
                self.records[adapter_id] = AdapterRecord(adapter, goal)  # a changed entry resets its backoff

    def _observe(self, server: ServerState, the_plan: Plan) -> None:
        """Set each record's state from what the server lists, before any action changes it."""
        skipped = {skip.adapter.id: skip.reason for skip in the_plan.skipped}
        planned = {action.adapter.id for action in the_plan.actions}
        for adapter_id, record in self.records.items():
            record.observed_source = server.adapters.get(adapter_id)
            if adapter_id in skipped:
                record.state, record.last_error = "skipped", skipped[adapter_id]
            elif adapter_id not in planned:
                record.state = "loaded" if record.desired == "present" else "absent"
                record.failures, record.retry_at, record.last_error = 0, None, None
            elif record.failures == 0:
                record.state = "pending"

    def _set_server_up(self, up: bool, reason: str = "") -> None:
        if up != self.server_up:
            fields = {"server": self.client.base_url}
            if up:
                log.info("vLLM server is up", extra={"fields": fields})
            elif self.server_up:
                log.warning("vLLM server is down", extra={"fields": {**fields, "error": reason}})
            else:
                log.info("waiting for vLLM to become healthy", extra={"fields": fields})
            self.server_up = up
        SERVER_UP.set(1 if up else 0)

    def _report_cycle_error(self, result: CycleResult) -> None:
        """Log a server error once per distinct error, and once more on recovery."""
        if result.completed and self._reported_error:
            log.info("reconcile recovered", extra={"fields": {"reconcile_id": self.cycles}})
            self._reported_error = None
        elif result.error and not result.unreachable and result.error != self._reported_error:
            log.error("reconcile stopped early", extra={"fields": {"reconcile_id": self.cycles, "error": result.error}})
            self._reported_error = result.error

    def status(self) -> dict[str, Any]:
        return {
            "server": {"url": self._server_url, "up": bool(self.server_up)},
            "in_sync": bool(self.last_cycle and self.last_cycle.in_sync),
            "last_error": self.last_cycle.error if self.last_cycle else None,
            "adapters": {adapter_id: record.status() for adapter_id, record in sorted(self.records.items())},
        }


# ------------------------------------------------------------------ triggers


class ConfigSource:
    """The mounted config file: a stat each tick, a read only when the stat changed, a parse
    only when the bytes changed. Keeps the last good config through any bad version."""

    def __init__(self, path: Path, validate_schema: bool = True) -> None:
        self.path = path
        self.validate_schema = validate_schema
        self.desired: DesiredState | None = None
        self.error: str | None = None
        self.last_read: float | None = None
        self._stat_seen: tuple[int, ...] | None = None
        self._sha_seen: str | None = None
        self._missing = False

    def poll(self, force: bool = False) -> bool:
        """True when a new valid config was adopted. `force` re-reads even if the stat looks the same."""
        stat = self._stat()
        if stat == self._stat_seen and not force:
            return False
        try:
            raw = _read_bytes(self.path)
        except FileNotFoundError:
            # Caught mid-swap, or really gone: either way keep the last good config. Say so only
            # when it is still missing on the next look, since a swap lasts far less than a tick.
            if self._missing:
                self._report(f"{self.path}: the config file does not exist")
                self._sha_seen = None  # the same good file coming back is news
            self._missing = True
            return False
        except OSError as e:
            self._report(f"{self.path}: cannot read the file: {e.strerror or e}")
            return False
        except ConfigError as e:  # too large to be a config
            self._stat_seen = stat
            self._report(str(e))
            return False
        self._missing = False
        self._stat_seen = stat
        self.last_read = clock()
        sha = hashlib.sha256(raw).hexdigest()
        if sha == self._sha_seen:
            return False
        self._sha_seen = sha
        try:
            desired = parse_config(raw, str(self.path), self.validate_schema)
        except ConfigError as e:
            self._report(str(e))
            return False
        self._adopt(desired)
        return True

    def _stat(self) -> tuple[int, ...] | None:
        try:
            s = os.stat(self.path)  # follows the kubelet's symlinks to the current version
        except OSError:
            return None
        return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)

    def _adopt(self, desired: DesiredState) -> None:
        if self.error:
            log.info("config is valid again", extra={"fields": {"config_sha256": desired.sha256}})
        self.error = None
        self.desired = desired
        CONFIG_VALID.set(1)
        CONFIG_LAST_CHANGE.set(wall_time(clock()))
        log.info(
            "config loaded",
            extra={"fields": {"name": desired.name or None, "config_sha256": desired.sha256,
                              "ensure_exist": len(desired.ensure_exist),
                              "ensure_not_exist": len(desired.ensure_not_exist)}},
        )

    def _report(self, error: str) -> None:
        CONFIG_VALID.set(0)
        if error != self.error:  # once per distinct error
            state = "keeping the last good config" if self.desired else "waiting for a valid config"
            log.error(f"config rejected; {state}", extra={"fields": {"error": error}})
        self.error = error

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.desired.name if self.desired else None,
            "sha256": self.desired.sha256 if self.desired else None,
            "last_read": iso_time(self.last_read),
            "error": self.error,
        }


@dataclass
class Heartbeat:
    """When the loop last ticked, for /healthz."""

    last_tick: float = field(default_factory=clock)


def run_loop(
    settings: Settings, config: ConfigSource, reconciler: Reconciler, stop: threading.Event, heartbeat: Heartbeat
) -> None:
    """The whole sidecar: reconcile when the config changed or a period passed; one cycle at a time."""
    next_due = 0.0
    while not stop.is_set():
        now = heartbeat.last_tick = clock()
        due = now >= next_due
        changed = config.poll(force=due)
        if (changed or due) and config.desired is not None:
            reconciler.reconcile(config.desired)
            next_due = now + reconciler.next_delay(settings.health_check_interval)
        elif due:
            next_due = now + settings.health_check_interval
        stop.wait(min(settings.watch_interval, max(0.0, next_due - clock())))


def wait_for_health(client: VLLMClient, timeout: float, interval: float) -> bool:
    deadline = clock() + timeout
    while not client.is_healthy():
        if clock() >= deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - clock())))
    return True


# ------------------------------------------------------------- status server


class AdapterMetrics(prom.registry.Collector):
    """The per-adapter series, read from the reconciler's records when Prometheus scrapes."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Built and handed over one family at a time: at 1000 adapters the samples of all
        # three at once would be the biggest thing the sidecar ever holds in memory.
        records = list(self.reconciler.records.values())  # a snapshot: the loop may change the dict
        loaded = [(r.adapter.id, 1 if r.desired == "present" and r.state == "loaded" else 0) for r in records]
        for (name, documentation), label in ((ADAPTER_LOADED, "adapter"), (LEGACY_ADAPTER_STATUS, "adapter_name")):
            family = GaugeMetricFamily(name, documentation, labels=[label])
            for adapter_id, value in loaded:
                family.add_metric([adapter_id], value)
            yield family
        family = GaugeMetricFamily(*ADAPTER_STATE, labels=["adapter", "state"])
        for record in records:
            for state in ADAPTER_STATES:
                family.add_metric([record.adapter.id, state], 1 if record.state == state else 0)
        yield family


class StatusServer(ThreadingHTTPServer):
    """/metrics, /healthz, /readyz and /status on one port; GET only."""

    daemon_threads = True
    request_queue_size = 64  # the default 5 makes a burst of probes and scrapes wait on SYN retries

    def __init__(
        self, address: tuple[str, int], status: Callable[[], dict[str, Any]],
        alive: Callable[[], bool], ready: Callable[[], bool],
    ) -> None:
        super().__init__(address, StatusHandler)
        self.status, self.alive, self.ready = status, alive, ready


class StatusHandler(BaseHTTPRequestHandler):
    timeout = 5  # a client that sends half a request must not hold a thread forever
    disable_nagle_algorithm = True  # headers and body are two writes; don't wait for a delayed ACK
    server: StatusServer
    PATHS = ("/metrics", "/healthz", "/readyz", "/status")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, prom.generate_latest(), prom.CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok = self.server.alive() and (path == "/healthz" or self.server.ready())
            self._send(200 if ok else 503, b"ok\n" if ok else b"not ok\n", "text/plain")
        elif path == "/status":
            body = json.dumps(self.server.status(), indent=2).encode() + b"\n"
            self._send(200, body, "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _refuse(self) -> None:
        known = self.path.split("?", 1)[0] in self.PATHS
        self._send(405 if known else 404, b"method not allowed\n" if known else b"not found\n", "text/plain")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse  # noqa: N815

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if code == 405:
            self.send_header("Allow", "GET")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the log


# ---------------------------------------------------------------------- main


class LogFormatter(logging.Formatter):
    """One line per event, text (`key=value`) or JSON, with any secret masked."""

    def __init__(self, json_lines: bool, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.json_lines = json_lines
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = {k: v for k, v in getattr(record, "fields", {}).items() if v is not None}
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        if self.json_lines:
            line = json.dumps({"ts": ts, "level": record.levelname.lower(), "msg": record.getMessage(), **fields})
        else:
            pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
            line = f"{ts} {record.levelname:<7} {record.getMessage()}" + (f" {pairs}" if pairs else "")
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if text and not any(c in text for c in ' ="\n') else json.dumps(text)


def configure_logging(level: str, log_format: str, secrets: Sequence[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(log_format == "json", secrets))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


ENV_PREFIX = "LORA_SIDECAR_"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar.py",
        description="Keep a vLLM server's LoRA adapters equal to a mounted config (vLLMLoRAConfig).",
        epilog="Every flag can also be set by the environment variable named in its help; a flag wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def flag(name: str, env: str, default: Any, help_text: str, **kwargs: Any) -> None:
        parser.add_argument(name, default=os.environ.get(env, default), help=f"{help_text} [env {env}]", **kwargs)

    flag("--config", "DYNAMIC_LORA_ROLLOUT_CONFIG", DEFAULT_CONFIG_PATH,
         "config file: the vLLMLoRAConfig YAML or a whole ConfigMap manifest", metavar="FILE")
    flag("--health-check-timeout", ENV_PREFIX + "HEALTH_CHECK_TIMEOUT", 300.0,
         "seconds to wait for vLLM's /health (--once/--dry-run give up after it)", type=float, metavar="S")
    flag("--health-check-interval", ENV_PREFIX + "HEALTH_CHECK_INTERVAL", 2.0,
         "seconds between /health checks while the server is not up", type=float, metavar="S")
    flag("--reconcile-trigger", ENV_PREFIX + "RECONCILE_TRIGGER", 5.0,
         "seconds between reconcile cycles (also the first retry delay of a failed adapter)", type=float,
         metavar="S")
    flag("--watch-interval", ENV_PREFIX + "WATCH_INTERVAL", 0.1,
         "seconds between cheap checks (stat) of the config file for changes", type=float, metavar="S")
    flag("--config-validation", ENV_PREFIX + "CONFIG_VALIDATION", "true",
         "check the config against validation.yaml (duplicate checks always run)",
         action=argparse.BooleanOptionalAction)
    flag("--metrics-port", ENV_PREFIX + "METRICS_PORT", 8080,
         "port of /metrics, /healthz, /readyz and /status; 0 turns them off", type=int, metavar="PORT")
    flag("--metrics-address", ENV_PREFIX + "METRICS_ADDRESS", "0.0.0.0", "address to serve them on", metavar="ADDR")
    flag("--request-timeout", ENV_PREFIX + "REQUEST_TIMEOUT", 10.0, "seconds allowed for every HTTP call",
         type=float, metavar="S")
    flag("--api-key-file", ENV_PREFIX + "API_KEY_FILE", None,
         "file holding vLLM's API key (else env VLLM_API_KEY); sent as Authorization: Bearer",
         metavar="FILE")
    flag("--log-level", ENV_PREFIX + "LOG_LEVEL", "info", "log level",
         choices=["debug", "info", "warning", "error"], type=str.lower)
    flag("--log-format", ENV_PREFIX + "LOG_FORMAT", "text", "log line format", choices=["text", "json"])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--once", dest="mode", action="store_const", const="once",
                       help="reconcile once and exit: 0 in sync, 1 not in sync, 2 invalid config")
    modes.add_argument("--dry-run", dest="mode", action="store_const", const="dry-run",
                       help="print the plan, change nothing, exit: 0 in sync, 1 changes needed, 2 invalid config")
    modes.add_argument("--validate", dest="mode", action="store_const", const="validate",
                       help="check the config file only (no network): exit 0, or 2 with every error")
    parser.add_argument("--version", action="version", version=f"lora-sidecar {VERSION}")
    parser.set_defaults(mode="run")
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = build_parser()
    # argparse converts string defaults (our environment values) with each flag's type.
    args = parser.parse_args(argv)
    for name, allowed in (("log_level", ("debug", "info", "warning", "error")), ("log_format", ("text", "json"))):
        if getattr(args, name) not in allowed:
            parser.error(f"--{name.replace('_', '-')}: {getattr(args, name)!r} is not one of {', '.join(allowed)}")
    if min(args.reconcile_trigger, args.watch_interval, args.request_timeout) <= 0:
        parser.error("--reconcile-trigger, --watch-interval and --request-timeout must be positive")
    validation = args.config_validation
    if isinstance(validation, str):  # from the environment
        validation = validation.strip().lower() not in ("0", "false", "no", "off")
    return Settings(
        config_path=Path(args.config),
        health_check_timeout=args.health_check_timeout,
        health_check_interval=max(args.health_check_interval, 0.05),
        reconcile_period=args.reconcile_trigger,
        watch_interval=args.watch_interval,
        config_validation=validation,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        request_timeout=args.request_timeout,
        api_key=read_api_key(parser, args.api_key_file),
        log_level=args.log_level,
        log_format=args.log_format,
        mode=args.mode,
    )


def read_api_key(parser: argparse.ArgumentParser, key_file: str | None) -> str | None:
    if key_file:
        try:
            return Path(key_file).read_text(encoding="utf-8").strip() or None
        except OSError as e:
            parser.error(f"--api-key-file {key_file}: {e.strerror or e}")
    return os.environ.get("VLLM_API_KEY") or None


def validate_only(settings: Settings) -> int:
    try:
        desired = read_config(settings.config_path, settings.config_validation)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 2
    print(f"{settings.config_path}: valid: {len(desired.ensure_exist)} adapters to hold, "
          f"{len(desired.ensure_not_exist)} to remove, server {desired.server_url}")
    return 0


def describe(the_plan: Plan) -> list[str]:
    lines = [f"{a.op.value:<7} {a.adapter.id}  source={a.adapter.source}  ({a.reason})" for a in the_plan.actions]
    lines += [f"skip    {s.adapter.id}  ({s.reason})" for s in the_plan.skipped]
    return lines or ["in sync"]


def run_one_shot(settings: Settings, client: VLLMClient) -> int:
    """--once and --dry-run: exit 0 when the server matches the config, 1 when not, 2 for a bad config."""
    try:
        desired = read_config(settings.config_path, settings.config_validation)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 2
    client.use_server(desired.server_url)
    if not wait_for_health(client, settings.health_check_timeout, settings.health_check_interval):
        log.error("vLLM is not healthy", extra={"fields": {"server": desired.server_url,
                                                           "waited_s": settings.health_check_timeout}})
        return 1
    try:
        if settings.mode == "once":
            Reconciler(client, settings.reconcile_period, settings.health_check_timeout).reconcile(desired)
        the_plan = plan(desired, client.server_state())
    except (ServerUnreachable, ServerError) as e:
        log.error("cannot read the server's adapters", extra={"fields": {"error": str(e)}})
        return 1
    print("\n".join(describe(the_plan)))
    return 0 if not the_plan.actions else 1


def run_forever(settings: Settings, client: VLLMClient) -> int:
    config = ConfigSource(settings.config_path, settings.config_validation)
    reconciler = Reconciler(client, settings.reconcile_period, settings.health_check_timeout)
    heartbeat = Heartbeat()
    prom.REGISTRY.register(AdapterMetrics(reconciler))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def alive() -> bool:
        return clock() - heartbeat.last_tick <= settings.alive_window

    def status() -> dict[str, Any]:
        return {"version": VERSION, "config": config.status(), "ready": reconciler.ready, **reconciler.status()}

    status_server = None
    if settings.metrics_port:
        address = (settings.metrics_address, settings.metrics_port)
        try:
            status_server = StatusServer(address, status, alive, lambda: reconciler.ready)
        except OSError as e:
            log.error("cannot serve metrics and probes", extra={"fields": {"address": f"{address[0]}:{address[1]}",
                                                                            "error": e.strerror or str(e)}})
            return 1
        # The process exits without shutdown(), so the poll interval only costs wake-ups: keep it long.
        threading.Thread(target=status_server.serve_forever, kwargs={"poll_interval": 5}, daemon=True).start()
    log.info("sidecar started", extra={"fields": {"version": VERSION, "config": str(settings.config_path),
                                                  "metrics_port": settings.metrics_port}})
    worker = threading.Thread(target=run_loop, args=(settings, config, reconciler, stop, heartbeat), daemon=True)
    worker.start()
    while not stop.is_set() and worker.is_alive():
        stop.wait(1.0)  # a signal sets `stop` and ends the wait at once
    log.info("sidecar stopping; adapters stay loaded")
    return 0 if stop.is_set() else 1


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format, [settings.api_key or ""])
    if settings.mode == "validate":
        return validate_only(settings)
    client = VLLMClient(requests.Session(), settings.request_timeout, settings.api_key)
    if settings.mode in ("once", "dry-run"):
        return run_one_shot(settings, client)
    return run_forever(settings, client)


if __name__ == "__main__":
    sys.exit(main())
