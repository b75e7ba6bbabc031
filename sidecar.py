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

Adapters kept in object storage (`s3://`, `https://` archives) are downloaded by
the sidecar into a volume vLLM shares, checked, and loaded from there.

Reading order: the knobs (every flag with its environment variable and why its
default is what it is) and the metrics; data types; config loading; the vLLM
client; remote sources (`localize()` and `evictions()`, pure, then
`AdapterStore`, which downloads, checks, stages and deletes); the decisions, all
pure: `plan()`, then what an answer or a model list does to one adapter's record
(`AdapterRecord`), which actions are due (`due_actions`), and when the sidecar is
in sync (`is_in_sync`) and ready (`is_ready`); the reconciler, which executes a
plan, records every answer and proves adapters with their canary; the triggers
(`ConfigSource`, `run_loop`, the one place that decides when to reconcile); the
status server; `main()`.
"""

from __future__ import annotations

import argparse
import enum
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from functools import cache, lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import prometheus_client as prom
import requests
import urllib3
import yaml
from prometheus_client.core import GaugeMetricFamily

VERSION = "1.0.0"

# ------------------------------------------------------------------ knobs
# Every flag, its environment variable and its default, and why the default is what it is.
ENV = "LORA_SIDECAR_"


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def byte_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no budget) or more, got {text!r}")
    return value


FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--config", "DYNAMIC_LORA_ROLLOUT_CONFIG", dict(
        # where deployment.yaml mounts the ConfigMap
        dest="config_path", type=Path, default="/config/configmap.yaml", metavar="FILE",
        help="config file: the vLLMLoRAConfig YAML or a whole ConfigMap manifest")),
    ("--reconcile-trigger", ENV + "RECONCILE_TRIGGER", dict(
        # How soon a vLLM restart is repaired; in sync a period costs one GET /v1/models.
        dest="reconcile_period", default=5.0, type=positive, metavar="S",
        help="seconds between reconcile cycles (also the first retry delay of a failed adapter)")),
    ("--watch-interval", ENV + "WATCH_INTERVAL", dict(
        # A stat() through the kubelet's symlinks; the kubelet itself takes 60-90 s to propagate.
        default=0.1, type=positive, metavar="S", help="seconds between cheap checks (stat) of the config file")),
    ("--health-check-interval", ENV + "HEALTH_CHECK_INTERVAL", dict(
        # /health costs vLLM nothing; the first reconcile follows within this of the server coming up.
        default=2.0, type=positive, metavar="S", help="seconds between /health checks while the server is not up")),
    ("--health-check-timeout", ENV + "HEALTH_CHECK_TIMEOUT", dict(
        # vLLM takes 25-60 s to start on a CPU, minutes to load a large model on a GPU.
        default=300.0, type=float, metavar="S",
        help="seconds to wait for vLLM's /health (--once/--dry-run give up after it; the loop logs it)")),
    ("--request-timeout", ENV + "REQUEST_TIMEOUT", dict(
        # The quick calls answer in milliseconds; 10 s only waits out a busy event loop.
        default=10.0, type=positive, metavar="S",
        help="seconds allowed for each quick call: /health, /version, /v1/models, unload")),
    ("--load-timeout", ENV + "LOAD_TIMEOUT", dict(
        # vLLM downloads a Hugging Face id on load: minutes for a large adapter on a slow link.
        default=600.0, type=positive, metavar="S",
        help="seconds allowed for one load; a load sent with others gets one allowance for each")),
    ("--adapter-dir", ENV + "ADAPTER_DIR", dict(
        default=None, type=Path, metavar="DIR",  # a volume mounted at the same path in vLLM's container
        help="where s3:// and https:// sources are downloaded to; vLLM loads them from there")),
    ("--adapter-dir-max-bytes", ENV + "ADAPTER_DIR_MAX_BYTES", dict(
        # 0 keeps no version the config no longer names; a budget keeps them, for a quick rollback.
        default=0, type=byte_count, metavar="BYTES",
        help="disk budget of --adapter-dir: versions no longer used are kept up to it, oldest evicted "
             "first; 0: no budget, and an unused version is deleted once vLLM no longer lists it")),
    ("--download-timeout", ENV + "DOWNLOAD_TIMEOUT", dict(
        # Each read has --request-timeout; this bounds the whole of a large adapter on a slow link.
        default=1800.0, type=positive, metavar="S", help="seconds allowed for one adapter's whole download")),
    ("--config-validation", ENV + "CONFIG_VALIDATION", dict(
        # An unknown key is most often a misspelt one (`base_model` for `base-model`): refuse it.
        default=True, action=argparse.BooleanOptionalAction,
        help="check the config against validation.yaml; off, unknown keys pass and every other rule holds")),
    ("--metrics-port", ENV + "METRICS_PORT", dict(
        # The port deployment.yaml's probes and prometheus.io annotations name.
        default=8080, type=int, metavar="PORT", help="port of /metrics, /healthz, /readyz and /status; 0: none")),
    ("--metrics-address", ENV + "METRICS_ADDRESS", dict(
        default="::", metavar="ADDR",  # dual stack: probes reach it on IPv4, IPv6 and dual-stack clusters
        help="address to serve them on; '::' is IPv6 and IPv4 (0.0.0.0 on a host without IPv6)")),
    ("--api-key-file", ENV + "API_KEY_FILE", dict(
        # None: VLLM_API_KEY, the variable vLLM itself reads, so one Secret can serve both containers.
        default=None, metavar="FILE",
        help="file holding vLLM's API key (else env VLLM_API_KEY); sent as Authorization: Bearer")),
    ("--log-level", ENV + "LOG_LEVEL", dict(
        # info: a line per action, change and failure, none while in sync.
        default="info", type=str.lower, choices=["debug", "info", "warning", "error"], help="log level")),
    ("--log-format", ENV + "LOG_FORMAT", dict(
        # text for `kubectl logs`; json for a log pipeline.
        default="text", choices=["text", "json"], help="log line format")),
)


@dataclass(frozen=True)
class Settings:
    """Everything the command line and environment can set, read once at start: the flags above
    by their `dest`, the API key, and what to do."""

    config_path: Path
    reconcile_period: float
    watch_interval: float
    health_check_interval: float
    health_check_timeout: float
    request_timeout: float
    load_timeout: float
    adapter_dir: Path | None
    adapter_dir_max_bytes: int
    download_timeout: float
    config_validation: bool
    metrics_port: int
    metrics_address: str
    log_level: str
    log_format: str
    api_key: str | None = field(repr=False)
    mode: str  # run | once | dry-run | validate | digest
    digest_of: Path | None  # --digest DIR

    @property
    def alive_window(self) -> float:
        # How long the loop may go without progress: 3 periods and one quick call. A call still
        # within its own timeout (a load may take minutes) extends it; see Liveness.
        return 3 * self.reconcile_period + self.request_timeout


SCHEMA_PATH = Path(__file__).resolve().with_name("validation.yaml")
CONFIG_KEY = "vLLMLoRAConfig"
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
# A new version is first loaded under this name (`<id>~staging`), so that the serving version is
# unloaded only once the new files are known to load.
STAGING_SUFFIX = "~staging"
# vLLM <= 0.32 keeps `load_inplace` on the stored request and re-reads the adapter's files on every
# engine step that uses it (vllm/lora/worker_manager.py); 0.33 resets the flag after the load.
INPLACE_SAFE_FROM = (0, 33)
# Remote sources: downloaded by the sidecar, loaded by vLLM from --adapter-dir.
REMOTE_SCHEMES = ("s3://", "https://")
# Downloads share one link and one disk: two at once keep a slow source from holding up the rest.
MAX_DOWNLOADS_IN_FLIGHT = 2
INCOMING_PREFIX = ".incoming-"  # a download in progress; never given to vLLM
DOWNLOAD_CHUNK = 1024 * 1024
RUNTIME_LORA_HINT = (
    "vLLM has runtime LoRA updating turned off: start it with "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and --enable-lora"
)


class EventLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`log.info("load done", adapter="a1")`: keyword arguments are the event's fields (LogFormatter)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("exc_info", "stack_info", "stacklevel")}
        return msg, {**kwargs, "extra": {"fields": fields}}


logger = logging.getLogger("lora-sidecar")
log = EventLog(logger)
# libyaml's safe loader when PyYAML has it (a 1000-adapter config: 27 ms, against 200 ms); both are safe.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The metric inventory: everything the sidecar reports, in one place.
prom.disable_created_metrics()  # *_created series only add noise to every counter and histogram
# Per-adapter series are built from the reconciler's records at scrape time (AdapterMetrics),
# so they cost nothing per cycle and leave with the adapter when it leaves the config.
ADAPTER_LOADED = ("lora_sidecar_adapter_loaded",
                  "1 when the server lists an ensureExist adapter with the desired source, else 0.")
ADAPTER_STATE = ("lora_sidecar_adapter_state", "One-hot state of each adapter named in the config.")
LEGACY_ADAPTER_STATUS = ("lora_syncer_adapter_status",
                         "1 when the adapter is loaded (kept for dashboards built for the original lora-syncer).")
OPERATIONS = prom.Counter("lora_sidecar_operations",
                          "Load, reload and unload actions, by result (success, error, timeout, unreachable).",
                          ["op", "result"])
OPERATION_SECONDS = prom.Histogram("lora_sidecar_operation_duration_seconds",
                                   "Duration of load, reload and unload actions, whatever their result.", ["op"],
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900))
HTTP_REQUESTS = prom.Counter("lora_sidecar_http_requests",
                             "Every HTTP request sent to vLLM, by route and answer (status code, timeout, error).",
                             ["route", "code"])
RECONCILES = prom.Counter("lora_sidecar_reconcile", "Reconcile cycles.", ["result"])
RECONCILE_SECONDS = prom.Histogram("lora_sidecar_reconcile_duration_seconds", "Duration of reconcile cycles.")
CONFIG_VALID = prom.Gauge("lora_sidecar_config_valid", "1 when the config file is valid.")
CONFIG_LAST_CHANGE = prom.Gauge("lora_sidecar_config_last_change_timestamp_seconds",
                                "Unix time at which a new valid config was adopted.")
CANARIES = prom.Counter("lora_sidecar_canary", "Canary completions run, by result (verified, inert, unavailable).",
                        ["result"])
CANARY_SECONDS = prom.Histogram("lora_sidecar_canary_duration_seconds",
                                "Time to prove an adapter: its completion and (unless cached) its base model's.")
FOREIGN = prom.Gauge("lora_sidecar_foreign_adapters", "Adapters the server lists that the config does not name.")
LOST = prom.Counter("lora_sidecar_adapter_lost", "Adapters the sidecar saw loaded that vanished without its unload.",
                    ["adapter"])
DOWNLOADS = prom.Counter("lora_sidecar_downloads", "Downloads of remote adapter sources, by result (success, error).",
                         ["result"])
DOWNLOAD_BYTES = prom.Counter("lora_sidecar_download_bytes", "Bytes downloaded from remote adapter sources.")
DOWNLOAD_SECONDS = prom.Histogram("lora_sidecar_download_seconds", "Duration of downloads, whatever their result.",
                                  buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800))
ADAPTER_DIR_BYTES = prom.Gauge("lora_sidecar_adapter_dir_bytes", "Bytes of the adapter versions in --adapter-dir.")
SERVER_UP = prom.Gauge("lora_sidecar_server_up", "1 when the vLLM server answered its last call.")
IN_SYNC = prom.Gauge("lora_sidecar_in_sync", "1 when the server matched the config after the last cycle.")
for _counter, _results in ((CANARIES, ("verified", "inert", "unavailable")), (DOWNLOADS, ("success", "error"))):
    for _result in _results:  # each at 0 from the start, so that dashboards find them
        _counter.labels(_result)

# Secrets (the API key) never leave the process: every log line, /status, /metrics and printed
# plan goes through mask(). Set once at start. A URL's credentials and query string (a presigned
# URL's signature) are masked too.
SECRETS: list[str] = []
URL_USER = re.compile(r"(\w+://)[^\s/@\"']+@")
# requests' messages name the URL as `url: /path?query`.
URL_QUERY = re.compile(r"((?:https?://|url: )[^\s?#\"']*)\?[^\s\"']*")


def mask(text: str) -> str:
    for secret in SECRETS:
        text = text.replace(secret, "***")
    if "://" in text or "url: " in text:
        text = URL_QUERY.sub(r"\1?***", URL_USER.sub(r"\1***@", text))
    return text


class Said:
    """What was last said on each subject, so that each thing is logged once until it changes."""

    def __init__(self) -> None:
        self._last: dict[Hashable, object] = {}

    def changed(self, subject: Hashable, value: object) -> bool:
        if subject in self._last and self._last[subject] == value:
            return False
        self._last[subject] = value
        return True

    def first(self, subject: Hashable) -> bool:
        return self.changed(subject, True)

    def clear(self, subject: Hashable) -> bool:
        return self._last.pop(subject, None) is not None


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
class Canary:
    """How to prove that an adapter works: one deterministic completion through it and one through
    its base model; the same text means the adapter changes nothing (inert)."""

    prompt: str
    max_tokens: int
    timeout: float
    inert_blocks_readiness: bool = False


@dataclass(frozen=True)
class Adapter:
    """One adapter as the config names it; base_model already falls back to defaultBaseModel."""

    id: str
    source: str
    base_model: str | None = None
    canary: Canary | None = None  # None: not proven, only loaded
    sha256: str | None = None  # pins a remote source's content

    @property
    def remote(self) -> bool:
        return self.source.startswith(REMOTE_SCHEMES)


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
    key: str | None = None  # the ConfigMap data key it came from, when the file was a whole manifest

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
    DOWNLOAD = "download"  # of a remote source, before its load; never in a plan


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


# ------------------------------------------------------------ config loading


class ConfigError(Exception):
    """A config that must not be acted on; each error names the file and the field."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = list(errors)


