"""Remote adapter sources for process tests: an S3 look-alike, an HTTPS file server, archives and digests.

Everything listens on loopback and is reached by the sidecar process through the standard settings a
user would give it (AWS_* variables, REQUESTS_CA_BUNDLE), so the sidecar's code path is the real one:

    s3 = MotoS3().start()                      # moto's standalone server, a child process
    s3.put_folder("bucket", "adapters/a/", folder)   # every file under the prefix, relative keys
    env = s3.env                               # AWS_ENDPOINT_URL_S3, credentials (SECRET_KEY), region
    s3.stop()

    files = HttpsFiles(ca).start()             # ca = trustme.CA(); files.env has REQUESTS_CA_BUNDLE
    files.put("/a.tar.gz", tar_gz(folder))     # url = files.url("/a.tar.gz", query="X-Amz-Signature=...")
    files.interrupt("/a.tar.gz", after=100)    # full Content-Length, 100 bytes, then the connection closes
    files.hold("/a.tar.gz"); files.release("/a.tar.gz")   # answers wait until released
    files.delay("/a.tar.gz", 2.0); files.fail("/a.tar.gz", 404); files.count("/a.tar.gz"); files.queries(...)

    tar_gz(folder, top="my-adapter"); zip_archive(folder); unsafe_archive("dotdot"|"absolute"|..., target)
    tree_digest(folder)                        # the sha256 an s3:// prefix is pinned with (README: Remote sources)
    sha256_file(path); sha256_bytes(data); version_dir(adapter_dir, "a", digest_or_source)

boto3 and trustme are imported only where they are used, so importing this module (conftest does)
costs nothing for the test files that never reach a remote source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import random
import re
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from fake_vllm import CuttableServer
from vllm_server import free_port

# Credentials the sidecar is given for the S3 look-alike. The secret is distinctive so a test can
# grep the sidecar's logs, /status and /metrics for it (and for any long piece of it).
ACCESS_KEY_ID = "AKIATESTREMOTESOURCES"
SECRET_KEY = "s3cr3t-KEY-never-to-be-logged-9f4e2d71c0"
REGION = "us-east-1"

# How long a child server is given to start answering (only a broken install waits it out).
START_DEADLINE = 30.0


# ------------------------------------------------------------------ digests and folders


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """{relative posix path: path} of every regular file under `folder` (what `find -type f` lists)."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def tree_digest(folder: str | os.PathLike[str]) -> str:
    """The digest that pins an s3:// prefix (README: Remote sources): sha256 of
    `<sha256 hex>  <relative/path>\\n` per file, sorted by path in byte order, i.e.
    `cd DIR && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum | sha256sum`."""
    files = folder_files(folder)
    lines = "".join(f"{sha256_file(files[p])}  {p}\n" for p in sorted(files, key=lambda p: p.encode()))
    return sha256_bytes(lines.encode())


def folder_size(folder: str | os.PathLike[str]) -> int:
    return sum(p.stat().st_size for p in folder_files(folder).values())


def safe_id(adapter_id: str) -> str:
    """The id as the sidecar writes it in a version folder's name: every character outside [A-Za-z0-9._-] as `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", adapter_id)


def version_dir(adapter_dir: str | os.PathLike[str], adapter_id: str, sha256: str | None = None,
                source: str | None = None) -> Path:
    """`<adapter-dir>/<safe-id>@<version>`: version = the pinned sha256's first 16 hex characters, or for
    an unpinned source those of sha256(source string)."""
    if sha256 is None:
        assert source is not None, "give the pinned sha256 or the source"
        sha256 = sha256_bytes(source.encode())
    return Path(adapter_dir).absolute() / f"{safe_id(adapter_id)}@{sha256[:16]}"


def fill_adapter(folder: str | os.PathLike[str], extra_bytes: int = 0, seed: str = "") -> Path:
    """Add weights-like files to an adapter folder (make_adapter writes only adapter_config.json):
    `adapter_model.safetensors` of `extra_bytes` bytes and a nested file, so archives and prefixes
    have more than one file and a size a budget can be set against. The bytes are pseudo-random (they do
    not compress: an archive is about as big as the folder) and depend on `seed` and the folder's name."""
    path = Path(folder)
    weights = random.Random(f"weights {seed} {path.name}").randbytes(extra_bytes)
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "tokenizer").mkdir(exist_ok=True)
    (path / "tokenizer" / "special_tokens_map.json").write_text('{"pad_token": "<pad>"}')
    return path


# ------------------------------------------------------------------ archives


def tar_gz(folder: str | os.PathLike[str], top: str | None = None) -> bytes:
    """A .tar.gz of the adapter folder: its files at the archive's root, or under one folder `top`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if top:
            tar.addfile(_tar_dir(top))
        for name, path in sorted(folder_files(folder).items()):
            data = path.read_bytes()
            tar.addfile(_tar_file(f"{top}/{name}" if top else name, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def zip_archive(folder: str | os.PathLike[str], top: str | None = None) -> bytes:
    """A .zip of the adapter folder: its files at the archive's root, or under one folder `top`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        if top:
            z.writestr(f"{top}/", b"")
        for name, path in sorted(folder_files(folder).items()):
            z.writestr(f"{top}/{name}" if top else name, path.read_bytes())
    return buffer.getvalue()


