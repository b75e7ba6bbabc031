#!/usr/bin/env python3
"""The fault matrix: every config event crossed with every server fault, sidecar.py as a process.

    make faults [FAULTS_ARGS="--rows down,hang --events valid_swap"]
    PYTHONPATH=.:tests python tests/faults.py [--jobs 8] [--rows down,hang] [--events valid_swap]
        [--json out.json] [--verbose]

One row per server fault: one FakeVLLM (in this process), one kubelet-style config folder and one
sidecar process (--reconcile-trigger 0.5 --request-timeout 1 --health-check-interval 0.2
--watch-interval 0.05). The rows run in parallel threads; inside a row the config events run one
after another. Each scenario:

  1. start from a good config the server already matches, plus an adapter ("theirs") that no config
     ever names;
  2. start the fault; behind the sidecar's back unload one adapter the config wants and load one it
     wants gone (so every scenario has work to do, even when the new file is bad); apply the config
     event; hold the fault FAULT_SECONDS (longer than the request timeout; 0 for "healthy", so there
     the time to recover is the plain reaction time); end it;
  3. wait until the server holds exactly the last good config: every ensureExist adapter with its
     source, no ensureNotExist adapter. The time from the end of the fault is "time to recover";
     past RECOVERY_BOUND the scenario is "not recovered";
  4. check the fake's request log over the scenario: every unload's lora_name must be in ensureNotExist
     of a good config in force when the request arrived (and every load in ensureExist, with its
     source). "In force" is taken from the sidecar's own "config loaded" log lines: a config is in
     force from its write until the sidecar reports adopting the next one (plus ADOPTION_SLACK);
  5. a crash is the process exiting (it is then started again, as the kubelet would), or a traceback
     or "reconcile failed unexpectedly" in its log.

The output is a table and one last line: `faults: N scenarios, W wrong unloads, C crashes,
R not recovered`. The exit code is 0 only when W, C and R are 0 and nothing else went wrong.
The soak test (test_soak.py) reuses Row, the configs and the request-log checks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fake_vllm import GARBAGE_VARIANTS, FakeVLLM, make_adapter
from kubelet import KubeletConfigDir
from sidecar_process import Sidecar, lora_config

FAULT_SECONDS = 2.5  # how long each server fault lasts: longer than the request timeout
RECOVERY_BOUND = 10.0  # the stated bound: the server matches the config this long after the fault ends
BASELINE_TIMEOUT = 15.0  # to reach the starting point of the next scenario
ADOPTION_SLACK = 0.5  # a request sent just before the sidecar adopted a newer config may arrive this late
STAGING = "~staging"  # the name a version is proven under before the serving one is swapped (sidecar.py)
SIDECAR_FLAGS = (
    "--reconcile-trigger", "0.5", "--request-timeout", "1", "--health-check-interval", "0.2",
    "--watch-interval", "0.05", "--log-format", "json",
)

EVENTS = ("valid_swap", "invalid_yaml", "schema_invalid", "empty_file", "file_missing", "dangling_symlink",
          "swaps_100_in_1s")
# Not in the matrix: configs that once crashed the parser (a ValueError that is no YAMLError, libyaml's
# recursion in C); test_faults.py runs each once against a healthy server.
EXTRA_EVENTS = ("yaml_value_error", "deep_nesting")
FAULTS = ("healthy", "down", "health_503", "hang", "load_500", "garbage_models", "restart_drops_all", "slow_load_2s")

POOL = tuple(f"a{i}" for i in range(6))
THEIRS = "theirs"  # loaded behind the sidecar's back; no config ever names it


# ------------------------------------------------------------------ configs


@dataclass(frozen=True)
class Config:
    """One version of the config file: its bytes and, if good, what it asks for."""

    text: str
    good: bool
    exist: Mapping[str, str] = field(default_factory=dict)  # id -> source
    not_exist: frozenset[str] = frozenset()

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class Configs:
    """The configs of one row: a family of good ones that shift adapters between the lists, and bad ones
    that would do damage if the sidecar acted on them."""

    def __init__(self, root: Path, port: int) -> None:
        self.port = port
        self.sources = {(a, v): str(make_adapter(root / "adapters" / f"{a}-v{v}")) for a in POOL for v in (0, 1)}
        self.theirs = str(make_adapter(root / "adapters" / THEIRS))

    def good(self, k: int) -> Config:
        """Good config number k: three adapters held, the two that left most recently dropped. From k to
        k+1 one adapter moves from ensureExist to ensureNotExist (an unload), one comes back (a load),
        and one changes its source (a reload)."""
        exist = {POOL[(k + i) % 6]: self.sources[POOL[(k + i) % 6], (k // 6 + (i == 1) * k) % 2] for i in range(3)}
        not_exist = {POOL[(k - 1) % 6], POOL[(k - 2) % 6]}
        text = lora_config(self.port, exist, {a: self.sources[a, 0] for a in sorted(not_exist)}, name=f"good-{k}")
        return Config(text, True, exist, frozenset(not_exist))

    def bad(self, kind: str, current: Config) -> Config:
        """A broken file whose intent, if acted on, would unload everything including THEIRS."""
        drop = sorted({*current.exist, THEIRS})
        danger = lora_config(self.port, {}, {a: "/x" for a in drop}, name="bad")
        if kind == "invalid_yaml":
            return Config(danger.replace("ensureNotExist:", "ensureNotExist: [", 1), False)
        if kind == "schema_invalid":
            return Config(danger.replace("name: bad", "name: bad\n  port: eighty\n  unknownField: 1"), False)
        if kind == "empty_file":
            return Config("", False)
        if kind == "yaml_value_error":  # a date that is no date: PyYAML raises ValueError, not YAMLError
            return Config(danger.replace("name: bad", "name: 2024-13-45"), False)
        if kind == "deep_nesting":  # 200 kB of nesting: libyaml's composer recurses in C
            return Config(danger.replace("name: bad", "name: " + "[" * 100_000 + "]" * 100_000), False)
        raise AssertionError(kind)


# ------------------------------------------------------------------ the request-log checks


@dataclass
class Adoption:
    t: float  # when the driver read the sidecar's "config loaded" line
    sha: str


@dataclass
class Judgement:
    wrong_unloads: list[str] = field(default_factory=list)
    wrong_loads: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    unloads: int = 0  # how many were judged
    loads: int = 0


def judge(requests_log: Iterable[Mapping[str, Any]], writes: list[tuple[float, Config]],
          adoptions: list[Adoption], since: float = 0.0, until: float = float("inf")) -> Judgement:
    """Every load and unload that arrived in [since, until) against the good configs in force then."""
    verdict = Judgement()
    spans: list[tuple[float, float, Config]] = []
    for k, adoption in enumerate(adoptions):
        written = [(t, c) for t, c in writes if c.sha == adoption.sha and t <= adoption.t]
        if not written:
            verdict.anomalies.append(f"adopted a config never written (sha {adoption.sha[:12]})")
            continue
        start, config = written[-1]
        if not config.good:
            verdict.anomalies.append(f"adopted a bad config (sha {adoption.sha[:12]})")
            continue
        end = adoptions[k + 1].t + ADOPTION_SLACK if k + 1 < len(adoptions) else float("inf")
        spans.append((start, end, config))
    entries = sorted((e for e in requests_log if since <= e["t"] < until
                      and e["path"] in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")), key=lambda e: e["t"])
    for index, entry in enumerate(entries):
        body = entry["body"] if isinstance(entry["body"], dict) else {}
        name = body.get("lora_name")
        in_force = [c for start, end, c in spans if start <= entry["t"] <= end]
        if entry["path"] == "/v1/unload_lora_adapter":
            verdict.unloads += 1
            if not any(name in c.not_exist or name.endswith(STAGING) or swapped(entries[index + 1:], name, c)
                       for c in in_force):
                verdict.wrong_unloads.append(f"unload {name!r} at {entry['t']:.2f}")
        else:
            verdict.loads += 1
            name = name.removesuffix(STAGING) if isinstance(name, str) else name
            if not any(c.exist.get(name) == body.get("lora_path") for c in in_force):
                verdict.wrong_loads.append(f"load {name!r} from {body.get('lora_path')!r} at {entry['t']:.2f}")
    return verdict


def swapped(later: Iterable[Mapping[str, Any]], name: str, config: Config) -> bool:
    """An unload that is half of a version swap: the next call for that name loads the config's source."""
    for entry in later:
        body = entry["body"] if isinstance(entry["body"], dict) else {}
        if body.get("lora_name") == name:
            return entry["path"] == "/v1/load_lora_adapter" and body.get("lora_path") == config.exist.get(name)
    return False