@cache
def config_schema(strict: bool = True) -> dict[str, Any]:
    """validation.yaml; not strict (--no-config-validation) lets unknown keys pass, nothing else."""
    with SCHEMA_PATH.open(encoding="utf-8") as f:
        schema = yaml.safe_load(f)
    if not strict:
        stack = [schema]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                node.pop("additionalProperties", None)
                stack.extend(node.values())
    return schema


# The formats validation.yaml names; jsonschema checks only formats it is given.
FORMATS = jsonschema.FormatChecker(())


@FORMATS.checks("printable")
def is_printable(value: object) -> bool:
    """No control, format or unpaired surrogate characters: they would forge log lines or break a scrape."""
    return not isinstance(value, str) or value.isprintable()


@FORMATS.checks("host")
def is_host(value: object) -> bool:
    """A host name or an IP address; an IPv6 address bare or in brackets. No scheme, path or port."""
    if not isinstance(value, str):
        return True
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if ":" in inner:
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return False
        return True
    return inner == value and re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?", value) is not None


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
    key = None
    if isinstance(document, dict) and document.get("kind") == "ConfigMap":
        key, document = _unwrap_configmap(document, label)
        label = f"{label} ({key})"
    errors = _schema_errors(document, label, strict=validate_schema)
    if errors:
        raise ConfigError(errors)
    desired = _build_desired_state(document, label)
    return replace(desired, sha256=hashlib.sha256(raw).hexdigest(), key=key)


YAML_STR, YAML_INT, YAML_MERGE = (f"tag:yaml.org,2002:{kind}" for kind in ("str", "int", "merge"))
RESOLVER = yaml.resolver.Resolver()  # how the safe loader types a plain scalar (`1`, `yes`, `~`)
# A surrogate's escape in JSON text (`\ud83d`), which the YAML parser refuses; an escaped backslash is
# matched too, and kept, so that the text after it is not taken for one.
ESCAPED_SURROGATE = re.compile(r"(\\\\)|\\ud[89a-f][0-9a-f]{2}")


def _parse_yaml(raw: bytes | str, label: str) -> Any:
    if not raw.strip():
        raise ConfigError([f"{label}: the file is empty; expected a {CONFIG_KEY} document"])
    try:
        # JSON is YAML; json reads escaped astral characters right. A duplicate key goes on to the
        # YAML reader, which names both lines.
        document = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):
        return _load_yaml(raw, label)
    # The same bounds as any YAML document, walked on its JSON text as written out again: the YAML
    # parser may refuse the file itself (tabs as indentation), and refuses escaped surrogates,
    # which the walk has no use for.
    text = ESCAPED_SURROGATE.sub(lambda m: m[1] or "?", json.dumps(document))
    _check_bounds(text, label)
    return document


def _load_yaml(raw: bytes | str, label: str) -> Any:
    try:
        _check_bounds(raw, label)
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


@dataclass
class _Open:
    """A collection being read from the event stream."""

    anchor: str | None
    start: int  # the value count where it began
    keys: dict[str, int] | None  # a mapping's keys read so far -> line; None for a sequence
    at_key: bool = True  # a mapping's next node is a key


def _check_bounds(raw: bytes | str, label: str) -> None:
    """The one bounds walk, on the parser's event stream, before anything is built: building first
    would let a merge-key or alias bomb, or deep nesting, exhaust time, memory or (in libyaml's
    composer) the C stack. Also refused: a key written twice in one mapping (YAML readers keep the
    last, silently), a key that is not a string, an integer too long to print."""
    total = 0
    sizes: dict[str, int] = {}  # anchor -> how many values it stands for
    tags: dict[str, str] = {}  # a scalar's anchor -> its tag, for an alias used as a key
    stack: list[_Open] = []
    for event in yaml.parse(raw, Loader=SAFE_LOADER):
        parent = stack[-1] if stack else None
        if parent and parent.keys is not None and isinstance(event, yaml.NodeEvent) and parent.at_key:
            _check_key(parent.keys, event, tags, label)
        if isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if len(event.value.replace("_", "").lstrip("+-")) > 18 and _scalar_tag(event) == YAML_INT:
                # Python refuses to print integers past 4300 digits; no field takes one this big anyway.
                raise ConfigError([f"{label}: a number has more than 18 digits"])
            if event.anchor:
                sizes[event.anchor], tags[event.anchor] = 1, _scalar_tag(event)
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            stack.append(_Open(event.anchor, total, {} if isinstance(event, yaml.MappingStartEvent) else None))
            if len(stack) > MAX_CONFIG_DEPTH:
                raise ConfigError([f"{label}: the document nests deeper than {MAX_CONFIG_DEPTH} levels"])
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            closed = stack.pop()
            if closed.anchor:
                sizes[closed.anchor] = total - closed.start + 1
            parent = stack[-1] if stack else None
        else:
            continue
        if parent and parent.keys is not None:
            parent.at_key = not parent.at_key  # a whole node was read: key, then value
        if total > MAX_CONFIG_NODES:
            raise ConfigError([f"{label}: the document expands to more than {MAX_CONFIG_NODES} values"])


def _scalar_tag(event: yaml.ScalarEvent) -> str:
    if event.tag not in (None, "!"):
        return str(event.tag)
    return _implicit_tag(event.value, tuple(event.implicit))


@lru_cache(maxsize=1024)  # keys repeat (`id`, `source`): resolved once, not once per entry
def _implicit_tag(value: str, implicit: tuple[bool, bool]) -> str:
    return str(RESOLVER.resolve(yaml.ScalarNode, value, implicit))


def _check_key(keys: dict[str, int], event: yaml.NodeEvent, tags: Mapping[str, str], label: str) -> None:
    if isinstance(event, yaml.AliasEvent):
        tag = tags.get(str(event.anchor), YAML_STR)  # a collection as a key fails when it is built
    elif isinstance(event, yaml.ScalarEvent):
        tag = _scalar_tag(event)
    else:
        return
    line = event.start_mark.line + 1
    if tag == YAML_MERGE:  # merge keys may repeat
        return
    if tag != YAML_STR:
        text = event.value if isinstance(event, yaml.ScalarEvent) else f"*{event.anchor}"
        raise ConfigError([f"{label}: mapping key {text!r} at line {line} is read as "
                           f"{tag.rsplit(':', 1)[-1]}, not a string; quote it"])
    if isinstance(event, yaml.ScalarEvent):
        if event.value in keys:
            raise ConfigError([f"{label}: duplicate key {event.value!r} at lines {keys[event.value]} and {line}"])
        keys[event.value] = line


def _unwrap_configmap(manifest: dict[str, Any], label: str) -> tuple[str, Any]:
    """Accept the very manifest `kubectl apply` takes: the data key that holds our document, or,
    where several do, the one named like the file (as it would be mounted)."""
    data = manifest.get("data")
    if not isinstance(data, dict) or not data:
        raise ConfigError([f"{label}: data: a ConfigMap must have a data mapping holding a {CONFIG_KEY} document"])
    holders = sorted(k for k, v in data.items() if isinstance(v, str) and CONFIG_KEY in v)
    if len(holders) > 1:
        holders = [k for k in holders if k == Path(label).name] or holders
    if len(holders) > 1:
        raise ConfigError([f"{label}: data: keys {' and '.join(holders)} both hold a {CONFIG_KEY} document; "
                           f"name the one to use like the file ({Path(label).name})"])
    if not holders:
        raise ConfigError([f"{label}: data: no key holds a {CONFIG_KEY} document (keys: {', '.join(sorted(data))})"])
    key = f"data.{holders[0]}"
    return key, _parse_yaml(data[holders[0]], f"{label} ({key})")


def _schema_errors(document: Any, label: str, strict: bool = True) -> list[str]:
    validator = jsonschema.Draft202012Validator(config_schema(strict), format_checker=FORMATS)
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
    elif error.validator == "maxLength":
        yield f"{field_path(path)}: longer than {error.validator_value} characters ({len(instance)})"
    elif error.validator == "format" and error.validator_value == "printable":
        yield (f"{field_path(path)}: must be printable text: no control characters (newline, tab, escape), "
               f"no unpaired surrogates; got {json.dumps(_short(instance))}")
    elif error.validator == "format" and error.validator_value == "host":
        yield (f"{field_path(path)}: expected a host name or IP address, got {_short(instance)!r}; "
               "put the scheme in `scheme` and the port in `port`")
    else:
        yield f"{field_path(path)}: {_short(error.message)}"


