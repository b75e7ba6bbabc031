"""Shared test set-up: tests/ on sys.path, so `import fake_vllm` works however pytest imports files."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402

import pytest  # noqa: E402
from fake_vllm import FakeVLLM, make_adapter  # noqa: E402
from kubelet import KubeletConfigDir  # noqa: E402
from sidecar_process import Sidecar  # noqa: E402


@pytest.fixture
def fake() -> Iterator[FakeVLLM]:
    """A vLLM look-alike on a free port, in this process; its request log is the server-side truth."""
    server = FakeVLLM(port=0).start()
    try:
        yield server
    finally:
        server.stop()


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