def matches(adapters: Mapping[str, str], config: Config) -> bool:
    """The server holds exactly what the config asks: each ensureExist with its source, no ensureNotExist."""
    return all(adapters.get(a) == s for a, s in config.exist.items()) and not config.not_exist & set(adapters)


# ------------------------------------------------------------------ one row: a server, a config folder, a sidecar


CRASH_MARKS = ("Traceback (most recent call last)", "reconcile failed unexpectedly")


class Row:
    """A FakeVLLM, a kubelet-style config folder and a sidecar process following it; everything a scenario
    needs to act and to judge."""

    def __init__(self, root: Path, name: str = "row") -> None:
        self.name = name
        self.root = root
        self.fake = FakeVLLM().start()
        self.configs = Configs(root, self.fake.port)
        self.folder = KubeletConfigDir(root / "config")
        self.writes: list[tuple[float, Config]] = []
        self.current: Config | None = None  # the file's content now
        self.last_good: Config | None = None
        self.k = 0
        self.sidecars: list[Sidecar] = []
        self.crashes_seen = 0

    # -- config events

    def write(self, config: Config) -> None:
        self.writes.append((time.monotonic(), config))
        self.folder.write(config.text)
        self.current = config
        if config.good:
            self.last_good = config

    def next_good(self) -> Config:
        self.k += 1
        return self.configs.good(self.k)

    def remove_key(self) -> None:
        self.writes.append((time.monotonic(), Config("<missing>", False)))
        self.folder.remove_key()
        self.current = None

    def dangle(self) -> None:
        self.writes.append((time.monotonic(), Config("<dangling>", False)))
        self.folder.dangle()
        self.current = None

    # -- the sidecar

    def start_sidecar(self) -> Sidecar:
        sidecar = Sidecar(["--config", self.folder.path, *SIDECAR_FLAGS]).start()
        self.sidecars.append(sidecar)
        return sidecar

    @property
    def sidecar(self) -> Sidecar:
        return self.sidecars[-1]

    def log_lines(self) -> list[tuple[float, str]]:
        lines = []
        for sidecar in self.sidecars:
            with sidecar._lock:
                lines += [(line.t, line.text) for line in sidecar.log]
        return sorted(lines, key=lambda pair: pair[0])

    def adoptions(self) -> list[Adoption]:
        found = []
        for t, text in self.log_lines():
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                if isinstance(record, dict) and record.get("msg") == "config loaded":
                    found.append(Adoption(t, record.get("config_sha256", "")))
        return found

    def crash_lines(self, since: float, until: float = float("inf")) -> list[str]:
        return [text for t, text in self.log_lines() if since <= t < until and any(m in text for m in CRASH_MARKS)]

    def judge(self, since: float = 0.0, until: float = float("inf")) -> Judgement:
        return judge(self.fake.requests(), self.writes, self.adoptions(), since, until)

    def in_sync(self) -> bool:
        assert self.last_good is not None
        return matches(self.fake.adapters(), self.last_good)

    def wait_in_sync(self, timeout: float) -> float | None:
        """Seconds until the server matches the last good config, or None past the timeout."""
        started = time.monotonic()
        while True:
            if self.in_sync():
                return time.monotonic() - started
            if time.monotonic() - started > timeout or not self.sidecar.running:
                return None
            time.sleep(0.02)

    def disturb(self) -> None:
        """Unload an adapter the last good config wants and load one it wants gone, as someone else might."""
        good = self.last_good
        assert good is not None
        wanted, unwanted = sorted(good.exist)[0], sorted(good.not_exist)[0]
        self.fake.set_adapters({wanted: None, unwanted: self.configs.sources[unwanted, 0]})

    def theirs_back(self) -> None:
        self.fake.set_adapters({THEIRS: self.configs.theirs})

    def close(self) -> None:
        for sidecar in self.sidecars:
            sidecar.close()
        self.fake.stop()