def _short(value: Any) -> str:
    try:
        text = value if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    except ValueError:  # an integer past Python's 4300-digit printing limit
        text = f"{type(value).__name__} too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _build_desired_state(document: dict[str, Any], label: str) -> DesiredState:
    """Turn a document the schema accepted into a DesiredState; the rule the schema cannot state
    (an id named once across both lists) is checked here."""
    body = document[CONFIG_KEY]
    default_base = body.get("defaultBaseModel")
    entries = [entry for key in ("ensureExist", "ensureNotExist") for entry in _entries(body, key, default_base)]
    _check_unique(entries, label)
    return DesiredState(
        host=body.get("host", schema_default("host")).removeprefix("[").removesuffix("]"),
        port=int(body.get("port", schema_default("port"))),  # JSON Schema counts 8000.0 as an integer
        scheme=body.get("scheme", schema_default("scheme")),
        name=body.get("name") or "",
        default_base_model=default_base,
        ensure_exist=tuple(entry.adapter for entry in entries if not entry.remove),
        ensure_not_exist=tuple(entry.adapter for entry in entries if entry.remove),
    )


@dataclass(frozen=True)
class Entry:
    """One model entry of the file, with where it stands, for error messages."""

    where: str
    adapter: Adapter
    remove: bool


def _entries(body: dict[str, Any], key: str, default_base: str | None) -> list[Entry]:
    """The entries of one list in file order; `toRemove: true` marks an ensureExist entry for removal."""
    models = (body.get(key) or {}).get("models") or []
    return [
        Entry(field_path([CONFIG_KEY, key, "models", index]),
              Adapter(model["id"], model["source"], model.get("base-model") or default_base,
                      _canary(body.get("canary") or {}, model.get("canary") or {}), model.get("sha256")),
              key == "ensureNotExist" or model.get("toRemove") is True)
        for index, model in enumerate(models)
    ]


@cache
def _canary_defaults() -> dict[str, Any]:
    return {k: v["default"] for k, v in config_schema()["$defs"]["canary"]["properties"].items()}


def _canary(every: dict[str, Any], own: dict[str, Any]) -> Canary | None:
    """The top-level canary with this adapter's own fields over it, over the schema's defaults."""
    merged = {**_canary_defaults(), **every, **own}
    if not merged["enabled"]:
        return None
    return Canary(merged["prompt"], merged["maxTokens"], float(merged["timeoutSeconds"]),
                  merged["inertBlocksReadiness"])


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


# ------------------------------------------------------------ the vLLM client


