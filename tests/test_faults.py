"""The fault matrix (tests/faults.py) under pytest, and checks of its own oracle.

test_fault_matrix runs `python tests/faults.py` (what `make faults` runs) and asserts its summary
line: 56 scenarios, 0 wrong unloads, 0 crashes, 0 not recovered. The other tests show that the
request-log judge really flags what it must, so a zero from the matrix means something.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from faults import (
    ADOPTION_SLACK,
    EVENTS,
    EXTRA_EVENTS,
    FAULTS,
    STAGING,
    THEIRS,
    Adoption,
    Config,
    Row,
    judge,
    matches,
    run_row,
)
from sidecar_process import wait_cycles

FAULTS_PY = Path(__file__).with_name("faults.py")
SUMMARY = re.compile(r"^faults: (\d+) scenarios, (\d+) wrong unloads, (\d+) crashes, (\d+) not recovered$")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fault_matrix():
    # The script finds the harness as `make faults` gives it: the repository root and tests/ on PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULTS_PY.parent.parent), str(FAULTS_PY.parent)])}
    proc = subprocess.run([sys.executable, str(FAULTS_PY)], capture_output=True, text=True, timeout=840,
                          check=False, env=env)
    print(proc.stdout)
    print(proc.stderr[-20_000:], file=sys.stderr)
    lines = proc.stdout.strip().splitlines()
    summaries = [line for line in lines if line.startswith("faults:")]
    assert len(summaries) == 1 and summaries[0] == lines[-1], "exactly one summary line, the last one"
    found = SUMMARY.match(summaries[0])
    assert found, summaries[0]
    scenarios, wrong, crashes, lost = map(int, found.groups())
    assert scenarios == len(EVENTS) * len(FAULTS) == 56
    assert (wrong, crashes, lost) == (0, 0, 0), proc.stdout
    assert proc.returncode == 0, proc.stdout


def entry(t: float, path: str, name: str, source: str | None = None) -> dict:
    body = {"lora_name": name} if source is None else {"lora_name": name, "lora_path": source}
    return {"t": t, "method": "POST", "path": path, "body": body, "status": 200}


UNLOAD, LOAD = "/v1/unload_lora_adapter", "/v1/load_lora_adapter"
GOOD_1 = Config("one", True, {"a": "/a"}, frozenset({"x"}))
GOOD_2 = Config("two", True, {"x": "/x"}, frozenset({"a"}))
BAD = Config("bad", False)


def test_judge_accepts_unloads_of_the_config_in_force_and_flags_the_rest():
    writes = [(10.0, GOOD_1), (20.0, BAD), (30.0, GOOD_2)]
    adoptions = [Adoption(10.1, GOOD_1.sha), Adoption(30.1, GOOD_2.sha)]
    log = [
        entry(10.2, UNLOAD, "x"),  # GOOD_1 says so: fine
        entry(25.0, UNLOAD, "x"),  # still GOOD_1 (BAD is never in force): fine
        entry(30.05, UNLOAD, "x"),  # GOOD_2 not adopted yet, GOOD_1 still in force: fine
        entry(30.1 + ADOPTION_SLACK + 0.1, UNLOAD, "x"),  # GOOD_2 keeps x: wrong
        entry(31.0, UNLOAD, "a"),  # GOOD_2 drops a: fine
        entry(15.0, UNLOAD, "a"),  # GOOD_1 keeps a: wrong
        entry(12.0, UNLOAD, THEIRS),  # never named: wrong
        entry(12.0, LOAD, "a", "/a"),  # fine
        entry(12.0, LOAD, "a", "/elsewhere"),  # wrong source
        entry(9.0, LOAD, "a", "/a"),  # before any config was written: wrong
        entry(32.0, UNLOAD, "x"),  # GOOD_2 keeps x, but the next call for x loads its source: a version swap
        entry(32.1, LOAD, "x", "/x"),
        entry(32.0, UNLOAD, "x" + STAGING),  # the staging copy of a version swap: fine
    ]
    verdict = judge(log, writes, adoptions)
    assert sorted(w.split(" at ")[0] for w in verdict.wrong_unloads) == sorted(
        ["unload 'x'", "unload 'a'", f"unload '{THEIRS}'"])
    assert len(verdict.wrong_loads) == 2
    assert verdict.anomalies == []


def test_judge_reports_adopting_a_bad_or_unknown_config():
    writes = [(1.0, GOOD_1), (2.0, BAD)]
    verdict = judge([], writes, [Adoption(1.1, GOOD_1.sha), Adoption(2.1, BAD.sha), Adoption(3.0, "f" * 64)])
    assert len(verdict.anomalies) == 2


def test_matches_is_about_named_adapters_only():
    assert matches({"a": "/a", THEIRS: "/t"}, GOOD_1)
    assert not matches({"a": "/old"}, GOOD_1)
    assert not matches({"a": "/a", "x": "/x"}, GOOD_1)
    assert not matches({}, GOOD_1)


def test_an_unload_the_sidecar_did_not_ask_for_is_caught_from_the_real_log(tmp_path):
    """End to end through a real row: an unload of THEIRS sent behind the sidecar's back counts as wrong."""
    row = Row(tmp_path)
    try:
        row.write(row.configs.good(0))
        row.theirs_back()
        row.start_sidecar()
        assert row.wait_in_sync(15) is not None, row.sidecar.log_text()
        assert row.judge().wrong_unloads == []
        since = time.monotonic()
        requests.post(row.fake.url + UNLOAD, json={"lora_name": THEIRS}, timeout=5)
        row.write(row.next_good())  # a legitimate unload follows: a0 leaves ensureExist for ensureNotExist
        assert row.wait_in_sync(15) is not None, row.sidecar.log_text()
        wait_cycles(row.fake, 1)  # the cycle's requests have all landed before the judging
        verdict = row.judge(since)
        assert [w.split(" at ")[0] for w in verdict.wrong_unloads] == [f"unload '{THEIRS}'"]
        assert verdict.wrong_loads == [] and verdict.anomalies == []
        assert any(e["path"] == UNLOAD and e["body"] == {"lora_name": "a0"} for e in row.fake.requests())
    finally:
        row.close()


@pytest.mark.parametrize("event", EXTRA_EVENTS)
def test_configs_the_parser_chokes_on_do_not_crash_the_sidecar(tmp_path, event):
    (outcome,) = run_row("healthy", [event], tmp_path)
    assert (outcome.crashes, outcome.wrong_unloads, outcome.recovered) == (0, 0, True), outcome