# ------------------------------------------------------------------ faults and events


class Fault:
    """Start and end one server fault; end() returns once the fault is really over."""

    def __init__(self, kind: str, row: Row, index: int) -> None:
        self.kind, self.row, self.index = kind, row, index

    def start(self) -> None:
        fake = self.row.fake
        if self.kind == "down":
            fake.stop()
        elif self.kind == "health_503":
            fake.set_fault("health503")
            fake.restart(down_seconds=0.3, keep_adapters=True)  # so the sidecar sees it down and asks /health
        elif self.kind == "hang":
            fake.set_fault("hang")
        elif self.kind == "load_500":
            fake.set_fault("load500")
        elif self.kind == "garbage_models":
            fake.set_fault("garbage_models", variant=GARBAGE_VARIANTS[self.index % len(GARBAGE_VARIANTS)])
        elif self.kind == "restart_drops_all":
            fake.restart(down_seconds=1.0, keep_adapters=False)
        elif self.kind == "slow_load_2s":
            fake.set_fault("slow_load", seconds=2.0)

    def end(self) -> None:
        fake = self.row.fake
        if self.kind == "down":
            fake.start()
        elif self.kind == "restart_drops_all":
            fake.wait_up(5)
        else:
            fake.clear_fault()
        if not fake.wait_up(5):
            raise RuntimeError("the fake server did not come back")