class ServerUnreachable(Exception):
    """No answer: connection refused, reset or timed out. `reason` says which, in words that stay
    the same from one try to the next (for once-per-reason logging)."""

    def __init__(self, message: str, reason: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.timed_out = timed_out


class ServerError(Exception):
    """An answer that stops the whole cycle: unauthorized, runtime LoRA off, a broken model list."""


class CanaryUnavailable(Exception):
    """No completion to compare: the server cannot complete (an embedding model), or did not answer."""


# What vLLM's answers mean for retrying (seen on vLLM 0.32): 404 = no adapter at that path, 400 = a
# request vLLM refuses as such, 500 = the engine could not load it (rank too big, broken files).
# Retrying those fast helps nobody. Timeouts, 429 and 502-504 are the moment, not the adapter.
PERMANENT_STATUSES = frozenset({400, 404, 422, 500})


@dataclass(frozen=True)
class Outcome:
    """The server's answer to one load or unload (or its absence), judged."""

    ok: bool
    message: str = ""
    status: int | None = None
    inplace_refused: bool = False
    timed_out: bool = False

    @property
    def permanent(self) -> bool:
        return not self.ok and self.status in PERMANENT_STATUSES


class Liveness:
    """When the sidecar last made progress, for /healthz. Every tick of the loop and every finished
    call counts; a call under way counts until its own timeout, so a load of minutes is not a hang."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._until = clock() + window
        self._lock = threading.Lock()

    def beat(self, allowance: float = 0.0) -> None:
        with self._lock:
            self._until = max(self._until, clock() + allowance + self.window)

    def alive(self) -> bool:
        return clock() <= self._until


class VLLMClient:
    """Thin HTTP layer: one session, a timeout on every call, answers turned into outcomes."""

    def __init__(self, session: requests.Session, timeout: float, api_key: str | None = None,
                 load_timeout: float = 600.0, liveness: Liveness | None = None) -> None:
        self.session = session
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.liveness = liveness or Liveness(float("inf"))
        self.base_url = ""
        self.has_api_key = bool(api_key)
        if api_key:
            session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> requests.Response:
        url, timeout = self.base_url + path, timeout or self.timeout
        self.liveness.beat(timeout)
        try:
            response = self.session.request(method, url, json=body, timeout=timeout)
        except requests.Timeout:
            HTTP_REQUESTS.labels(path, "timeout").inc()
            reason = f"no answer within {timeout:g} s"
            raise ServerUnreachable(f"{method} {url}: {reason}", reason, timed_out=True) from None
        except requests.RequestException as e:
            HTTP_REQUESTS.labels(path, "error").inc()
            reason = _unreachable_reason(e)
            raise ServerUnreachable(f"{method} {url}: {reason}", reason) from None
        finally:
            self.liveness.beat()
        HTTP_REQUESTS.labels(path, str(response.status_code)).inc()
        return response

    def health(self) -> str | None:
        """None when /health answers 200, else why not."""
        try:
            response = self._call("GET", "/health")
        except ServerUnreachable as e:
            return e.reason
        if response.status_code == 200:
            return None
        return f"GET /health answered {response.status_code}: {_server_message(response) or 'no message'}"

    def version(self) -> str | None:
        """vLLM's version from GET /version (no key needed), or None if the server does not say."""
        try:
            response = self._call("GET", "/version")
        except ServerUnreachable:
            return None
        body = _json_body(response) if response.status_code == 200 else None
        version = body.get("version") if isinstance(body, dict) else None
        return version if isinstance(version, str) else None

    def use_server(self, base_url: str) -> None:
        """Point at a server. Proxy and CA-bundle settings (HTTPS_PROXY, NO_PROXY,
        REQUESTS_CA_BUNDLE) are read from the environment once here, not on every request."""
        self.base_url = base_url
        self.session.trust_env = True
        found = self.session.merge_environment_settings(base_url, {}, None, None, None)
        self.session.proxies, self.session.verify = found["proxies"], found["verify"]
        self.session.trust_env = False  # also keeps a ~/.netrc from replacing the API key

    def server_state(self) -> ServerState:
        response = self._call("GET", "/v1/models")
        self._raise_for_auth(response)
        if response.status_code != 200:
            raise ServerError(f"GET /v1/models answered {response.status_code}: {_server_message(response)}")
        try:
            return parse_model_list(json.loads(response.content))
        except (ValueError, RecursionError) as e:
            raise ServerError(f"GET /v1/models answered an unexpected body: {e}") from None

    def load(self, adapter: Adapter, inplace: bool = False, alongside: int = 1) -> Outcome:
        """`alongside`: how many loads may be in flight with this one. The engine applies them one
        at a time, in the order they arrive (not the order they were sent), so each may wait for all
        the others: it gets one allowance for each and is not charged for the queue."""
        body: dict[str, Any] = {"lora_name": adapter.id, "lora_path": adapter.source}
        if inplace:
            body["load_inplace"] = True
        response = self._call("POST", "/v1/load_lora_adapter", body, self.load_timeout * max(1, alongside))
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

    def complete(self, model: str, canary: Canary) -> str:
        """The text of one deterministic completion through `model` (an adapter or a base model)."""
        body = {"model": model, "prompt": canary.prompt, "max_tokens": canary.max_tokens, "temperature": 0}
        try:
            response = self._call("POST", "/v1/completions", body, canary.timeout)
            self._raise_for_auth(response)
        except (ServerUnreachable, ServerError) as e:
            raise CanaryUnavailable(f"POST /v1/completions for {model!r}: {e}") from None
        answer = _json_body(response)
        if response.status_code == 200 and isinstance(answer, dict):
            choices = answer.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                text = choices[0].get("text")
                if isinstance(text, str):
                    return text
        raise CanaryUnavailable(f"POST /v1/completions for {model!r} answered {response.status_code}: "
                                f"{_server_message(response)}")

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


def _unreachable_reason(error: requests.RequestException) -> str:
    """Why a call got no answer, in an operator's words; the library's text follows where it helps."""
    text = str(error)
    if isinstance(error, requests.exceptions.SSLError):
        return f"TLS handshake failed (is `scheme` right for this server?): {_first_line(error)}"
    if "Failed to resolve" in text or "Name or service not known" in text or "name resolution" in text:
        return "cannot resolve the host name"
    if "Connection refused" in text:
        return "connection refused"
    if "RemoteDisconnected" in text or "Connection aborted" in text or "Connection reset" in text:
        return "the connection was closed without an answer"
    return f"{type(error).__name__}: {_first_line(error)}"


def inplace_is_safe(version: str | None) -> bool:
    """True where vLLM resets load_inplace after the load (0.33 and later); unknown counts as older."""
    numbers = re.findall(r"\d+", (version or "").split("+")[0])[:2]
    return len(numbers) == 2 and (int(numbers[0]), int(numbers[1])) >= INPLACE_SAFE_FROM


def same_source(served: str | None, wanted: str) -> bool:
    """Compare sources the way vLLM may report them: a trailing '/' makes no difference."""
    return served is not None and (served.rstrip("/") or "/") == (wanted.rstrip("/") or "/")


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


# ------------------------------------------------ remote sources: download, check, stage, evict


class FetchError(Exception):
    """A download that failed. Permanent when the source itself is at fault (a digest that does not
    match, an unsafe archive, no adapter in it): waiting will not fix it."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Download:
    """A finished download: the version folder it filled, or why it failed."""

    adapter: Adapter
    folder: Path
    error: FetchError | None
    bytes: int
    seconds: float
    sha256: str | None

    def status(self) -> dict[str, Any]:
        return {"state": "failed" if self.error else "done", "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "sha256": self.sha256}


@dataclass
class Received:
    """Bytes of one download so far, for its record whether it ends well or not."""

    bytes: int = 0


@dataclass(frozen=True)
class VersionFolder:
    name: str
    bytes: int
    staged_at: float  # the folder's mtime: when its download was renamed into place


VERSION_FOLDER = re.compile(r"[A-Za-z0-9._-]+@[0-9a-f]{16}")


def version_folder(adapter_dir: Path, adapter: Adapter) -> Path:
    """`<id>@<version>`, the version being the pinned digest or else the source's: a new version is
    a new folder, so the files vLLM serves are never overwritten."""
    version = adapter.sha256 or hashlib.sha256(adapter.source.encode()).hexdigest()
    return adapter_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', adapter.id)[:200]}@{version[:16]}"


def localize(desired: DesiredState, server: ServerState, adapter_dir: Path | None,
             staged: Collection[str]) -> tuple[DesiredState, tuple[Adapter, ...]]:
    """The desired state as vLLM can load it: a remote adapter whose version is staged points at its
    folder; one not staged yet is left out, so the version it replaces keeps serving, and is
    returned to be fetched. One for a base model the server does not serve is left to plan()."""
    local, fetch = [], []
    for adapter in desired.ensure_exist:
        if not adapter.remote or (adapter.base_model and not server.serves(adapter.base_model)):
            local.append(adapter)
        elif adapter_dir and (folder := version_folder(adapter_dir, adapter)).name in staged:
            local.append(replace(adapter, source=str(folder)))
        else:
            fetch.append(adapter)
    return replace(desired, ensure_exist=tuple(local)), tuple(fetch)


def evictions(folders: Sequence[VersionFolder], keep: Collection[str], budget: int, need: int = 0) -> list[str]:
    """The version folders to delete, oldest first, among those in no use (`keep`: wanted by the
    config or listed by vLLM): with no budget, all of them; with one, as many as it takes for the
    rest and `need` more bytes to fit."""
    unused = sorted((f for f in folders if f.name not in keep), key=lambda f: f.staged_at)
    if budget <= 0:
        return [f.name for f in unused]
    used, chosen = sum(f.bytes for f in folders), []
    for folder in unused:
        if used + need <= budget:
            break
        chosen.append(folder.name)
        used -= folder.bytes
    return chosen


def safe_relative(name: str, where: str, strict: bool = False) -> str:
    """An archive entry or object key as a path inside the adapter's folder. A name that could land
    outside it (absolute, `..`) fails the download; `strict` (object keys) refuses empty parts too."""
    parts = name.replace("\\", "/").split("/")
    if (name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:[\\/]", name)
            or (strict and "" in parts[:-1])):
        raise FetchError(f"unsafe path in {where}: {name!r}", permanent=True)
    return "/".join(part for part in parts if part not in ("", "."))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(files: Mapping[str, str]) -> str:
    """The digest pinned for an s3:// prefix, from {relative path: file sha256}: the sha256 of
    `sha256sum`'s lines in byte order of the path, as
    `find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum | sha256sum` prints it."""
    return hashlib.sha256("".join(f"{files[p]}  {p}\n" for p in sorted(files)).encode()).hexdigest()


def folder_digest(folder: Path) -> str:
    files = {}
    for top, _, names in os.walk(folder):
        for name in names:
            path = Path(top, name)
            files[path.relative_to(folder).as_posix()] = file_sha256(path)
    return tree_digest(files)


def folder_bytes(folder: Path) -> int:
    return sum(Path(top, name).stat().st_size for top, _, names in os.walk(folder) for name in names)


def extract(archive: Path, into: Path, budget: int) -> None:
    """Unpack regular files and folders only. Any entry that could land outside `into` (absolute,
    `..`, a link, a device) fails the whole archive; so does unpacking past the budget."""
    into.mkdir()
    written = 0

    def write(name: str, source: Any) -> None:
        nonlocal written
        target = into / safe_relative(name, "archive")
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            while chunk := source.read(DOWNLOAD_CHUNK):
                written += len(chunk)
                if budget and written > budget:
                    raise FetchError(f"the archive unpacks to more than --adapter-dir-max-bytes ({budget})",
                                     permanent=True)
                out.write(chunk)

    import tarfile  # here: 0.4 MB resident, for a sidecar that may never see an archive

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise FetchError(f"unsafe path in archive: {info.filename!r} is a link or device",
                                     permanent=True)
                if info.is_dir():
                    (into / safe_relative(info.filename, "archive")).mkdir(parents=True, exist_ok=True)
                else:
                    with z.open(info) as source:
                        write(info.filename, source)
        return
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isdir():
                    (into / safe_relative(member.name, "archive")).mkdir(parents=True, exist_ok=True)
                elif not member.isfile():
                    raise FetchError(f"unsafe path in archive: {member.name!r} is a link or device",
                                     permanent=True)
                else:
                    write(member.name, tar.extractfile(member))
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise FetchError(f"not a .tar.gz, .tgz or .zip archive: {_first_line(e)}", permanent=True) from None


def adapter_root(content: Path) -> Path:
    """The folder holding adapter_config.json: the download itself, or its one top-level folder
    (an archive made with `tar czf a.tar.gz my-adapter/`)."""
    entries = list(content.iterdir())
    if not (content / "adapter_config.json").is_file() and len(entries) == 1 and entries[0].is_dir():
        content = entries[0]
    try:
        config = json.loads((content / "adapter_config.json").read_bytes())
    except FileNotFoundError:
        raise FetchError("no adapter_config.json in the download", permanent=True) from None
    except (OSError, ValueError) as e:
        raise FetchError(f"adapter_config.json is unreadable: {_first_line(e)}", permanent=True) from None
    if not isinstance(config, dict):
        raise FetchError("adapter_config.json is not a JSON object", permanent=True)
    return content


class AdapterStore:
    """--adapter-dir: remote sources downloaded in the background, checked, and renamed into their
    version folder; a version deleted only once vLLM's last answered model list no longer names it."""

    def __init__(self, root: Path | None, budget: int = 0, request_timeout: float = 10.0,
                 download_timeout: float = 1800.0) -> None:
        self.root = root.absolute() if root else None
        self.budget = budget
        self.request_timeout = request_timeout
        self.download_timeout = download_timeout
        self.wake: Callable[[], None] = lambda: None  # the loop's nudge: a finished download is news
        # Not the vLLM client's session: that one carries vLLM's API key, which no other host may see.
        self._http = requests.Session()
        self._pool = ThreadPoolExecutor(MAX_DOWNLOADS_IN_FLIGHT, thread_name_prefix="download")
        self._running: dict[str, Future[Download]] = {}  # by folder name
        self._keep: set[str] | None = None  # folders wanted or listed at the last answered /v1/models
        self._lock = threading.RLock()  # the loop and the downloads both delete, count and track
        self._sizes: dict[str, int] = {}  # a staged folder never changes: measured once
        self._s3_client: Any = None
        self._s3_lock = threading.Lock()  # not _lock: importing boto3 takes a second the loop must not wait

    def remove_leftovers(self) -> None:
        """Delete the downloads a restart cut short; only the long-running sidecar owns the folder."""
        for leftover in self.root.glob(INCOMING_PREFIX + "*") if self.root else ():
            shutil.rmtree(leftover, ignore_errors=True)

    # -- what the loop calls

    def staged(self) -> list[VersionFolder]:
        if self.root is None or not self.root.is_dir():
            return []
        folders = []
        with self._lock:
            for path in self.root.iterdir():
                if VERSION_FOLDER.fullmatch(path.name) and path.is_dir():
                    if path.name not in self._sizes:
                        self._sizes[path.name] = folder_bytes(path)
                    folders.append(VersionFolder(path.name, self._sizes[path.name], path.stat().st_mtime))
        return folders

    def staged_names(self) -> set[str]:
        return {folder.name for folder in self.staged()}

    def finished(self) -> list[Download]:
        with self._lock:
            done = [name for name, future in self._running.items() if future.done()]
            return [self._running.pop(name).result() for name in done]

    def start(self, adapter: Adapter) -> None:
        """Download one adapter's version unless that is under way already."""
        folder = version_folder(self.root or Path(), adapter)
        with self._lock:
            if folder.name not in self._running:
                future = self._pool.submit(self._download, adapter, folder)
                future.add_done_callback(lambda _: self.wake())
                self._running[folder.name] = future

    def busy(self) -> bool:
        return bool(self._running)

    def wait(self, timeout: float) -> None:
        with self._lock:
            futures = list(self._running.values())
        if futures:
            next(iter(as_completed(futures, timeout)), None)

    def evict_unused(self, desired: DesiredState, server: ServerState | None) -> None:
        """After each model list (None: the server could not be asked): remember which versions must
        stay, and delete those no longer wanted nor listed, as the budget says."""
        if self.root is None:
            return
        with self._lock:
            if server is None:
                self._keep = None
                return
            root = str(self.root)
            listed = {os.path.basename(r.rstrip("/")) for r in server.adapters.values()
                      if r and os.path.dirname(r.rstrip("/")) == root}
            wanted = {version_folder(self.root, a).name for a in desired.ensure_exist if a.remote}
            self._keep = listed | wanted | set(self._running)
            folders = self.staged()
            for name in evictions(folders, self._keep, self.budget):
                self._delete(name)
            ADAPTER_DIR_BYTES.set(sum(f.bytes for f in folders if f.name in self._sizes))

    # -- one download, in a worker thread

    def _download(self, adapter: Adapter, folder: Path) -> Download:
        started, received, digest = clock(), Received(), None
        try:
            if self.root is None:
                raise FetchError(f"{adapter.source.split(':')[0]}:// sources need --adapter-dir, a volume "
                                 "mounted at the same path in the sidecar and vLLM", permanent=True)
            self.root.mkdir(parents=True, exist_ok=True)
            incoming = Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=self.root))
            try:
                deadline = started + self.download_timeout
                if adapter.source.startswith("s3://"):
                    digest = self._fetch_prefix(adapter.source, incoming / "adapter", deadline, received)
                else:
                    digest = self._fetch_archive(adapter.source, incoming, deadline, received)
                if adapter.sha256 and digest != adapter.sha256:
                    raise FetchError(f"sha256 mismatch: the config pins {adapter.sha256}, the download is {digest}",
                                     permanent=True)
                self._move_into_place(adapter_root(incoming / "adapter"), folder)
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
        except FetchError as e:
            error: FetchError | None = e
        except OSError as e:  # a full disk, a read-only volume
            error = FetchError(f"cannot write to --adapter-dir: {e.strerror or e}")
        except Exception as e:  # a bug costs this adapter a retry, not the others
            log.exception("unexpected error", adapter=adapter.id, action="download")
            error = FetchError(f"internal error: {e!r}")
        else:
            error = None
        finally:
            DOWNLOAD_BYTES.inc(received.bytes)
        return Download(adapter, folder, error, received.bytes, clock() - started, digest)

    def _move_into_place(self, content: Path, folder: Path) -> None:
        """Rename a checked download into its version folder, making room under the budget first (the
        budget counts the versions kept; a download in progress needs its own room besides)."""
        need = folder_bytes(content)
        with self._lock:
            if folder.is_dir():
                return  # the same version, staged for another adapter id meanwhile
            if self.budget:
                if self._keep is None:
                    raise FetchError("no room can be made in --adapter-dir while the server cannot be asked")
                for name in evictions(self.staged(), self._keep | set(self._running), self.budget, need):
                    self._delete(name)
                used = sum(f.bytes for f in self.staged())
                if used + need > self.budget:
                    raise FetchError(f"the download ({need} bytes) does not fit in --adapter-dir-max-bytes "
                                     f"({self.budget}): {used} bytes are in use by versions vLLM lists or the "
                                     f"config names")
            content.rename(folder)
            os.utime(folder)  # staged now, for the oldest-first eviction

    def _delete(self, name: str) -> None:
        assert self.root is not None
        shutil.rmtree(self.root / name, ignore_errors=True)
        self._sizes.pop(name, None)
        log.info(f"deleted {name}: no adapter vLLM lists and no entry of the config uses it",
                 folder=str(self.root / name))

    def _check_size(self, size: int) -> None:
        if self.budget and size > self.budget:
            raise FetchError(f"the download ({size} bytes or more) does not fit in --adapter-dir-max-bytes "
                             f"({self.budget})", permanent=True)

    def _check_deadline(self, deadline: float) -> None:
        if clock() > deadline:
            raise FetchError(f"the download took longer than --download-timeout ({self.download_timeout:g} s)")

    def _fetch_archive(self, url: str, incoming: Path, deadline: float, received: Received) -> str:
        archive, digest = incoming / "archive", hashlib.sha256()
        try:
            # identity: the sha256 pinned is the file's, and the unpacker does its own gunzip
            with self._http.get(url, stream=True, timeout=self.request_timeout,
                                headers={"Accept-Encoding": "identity"}) as response:
                if response.status_code != 200:
                    raise FetchError(f"the archive's server answered {response.status_code}",
                                     permanent=response.status_code in (401, 403, 404, 410))
                expected = int(response.headers.get("Content-Length") or 0)
                self._check_size(expected)
                with archive.open("wb") as out:
                    # read1: whatever has arrived, so that a server trickling bytes meets the deadline;
                    # the bytes as sent, whatever Content-Encoding a store put on them
                    while chunk := response.raw.read1(DOWNLOAD_CHUNK, decode_content=False):
                        self._check_deadline(deadline)
                        received.bytes += len(chunk)
                        self._check_size(received.bytes)
                        out.write(chunk)
                        digest.update(chunk)
        except requests.exceptions.SSLError as e:
            raise FetchError(f"TLS: the archive's server is not trusted (REQUESTS_CA_BUNDLE names a private CA): "
                             f"{_first_line(e)}") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            error = f"{type(e).__name__}: {_first_line(e)}"
            raise FetchError(f"the download broke off after {received.bytes} bytes: {error}") from None
        if expected and received.bytes != expected:
            raise FetchError(f"the download broke off after {received.bytes} of {expected} bytes")
        extract(archive, incoming / "adapter", self.budget)
        archive.unlink()
        return digest.hexdigest()

    def _s3(self) -> Any:
        with self._s3_lock:
            if self._s3_client is None:
                try:  # here, not at the top: boto3 costs 40 MB resident, and most sidecars never use it
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise FetchError("s3:// sources need boto3: pip install -r requirements-s3.txt, or the "
                                     "image built with --build-arg WITH_S3=1", permanent=True) from None
                # Endpoint, region and credentials: boto3's standard chain (AWS_* variables, config
                # files, web identity tokens, instance roles).
                self._s3_client = boto3.session.Session().client("s3", config=Config(
                    connect_timeout=self.request_timeout, read_timeout=self.request_timeout,
                    retries={"max_attempts": 3, "mode": "standard"}))
            return self._s3_client

    def _fetch_prefix(self, source: str, into: Path, deadline: float, received: Received) -> str:
        s3 = self._s3()
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        files = {}
        try:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            keys = {safe_relative(o["Key"][len(prefix):], "the object key", strict=True): (o["Key"], o["Size"])
                    for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")}
            if not keys:
                raise FetchError(f"no objects under {source}", permanent=True)
            self._check_size(sum(object_size for _, object_size in keys.values()))
            for relative, (key, _) in sorted(keys.items()):
                target, digest = into / relative, hashlib.sha256()
                target.parent.mkdir(parents=True, exist_ok=True)
                body = s3.get_object(Bucket=bucket, Key=key)["Body"]
                with target.open("wb") as out:
                    for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                        self._check_deadline(deadline)
                        received.bytes += len(chunk)
                        out.write(chunk)
                        digest.update(chunk)
                files[relative] = digest.hexdigest()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", "?"))
            raise FetchError(f"S3 answered {code}: {_first_line(e)}",
                             permanent=code in ("NoSuchBucket", "NoSuchKey", "AccessDenied", "403", "404")) from None
        except BotoCoreError as e:
            raise FetchError(f"S3: {_first_line(e)}") from None
        return tree_digest(files)


# ------------------------------------- decisions: plan, per-adapter rules, in sync, readiness


def plan(desired: DesiredState, server: ServerState) -> Plan:
    """The rules, with no I/O and no clock: unloads first, then reloads, then loads.

    An adapter the config does not name is never touched, but for the staging copy of
    one (`<id>~staging`) that a sidecar stopped mid-swap left behind. An adapter whose base
    model this server does not serve is skipped, so one config can serve a fleet.
    """
    unloads = [
        Action(Op.UNLOAD, adapter, "listed in ensureNotExist")
        for adapter in desired.ensure_not_exist
        if adapter.id in server.adapters
    ]
    named = {a.id for a in desired.ensure_exist + desired.ensure_not_exist}
    unloads += [
        Action(Op.UNLOAD, Adapter(adapter_id, source or ""), "a staging copy left over from a version update")
        for adapter_id, source in server.adapters.items()
        if adapter_id.endswith(STAGING_SUFFIX) and adapter_id[: -len(STAGING_SUFFIX)] in named
        and adapter_id not in named
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
        elif served_source is not None and not same_source(served_source, adapter.source):
            reloads.append(Action(Op.RELOAD, adapter, f"the server has source {served_source!r}"))
    return Plan(tuple(unloads + reloads + loads), tuple(skipped))


def backoff_delay(failures: int, period: float) -> float:
    """Seconds before retrying an adapter that failed `failures` times in a row."""
    return min(period * 2 ** min(failures - 1, 20), BACKOFF_CAP_SECONDS)


class State(enum.StrEnum):
    LOADED = "loaded"
    PENDING = "pending"
    FAILED = "failed"
    ABSENT = "absent"
    SKIPPED = "skipped"
    INERT = "inert"  # loaded, but its canary completion is the base model's


class Seen(enum.Enum):
    """What a model list told about one adapter that is worth reporting."""

    NOTHING = enum.auto()
    FAILED = enum.auto()  # an answer of 200 the list did not bear out, twice
    LOST = enum.auto()  # it was loaded, and went without the sidecar's unload


@dataclass
class AdapterRecord:
    """What the sidecar remembers of one configured adapter between cycles, and the rules for what
    an answer or a model list does to it: no I/O, no clock (`now` is given)."""

    adapter: Adapter
    wanted: bool  # ensureExist (True) or ensureNotExist (False)
    state: State = State.PENDING
    observed_source: str | None = None
    last_action: Op | None = None
    last_error: str | None = None
    skip_reason: str | None = None
    failures: int = 0
    retry_at: float | None = None
    permanent: bool = False  # the last failure was the adapter's own (bad path, rank, files)
    unconfirmed: Op | None = None  # answered 200; the next /v1/models must agree
    doubts: int = 0  # 200s in a row that the next /v1/models did not bear out
    canary_due: bool = False  # seen loaded after a change: prove it works
    proof: dict[str, Any] | None = None  # the last canary's result, for /status
    lost: int = 0  # times it vanished from the server without the sidecar's unload
    download: dict[str, Any] | None = None  # a remote source's last download, for /status

    def is_serving(self) -> bool:
        return self.wanted and self.unconfirmed is None and self.state in (State.LOADED, State.INERT)

    def observe(self, listed: str | None, planned: bool, skip_reason: str | None, now: float,
                period: float) -> Seen:
        """Take in what /v1/models lists, before any action of this cycle. An answer of 200 the
        list does not bear out fails the adapter the second time in a row (once could be a restart
        between the answer and the list)."""
        serving = self.is_serving()
        self.observed_source, self.skip_reason = listed, skip_reason
        unconfirmed, self.unconfirmed = self.unconfirmed, None
        if skip_reason:
            self.state, self.last_error, self.doubts = State.SKIPPED, None, 0
        elif not planned:
            # Listed as wanted and not proven yet: after a load, a new canary setting, or a restart
            # of the sidecar that found it loaded (a verdict is not kept across restarts).
            self.canary_due = self.wanted and self.adapter.canary is not None and self.proof is None
            if self.state is not State.INERT or unconfirmed:
                self.state = State.LOADED if self.wanted else State.ABSENT
            self.failures, self.retry_at, self.last_error, self.permanent, self.doubts = 0, None, None, False, 0
        elif serving and listed is None:
            self.state, self.lost = State.PENDING, self.lost + 1
            return Seen.LOST
        elif unconfirmed is not None and self.doubts >= 1:
            self.doubts += 1
            news = self.fail(unconfirmed, _not_borne_out(unconfirmed, listed), now, period)
            return Seen.FAILED if news else Seen.NOTHING
        else:
            self.doubts += unconfirmed is not None
            if self.failures == 0:
                self.state = State.PENDING
        return Seen.NOTHING

    def use_canary(self, adapter: Adapter) -> None:
        """The entry's canary settings changed: a verdict under the old ones no longer holds, so a
        loaded adapter is proven again (a new prompt is how a wrong `inert` is put right)."""
        if adapter.canary == self.adapter.canary:
            return
        self.adapter, self.proof = adapter, None  # the next model list makes it due (observe)
        if self.state is State.INERT:
            self.state = State.LOADED

    def take_proof(self, result: str, seconds: float, detail: str | None) -> None:
        """A canary's verdict: verified, inert (the base model's text) or unavailable."""
        self.canary_due = False
        self.proof = {"result": result, "seconds": round(seconds, 3), "detail": detail}
        if result == "inert":
            self.state = State.INERT
        elif self.state is State.INERT:
            self.state = State.LOADED

    def succeed(self, op: Op, source: str | None = None) -> bool:
        """An answer of 200 (to a load from `source`, a remote adapter's folder). False while this
        server has answered 200 to no effect before: the failure stands until /v1/models agrees."""
        self.last_action, self.unconfirmed = op, op
        if self.doubts and self.state is State.FAILED:
            return False
        self.failures, self.retry_at, self.last_error, self.permanent = 0, None, None, False
        self.state = State.ABSENT if op is Op.UNLOAD else State.LOADED
        self.observed_source = None if op is Op.UNLOAD else source or self.adapter.source
        self.proof = None  # a verdict on what was there before
        return True

    def fail(self, op: Op, error: str, now: float, period: float, permanent: bool = False) -> bool:
        """A failure of `op`: backoff doubles. True when the error is news (not the one already reported)."""
        self.last_action = op
        self.failures += 1
        self.retry_at = now + backoff_delay(self.failures, period)
        self.state, self.permanent = State.FAILED, permanent
        news, self.last_error = error != self.last_error, error
        return news

    def is_due(self, now: float) -> bool:
        return self.retry_at is None or now >= self.retry_at

    def start_download(self, now: float) -> bool:
        """True when its remote source should be fetched now: not backing off, not under way."""
        if not self.is_due(now) or (self.download or {}).get("state") == "downloading":
            return False
        self.download = {"state": "downloading", "bytes": 0, "seconds": None, "sha256": None}
        return True

    def take_download(self, download: Download, now: float, period: float) -> bool:
        """A finished download, shown in /status; a failed one fails the adapter as a load would.
        True when that failure is news."""
        self.download = download.status()
        error = download.error
        return error is not None and self.fail(Op.DOWNLOAD, str(error), now, period, error.permanent)

    def is_settled(self) -> bool:
        """Loaded and seen so, not for this server, or failed for a reason of its own that waiting
        will not fix. A timeout or a busy server is not settled."""
        inert_blocks = self.adapter.canary is not None and self.adapter.canary.inert_blocks_readiness
        return ((self.state is State.LOADED and self.unconfirmed is None and not self.canary_due)
                or self.state is State.SKIPPED or (self.state is State.INERT and not inert_blocks)
                or (self.state is State.FAILED and self.permanent))

    def status(self) -> dict[str, Any]:
        return {
            "desired": "present" if self.wanted else "absent",
            "state": self.state.value,
            "source": self.adapter.source,
            "base_model": self.adapter.base_model,
            "observed_source": self.observed_source,
            "last_action": self.last_action.value if self.last_action else None,
            "last_error": self.last_error,
            "skip_reason": self.skip_reason,
            "failures": self.failures,
            "next_retry": iso_time(self.retry_at),
            "canary": self.proof,
            "lost": self.lost,
            "download": self.download,
        }


def _not_borne_out(op: Op, listed_source: str | None) -> str:
    if op is Op.UNLOAD:
        return "unload answered 200 but /v1/models still lists it"
    if listed_source is None:
        return f"{op.value} answered 200 but /v1/models does not list it"
    return f"{op.value} answered 200 but /v1/models still lists source {listed_source!r}"


def due_actions(actions: Sequence[Action], records: Mapping[str, AdapterRecord], now: float) -> list[Action]:
    """The actions whose adapter is not backing off (a leftover staging copy has no record: always due)."""
    return [a for a in actions if a.adapter.id not in records or records[a.adapter.id].is_due(now)]


def is_in_sync(planned: Plan, succeeded: int, fetching: Collection[str]) -> bool:
    """In sync: every action of the plan was sent and answered 200 (none backing off, none failed),
    and no remote adapter still waits for its files. A skipped adapter does not count."""
    return succeeded == len(planned.actions) and not fetching


def is_ready(records: Mapping[str, AdapterRecord]) -> bool:
    """Ready: every adapter to hold is settled (see AdapterRecord.is_settled)."""
    return all(r.is_settled() for r in records.values() if r.wanted)


# ---------------------------------------------------------------- reconciler


@dataclass(frozen=True)
class Attempt:
    """One action as it went: the answer judged, or the error that stops the cycle, or None (not
    sent: an earlier call stopped the cycle), and how long it took."""

    result: Outcome | ServerUnreachable | ServerError | None
    seconds: float


@dataclass(frozen=True)
class CycleResult:
    completed: bool  # the server answered and every due action was tried
    in_sync: bool  # nothing left to do but skipped adapters
    error: str | None = None
    unreachable: bool = False  # no answer at all: the server up/down line already says so

    @classmethod
    def stopped(cls, error: str, unreachable: bool = False) -> CycleResult:
        return cls(False, False, error, unreachable)


class Reconciler:
    """One cycle at a time: read the server, plan, send what is due, record every answer. The only
    code that changes the server; it remembers per-adapter backoff between cycles."""

    def __init__(self, client: VLLMClient, period: float, health_check_timeout: float,
                 store: AdapterStore | None = None) -> None:
        self.client = client
        self.store = store or AdapterStore(None)
        self.period = period
        self.health_check_timeout = health_check_timeout
        self.records: dict[str, AdapterRecord] = {}
        self.server_up: bool | None = None
        self.server_error: str | None = None  # why the server is not up
        self.server_version: str | None = None
        self.ready = False
        self.cycles = 0
        self.last_cycle: CycleResult | None = None
        self._server_url = ""
        self._adopted: DesiredState | None = None
        self._started = clock()
        self._said = Said()
        self.foreign: list[str] = []  # adapters the server lists that the config does not name

    def reconcile(self, desired: DesiredState) -> CycleResult:
        """One cycle: health (only while the server is not known up), one GET /v1/models, the due actions."""
        self.cycles += 1
        started = clock()
        self._follow(desired)
        try:
            result = self._cycle(desired, started)
        except Exception as e:  # a bug in one cycle must not stop the next one
            log.exception("reconcile failed unexpectedly", reconcile_id=self.cycles)
            result = CycleResult.stopped(f"internal error: {e!r}")
        RECONCILES.labels("success" if result.completed and result.in_sync else "error").inc()
        RECONCILE_SECONDS.observe(clock() - started)
        IN_SYNC.set(1 if result.in_sync else 0)
        self._report_cycle(result)
        self.last_cycle = result
        return result

    def next_delay(self, health_check_interval: float) -> float:
        return self.period if self.server_up else health_check_interval

    def _cycle(self, desired: DesiredState, now: float) -> CycleResult:
        server = self._read_server(desired, now)
        if isinstance(server, CycleResult):
            return server
        local, fetching = self._localize(desired, server, now)
        planned = plan(local, server)
        self._take_in(server, planned, now, fetching)
        succeeded = self._execute(planned, now)
        if isinstance(succeeded, CycleResult):
            return succeeded
        self._prove(server)
        self.ready = self.ready or is_ready(self.records)
        return CycleResult(completed=True, in_sync=is_in_sync(planned, succeeded, fetching))

    def _read_server(self, desired: DesiredState, now: float) -> ServerState | CycleResult:
        """What the server lists, or why this cycle stops; either way the store learns whether it
        may delete anything."""
        server: ServerState | CycleResult
        if not self.server_up and not self._check_health(now):
            server = CycleResult.stopped(f"vLLM is not healthy: {self.server_error}", unreachable=True)
        else:
            try:
                server = self.client.server_state()
            except ServerUnreachable as e:
                server = self._unanswered(e)
            except ServerError as e:
                server = CycleResult.stopped(str(e))
        self.store.evict_unused(desired, None if isinstance(server, CycleResult) else server)
        return server

    def _localize(self, desired: DesiredState, server: ServerState, now: float) -> tuple[DesiredState, set[str]]:
        """Remote sources: record the downloads that finished, start those due, and point each
        staged adapter at its folder. Returns that desired state and the adapters still fetching."""
        for download in self.store.finished():
            self._record_download(download, now)
        local, fetch = localize(desired, server, self.store.root, self.store.staged_names())
        for adapter in fetch:
            if self.records[adapter.id].start_download(now):
                self.store.start(adapter)
        return local, {adapter.id for adapter in fetch}

    def _record_download(self, download: Download, now: float) -> None:
        DOWNLOADS.labels("error" if download.error else "success").inc()
        DOWNLOAD_SECONDS.observe(download.seconds)
        record = self.records.get(download.adapter.id)
        if record is None or version_folder(download.folder.parent, record.adapter) != download.folder:
            return  # the config moved on to another version while this one downloaded
        fields = {"adapter": download.adapter.id, "action": "download", "bytes": download.bytes,
                  "duration_s": round(download.seconds, 4), "sha256": download.sha256,
                  "source": download.adapter.source}
        if record.take_download(download, now, self.period):
            self._report_failure(record, Op.DOWNLOAD, now, fields)
        elif download.error is None:
            log.info(f"download done: {download.adapter.id}", folder=str(download.folder), **fields)

    def _check_health(self, now: float) -> bool:
        """Check /health once; say so once if the server stays away past the health-check timeout."""
        reason = self.client.health()
        if reason is None:
            self.server_version = self.client.version()  # a restart may have brought another vLLM
        self._set_server_up(reason is None, reason)
        if reason and now - self._started > self.health_check_timeout and self._said.first("still not healthy"):
            log.error("vLLM is still not healthy; waiting on", server=self.client.base_url,
                      waited_s=round(now - self._started), error=reason)
        return reason is None

    def _unanswered(self, error: ServerUnreachable) -> CycleResult:
        """A call got no answer. The server is down only if /health says so too; otherwise it is
        this cycle's error, logged once, and the next try is a period away."""
        reason = self.client.health()
        if reason is None:
            return CycleResult.stopped(str(error))
        self._set_server_up(False, reason)
        return CycleResult.stopped(str(error), unreachable=True)

    def _execute(self, planned: Plan, now: float) -> int | CycleResult:
        """Send the due actions, unloads first; how many succeeded, or why the cycle stopped."""
        due, succeeded = due_actions(planned.actions, self.records, now), 0
        for batch in ([a for a in due if a.op is Op.UNLOAD], [a for a in due if a.op is not Op.UNLOAD]):
            # unloads first, so their slots are free for the loads
            stop: ServerUnreachable | ServerError | None = None
            for action, attempt in zip(batch, self._send_all(batch), strict=True):
                succeeded += self._record(action, attempt, now)
                if isinstance(attempt.result, ServerUnreachable | ServerError):
                    stop = stop or attempt.result
            if isinstance(stop, ServerUnreachable):
                return self._unanswered(stop)
            if stop:
                return CycleResult.stopped(str(stop))
        return succeeded

    def _send_all(self, actions: list[Action]) -> list[Attempt]:
        """Send up to MAX_REQUESTS_IN_FLIGHT requests at once: vLLM accepts calls for different
        names concurrently, which hides each round trip behind the engine's own work. After a
        call that stops the cycle (no connection, unauthorized), nothing more is sent."""
        halt = threading.Event()

        def attempt(action: Action, width: int) -> Attempt:
            if halt.is_set():
                return Attempt(None, 0.0)
            started = clock()
            result: Outcome | ServerUnreachable | ServerError
            try:
                result = self._send(action, width)
            except ServerUnreachable as e:
                if e.timed_out:  # blame this adapter: a load that hangs must not block the others
                    result = Outcome(False, str(e), timed_out=True)
                else:
                    result = e
                    halt.set()
            except ServerError as e:
                result = e
                halt.set()
            except Exception as e:  # a bug costs this adapter a retry, not the others
                log.exception("unexpected error", **self._fields(action, clock() - started))
                result = Outcome(False, f"internal error: {e!r}")
            return Attempt(result, clock() - started)

        if not actions:
            return []
        width = min(MAX_REQUESTS_IN_FLIGHT, len(actions))
        with ThreadPoolExecutor(max_workers=width) as pool:
            return list(pool.map(attempt, actions, [width] * len(actions)))

    def _send(self, action: Action, width: int) -> Outcome:
        adapter = action.adapter
        if action.op is Op.UNLOAD:
            return self.client.unload(adapter.id)
        if action.op is Op.LOAD:
            return self.client.load(adapter, alongside=width)
        return self._swap(adapter, width)

    def _swap(self, adapter: Adapter, width: int) -> Outcome:
        """Serve a new version without ever leaving the adapter unloaded for a version that fails.

        Where vLLM resets load_inplace after the load (0.33+), an in-place load: vLLM loads the new
        files before it drops the old ones. Elsewhere the flag would stick and slow the adapter for
        good, so the new files are first proven under a staging name, and only then is the serving
        version unloaded and loaded again from the new source: unserved for one load's time.
        """
        if inplace_is_safe(self.server_version):
            outcome = self.client.load(adapter, inplace=True, alongside=width)
            if not outcome.inplace_refused:
                return outcome
        staging = replace(adapter, id=adapter.id + STAGING_SUFFIX)
        staged = self.client.load(staging, alongside=width)
        if not staged.ok:
            return replace(staged, message=f"the new version did not load; the old one keeps serving: "
                                           f"{staged.message}")
        self.client.unload(staging.id)
        unloaded = self.client.unload(adapter.id)
        return self.client.load(adapter, alongside=width) if unloaded.ok else unloaded

    def _fields(self, action: Action, seconds: float) -> dict[str, Any]:
        return {"adapter": action.adapter.id, "action": action.op.value, "duration_s": round(seconds, 4),
                "reconcile_id": self.cycles}

    def _record(self, action: Action, attempt: Attempt, now: float) -> bool:
        """Every attempt, whatever became of it: counted, remembered, logged. True if it succeeded."""
        outcome = attempt.result
        if outcome is None:
            return False
        if isinstance(outcome, Outcome):
            result = "success" if outcome.ok else "timeout" if outcome.timed_out else "error"
        else:
            result = "unreachable" if isinstance(outcome, ServerUnreachable) else "error"
        OPERATIONS.labels(action.op.value, result).inc()
        OPERATION_SECONDS.labels(action.op.value).observe(attempt.seconds)
        if not isinstance(outcome, Outcome):
            return False  # the cycle stops; the server's state, not this adapter, is the news
        record = self.records.get(action.adapter.id) or AdapterRecord(action.adapter, wanted=False)
        fields = {**self._fields(action, attempt.seconds), "result": result}
        if outcome.ok:
            log.info(f"{action.op.value} done: {action.adapter.id}", **fields)
            return record.succeed(action.op, action.adapter.source)
        error = outcome.message if outcome.timed_out else f"{outcome.status}: {outcome.message}"
        if record.fail(action.op, error, now, self.period, outcome.permanent):
            self._report_failure(record, action.op, now, fields)
        return False

    def _report_failure(self, record: AdapterRecord, op: Op, now: float, fields: dict[str, Any]) -> None:
        retry_in = round((record.retry_at or now) - now, 3)
        log.warning(f"{op.value} failed: {record.adapter.id}",
                    **{"result": "error", **fields, "error": record.last_error, "retry_in_s": retry_in})

    def _follow(self, desired: DesiredState) -> None:
        """Follow config changes: new records for new or changed entries, none for dropped ones."""
        if desired is self._adopted:
            return  # the same config as last cycle: nothing to follow
        self._adopted = desired
        if desired.server_url != self._server_url:
            self.client.use_server(desired.server_url)
            self._server_url, self.server_up = desired.server_url, None
        wanted = {a.id: (a, True) for a in desired.ensure_exist}
        wanted.update({a.id: (a, False) for a in desired.ensure_not_exist})
        for adapter_id in set(self.records) - set(wanted):
            del self.records[adapter_id]
            self._said.clear(("skip", adapter_id))
            self._said.clear(("canary unavailable", adapter_id))
        for adapter_id, (adapter, keep) in wanted.items():
            record = self.records.get(adapter_id)
            if record and record.wanted == keep and replace(record.adapter, canary=adapter.canary) == adapter:
                record.use_canary(adapter)  # the same files: prove them again, no reload
            elif record is None or record.adapter != adapter or record.wanted != keep:
                # a changed entry resets its backoff; what it went through stays counted
                self.records[adapter_id] = AdapterRecord(adapter, keep, lost=record.lost if record else 0)

    def _take_in(self, server: ServerState, planned: Plan, now: float, fetching: Collection[str] = ()) -> None:
        """Each record takes in what the server lists, before any action changes it; and what
        changed behind the sidecar's back is reported: adapters lost, adapters foreign."""
        skipped = {skip.adapter.id: skip.reason for skip in planned.skipped}
        busy = {action.adapter.id for action in planned.actions} | set(fetching)
        serving = sum(r.is_serving() for r in self.records.values())
        lost = []
        for adapter_id, record in self.records.items():
            self._report_skip(record, skipped.get(adapter_id))
            unconfirmed = record.unconfirmed
            seen = record.observe(server.adapters.get(adapter_id), adapter_id in busy, skipped.get(adapter_id),
                                  now, self.period)
            if seen is Seen.FAILED and unconfirmed:
                self._report_failure(record, unconfirmed, now, {"adapter": adapter_id, "action": unconfirmed.value,
                                                                "reconcile_id": self.cycles})
            elif seen is Seen.LOST:
                lost.append(adapter_id)
                LOST.labels(adapter_id).inc()
        if lost:
            everything = len(lost) == serving
            log.warning(f"lost: {len(lost)} of the {serving} adapters loaded vanished without an unload"
                        + ("; all of them at once: the server restarted" if everything and serving > 1 else "")
                        + "; loading them again", adapters=lost, server_restarted=everything and serving > 1)
        self._report_foreign(server)

    def _report_foreign(self, server: ServerState) -> None:
        """Adapters the server lists that the config names nowhere (nor a staging copy of one):
        never touched, but shown, counted and logged once each."""
        foreign = sorted(i for i in server.adapters
                         if i not in self.records and i.removesuffix(STAGING_SUFFIX) not in self.records)
        for adapter_id in set(self.foreign) - set(foreign):
            self._said.clear(("foreign", adapter_id))
        for adapter_id in foreign:
            if self._said.first(("foreign", adapter_id)):
                log.info(f"foreign: {adapter_id} is loaded on the server and named nowhere in the config; left alone",
                         adapter=adapter_id, source=server.adapters[adapter_id])
        self.foreign = foreign
        FOREIGN.set(len(foreign))

    def _prove(self, server: ServerState) -> None:
        """The canary of each adapter loaded without a verdict yet; never while nothing changes. The
        base model answers once per prompt, then the adapters a few at a time, as loads go."""
        due = [r for r in self.records.values() if r.canary_due]
        if not due:
            return
        base_texts: dict[tuple[str, int], str | CanaryUnavailable] = {}
        for canary in {r.adapter.canary for r in due if r.adapter.canary}:
            try:
                if not server.base_models:
                    raise CanaryUnavailable("the server lists no base model to compare with")
                base_texts[canary.prompt, canary.max_tokens] = self.client.complete(server.base_models[0], canary)
            except CanaryUnavailable as e:  # said once for every adapter that needed it, not asked again
                base_texts[canary.prompt, canary.max_tokens] = e

        def prove(record: AdapterRecord) -> tuple[str, float, str | None]:
            canary, started = record.adapter.canary, clock()
            assert canary is not None  # canary_due is only ever set for an adapter with a canary
            base = base_texts[canary.prompt, canary.max_tokens]
            try:
                if isinstance(base, CanaryUnavailable):
                    raise base
                text = self.client.complete(record.adapter.id, canary)
            except CanaryUnavailable as e:
                return "unavailable", clock() - started, str(e)
            if text == base:
                return "inert", clock() - started, f"{record.adapter.id} and {server.base_models[0]} answer {text!r}"
            return "verified", clock() - started, None

        with ThreadPoolExecutor(max_workers=min(MAX_REQUESTS_IN_FLIGHT, len(due))) as pool:
            verdicts = list(pool.map(prove, due))
        for record, (result, seconds, detail) in zip(due, verdicts, strict=True):
            self._report_proof(record, result, seconds, detail)

    def _report_proof(self, record: AdapterRecord, result: str, seconds: float, detail: str | None) -> None:
        adapter_id = record.adapter.id
        record.take_proof(result, seconds, detail)
        CANARIES.labels(result).inc()
        CANARY_SECONDS.observe(seconds)
        if result == "verified":
            log.info(f"verified: {adapter_id} answers unlike its base model", adapter=adapter_id,
                     duration_s=round(seconds, 4))
        elif result == "inert":
            log.warning(f"inert: {adapter_id} answers as its base model does", adapter=adapter_id,
                        duration_s=round(seconds, 4), error=detail)
        elif self._said.changed(("canary unavailable", adapter_id), detail):
            log.warning(f"canary skipped: {adapter_id} cannot be proven here", adapter=adapter_id, error=detail)
        if result != "unavailable":
            self._said.clear(("canary unavailable", adapter_id))

    def _report_skip(self, record: AdapterRecord, reason: str | None) -> None:
        """Say once why an adapter is not loaded here, and once when that no longer holds."""
        adapter_id = record.adapter.id
        if reason and self._said.changed(("skip", adapter_id), reason):
            log.info(f"skipped: {adapter_id} is not for this server", adapter=adapter_id,
                     base_model=record.adapter.base_model, reason=reason)
        elif not reason and self._said.clear(("skip", adapter_id)):
            log.info(f"no longer skipped: {adapter_id}", adapter=adapter_id)

    def _set_server_up(self, up: bool, reason: str | None = None) -> None:
        if up != self.server_up or (not up and reason != self.server_error):
            if up:
                log.info("vLLM server is up", server=self.client.base_url, vllm_version=self.server_version)
            elif self.server_up:
                log.warning("vLLM server is down", server=self.client.base_url, error=reason)
            else:
                log.info("waiting for vLLM", server=self.client.base_url, error=reason)
            self.server_up = up
        self.server_error = None if up else reason
        SERVER_UP.set(1 if up else 0)

    def _report_cycle(self, result: CycleResult) -> None:
        """Log a server error once per distinct error, and once more on recovery."""
        if result.completed and self._said.clear("cycle error"):
            log.info("reconcile recovered", reconcile_id=self.cycles)
        elif result.error and not result.unreachable and self._said.changed("cycle error", result.error):
            log.error("reconcile stopped early", reconcile_id=self.cycles, error=result.error)

    def status(self) -> dict[str, Any]:
        return {
            "server": {"url": self._server_url, "up": bool(self.server_up), "version": self.server_version,
                       "error": self.server_error},
            "in_sync": bool(self.last_cycle and self.last_cycle.in_sync),
            "last_error": self.last_cycle.error if self.last_cycle else None,
            "adapters": {adapter_id: record.status() for adapter_id, record in sorted(self.records.items())},
            "foreign": self.foreign,
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
            if self.desired and sha == self.desired.sha256:
                self._valid_again(self.desired)  # back from a version that could not even be read
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
        self._valid_again(desired)
        self.desired = desired
        CONFIG_LAST_CHANGE.set(wall_time(clock()))
        log.info(
            "config loaded",
            name=desired.name or None, config_sha256=desired.sha256, key=desired.key,
            ensure_exist=len(desired.ensure_exist), ensure_not_exist=len(desired.ensure_not_exist),
        )

    def _valid_again(self, desired: DesiredState) -> None:
        if self.error:
            log.info("config is valid again", config_sha256=desired.sha256)
        self.error = None
        CONFIG_VALID.set(1)

    def _report(self, error: str) -> None:
        CONFIG_VALID.set(0)
        if error != self.error:  # once per distinct error
            state = "keeping the last good config" if self.desired else "waiting for a valid config"
            log.error(f"config rejected; {state}", error=error)
        self.error = error

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.desired.name if self.desired else None,
            "sha256": self.desired.sha256 if self.desired else None,
            "key": self.desired.key if self.desired else None,
            "last_read": iso_time(self.last_read),
            "error": self.error,
        }


def run_loop(
    settings: Settings, config: ConfigSource, reconciler: Reconciler, stop: threading.Event, liveness: Liveness,
    nudge: threading.Event,
) -> None:
    """The whole sidecar: reconcile when the config changed, a period passed or SIGHUP asked for it
    (`nudge`); one cycle at a time."""
    next_due = 0.0
    while not stop.is_set():
        liveness.beat()
        now = clock()
        due = now >= next_due or nudge.is_set()
        nudge.clear()
        changed = config.poll(force=due)
        if (changed or due) and config.desired is not None:
            reconciler.reconcile(config.desired)
            next_due = now + reconciler.next_delay(settings.health_check_interval)
        elif due:
            next_due = now + settings.health_check_interval
        nudge.wait(min(settings.watch_interval, max(0.0, next_due - clock())))


def wait_for_health(client: VLLMClient, timeout: float, interval: float) -> bool:
    deadline = clock() + timeout
    while client.health() is not None:
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
        loaded = [(r.adapter.id, 1 if r.wanted and r.state in (State.LOADED, State.INERT) else 0) for r in records]
        for (name, documentation), label in ((ADAPTER_LOADED, "adapter"), (LEGACY_ADAPTER_STATUS, "adapter_name")):
            family = GaugeMetricFamily(name, documentation, labels=[label])
            for adapter_id, value in loaded:
                family.add_metric([adapter_id], value)
            yield family
        family = GaugeMetricFamily(*ADAPTER_STATE, labels=["adapter", "state"])
        for record in records:
            for state in State:
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
        host = address[0].removeprefix("[").removesuffix("]")
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, address[1]), StatusHandler)
        self.status, self.alive, self.ready = status, alive, ready

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # `::` takes IPv4 clients too (dual stack), whatever the host's net.ipv6.bindv6only says.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class StatusHandler(BaseHTTPRequestHandler):
    timeout = 5  # a client that sends half a request must not hold a thread forever
    disable_nagle_algorithm = True  # headers and body are two writes; don't wait for a delayed ACK
    server: StatusServer
    PATHS = ("/metrics", "/healthz", "/readyz", "/status")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, mask(prom.generate_latest().decode()).encode(), prom.CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok = self.server.alive() and (path == "/healthz" or self.server.ready())
            self._send(200 if ok else 503, b"ok\n" if ok else b"not ok\n", "text/plain")
        elif path == "/status":
            body = mask(json.dumps(self.server.status(), indent=2)).encode() + b"\n"
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

    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = {k: v for k, v in getattr(record, "fields", {}).items() if v is not None}
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        if self.json_lines:
            line = json.dumps({"ts": ts, "level": record.levelname.lower(), "msg": record.getMessage(), **fields})
        else:
            pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
            message = record.getMessage()
            message = message if message.isprintable() else json.dumps(message)[1:-1]
            line = f"{ts} {record.levelname:<7} {message}" + (f" {pairs}" if pairs else "")
        return mask(line)


