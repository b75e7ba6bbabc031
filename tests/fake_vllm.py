"""A local stand-in for a vLLM 0.32 OpenAI server, for process tests, faults, soak and benchmarks.

It answers the routes the sidecar uses (/health, /version, /v1/models, load and unload), and the
completions the tests use to prove an adapter is live, the way a real vLLM server was observed to
answer them (status codes, JSON error bodies, the plain-text 200 bodies that carry no Content-Type),
and decides adapter validity from the real filesystem as vLLM does. Other paths answer 404 and other
methods 405, as in vLLM. A control surface under /_fake/ (no auth) lets a test in another process
(the benchmark) read the request log and the state and set the adapters.

GET /version answers {"version": V} without a key (version=None: 404, a server without the route).
A load with load_inplace=True is remembered per adapter while its flag sticks, as on vLLM <= 0.32
(also an unknown version); from 0.33 on it does not: see inplace_sticky(). normalize_root=True makes
/v1/models report each adapter's root without a trailing "/" (adapters() keeps it as sent).

Faults (one at a time, in-process: set_fault(mode, ...)):
health503 (/health 503), hang (vLLM routes answer nothing until cleared), load500,
garbage_models (variant=not_json|wrong_type|missing_keys), slow_load (seconds=S per load),
load_noop (load answers 200, nothing changes), unload_noop (unload answers 200, the adapter stays),
load_status (status=N: load answers N with vLLM's JSON error body, nothing changes),
models_drop (GET /v1/models closes the connection unanswered; /health stays 200),
echo_auth (load answers 500 quoting the request's Authorization header, as a careless proxy might),
no_completions (POST /v1/completions answers 404 {"detail":"Not Found"}, as for an embedding model).

An adapter made with make_adapter(folder, inert=True) loads like any other, but its completions are
the base model's, word for word (zero weights or wrong target modules would do that on vLLM); the
marker (INERT_KEY in adapter_config.json) is read from the adapter's folder at each completion.

Known differences from vLLM: the text of 400 validation errors only resembles pydantic's;
/metrics is not served; an injected fault survives restart() (clear it with set_fault("none"));
a sticky load_inplace flag is only recorded: completions do not re-read the adapter's files.

In-process:

    server = FakeVLLM(port=0, version="0.32.0").start()     # server.url, server.port
    server.requests(); server.adapters(); server.inplace_sticky(); server.state()
    server.set_fault("hang"); server.set_fault("load_status", status=503); server.restart(down_seconds=1)
    server.stop()

As a process, the way the benchmark runs it (prints one line `LISTENING <port>` once it accepts
connections; exits 0 on SIGTERM):

    python tests/fake_vllm.py --port 0 [--accept-any-path] [--load-delay S] [--version-string V]
    GET /_fake/requests, POST /_fake/reset, GET /_fake/state, PUT /_fake/adapters {name: path}

Standard library only, so any venv (or none) can run it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# --- Inventory ------------------------------------------------------------------------------

FAULT_MODES = ("none", "health503", "hang", "load500", "garbage_models", "slow_load", "load_noop", "unload_noop",
               "load_status", "models_drop", "echo_auth", "no_completions")
GARBAGE_VARIANTS = ("not_json", "wrong_type", "missing_keys")

# Routes that exist only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true (else 404 {"detail":"Not Found"}).
LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")

# vLLM's utility-call wrapper: engine errors reach the HTTP answer as "Call to add_lora method failed: ...".
ADD_LORA_FAILED = "Call to add_lora method failed: "

# Statuses fault "load_status" may answer with.
ERROR_STATUSES = frozenset(s.value for s in HTTPStatus if s >= 400)

# uvicorn closes idle keep-alive connections after 5 s; clients must cope with that race.
UVICORN_KEEP_ALIVE_S = 5.0

# adapter_config.json key of an adapter whose completions are the base model's (make_adapter(inert=True)).
INERT_KEY = "fake_inert"

# --max-model-len of the servers the tests imitate (tests/vllm_server.py starts the real one with it).
MAX_MODEL_LEN = 128

# serve_forever() checks for shutdown this often; it bounds how long stop() takes.
POLL_INTERVAL_S = 0.01

JsonObject = dict[str, Any]


# --- Data types -----------------------------------------------------------------------------


@dataclass
class FakeConfig:
    """What a real server is told on its command line. Read on every request, so a test may change it."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    model: str = "/models/base"
    served_model_names: tuple[str, ...] = ("base",)
    max_lora_rank: int = 8
    runtime_lora: bool = True  # VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and --enable-lora
    inplace_supported: bool = True  # False: an older vLLM that ignores load_inplace
    accept_any_path: bool = False  # any non-empty lora_path loads (benchmarks with 1000 adapters)
    load_delay: float = 0.0  # seconds each load holds the engine
    version: str | None = "0.32.0"  # what GET /version reports; None: the route does not exist
    normalize_root: bool = False  # /v1/models reports adapter roots without a trailing "/"


