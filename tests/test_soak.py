"""Soak: the sidecar for SOAK_SECONDS (default 60) against the vLLM look-alike while a seeded
random driver swaps configs (good and bad), breaks the server and changes adapters behind its back.

At the end: the server holds the last good config; no unload over the whole run was outside
ensureNotExist of a good config then in force (judged from the fake's request log, see faults.py);
the sidecar never crashed; its RSS (/proc/<pid>/status VmRSS) grew by at most 10 % from the end of
the warm-up to the end. The warm-up walks through every kind of event once, so everything the
sidecar allocates for good (sessions, threads, caches) exists before the first measurement.

    SOAK_SECONDS=600 SOAK_SEED=7 .venv/bin/python -m pytest tests/test_soak.py -s
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults import FAULTS, RECOVERY_BOUND, THEIRS, Fault, Row, matches

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SEED = int(os.environ.get("SOAK_SEED", "20261128"))
RSS_GROWTH = 0.10
BAD_KINDS = ("invalid_yaml", "schema_invalid", "empty_file")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Driver:
    """The random hand: every action leaves the world in a state the sidecar must cope with."""

    def __init__(self, row: Row, rng: random.Random) -> None:
        self.row, self.rng = row, rng
        self.fault: Fault | None = None
        self.fault_ends = 0.0
        self.done: list[str] = []
        self.actions: dict[str, Callable[[], None]] = {
            "swap": self.swap, "burst": self.burst, "bad": self.bad, "missing": self.missing, "dangle": self.dangle,
            "fault": self.start_fault, "behind": self.behind, "theirs": self.row.theirs_back,
        }

    def swap(self) -> None:
        self.row.k += self.rng.randint(0, 4)
        self.row.write(self.row.next_good())

    def burst(self) -> None:
        for _ in range(self.rng.randint(5, 30)):
            self.row.write(self.row.next_good())
            time.sleep(0.01)

    def bad(self) -> None:
        assert self.row.last_good is not None
        self.row.write(self.row.configs.bad(self.rng.choice(BAD_KINDS), self.row.last_good))

    def missing(self) -> None:
        if self.row.current is not None:
            self.row.remove_key()

    def dangle(self) -> None:
        self.row.dangle()

    def start_fault(self, kind: str | None = None) -> None:
        if self.fault is not None:
            return
        self.fault = Fault(kind or self.rng.choice(FAULTS[1:]), self.row, self.rng.randrange(3))
        self.fault.start()
        self.fault_ends = time.monotonic() + self.rng.uniform(0.5, 3.0)

    def end_fault(self, force: bool = False) -> None:
        if self.fault is not None and (force or time.monotonic() >= self.fault_ends):
            self.fault.end()
            self.fault = None

    def behind(self) -> None:
        """Someone else unloads a wanted adapter, or loads one the config wants gone."""
        good = self.row.last_good
        assert good is not None
        if self.rng.random() < 0.5 and good.exist:
            self.row.fake.set_adapters({self.rng.choice(sorted(good.exist)): None})
        elif good.not_exist:
            name = self.rng.choice(sorted(good.not_exist))
            self.row.fake.set_adapters({name: self.row.configs.sources[name, 0]})

    def step(self, name: str) -> None:
        self.end_fault()
        self.actions[name]()
        self.done.append(name)


@pytest.mark.slow  # SOAK_SECONDS, 60 by default
def test_soak(tmp_path):
    rng = random.Random(SEED)
    row = Row(tmp_path, "soak")
    try:
        row.write(row.configs.good(0))
        row.theirs_back()
        sidecar = row.start_sidecar()
        assert row.wait_in_sync(15) is not None, sidecar.log_text()
        driver = Driver(row, rng)
        started = time.monotonic()
        # Warm-up: every action and every fault once, then time to settle.
        for name in driver.actions:
            driver.step(name)
            time.sleep(0.3)
        for kind in FAULTS[1:]:
            driver.end_fault(force=True)
            driver.start_fault(kind)
            time.sleep(0.5)
        driver.end_fault(force=True)
        row.write(row.next_good())
        assert row.wait_in_sync(RECOVERY_BOUND) is not None, sidecar.log_text()
        time.sleep(1.0)
        rss_start = rss_kib(sidecar.proc.pid)
        warmed = time.monotonic()
        names = list(driver.actions)
        weights = [5, 1, 2, 1, 1, 2, 2, 1]
        while time.monotonic() < started + SOAK_SECONDS:
            driver.step(rng.choices(names, weights)[0])
            time.sleep(rng.uniform(0.05, 0.8))
        driver.end_fault(force=True)
        recovered = row.wait_in_sync(RECOVERY_BOUND)
        time.sleep(0.5)
        rss_end = rss_kib(sidecar.proc.pid) if sidecar.running else None
        ended = time.monotonic()
        verdict = row.judge()
        crashes = row.crash_lines(0.0) + (["the sidecar exited"] if not sidecar.running else [])
        unloads = sum(1 for e in row.fake.requests() if e["path"] == "/v1/unload_lora_adapter")
        summary = (f"soak: seed {SEED}, {ended - started:.0f} s, {len(driver.done)} actions "
                   f"({', '.join(f'{n} {driver.done.count(n)}' for n in names)}), {len(row.writes)} config writes, "
                   f"{unloads} unloads, RSS {rss_start} -> {rss_end} KiB after {ended - warmed:.0f} s")
        print(summary)
        assert not crashes, crashes
        assert recovered is not None and row.last_good is not None, (
            f"server {row.fake.adapters()} != last good config {dict(row.last_good.exist)}\n{summary}")
        assert matches(row.fake.adapters(), row.last_good)
        assert verdict.wrong_unloads == [], verdict.wrong_unloads
        assert verdict.wrong_loads == [], verdict.wrong_loads
        assert verdict.anomalies == [], verdict.anomalies
        assert unloads > 0, "the run never unloaded anything: the driver is too gentle"
        assert THEIRS not in {e["body"].get("lora_name") for e in row.fake.requests()
                              if e["path"] == "/v1/unload_lora_adapter" and isinstance(e["body"], dict)}
        assert rss_end is not None and rss_end <= rss_start * (1 + RSS_GROWTH), summary
    finally:
        row.close()