def _text_value(value: Any) -> str:
    # Quoted and escaped when it could be read as more than one value, or as more than one line.
    text = value if isinstance(value, str) else json.dumps(value)
    return text if text and text.isprintable() and not any(c in text for c in ' ="') else json.dumps(text)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(log_format == "json"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar.py",
        description="Keep a vLLM server's LoRA adapters equal to a mounted config (vLLMLoRAConfig).",
        epilog="Every flag can also be set by the environment variable named in its help; a flag wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        exit_on_error=False,
    )
    for name, env, options in FLAGS:
        parser.add_argument(name, **{**options, "help": f"{options['help']} [env {env}]"})
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--once", dest="mode", action="store_const", const="once",
                       help="reconcile once and exit: 0 in sync, 1 not in sync, 2 invalid config")
    modes.add_argument("--dry-run", dest="mode", action="store_const", const="dry-run",
                       help="print the plan, change nothing, exit: 0 in sync, 1 changes needed, 2 invalid config")
    modes.add_argument("--validate", dest="mode", action="store_const", const="validate",
                       help="check the config file only (no network): exit 0, or 2 with every error")
    modes.add_argument("--digest", dest="digest_of", metavar="DIR", type=Path,
                       help="print the sha256 that pins an adapter folder uploaded under an s3:// prefix, and exit")
    parser.add_argument("--version", action="version", version=f"lora-sidecar {VERSION}")
    parser.set_defaults(mode="run")
    return parser