def apply_event(event: str, row: Row) -> None:
    """Change the config file the way `event` says; the last good config is what the server must match after."""
    if event == "valid_swap":
        row.write(row.next_good())
    elif event in ("invalid_yaml", "schema_invalid", "empty_file", *EXTRA_EVENTS):
        assert row.last_good is not None
        row.write(row.configs.bad(event, row.last_good))
    elif event == "file_missing":
        row.remove_key()
    elif event == "dangling_symlink":
        row.dangle()
    elif event == "swaps_100_in_1s":
        started = time.monotonic()
        for i in range(100):
            row.write(row.next_good())
            time.sleep(max(0.0, started + (i + 1) / 100 - time.monotonic()))
    else:
        raise AssertionError(event)


# ------------------------------------------------------------------ scenarios


@dataclass
class Outcome:
    event: str
    fault: str
    outcome: str = "ok"
    recover_s: float | None = None
    wrong_unloads: int = 0
    crashes: int = 0
    recovered: bool = True
    details: list[str] = field(default_factory=list)
    loads: int = 0  # judged from the request log
    unloads: int = 0

    @property
    def scenario(self) -> str:
        return f"{self.event} x {self.fault}"


def run_scenario(row: Row, event: str, fault_kind: str, index: int) -> Outcome:
    result = Outcome(event, fault_kind)
    started = time.monotonic()
    fault = Fault(fault_kind, row, index)
    fault.start()
    fault_started = time.monotonic()
    row.disturb()  # behind the sidecar's back: one wanted adapter gone, one unwanted one loaded
    apply_event(event, row)
    hold = 0.0 if fault_kind == "healthy" else FAULT_SECONDS  # healthy: recovery is the plain reaction time
    time.sleep(max(0.0, fault_started + hold - time.monotonic()))
    fault.end()
    result.recover_s = row.wait_in_sync(RECOVERY_BOUND)
    if result.recover_s is None:
        result.recovered = False
        result.details.append(f"server {row.fake.adapters()} != config {dict(row.last_good.exist)}"
                              if row.last_good else "no good config")
    exit_code = None if row.sidecar.running else row.sidecar.proc.returncode
    # Back to a good file the server matches: the next scenario's starting point. A dead sidecar is
    # started again, as the kubelet would, once the file is good (else it would die again at once).
    if row.current is None or not row.current.good:
        row.write(row.next_good())
    row.theirs_back()
    if exit_code is not None:
        result.details.append(f"the sidecar exited with {exit_code}")
        row.start_sidecar()
    if row.wait_in_sync(BASELINE_TIMEOUT) is None:
        result.recovered = False
        result.details.append("did not reach the next scenario's starting point")
    time.sleep(0.3)  # let the last cycle's requests land before judging
    ended = time.monotonic()
    lines = row.crash_lines(started, ended)
    internal = [line for line in lines if "reconcile failed unexpectedly" in line]
    result.crashes = (1 + len(internal)) if exit_code is not None else len(lines)
    result.details += lines[:3]
    verdict = row.judge(started, ended)
    result.wrong_unloads = len(verdict.wrong_unloads)
    result.loads, result.unloads = verdict.loads, verdict.unloads
    result.details += verdict.wrong_unloads + verdict.wrong_loads + verdict.anomalies
    problems = []
    if not result.recovered:
        problems.append("NOT RECOVERED")
    if result.wrong_unloads:
        problems.append("WRONG UNLOAD")
    if verdict.wrong_loads:
        problems.append("WRONG LOAD")
    if verdict.anomalies:
        problems.append("ANOMALY")
    if result.crashes:
        problems.append("CRASH")
    result.outcome = ", ".join(problems) or "ok"
    return result