def _tar_file(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
    return info


def _tar_dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    return info


ADAPTER_CONFIG = b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}'
EVIL = b"written by an unsafe archive\n"

# kind -> what the archive holds besides a valid adapter_config.json at its root
UNSAFE_KINDS = ("dotdot", "absolute", "symlink", "hardlink", "zip-dotdot", "zip-absolute", "zip-symlink")


def unsafe_archive(kind: str, target: str) -> tuple[bytes, str]:
    """(archive bytes, the name of its unsafe entry): a loadable adapter plus one entry that would write
    at or point to `target` if unpacked naively. `target` is an absolute path outside the adapter dir
    (for the `..` kinds it is reached as a relative name with enough `..` to climb out of any folder the
    archive could be unpacked in).

    dotdot / zip-dotdot: a regular file named `../../…/target`; absolute / zip-absolute: a regular file
    named `target`; symlink / zip-symlink: `weights.bin` -> `target`; hardlink: `weights.bin` linked to
    `target`.
    """
    climb = "../" * 16 + target.lstrip("/")
    if kind.startswith("zip-"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("adapter_config.json", ADAPTER_CONFIG)
            if kind == "zip-symlink":
                info = zipfile.ZipInfo("weights.bin")
                info.create_system = 3  # unix: external_attr carries the mode
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                z.writestr(info, target)
                name = "weights.bin"
            else:
                name = climb if kind == "zip-dotdot" else target
                z.writestr(zipfile.ZipInfo(name), EVIL)
        return buffer.getvalue(), name
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(_tar_file("adapter_config.json", len(ADAPTER_CONFIG)), io.BytesIO(ADAPTER_CONFIG))
        if kind in ("dotdot", "absolute"):
            name = climb if kind == "dotdot" else target
            tar.addfile(_tar_file(name, len(EVIL)), io.BytesIO(EVIL))
        elif kind in ("symlink", "hardlink"):
            name = "weights.bin"
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname, info.mtime = target, 1_700_000_000
            tar.addfile(info)
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {UNSAFE_KINDS}")
    return buffer.getvalue(), name


# ------------------------------------------------------------------ the S3 look-alike


class MotoS3:
    """moto's standalone S3 server as a child process on a loopback port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a sidecar process needs to reach this server through boto3's standard chain."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self) -> MotoS3:
        for _ in range(3):  # a free port can be taken between free_port() and the bind
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            if self._wait_up():
                return self
            self.stop()
        raise RuntimeError("moto's S3 server did not start")

    def _wait_up(self) -> bool:
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                requests.get(self.url + "/moto-api/", timeout=1)
                return True
            except requests.RequestException:
                time.sleep(0.05)  # not listening yet
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the test's own view, through boto3 with the same dummy credentials

    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.url, region_name=REGION,
                aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_KEY,
            )
        return self._client

    def create_bucket(self, bucket: str) -> str:
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def put_folder(self, bucket: str, prefix: str, folder: str | os.PathLike[str]) -> str:
        """Upload every file of `folder` as `<prefix><relative path>`; return the source `s3://bucket/prefix`."""
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        for name, path in folder_files(folder).items():
            self.put(bucket, prefix + name, path.read_bytes())
        return f"s3://{bucket}/{prefix}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# ------------------------------------------------------------------ the HTTPS file server


@dataclass
class Route:
    data: bytes
    interrupt_after: int | None = None  # send the full Content-Length, this many bytes, then close
    delay: float = 0.0  # seconds before the answer starts
    status: int = 200
    gate: threading.Event | None = None  # while held: answers wait until it is set (release())
    trickle: float = 0.0  # seconds between bytes of the body: alive, but never done in time
    encoding: str | None = None  # a Content-Encoding header over the bytes as stored (S3's ContentEncoding)


@dataclass
class Hit:
    t: float  # time.monotonic() when the request arrived
    path: str
    query: str
    headers: dict[str, str] = field(default_factory=dict)


class _TLSListener(CuttableServer):
    """The TLS handshake happens in the request's thread, so a client that never completes one cannot
    hold up the others; stop() cuts every open connection."""

    def __init__(self, address: tuple[str, int], files: HttpsFiles, context: ssl.SSLContext) -> None:
        self.files = files
        self.context = context
        super().__init__(address, _FileHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # a client that gave up or does not trust the certificate
        self.track(tls)
        try:
            super().finish_request(tls, client_address)
        finally:
            self.untrack(tls)
            with contextlib.suppress(OSError):
                tls.close()


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSListener

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        parts = urlsplit(self.path)
        files = self.server.files
        route = files.hit(Hit(time.monotonic(), parts.path, parts.query, dict(self.headers.items())))
        if route is None:
            self._send(404, b"not found\n")
            return
        if route.delay and self.server.stopped.wait(route.delay):
            self.close_connection = True
            return
        while route.gate is not None and not route.gate.wait(0.05):
            if self.server.stopped.is_set():
                self.close_connection = True
                return
        if route.status != 200:
            self._send(route.status, b"error\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(route.data)))
        if route.encoding:
            self.send_header("Content-Encoding", route.encoding)
        if route.interrupt_after is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if not body:
            return
        try:
            if route.trickle:
                for i in range(len(route.data)):
                    if self.server.stopped.wait(route.trickle):
                        break
                    self.wfile.write(route.data[i:i + 1])
                    self.wfile.flush()
                self.close_connection = True
                return
            if route.interrupt_after is None:
                self.wfile.write(route.data)
                return
            self.wfile.write(route.data[: route.interrupt_after])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):  # the rest never comes: the peer sees a short body
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.close_connection = True

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class HttpsFiles:
    """Files served over HTTPS on loopback from {path: bytes}, any query string accepted (a presigned URL's
    signature included); per-path controls to interrupt, delay or fail answers; every request logged."""

    def __init__(self, ca: Any, ca_file: str | os.PathLike[str], host: str = "127.0.0.1") -> None:
        """`ca`: a trustme.CA; `ca_file`: where its certificate (PEM) was written, for REQUESTS_CA_BUNDLE."""
        self.host = host
        self.ca_file = str(ca_file)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(host, "localhost").configure_cert(self.context)
        self._routes: dict[str, Route] = {}
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._listener: _TLSListener | None = None
        self.port = 0

    @property
    def env(self) -> dict[str, str]:
        """What a sidecar process needs to trust this server."""
        return {"REQUESTS_CA_BUNDLE": self.ca_file}

    def url(self, path: str, query: str = "") -> str:
        return f"https://{self.host}:{self.port}{path}" + (f"?{query}" if query else "")

    def start(self) -> HttpsFiles:
        self._listener = _TLSListener((self.host, 0), self, self.context)
        self.port = self._listener.server_address[1]
        threading.Thread(target=self._listener.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True,
                         name=f"https-files-{self.port}").start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stopped.set()
            listener.shutdown()
            listener.server_close()
            listener.cut_connections()

    def __enter__(self) -> HttpsFiles:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what is served

    def put(self, path: str, data: bytes) -> str:
        """Serve `data` at `path` (replacing any controls on it); return its URL without a query."""
        with self._lock:
            self._routes[path] = Route(data)
        return self.url(path)

    def interrupt(self, path: str, after: int | None) -> None:
        """Answers at `path` announce the whole length, send `after` bytes and close (None: whole answers)."""
        with self._lock:
            self._routes[path].interrupt_after = after

    def delay(self, path: str, seconds: float) -> None:
        with self._lock:
            self._routes[path].delay = seconds

    def trickle(self, path: str, seconds_per_byte: float) -> None:
        """Answers at `path` send one byte every `seconds_per_byte`: each read is quick, the whole never ends."""
        with self._lock:
            self._routes[path].trickle = seconds_per_byte

    def encode(self, path: str, encoding: str | None) -> None:
        """Answers at `path` say `Content-Encoding: encoding` over the same bytes (a .tar.gz stored gzip)."""
        with self._lock:
            self._routes[path].encoding = encoding

    def hold(self, path: str) -> None:
        """Requests for `path` get no answer until release(path) (the connection stays open)."""
        with self._lock:
            self._routes[path].gate = threading.Event()

    def release(self, path: str) -> None:
        with self._lock:
            gate, self._routes[path].gate = self._routes[path].gate, None
        if gate is not None:
            gate.set()

    def fail(self, path: str, status: int) -> None:
        """Answer `status` at `path` (200: serve the data again)."""
        with self._lock:
            self._routes[path].status = status

    def hit(self, hit: Hit) -> Route | None:
        with self._lock:
            self._hits.append(hit)
            route = self._routes.get(hit.path)
            return None if route is None else dataclasses.replace(route)  # a snapshot: controls change under it

    # -- what was asked

    def hits(self, path: str | None = None) -> list[Hit]:
        with self._lock:
            return [h for h in self._hits if path is None or h.path == path]

    def count(self, path: str) -> int:
        """Requests for `path`, whatever their query string."""
        return len(self.hits(path))

    def queries(self, path: str) -> list[str]:
        return [h.query for h in self.hits(path)]


def make_ca_file(ca: Any, folder: str | os.PathLike[str]) -> Path:
    """Write a trustme.CA's certificate as PEM into `folder`; the file REQUESTS_CA_BUNDLE names."""
    path = Path(folder) / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def secrets_in(texts: Mapping[str, str], secrets: Mapping[str, str]) -> list[str]:
    """`where: secret-name` for every secret (or a 12-character piece of its start) found in any text."""
    found = []
    for where, text in texts.items():
        for name, secret in secrets.items():
            if secret in text or (len(secret) > 12 and secret[:12] in text):
                found.append(f"{where}: {name}")
    return found