def environment_flags(environ: Mapping[str, str]) -> list[str]:
    """The environment as flags, put before the command line's own (the last one given wins), so
    that argparse checks a value from the environment exactly as it checks a flag."""
    argv = []
    for name, env, options in FLAGS:
        value = environ.get(env)
        if value is None:
            continue
        word = value.strip().lower()
        if options.get("action") is argparse.BooleanOptionalAction and word in ("1", "true", "yes", "on"):
            argv.append(name)
        elif options.get("action") is argparse.BooleanOptionalAction and word in ("0", "false", "no", "off"):
            argv.append(name.replace("--", "--no-", 1))
        else:  # anything else argparse refuses, for a switch too ("ignored explicit argument")
            argv.append(f"{name}={value}")
    return argv


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = build_parser()
    try:
        args = parser.parse_args([*environment_flags(os.environ), *(sys.argv[1:] if argv is None else argv)])
    except argparse.ArgumentError as e:  # name the variable too, where the value came from one
        envs = [env for name, env, _ in FLAGS if name in (e.argument_name or "").split("/") and env in os.environ]
        parser.error(f"{e}" + "".join(f" ({env}={os.environ[env]!r})" for env in envs))
    values = {**vars(args), "api_key": read_api_key(parser, args.api_key_file),
              "mode": "digest" if args.digest_of else args.mode}
    return Settings(**{f.name: values[f.name] for f in fields(Settings)})