def run_row(fault_kind: str, events: Iterable[str], root: Path, verbose: bool = False) -> list[Outcome]:
    row = Row(root, fault_kind)
    outcomes: list[Outcome] = []
    try:
        row.write(row.configs.good(0))
        row.theirs_back()
        row.start_sidecar()
        if row.wait_in_sync(BASELINE_TIMEOUT) is None:
            raise RuntimeError(f"{fault_kind}: the sidecar never matched the first config:\n{row.sidecar.log_text()}")
        for index, event in enumerate(events):
            try:
                outcome = run_scenario(row, event, fault_kind, index)
            except Exception as e:  # the harness itself failed: say so, count it as not recovered
                outcome = Outcome(event, fault_kind, f"HARNESS ERROR {e!r}", recovered=False,
                                  details=[traceback.format_exc()])
                with contextlib.suppress(Exception):
                    row.fake.clear_fault()
                    row.fake.start()
            outcomes.append(outcome)
            if verbose and outcome.outcome != "ok":
                print(f"--- {outcome.scenario}: {outcome.details}\n{row.sidecar.log_text()[-4000:]}", file=sys.stderr)
    finally:
        row.close()
    return outcomes


def run_matrix(events: Iterable[str] = EVENTS, faults: Iterable[str] = FAULTS, jobs: int = 8,
               verbose: bool = False, progress: Callable[[str], None] | None = None) -> list[Outcome]:
    events, faults = list(events), list(faults)
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {f: pool.submit(run_row, f, events, Path(tmp) / f, verbose) for f in faults}
        results: list[Outcome] = []
        for fault_kind in faults:
            try:
                row_results = futures[fault_kind].result()
            except Exception as e:
                row_results = [Outcome(ev, fault_kind, f"HARNESS ERROR {e!r}", recovered=False) for ev in events]
            if progress:
                progress(f"row {fault_kind}: {sum(o.outcome == 'ok' for o in row_results)}/{len(row_results)} ok")
            results += row_results
    order = {(e, f): i for i, (e, f) in enumerate((e, f) for e in events for f in faults)}
    return sorted(results, key=lambda o: order[o.event, o.fault])


def summary(results: list[Outcome]) -> str:
    wrong = sum(o.wrong_unloads for o in results)
    crashes = sum(o.crashes for o in results)
    lost = sum(not o.recovered for o in results)
    return f"faults: {len(results)} scenarios, {wrong} wrong unloads, {crashes} crashes, {lost} not recovered"


def table(results: list[Outcome]) -> str:
    width = max(len(o.scenario) for o in results)
    lines = [f"{'scenario':<{width}}  {'outcome':<14} {'recover_s':>9} {'wrong_unloads':>13} {'crashes':>7}"]
    for o in results:
        recover = f"{o.recover_s:.2f}" if o.recover_s is not None else f">{RECOVERY_BOUND:g}"
        lines.append(f"{o.scenario:<{width}}  {o.outcome:<14} {recover:>9} {o.wrong_unloads:>13} {o.crashes:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=len(FAULTS), help="rows run in parallel")
    parser.add_argument("--rows", default=",".join(FAULTS), help="server faults, comma-separated")
    parser.add_argument("--events", default=",".join(EVENTS),
                        help=f"config events, comma-separated (also: {', '.join(EXTRA_EVENTS)})")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="print the sidecar's log for failed scenarios")
    args = parser.parse_args(argv)
    faults = [f for f in args.rows.split(",") if f]
    events = [e for e in args.events.split(",") if e]
    unknown = sorted(set(faults) - set(FAULTS)) + sorted(set(events) - set(EVENTS) - set(EXTRA_EVENTS))
    if unknown:
        parser.error(f"unknown rows or events: {', '.join(unknown)}")
    started = time.monotonic()
    results = run_matrix(events, faults, args.jobs, args.verbose,
                         progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(table(results))
    details = [f"{o.scenario}: {d}" for o in results if o.outcome != "ok" for d in o.details]
    if details:
        print("\n".join(["", "details:", *details]))
    print(f"\nbound: the server matches the last good config within {RECOVERY_BOUND:g} s of the fault's end "
          f"(faults last {FAULT_SECONDS:g} s); judged {sum(o.loads for o in results)} loads and "
          f"{sum(o.unloads for o in results)} unloads from the request logs; "
          f"matrix took {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ | {"scenario": o.scenario} for o in results], indent=2))
    line = summary(results)
    print(line)
    return 0 if all(o.outcome == "ok" for o in results) else 1


if __name__ == "__main__":
    sys.exit(main())