@dataclass(frozen=True)
class Fault:
    """The one injected fault in force; "none" means the server behaves like vLLM."""

    mode: str = "none"
    variant: str | None = None  # garbage_models only
    seconds: float | None = None  # slow_load only
    status: int | None = None  # load_status only

    @staticmethod
    def make(mode: str, variant: str | None = None, seconds: float | None = None, status: int | None = None) -> Fault:
        """Validate a fault request; ValueError says what is wrong."""
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; expected one of {', '.join(FAULT_MODES)}")
        if mode == "garbage_models":
            variant = variant or GARBAGE_VARIANTS[0]
            if variant not in GARBAGE_VARIANTS:
                raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(GARBAGE_VARIANTS)}")
            return Fault(mode, variant=variant)
        if mode == "slow_load":
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
                raise ValueError("slow_load needs a number of seconds >= 0")
            return Fault(mode, seconds=float(seconds))
        if mode == "load_status":
            if isinstance(status, bool) or status not in ERROR_STATUSES:
                raise ValueError("load_status needs a status: an HTTP error code such as 429 or 503")
            return Fault(mode, status=status)
        return Fault(mode)

    def to_json(self) -> JsonObject:
        return {"mode": self.mode, "variant": self.variant, "seconds": self.seconds, "status": self.status}


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request, plus the listener incarnation that received it."""

    method: str
    path: str
    headers: Message
    body: bytes
    stopped: threading.Event  # set when the listener that accepted this request goes away


@dataclass(frozen=True)
class Reply:
    """One HTTP answer. content_type None sends no Content-Type header, as vLLM's plain 200s do."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


@dataclass
class LogEntry:
    """One request to a vLLM route; status stays None while in flight or when dropped unanswered."""

    t: float
    method: str
    path: str
    body: Any
    status: int | None = None

    def to_json(self) -> JsonObject:
        # A deep copy, so a test that edits what it got cannot rewrite history.
        return {"t": self.t, "method": self.method, "path": self.path, "body": copy.deepcopy(self.body),
                "status": self.status}


@dataclass(frozen=True)
class LoadRequest:
    lora_name: str
    lora_path: str
    load_inplace: bool


# --- Reply builders -------------------------------------------------------------------------


def json_reply(status: int, obj: Any, *, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    # Starlette's JSONResponse renders compactly; matching it keeps byte-level comparisons honest.
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return Reply(status, body, "application/json", headers)


def text_reply(status: int, text: str) -> Reply:
    """vLLM answers load/unload success with Response(content=str): no Content-Type at all."""
    return Reply(status, text.encode())


def error_reply(status: int, message: str, err_type: str, param: str | None = None) -> Reply:
    return json_reply(status, {"error": {"message": message, "type": err_type, "param": param, "code": status}})


def validation_reply(errors: Sequence[Any]) -> Reply:
    """FastAPI's RequestValidationError as vLLM renders it: 400, type "Bad Request"."""
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {err}\n" for err in errors)
    first = errors[0] if errors else None
    param = ".".join(str(p) for p in first["loc"]) if isinstance(first, dict) and "loc" in first else None
    return error_reply(400, message.rstrip(), "Bad Request", param)


NOT_FOUND = json_reply(404, {"detail": "Not Found"})
UNAUTHORIZED = json_reply(401, {"error": "Unauthorized"})


def method_not_allowed(allowed: Iterable[str]) -> Reply:
    return json_reply(405, {"detail": "Method Not Allowed"}, headers=(("Allow", ", ".join(sorted(allowed))),))


def model_card(model_id: str, root: str, parent: str | None, max_model_len: int | None, created: int) -> JsonObject:
    """One /v1/models entry with every field vLLM's ModelCard carries."""
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
        "organization": "*", "group": None, "is_blocking": False,
    }
    return {"id": model_id, "object": "model", "created": created, "owned_by": "vllm", "root": root,
            "parent": parent, "max_model_len": max_model_len, "permission": [permission]}