def read_api_key(parser: argparse.ArgumentParser, key_file: str | None) -> str | None:
    """The key from --api-key-file, else VLLM_API_KEY. Surrounding white space (the newline that
    `echo` leaves in a Secret) is dropped; a key that cannot go into an HTTP header is refused here,
    since the HTTP client would refuse every call with it."""
    source = f"--api-key-file {key_file}" if key_file else "VLLM_API_KEY"
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8")
        except OSError as e:
            parser.error(f"--api-key-file {key_file}: {e.strerror or e}")
    else:
        key = os.environ.get("VLLM_API_KEY", "")
    key = key.strip()
    if any(not " " <= c <= "~" for c in key):
        parser.error(f"{source}: the API key holds a control or non-ASCII character; it cannot be sent as a header")
    return key or None


def validate_only(settings: Settings) -> int:
    try:
        desired = read_config(settings.config_path, settings.config_validation)
    except ConfigError as e:
        print(mask("\n".join(e.errors)), file=sys.stderr)
        return 2
    print(f"{settings.config_path}: valid: {len(desired.ensure_exist)} adapters to hold, "
          f"{len(desired.ensure_not_exist)} to remove, server {desired.server_url}")
    return 0


def plan_lines(planned: Plan, fetch: Sequence[Adapter] = ()) -> list[str]:
    lines = [f"download {a.id}  source={a.source}  (not in --adapter-dir yet)" for a in fetch]
    lines += [f"{a.op.value:<7} {a.adapter.id}  source={a.adapter.source}  ({a.reason})" for a in planned.actions]
    lines += [f"skip    {s.adapter.id}  ({s.reason})" for s in planned.skipped]
    return lines or ["in sync"]


