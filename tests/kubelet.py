"""A config folder updated the way the kubelet updates a mounted ConfigMap.

The kubelet's steps (its atomic writer): write a new timestamped folder, point
`..data_tmp` at it and rename it over `..data` (the atomic switch), add the key
symlink if missing, delete the old folder last.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

_versions = itertools.count()


class KubeletConfigDir:
    def __init__(self, root: Path, key: str = "configmap.yaml") -> None:
        self.root = root
        self.key = key
        root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """The path the sidecar is given: the key symlink."""
        return self.root / self.key

    def write(self, text: str | bytes) -> float | None:
        """Publish a new version; a byte-identical one is ignored, as the kubelet does.

        Returns the time.monotonic() of the atomic `..data` switch (what bench/bench.py times reactions
        from), or None when the version was ignored.
        """
        data = text.encode() if isinstance(text, str) else text
        if self.path.is_file() and self.path.read_bytes() == data:
            return None
        return self._publish(lambda key: key.write_bytes(data))

    def write_directory(self) -> float:
        """Publish a version in which the key is a directory (a file inside it), which no sidecar can read."""

        def fill(key: Path) -> None:
            key.mkdir()
            (key / "inside.yaml").write_text("vLLMLoRAConfig: {}\n")

        return self._publish(fill)

    def _publish(self, fill: Callable[[Path], None]) -> float:
        version = self.root / f"..{os.getpid()}_{next(_versions):06d}"
        version.mkdir()
        fill(version / self.key)
        old = self._current()
        tmp = self.root / "..data_tmp"
        os.symlink(version.name, tmp)
        os.rename(tmp, self.root / "..data")
        switched = time.monotonic()
        if not os.path.islink(self.path):
            os.symlink(f"..data/{self.key}", self.path)
        if old is not None and old.exists():
            shutil.rmtree(old)
        return switched

    def remove_key(self) -> None:
        """The key disappears from the ConfigMap: its symlink goes, the data stays."""
        os.unlink(self.path)

    def dangle(self) -> None:
        """Leave the key symlink pointing into a folder that no longer exists (caught mid-swap)."""
        old = self._current()
        tmp = self.root / "..data_tmp"
        os.symlink("..gone", tmp)
        os.rename(tmp, self.root / "..data")
        if old is not None and old.exists():
            shutil.rmtree(old)

    def _current(self) -> Path | None:
        data = self.root / "..data"
        return self.root / os.readlink(data) if os.path.islink(data) else None
