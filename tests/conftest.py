"""Fixtures shared by the process tests: the vLLM look-alike, adapter folders, a kubelet-style config
folder and sidecar processes. The harness modules themselves (fake_vllm, kubelet, sidecar_process) are
importable through pytest's `pythonpath` (pyproject.toml)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from fake_vllm import FakeVLLM, make_adapter
from kubelet import KubeletConfigDir
from remote_sources import HttpsFiles, MotoS3, make_ca_file
from sidecar_process import Sidecar


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeVLLM]]:
    """make(**FakeVLLM kwargs) -> a started fake on a free port; all are stopped at teardown.
    Ask for it before start_sidecar, so the sidecars go first."""
    servers: list[FakeVLLM] = []

    def make(**kwargs: Any) -> FakeVLLM:
        server = FakeVLLM(port=0, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def fake(make_fake: Callable[..., FakeVLLM]) -> FakeVLLM:
    """A vLLM look-alike on a free port, in this process; its request log is the server-side truth."""
    return make_fake()


@pytest.fixture
def adapter_paths(tmp_path: Path) -> Callable[..., dict[str, str]]:
    """make(names, rank=8) -> {name: absolute path of an adapter folder the fake accepts}."""

    def make(names: Sequence[str], rank: int = 8) -> dict[str, str]:
        return {name: str(make_adapter(tmp_path / "adapters" / f"{name}-r{rank}", rank=rank)) for name in names}

    return make


@pytest.fixture
def kubelet(tmp_path: Path) -> KubeletConfigDir:
    """A config folder updated the way the kubelet updates a mounted ConfigMap; give the sidecar .path."""
    return KubeletConfigDir(tmp_path / "config")


@pytest.fixture
def start_sidecar() -> Iterator[Callable[..., Sidecar]]:
    """start(args, env=None, **kwargs) -> a running Sidecar; every one is stopped at teardown and its log
    printed (pytest shows it when the test fails)."""
    started: list[Sidecar] = []

    def start(args: Sequence[object], env: Mapping[str, str] | None = None, **kwargs: object) -> Sidecar:
        sidecar = Sidecar([str(a) for a in args], env, **kwargs).start()  # type: ignore[arg-type]
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.close()
        print(f"--- sidecar log ({' '.join(sidecar.argv[2:])}):\n{sidecar.log_text()}")


# ------------------------------------------------------------------ remote adapter sources (remote_sources.py)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    """moto's S3 server, one child process for the whole run; give a sidecar `s3_server.env`.
    Tests share it: each makes its own bucket (s3_bucket)."""
    server = MotoS3().start()
    yield server
    server.stop()


_buckets = itertools.count()


@pytest.fixture
def s3_bucket(s3_server: MotoS3) -> str:
    """A new, empty bucket on s3_server."""
    return s3_server.create_bucket(f"adapters-{next(_buckets):04d}")


@pytest.fixture(scope="session")
def https_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(trustme.CA, its certificate as a PEM file): what REQUESTS_CA_BUNDLE names."""
    import trustme

    ca = trustme.CA()
    return ca, make_ca_file(ca, tmp_path_factory.mktemp("ca"))


@pytest.fixture
def https_files(https_ca: tuple[Any, Path]) -> Iterator[HttpsFiles]:
    """An HTTPS file server on loopback trusted through `https_files.env`. Ask for it before start_sidecar,
    so the sidecars go first."""
    ca, ca_file = https_ca
    with HttpsFiles(ca, ca_file) as files:
        yield files