def print_digest(folder: Path) -> int:
    if not folder.is_dir():
        print(f"--digest {folder}: not a folder", file=sys.stderr)
        return 2
    print(folder_digest(folder))
    return 0


def adapter_store(settings: Settings) -> AdapterStore:
    return AdapterStore(settings.adapter_dir, settings.adapter_dir_max_bytes, settings.request_timeout,
                        settings.download_timeout)


def run_one_shot(settings: Settings, client: VLLMClient) -> int:
    """--once and --dry-run: exit 0 when the server matches the config, 1 when not, 2 for a bad config."""
    try:
        desired = read_config(settings.config_path, settings.config_validation)
    except ConfigError as e:
        print(mask("\n".join(e.errors)), file=sys.stderr)
        return 2
    client.use_server(desired.server_url)
    if not wait_for_health(client, settings.health_check_timeout, settings.health_check_interval):
        log.error("vLLM is not healthy", server=desired.server_url, waited_s=settings.health_check_timeout)
        return 1
    store = adapter_store(settings)
    try:
        if settings.mode == "once":
            reconciler = Reconciler(client, settings.reconcile_period, settings.health_check_timeout, store)
            reconciler.reconcile(desired)
            deadline = clock() + settings.download_timeout
            while store.busy() and clock() < deadline:  # load what the downloads bring
                store.wait(deadline - clock())
                reconciler.reconcile(desired)
        server = client.server_state()
    except (ServerUnreachable, ServerError) as e:
        log.error("cannot read the server's adapters", error=str(e))
        return 1
    local, fetch = localize(desired, server, store.root, store.staged_names())
    planned = plan(local, server)
    print(mask("\n".join(plan_lines(planned, fetch))))
    return 0 if is_in_sync(planned, 0, [a.id for a in fetch]) else 1


def run_forever(settings: Settings, client: VLLMClient) -> int:
    config = ConfigSource(settings.config_path, settings.config_validation)
    store = adapter_store(settings)
    reconciler = Reconciler(client, settings.reconcile_period, settings.health_check_timeout, store)
    liveness = client.liveness
    prom.REGISTRY.register(AdapterMetrics(reconciler))
    stop, nudge = threading.Event(), threading.Event()
    store.wake = nudge.set
    store.remove_leftovers()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: (stop.set(), nudge.set()))
    signal.signal(signal.SIGHUP, lambda *_: nudge.set())  # re-read the config and reconcile now

    def status() -> dict[str, Any]:
        return {"version": VERSION, "config": config.status(), "ready": reconciler.ready, **reconciler.status()}

    status_server = None
    if settings.metrics_port:
        address = (settings.metrics_address, settings.metrics_port)
        try:
            try:
                status_server = StatusServer(address, status, liveness.alive, lambda: reconciler.ready)
            except OSError as e:
                if address[0] != "::" or e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                address = ("0.0.0.0", settings.metrics_port)  # a host without IPv6
                status_server = StatusServer(address, status, liveness.alive, lambda: reconciler.ready)
        except OSError as e:
            log.error("cannot serve metrics and probes", address=f"{address[0]}:{address[1]}",
                      error=e.strerror or str(e))
            return 1
        # The process exits without shutdown(), so the poll interval only costs wake-ups: keep it long.
        threading.Thread(target=status_server.serve_forever, kwargs={"poll_interval": 5}, daemon=True).start()
    log.info("sidecar started", version=VERSION, config=str(settings.config_path), metrics_port=settings.metrics_port)
    worker = threading.Thread(target=run_loop, args=(settings, config, reconciler, stop, liveness, nudge),
                              daemon=True)
    worker.start()
    while not stop.is_set() and worker.is_alive():
        stop.wait(1.0)  # a signal sets `stop` and ends the wait at once
    log.info("sidecar stopping; adapters stay loaded")
    return 0 if stop.is_set() else 1


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    SECRETS[:] = [settings.api_key] if settings.api_key else []
    configure_logging(settings.log_level, settings.log_format)
    if settings.mode == "validate":
        return validate_only(settings)
    if settings.digest_of:
        return print_digest(settings.digest_of)
    client = VLLMClient(requests.Session(), settings.request_timeout, settings.api_key, settings.load_timeout,
                        Liveness(settings.alive_window))
    if settings.mode in ("once", "dry-run"):
        return run_one_shot(settings, client)
    return run_forever(settings, client)


if __name__ == "__main__":
    sys.exit(main())