# --- Request body validation (what pydantic would say) --------------------------------------

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def parse_json_object(request: Request) -> JsonObject | Reply:
    """The body as a JSON object, or the 400 vLLM gives for a wrong media type or a bad body."""
    media_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return validation_reply(["Unsupported Media Type: Only 'application/json' is allowed"])
    if not request.body:
        return validation_reply([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        obj = json.loads(request.body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        position = getattr(e, "pos", 0)
        reason = getattr(e, "msg", str(e))
        return validation_reply(
            [{"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error", "input": {},
              "ctx": {"error": reason}}]
        )
    if not isinstance(obj, dict):
        return validation_reply(
            [{"type": "model_attributes_type", "loc": ("body",),
              "msg": "Input should be a valid dictionary or object to extract fields from", "input": obj}]
        )
    return obj


def _string_field(obj: JsonObject, key: str, errors: list[JsonObject]) -> str:
    if key not in obj:
        errors.append({"type": "missing", "loc": ("body", key), "msg": "Field required", "input": obj})
        return ""
    value = obj[key]
    if not isinstance(value, str):
        errors.append({"type": "string_type", "loc": ("body", key), "msg": "Input should be a valid string",
                       "input": value})
        return ""
    return value


def _bool_field(obj: JsonObject, key: str, errors: list[JsonObject]) -> bool:
    """pydantic's lax bool: true/false, 0/1 and the usual yes/no strings."""
    value = obj.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    errors.append({"type": "bool_parsing", "loc": ("body", key), "msg": "Input should be a valid boolean",
                   "input": value})
    return False


def parse_load_request(request: Request) -> LoadRequest | Reply:
    obj = parse_json_object(request)
    if isinstance(obj, Reply):
        return obj
    errors: list[JsonObject] = []
    # Unknown fields (base_model_name, ...) are ignored, as vLLM ignores them.
    load = LoadRequest(_string_field(obj, "lora_name", errors), _string_field(obj, "lora_path", errors),
                       _bool_field(obj, "load_inplace", errors))
    return validation_reply(errors) if errors else load


def parse_unload_name(request: Request) -> str | Reply:
    obj = parse_json_object(request)
    if isinstance(obj, Reply):
        return obj
    errors: list[JsonObject] = []
    name = _string_field(obj, "lora_name", errors)
    return validation_reply(errors) if errors else name


def log_body(raw: bytes) -> Any:
    """What the request log shows: parsed JSON, else the raw text, None when there was no body."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


# --- The adapter check vLLM's engine does on load -------------------------------------------


def check_adapter(name: str, path: str, max_rank: int) -> Reply | None:
    """None if `path` is a loadable adapter, else the answer vLLM gives.

    Relative paths resolve against this process's working directory, as they do for vLLM.
    A missing path would be tried as a Hugging Face repo id; offline that is a 404 too.
    """
    config_file = Path(path).absolute() / "adapter_config.json"
    try:
        if Path(path).is_file():
            return error_reply(500, f"{ADD_LORA_FAILED}[Errno 20] Not a directory: '{config_file}'",
                               "InternalServerError")
        if not config_file.is_file():
            return error_reply(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        rank = int(json.loads(config_file.read_text()).get("r", 8))  # peft's default rank is 8
    except (OSError, ValueError, TypeError, AttributeError) as e:  # unreadable or malformed config
        return error_reply(500, f"{ADD_LORA_FAILED}{e}", "InternalServerError")
    if rank > max_rank:
        return error_reply(
            500, f"{ADD_LORA_FAILED}LoRA rank {rank} is greater than max_lora_rank {max_rank}.", "InternalServerError"
        )
    return None


def inplace_sticks(version: str | None) -> bool:
    """Whether vLLM of this version keeps load_inplace on the stored request: <= 0.32, or unknown."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", version or "")  # "0.32.0", "0.33.1", "0.32.0+cpu", "0.33.0rc1"
    return match is None or (int(match[1]), int(match[2])) <= (0, 32)


def is_inert(path: str) -> bool:
    """Whether the adapter folder at `path` carries the INERT_KEY marker (False when unreadable)."""
    try:
        return json.loads((Path(path) / "adapter_config.json").read_text()).get(INERT_KEY) is True
    except (OSError, ValueError, AttributeError):
        return False


def make_adapter(folder: str | os.PathLike[str], rank: int = 8, *, inert: bool = False, **extra: Any) -> Path:
    """Create an adapter folder the fake accepts (adapter_config.json only; no weights needed).
    inert=True: the fake answers completions through it exactly as through the base model."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    config = {"r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA", **extra}
    if inert:
        config[INERT_KEY] = True
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


# --- The request log ------------------------------------------------------------------------


class RequestLog:
    """Every request to a vLLM route in arrival order; status is filled in before the answer is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[LogEntry] = []

    def open(self, request: Request) -> LogEntry:
        entry = LogEntry(time.monotonic(), request.method, request.path, log_body(request.body))
        with self._lock:
            self._entries.append(entry)
        return entry

    def close(self, entry: LogEntry, status: int) -> None:
        with self._lock:
            entry.status = status

    def snapshot(self) -> list[JsonObject]:
        with self._lock:
            return [entry.to_json() for entry in self._entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --- The HTTP plumbing ----------------------------------------------------------------------


class CuttableServer(ThreadingHTTPServer):
    """A test server that remembers its open connections, so that stop() can cut them all, as a dying
    process would, instead of waiting for keep-alive or hung handler threads. Used here and by
    remote_sources.HttpsFiles."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True  # stop() then start() must rebind the same port at once

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.stopped = threading.Event()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, connection: socket.socket) -> None:
        with self._open_lock:
            self._open.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(connection)

    def cut_connections(self) -> None:
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # peers that vanish mid-answer are normal in fault tests


class _Listener(CuttableServer):
    """One incarnation of the listening socket. A restart makes a new one on the same port."""

    request_queue_size = 1024  # the stdlib's backlog of 5 drops connections when a benchmark bursts

    def __init__(self, address: tuple[str, int], fake: FakeVLLM) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.fake = fake
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.track(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.untrack(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn
    # Headers and body go out in two writes; without this, Nagle's algorithm and the
    # client's delayed ACK add 40 ms to every answer, which uvicorn does not.
    disable_nagle_algorithm = True
    timeout = UVICORN_KEEP_ALIVE_S
    server: _Listener

    def version_string(self) -> str:
        return "uvicorn"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # The methods the sidecar, the tests and the benchmark send, through one dispatcher, so vLLM's
    # 404/405 answers come out right.
    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self._send(Reply(400, b"Invalid HTTP request received.", "text/plain; charset=utf-8", close=True))
            return
        request = Request(self.command, urlsplit(self.path).path, self.headers, body, self.server.stopped)
        try:
            reply = self.server.fake.handle(request)
        except Exception:
            traceback.print_exc()  # a bug in the fake: make it loud, answer like uvicorn does
            reply = Reply(500, b"Internal Server Error", "text/plain; charset=utf-8", close=True)
        if reply is None:  # the server "died" while this request was in flight: no answer at all
            self.close_connection = True
            return
        self._send(reply)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length)

    def _send(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            if reply.content_type is not None:
                self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            if reply.close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True  # the client gave up (timeout) or stop() cut the connection


# --- The fake server ------------------------------------------------------------------------

Route = Callable[[Request], Reply | None]


class FakeVLLM:
    """A vLLM look-alike on a real port; see the module docstring."""

    def __init__(
        self,
        port: int = 0,
        api_key: str | None = None,
        model: str = "/models/base",
        served_model_name: str | Sequence[str] = "base",
        max_lora_rank: int = 8,
        runtime_lora: bool = True,
        inplace_supported: bool = True,
        accept_any_path: bool = False,
        load_delay: float = 0.0,
        *,
        host: str = "127.0.0.1",
        version: str | None = "0.32.0",
        normalize_root: bool = False,
    ) -> None:
        names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
        self.config = FakeConfig(
            host=host, port=port, api_key=api_key, model=model, served_model_names=names,
            max_lora_rank=max_lora_rank, runtime_lora=runtime_lora, inplace_supported=inplace_supported,
            accept_any_path=accept_any_path, load_delay=load_delay, version=version, normalize_root=normalize_root,
        )
        self._log = RequestLog()
        # _lock guards the engine state below; _changed wakes handlers held by the "hang" fault.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._adapters: dict[str, str] = {}
        self._sticky: set[str] = set()  # adapters last loaded with a load_inplace flag that stuck
        self._fault = Fault()
        self._last_created = 0
        self._name_locks: dict[str, threading.Lock] = {}
        # vLLM's engine core runs add_lora/remove_lora one at a time.
        self._engine_lock = threading.Lock()
        # _lifecycle guards the listener and a pending delayed restart.
        self._lifecycle = threading.Lock()
        self._listener: _Listener | None = None
        self._pending_start: threading.Timer | None = None
        self._up = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeVLLM:
        """Bind and serve. After a first start on port 0, later starts rebind the port it got."""
        with self._lifecycle:
            self._cancel_pending_start()
            if self._listener is None:
                self._start_locked()
        return self

    def stop(self, *, keep_adapters: bool = True) -> None:
        """Close the port and cut every connection; returns within about 0.1 s even with hung handlers.

        keep_adapters=False forgets loaded adapters, as a real restart does.
        """
        self._stop(keep_adapters=keep_adapters)

    def restart(self, down_seconds: float = 0.0, *, keep_adapters: bool = False) -> None:
        """Go down now (connections refused), come back on the same port after down_seconds.

        Returns once the port is closed; wait_up() waits for the comeback.
        """
        self._stop(keep_adapters=keep_adapters)
        self._schedule_start(down_seconds)

    def wait_up(self, timeout: float = 5.0) -> bool:
        """True once the server accepts connections (for use after restart())."""
        return self._up.wait(timeout)

    @property
    def running(self) -> bool:
        return self._up.is_set()

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def url(self) -> str:
        if not self.config.port:
            raise RuntimeError("FakeVLLM has no port yet: call start() first")
        host = self.config.host
        return f"http://[{host}]:{self.config.port}" if ":" in host else f"http://{host}:{self.config.port}"

    def __enter__(self) -> FakeVLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_locked(self) -> None:
        listener = self._bind()
        self.config.port = listener.server_address[1]
        self._listener = listener
        threading.Thread(
            target=listener.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True,
            name=f"fake-vllm-{self.config.port}",
        ).start()
        self._up.set()

    def _bind(self) -> _Listener:
        # A port freed a moment ago can still be held for a few ms by a closing listener; retry briefly.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                return _Listener((self.config.host, self.config.port), self)
            except OSError:
                if not self.config.port or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _stop(self, *, keep_adapters: bool) -> None:
        with self._lifecycle:
            self._cancel_pending_start()
            listener, self._listener = self._listener, None
            self._up.clear()
            if listener is not None:
                listener.stopped.set()
                with self._changed:
                    self._changed.notify_all()  # release handlers held by "hang"
                    if not keep_adapters:
                        self._adapters.clear()
                        self._sticky.clear()
                listener.shutdown()
                listener.server_close()
                listener.cut_connections()
            elif not keep_adapters:
                with self._lock:
                    self._adapters.clear()
                    self._sticky.clear()

    def _schedule_start(self, down_seconds: float) -> None:
        if down_seconds <= 0:
            self.start()
            return
        timer = threading.Timer(down_seconds, self._delayed_start)
        timer.daemon = True
        with self._lifecycle:
            self._cancel_pending_start()
            self._pending_start = timer
        timer.start()

    def _delayed_start(self) -> None:
        with self._lifecycle:
            if self._pending_start is not threading.current_thread():
                return  # cancelled by stop() or start() meanwhile
            self._pending_start = None
            if self._listener is None:
                try:
                    self._start_locked()
                except OSError as e:
                    print(f"fake_vllm: could not rebind port {self.config.port}: {e}", file=sys.stderr)

    def _cancel_pending_start(self) -> None:
        if self._pending_start is not None:
            self._pending_start.cancel()
            self._pending_start = None

    # -- observation and fault injection (in-process) ----------------------------------------

    def requests(self) -> list[JsonObject]:
        """The request log: [{t, method, path, body, status}] for every vLLM-route request."""
        return self._log.snapshot()

    def reset_requests(self) -> None:
        self._log.clear()

    def adapters(self) -> dict[str, str]:
        """Loaded adapters, name -> lora_path as sent, in load order."""
        with self._lock:
            return dict(self._adapters)

    def set_adapters(self, adapters: Mapping[str, str | None], *, replace: bool = False) -> None:
        """Load (or with None unload) adapters behind the sidecar's back; replace=True drops all others."""
        with self._lock:
            if replace:
                self._adapters.clear()
                self._sticky.clear()
            for name, path in adapters.items():
                self._sticky.discard(name)  # a fresh load or an unload
                if path is None:
                    self._adapters.pop(name, None)
                else:
                    self._adapters[name] = path

    def inplace_sticky(self) -> list[str]:
        """Adapters last loaded with load_inplace=True on a version where the flag sticks (<= 0.32), sorted."""
        with self._lock:
            return sorted(self._sticky)

    def fault(self) -> Fault:
        with self._lock:
            return self._fault

    def set_fault(
        self, mode: str, *, variant: str | None = None, seconds: float | None = None, status: int | None = None
    ) -> Fault:
        """Put a fault in force (see FAULT_MODES); "none" clears it and releases hung requests."""
        fault = Fault.make(mode, variant, seconds, status)
        with self._changed:
            self._fault = fault
            self._changed.notify_all()
        return fault

    def clear_fault(self) -> None:
        self.set_fault("none")

    def state(self) -> JsonObject:
        return {"adapters": self.adapters(), "inplace_sticky": self.inplace_sticky(), "fault": self.fault().to_json(),
                "port": self.port, "running": self.running}

    # -- request dispatch --------------------------------------------------------------------

    def handle(self, request: Request) -> Reply | None:
        """The answer to one request, or None to drop the connection unanswered."""
        if request.path == "/_fake" or request.path.startswith("/_fake/"):
            return self._control(request)
        entry = self._log.open(request)
        if not self._hold_while_hanging(request.stopped):
            return None
        reply = self._vllm(request)
        if reply is not None:
            self._log.close(entry, reply.status)
        return reply

    def _hold_while_hanging(self, stopped: threading.Event) -> bool:
        """Under "hang", send nothing until the fault is cleared (True) or the server stops (False)."""
        with self._changed:
            while self._fault.mode == "hang" and not stopped.is_set():
                self._changed.wait(0.5)
        return not stopped.is_set()

    def _vllm(self, request: Request) -> Reply | None:
        # vLLM's auth middleware guards every path under /v1 (not /health or /version), before routing.
        key = self.config.api_key
        if key is not None and request.path.startswith("/v1") and request.headers.get("Authorization") != \
                f"Bearer {key}":
            return UNAUTHORIZED
        methods = self._routes().get(request.path)
        if methods is None:
            return NOT_FOUND
        route = methods.get(request.method)
        if route is None:
            return method_not_allowed(methods)
        return route(request)

    def _routes(self) -> dict[str, dict[str, Route]]:
        routes: dict[str, dict[str, Route]] = {
            "/health": {"GET": self._health},
            "/v1/models": {"GET": self._models},
            "/v1/completions": {"POST": self._completions},
        }
        if self.config.version is not None:
            routes["/version"] = {"GET": self._version}
        if self.config.runtime_lora:
            routes[LORA_ROUTES[0]] = {"POST": self._load}
            routes[LORA_ROUTES[1]] = {"POST": self._unload}
        return routes

    # -- vLLM routes -------------------------------------------------------------------------

    def _health(self, request: Request) -> Reply:
        return Reply(503 if self.fault().mode == "health503" else 200)

    def _version(self, request: Request) -> Reply:
        return json_reply(200, {"version": self.config.version})

    def _models(self, request: Request) -> Reply | None:
        fault = self.fault()
        if fault.mode == "models_drop":
            return None
        if fault.mode == "garbage_models":
            return self._garbage_models(fault.variant or GARBAGE_VARIANTS[0])
        return json_reply(200, {"object": "list", "data": self._model_cards()})

    def _model_cards(self) -> list[JsonObject]:
        config, created = self.config, self._next_created()
        names = config.served_model_names
        base = [model_card(name, config.model, None, MAX_MODEL_LEN, created) for name in names]
        adapters = self.adapters()
        if config.normalize_root:
            adapters = {name: path.rstrip("/") or path for name, path in adapters.items()}
        return base + [model_card(name, path, names[0], None, created) for name, path in adapters.items()]

    def _next_created(self) -> int:
        # vLLM stamps `created` at answer time. Forcing a new value on every call keeps a client
        # from ever mistaking it for a restart marker, even when two calls share a second.
        with self._lock:
            self._last_created = max(int(time.time()), self._last_created + 1)
            return self._last_created

    def _garbage_models(self, variant: str) -> Reply:
        if variant == "not_json":
            return Reply(200, b'{"object":"list","data":[{"id":', "application/json")
        if variant == "wrong_type":
            return json_reply(200, {"object": "list", "data": "unavailable"})
        hidden = ("id", "root", "parent")
        stripped = [{k: v for k, v in card.items() if k not in hidden} for card in self._model_cards()]
        return json_reply(200, {"object": "list", "data": stripped})

    def _completions(self, request: Request) -> Reply:
        if self.fault().mode == "no_completions":
            return NOT_FOUND
        obj = parse_json_object(request)
        if isinstance(obj, Reply):
            return obj
        model = obj.get("model") or self.config.served_model_names[0]
        adapters = self.adapters()
        speaker = model
        if model in self.config.served_model_names:
            root = self.config.model
        elif model in adapters:
            root = adapters[model]
            if is_inert(root):  # it changes nothing: the base model answers
                speaker, root = self.config.served_model_names[0], self.config.model
        else:
            return error_reply(404, f"The model '{model}' does not exist.", "NotFoundError", "model")
        # The text names the model and the weights it ran with, so a test can prove an adapter (or its reload) is live.
        text = f" fake completion by {speaker} from {root}"
        created = int(time.time())
        return json_reply(200, {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                         "prompt_logprobs": None}],
            "usage": {"prompt_tokens": 1, "total_tokens": 9, "completion_tokens": 8, "prompt_tokens_details": None},
        })

    def _load(self, request: Request) -> Reply | None:
        fault = self.fault()  # these two answer in front of vLLM, as a proxy or an overloaded server would
        if fault.mode == "load_status" and fault.status is not None:
            status = HTTPStatus(fault.status)
            return error_reply(status, f"{status.phrase} (injected fault load_status)", status.phrase)
        if fault.mode == "echo_auth":
            auth = request.headers.get("Authorization", "")
            return error_reply(500, f"upstream rejected request with Authorization: {auth}", "InternalServerError")
        load = parse_load_request(request)
        if isinstance(load, Reply):
            return load
        if not load.lora_name or not load.lora_path:
            return error_reply(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        # Like vLLM: one request per name at a time, so a concurrent duplicate sees "already loaded".
        with self._name_lock(load.lora_name):
            refusal = self._refuse_load(load)
            if refusal is not None:
                return refusal
            return self._engine_add_lora(load, request.stopped)

    def _refuse_load(self, load: LoadRequest) -> Reply | None:
        name = load.lora_name
        if name in self.config.served_model_names:
            return error_reply(400, f"The lora adapter name '{name}' conflicts with a served base model.",
                               "InvalidUserInput")
        inplace = load.load_inplace and self.config.inplace_supported
        if name in self.adapters() and not inplace:
            hint = " If you want to load the adapter in place, set 'load_inplace' to True." \
                if self.config.inplace_supported else ""
            return error_reply(400, f"The lora adapter '{name}' has already been loaded.{hint}", "InvalidUserInput")
        return None

    def _engine_add_lora(self, load: LoadRequest, stopped: threading.Event) -> Reply | None:
        with self._engine_lock:
            fault = self.fault()
            if fault.mode == "load500":
                return error_reply(500, f"{ADD_LORA_FAILED}injected fault load500", "InternalServerError")
            if fault.mode == "load_noop":
                return text_reply(200, f"Success: LoRA adapter '{load.lora_name}' added successfully.")
            delay = fault.seconds if fault.mode == "slow_load" and fault.seconds is not None else self.config.load_delay
            if stopped.wait(delay):
                return None  # the server went down mid-load: the load is lost, nobody answers
            if not self.config.accept_any_path:
                failure = check_adapter(load.lora_name, load.lora_path, self.config.max_lora_rank)
                if failure is not None:
                    return failure
            with self._lock:
                if stopped.is_set():
                    return None
                self._adapters[load.lora_name] = load.lora_path  # an in-place reload keeps its list position
                # vLLM <= 0.32 keeps the flag on the stored request (and rereads the files each step).
                if load.load_inplace and self.config.inplace_supported and inplace_sticks(self.config.version):
                    self._sticky.add(load.lora_name)
                else:
                    self._sticky.discard(load.lora_name)
        return text_reply(200, f"Success: LoRA adapter '{load.lora_name}' added successfully.")

    def _unload(self, request: Request) -> Reply | None:
        name = parse_unload_name(request)
        if isinstance(name, Reply):
            return name
        if not name:
            return error_reply(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        with self._name_lock(name):
            if name not in self.adapters():
                return error_reply(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            with self._engine_lock, self._lock:
                if request.stopped.is_set():
                    return None
                if self._fault.mode != "unload_noop":
                    self._adapters.pop(name, None)
                    self._sticky.discard(name)
        return text_reply(200, f"Success: LoRA adapter '{name}' removed successfully.")

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    # -- /_fake/ control routes --------------------------------------------------------------

    def _control(self, request: Request) -> Reply:
        routes: dict[tuple[str, str], Callable[[Request, Any], Reply]] = {
            ("GET", "/_fake/requests"): lambda r, body: json_reply(200, self.requests()),
            ("POST", "/_fake/reset"): self._control_reset,
            ("GET", "/_fake/state"): lambda r, body: json_reply(200, self.state()),
            ("PUT", "/_fake/adapters"): self._control_adapters,
        }
        route = routes.get((request.method, request.path))
        if route is None:
            return json_reply(404, {"error": f"no control route {request.method} {request.path}"})
        body = log_body(request.body)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            return json_reply(400, {"error": "the body must be a JSON object"})
        try:
            return route(request, body)
        except (ValueError, TypeError) as e:
            return json_reply(400, {"error": str(e)})

    def _control_reset(self, request: Request, body: JsonObject) -> Reply:
        self.reset_requests()
        return json_reply(200, {"ok": True})

    def _control_adapters(self, request: Request, body: JsonObject) -> Reply:
        """PUT {name: path}: exactly these adapters loaded, behind the sidecar's back."""
        if not all(isinstance(v, str) for v in body.values()):
            raise ValueError("expected {name: path}")
        self.set_adapters(body, replace=True)
        return json_reply(200, {"adapters": self.adapters()})


# --- Command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A fake vLLM OpenAI server for tests (see module docstring).")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port; the chosen one is printed")
    p.add_argument("--accept-any-path", action="store_true", help="any non-empty lora_path loads")
    p.add_argument("--load-delay", type=float, default=0.0, help="seconds each load takes (loads run one at a time)")
    p.add_argument("--version-string", default="0.32.0", metavar="V",
                   help='what GET /version reports; "" means no such route (404)')
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Block the stop signals before any thread exists, so every thread inherits the mask and
    # only sigwait() below sees them: no signal handler runs in the middle of a lock.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = FakeVLLM(port=args.port, accept_any_path=args.accept_any_path, load_delay=args.load_delay,
                      version=args.version_string or None)
    try:
        server.start()
    except OSError as e:
        print(f"fake_vllm: cannot listen on port {args.port}: {e}", file=sys.stderr)
        return 1
    print(f"LISTENING {server.port}", flush=True)
    signal.sigwait(stop_signals)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
