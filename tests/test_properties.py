"""Property-based tests (hypothesis) of sidecar.py's pure core.

(a) Config documents: any bytes, any YAML, any document shape -> parse_config returns a DesiredState
    or raises ConfigError, every error naming the file (its label) and, for shape errors, the field;
    never another exception. Bombs and deep nesting are refused within a bound on time and memory.
(b) Server answers: any /v1/models body and any status (or a dropped connection) on every call ->
    Reconciler.reconcile never raises, never hits its own catch-all, lets no exception escape the
    threads it sends with, and never sends an unload for an adapter outside ensureNotExist (or one
    the server did not list).
(c) plan(): never touches an adapter the config does not name, never both loads and unloads one id,
    and planning again after applying the plan gives an empty plan.

Examples per property: 10_000, set here, not left to hypothesis' default. That is the CI figure
(CI=true) and the default everywhere; HYPOTHESIS_PROFILE=dev runs 200 per property (`make check`).
The bomb and nesting properties give every example a budget of CPU time well under a second
(BOMB_SECONDS): CPU seconds of the parsing thread, which a busy machine does not inflate the way it
does wall-clock time, counted with the garbage collector paused (a full collection of the test
runner's own heap, hypothesis keeps ~50 kB per example, can take a second and is no cost of the
sidecar's). Inputs that can crash the parser itself (libyaml recurses in C) are only ever parsed in
a child process.

Each bug these properties found is pinned by an explicit @example or parameter, so it stays tested.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
import yaml
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import sidecar
from sidecar import (
    STAGING_SUFFIX,
    Adapter,
    ConfigError,
    DesiredState,
    Op,
    Reconciler,
    ServerState,
    VLLMClient,
    parse_config,
    parse_model_list,
    plan,
)

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ settings

settings.register_profile(
    "ci",
    max_examples=10_000,
    deadline=None,  # the time bounds that matter are asserted where they matter (bombs, big files)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,  # a failure prints the blob that replays it (@reproduce_failure)
    database=None,  # no .hypothesis/ folder: CI starts clean anyway, and a failure prints its blob
)
settings.register_profile("dev", settings.get_profile("ci"), max_examples=200)
PROFILE_NAME = "dev" if os.environ.get("HYPOTHESIS_PROFILE", "").strip().lower() == "dev" else "ci"
PROFILE = settings.get_profile(PROFILE_NAME)  # applied per test below; the global default stays untouched
if os.environ.get("HYPOTHESIS_MAX_EXAMPLES"):  # for measuring the cost of one property at any count
    PROFILE = settings(PROFILE, max_examples=int(os.environ["HYPOTHESIS_MAX_EXAMPLES"]))

# A bomb or a deep document must be refused with well under a second of CPU (an expanded one costs
# minutes); this is each example's budget there.
BOMB_SECONDS = 0.5
# Files up to the size cap (1 MiB) may take longer: pure-Python PyYAML reads ~1 MB/s. The bound keeps the
# sidecar alive: at the manifest's 200m CPU limit, 4 CPU seconds here are 20 s there, inside the 25 s
# /healthz window.
BIG_FILE_SECONDS = 4.0
# Peak Python allocation while refusing one small bomb (tracemalloc); the container limit is 128 MiB.
PEAK_BYTES = 32 * 1024 * 1024

LABEL = "/config/odd ☃ dir/configmap.yaml"


def examples(**overrides: Any) -> settings:
    return settings(PROFILE, **overrides)


# ------------------------------------------------------------------ (a) config documents


def check_parse(raw: bytes, validate: bool = True) -> DesiredState | None:
    """The property itself: a DesiredState, or a ConfigError whose every error names the file."""
    try:
        desired = parse_config(raw, LABEL, validate)
    except ConfigError as e:
        assert e.errors, "a ConfigError with no error in it"
        for error in e.errors:
            assert isinstance(error, str) and error.startswith(LABEL), error
            assert len(error) < 2_000, f"an error message of {len(error)} characters"
        return None
    check_desired_state(desired)
    return desired


def check_desired_state(desired: DesiredState) -> None:
    """What every accepted config must satisfy, whatever the input."""
    assert isinstance(desired, DesiredState)
    ids = [a.id for a in desired.ensure_exist + desired.ensure_not_exist]
    assert len(ids) == len(set(ids)), f"an id named twice was accepted: {ids}"
    for adapter in desired.ensure_exist + desired.ensure_not_exist:
        assert isinstance(adapter.id, str) and adapter.id
        assert isinstance(adapter.source, str) and adapter.source
        assert adapter.base_model is None or isinstance(adapter.base_model, str)
    assert isinstance(desired.port, int) and not isinstance(desired.port, bool) and 1 <= desired.port <= 65535
    assert desired.scheme in ("http", "https")
    assert isinstance(desired.host, str)
    assert len(desired.sha256) == 64


# Text that YAML readers find hard: controls, bidi marks, zero-width, astral, combining, NUL.
ODD_CHARS = "\x00\x01\t\n\r\x1b\x7f\x85\xa0\u2028\u2029\u200b\u200f\u202e\ufeff\ufffd\U0001f600"
ODD_CHARS += "e\u0301ﬀ:#&*!|>'\"%@`{}[],-?"
# Two plain alphabets, not one mixed one: hypothesis draws a plain alphabet's text in one go, 3x faster.
odd_text = st.text(alphabet=ODD_CHARS, max_size=16) | st.text(st.characters(codec="utf-8"), max_size=16)
odd_name = st.text(alphabet=ODD_CHARS, min_size=1, max_size=16) | st.text(st.characters(codec="utf-8"), min_size=1,
                                                                        max_size=16)
# Valid names are printable (validation.yaml's `printable`): the odd characters that are.
PRINTABLE_ODD = "".join(c for c in ODD_CHARS if c.isprintable())
NOT_PRINTABLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
printable_text = (st.text(alphabet=PRINTABLE_ODD, max_size=16)
                  | st.text(st.characters(codec="utf-8", exclude_categories=NOT_PRINTABLE), max_size=16))
printable_name = printable_text.filter(bool)
ID_POOL = ("a", "b", "adapter-1", "base", "ünïcödé", "id with spaces", "../../etc/passwd", "$(rm -rf /)", "0x1F",
           "yes", "null", "~", "2024-01-01", "1e3", "-", "*", "&a")
ids = st.sampled_from(ID_POOL) | printable_name
sources = st.sampled_from(("/adapters/a", "org/repo", "../up", "s3://x", "C:\\x", "'quoted'")) | printable_name
base_models = st.sampled_from(("base", "/models/base", "Qwen/Qwen3-32B")) | printable_name

# Strategies are built once: building them inside a draw costs more than the draw itself.
BOOLS = st.booleans()
ONE_IN_TEN = st.integers(0, 9).map(lambda n: n == 0)
ONE_TO_FOUR = st.integers(1, 4)
UNIT = st.floats(0, 1)
MODEL_TABLE = tuple(
    {"id": i, "source": src, **({"base-model": base} if base else {})}
    for i in ID_POOL for src in ("/adapters/a", "org/repo", "../up", "'quoted'") for base in ("", "base", "x y")
)
odd_models = st.builds(lambda i, src, base: {"id": i, "source": src, **({"base-model": base} if base else {})},
                       ids, sources, st.none() | base_models)
MODEL_LISTS = st.lists(st.one_of(st.sampled_from(MODEL_TABLE), st.sampled_from(MODEL_TABLE), odd_models),
                       max_size=4, unique_by=lambda m: m["id"])
MUTATIONS = st.sampled_from(("retype", "unknown", "drop", "alias", "duplicate", "top"))
UNKNOWN_KEYS = odd_text | st.sampled_from(("ID", "sources", "toremove", "base_model"))
BLOCK_OR_FLOW = st.sampled_from(("block", "flow"))
MUTATED_STYLES = st.sampled_from(("block", "flow", "configmap"))
EDITS = st.sampled_from(("delete", "insert", "replace"))
OPTIONAL_FIELDS = {
    "host": st.sampled_from(("localhost", "vllm", "::1", "[fd00::1]", "10.0.0.1", "vllm.ns.svc.cluster.local")),
    "port": st.integers(1, 65535),
    "scheme": st.sampled_from(("http", "https")),
    "name": printable_text,
    "defaultBaseModel": base_models,
}

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | odd_text
           | st.binary(max_size=8) | st.dates() | st.datetimes())
any_value = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text | st.sampled_from(("id", "source")), inner,
                                                                  max_size=4),
    max_leaves=12,
)


@st.composite
def valid_models(draw: st.DrawFn) -> list[dict[str, Any]]:
    # Short lists (long ones have their own test), entries mostly from a table: one draw per entry.
    return [dict(m) for m in draw(MODEL_LISTS)]


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A document that is valid by construction (the schema's own rules, ids unique over both lists)."""
    keep, drop = draw(valid_models()), draw(valid_models())
    taken = {m["id"] for m in keep}
    drop = [m for m in drop if m["id"] not in taken]
    for model in keep:
        if draw(ONE_IN_TEN):
            model["toRemove"] = draw(BOOLS)
    body: dict[str, Any] = {}
    for key, strategy in OPTIONAL_FIELDS.items():
        if draw(BOOLS):
            body[key] = draw(strategy)
    if keep or draw(BOOLS):
        body["ensureExist"] = {"models": keep}
    if drop or draw(BOOLS):
        body["ensureNotExist"] = {"models": drop}
    return {"vLLMLoRAConfig": body}


DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's writer: 4x faster, same text for our purpose


def render(document: Any, style: str) -> bytes:
    """One document as bytes, the ways people write it. YAML dumps share repeated objects as &anchors/*aliases."""
    # No allow_unicode: PyYAML's emitter then writes U+0085 raw, and its reader folds it to a space.
    if style == "block":
        return yaml.dump(document, Dumper=DUMPER, sort_keys=False).encode()
    if style == "flow":
        return yaml.dump(document, Dumper=DUMPER, default_flow_style=True, width=60).encode()
    if style == "json":
        text = json.dumps(document, default=str)
        if re.search(r"\\ud[89ab]", text):  # astral characters: see test_json_escaped_astral_characters
            return render(document, "block")
        return text.encode()
    if style == "utf16":
        return yaml.dump(document, Dumper=DUMPER).encode("utf-16")
    if style == "configmap":
        inner = yaml.dump(document, Dumper=DUMPER, sort_keys=False)
        data = {"configmap.yaml": inner}
        manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": data}
        return yaml.dump(manifest, Dumper=DUMPER, sort_keys=False).encode()
    raise AssertionError(style)


STYLES = st.sampled_from(("block", "flow", "json", "utf16", "configmap"))


def expected_state(document: dict[str, Any]) -> tuple[list[Adapter], list[Adapter], dict[str, Any]]:
    body = document["vLLMLoRAConfig"]
    default = body.get("defaultBaseModel")

    def adapter(model: dict[str, Any]) -> Adapter:
        return Adapter(model["id"], model["source"], model.get("base-model") or default)

    keep = (body.get("ensureExist") or {}).get("models", [])
    drop = (body.get("ensureNotExist") or {}).get("models", [])
    exist = [adapter(m) for m in keep if m.get("toRemove") is not True]
    not_exist = [adapter(m) for m in keep if m.get("toRemove") is True] + [adapter(m) for m in drop]
    server = {"host": body.get("host", "localhost").strip("[]"), "port": body.get("port", 8000),
              "scheme": body.get("scheme", "http"), "name": body.get("name", "")}
    return exist, not_exist, server


@examples()
@given(document=valid_documents(), style=STYLES, validate=st.booleans())
def test_valid_documents_are_accepted_exactly(document, style, validate):
    raw = render(document, style)
    desired = check_parse(raw, validate)
    assert desired is not None, "a valid document was refused"
    exist, not_exist, server = expected_state(document)
    assert list(desired.ensure_exist) == exist
    assert list(desired.ensure_not_exist) == not_exist
    assert (desired.host, desired.port, desired.scheme, desired.name) == (
        server["host"], server["port"], server["scheme"], server["name"])


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    """A valid document bent by a few edits: wrong types, unknown keys, missing keys, shared (aliased)
    nodes, duplicated entries, or a top that is not a mapping at all."""
    document: Any = draw(valid_documents())
    for _ in range(draw(ONE_TO_FOUR)):
        containers = list(_containers(document))
        kind = draw(MUTATIONS)
        if kind == "top":
            document = [document, "vLLMLoRAConfig", None, 0, []][draw(st.integers(0, 4))] if draw(
                BOOLS) else draw(any_value)
            continue
        if not containers:
            continue
        node = containers[draw(st.integers(0, len(containers) - 1))]
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if kind == "unknown" and isinstance(node, dict):
            node[draw(UNKNOWN_KEYS)] = draw(any_value)
        elif kind == "unknown":
            node.append(draw(any_value))
        elif not keys:
            continue
        elif kind == "retype":
            node[draw(st.sampled_from(keys))] = draw(any_value)
        elif kind == "drop":
            del node[draw(st.sampled_from(keys))]
        elif kind == "alias":  # the same object twice: safe_dump writes an anchor and an alias
            other = containers[draw(st.integers(0, len(containers) - 1))]
            node[draw(st.sampled_from(keys))] = other
        elif kind == "duplicate" and isinstance(node, list):
            node.append(node[draw(st.sampled_from(keys))])
    return document


def _containers(document: Any) -> Iterator[Any]:
    seen: set[int] = set()
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list) and id(node) not in seen:
            seen.add(id(node))
            yield node
            stack.extend(node.values() if isinstance(node, dict) else node)


def test_json_escaped_astral_characters_are_read_as_written():
    raw = json.dumps({"vLLMLoRAConfig": {"ensureExist": {"models": [{"id": "a\U0001f600", "source": "/s"}]}}})
    desired = check_parse(raw.encode())
    assert desired is not None and desired.ensure_exist[0].id == "a\U0001f600"


YAML_TOKENS = (
    "vLLMLoRAConfig:", "ensureExist:", "ensureNotExist:", "models:", "- id: a", "  source: /x", "id:", "source:",
    "base-model:", "toRemove: true", "port: 8000", "scheme: https", "&a ", "*a", "&b ", "*b", "<<: *a", "<<: [*a, *b]",
    "? ", ": ", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "\t", "  ", "\n", "[", "]", "{", "}", ",",
    "- ", "|\n", ">-\n", "'", '"', "#", "\\", "kind: ConfigMap\n", "data:\n", "configmap.yaml: |\n", "~", "null",
    "yes", "0x1F", "1e3", ".inf", "=", "\ufeff", "\x00", "\x85", "\u2028",
)
yaml_soup = st.lists(st.sampled_from(YAML_TOKENS) | odd_text, max_size=30).map("".join)


VALID_DOCUMENTS = valid_documents()
TOKENS = st.sampled_from(YAML_TOKENS)


@st.composite
def damaged_text(draw: st.DrawFn) -> bytes:
    """A valid file with a few tokens deleted, inserted or overwritten at random places."""
    text = render(draw(VALID_DOCUMENTS), draw(BLOCK_OR_FLOW)).decode()
    for _ in range(draw(ONE_TO_FOUR)):
        at, token = int(draw(UNIT) * len(text)), draw(TOKENS)
        how = draw(EDITS)
        text = text[:at] + (token if how != "delete" else "") + text[at + (len(token) if how != "insert" else 0):]
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    document = draw(mutated_documents())
    try:
        return render(document, draw(MUTATED_STYLES))
    except (yaml.YAMLError, RecursionError, ValueError):
        return b"{}"  # not representable as YAML (a cycle through a key, say)


any_file = st.one_of(
    mutated_files(),  # wrong types, unknown or missing keys, aliases, duplicates, non-mapping tops
    damaged_text(),  # broken syntax in an otherwise good file
    yaml_soup.map(lambda s: s.encode("utf-8", "surrogatepass")),  # YAML-ish token soup
    st.binary(max_size=200),  # random bytes, empty included
)


@examples()
@given(raw=any_file, validate=st.booleans())
def test_any_file_is_accepted_or_refused_naming_the_file(raw, validate):
    accepted = check_parse(raw, validate)
    if validate and accepted is not None:
        assert check_parse(raw, False) == accepted, "the shape checks refuse what the schema accepts"


# YAML 1.1 scalars that PyYAML resolves or is told to build, and can fail to build: timestamps that
# are not dates, explicit tags on the wrong text, integers past Python's 4300-digit limit.
BAD_SCALARS = (
    "2024-13-45", "2024-02-30", "2024-02-30T25:61:61Z", "!!int abc", "!!int ''", "!!int 0x", "!!float abc",
    "!!float ''", "!!bool maybe", "!!timestamp foo", "!!timestamp 2024-1-1 1:1:1", "!!binary '!!!'", "!!null x",
    "!!str [1]", "!!set [1]", "!!omap [1]", "!!python/object:os.system x", "!!python/name:os.system ''",
    "1" * 4301, "0b" + "1" * 20000, "0x" + "f" * 4000, "1:" * 3000 + "1",
)


@examples()
@example(where="name", scalar="2024-13-45", wrap=False)
@given(where=st.sampled_from(("name", "host", "port", "id", "source", "key", "top")),
       scalar=st.sampled_from(BAD_SCALARS) | st.builds(lambda y, m, d: f"{y:04d}-{m:02d}-{d:02d}",
                                                       st.integers(0, 9999), st.integers(0, 99), st.integers(0, 99)),
       wrap=st.booleans())
def test_scalars_pyyaml_cannot_build_are_config_errors(where, scalar, wrap):
    model = {"id": "a", "source": "/s"}
    if where in ("id", "source"):
        model[where] = "@@"
    body: dict[str, Any] = {"ensureExist": {"models": [model]}}
    if where in ("name", "host", "port"):
        body[where] = "@@"
    if where == "key":
        body["@@"] = 1
    text = yaml.safe_dump({"vLLMLoRAConfig": body}) if where != "top" else "@@\n"
    text = text.replace("'@@'", "@@").replace("@@", scalar)
    check_parse((inside(text, "configmap") if wrap else text).encode())


# ------------------------------------------------------------------ (a) bombs and deep nesting
#
# The sidecar refuses a bomb by walking it up to its 100_000-value budget: 30-50 ms each. So these
# properties draw from finite spaces (a few hundred shapes); hypothesis stops when it has tried every
# member, which is before 10^4 examples. Each example must beat the deadline (BOMB_SECONDS).


def billion_laughs(levels: int, fanout: int, mapping: bool) -> str:
    lines = ["a0: &a0 " + ("{k: v}" if mapping else '["x"]')]
    for i in range(1, levels + 1):
        refs = [f"*a{i - 1}"] * fanout
        inner = ", ".join(f"k{j}: {r}" for j, r in enumerate(refs)) if mapping else ", ".join(refs)
        lines.append(f"a{i}: &a{i} " + ("{" + inner + "}" if mapping else "[" + inner + "]"))
    return "\n".join(lines) + "\n"


def merge_key_bomb(levels: int, fanout: int) -> str:
    """YAML merge keys (`<<`) make PyYAML copy every merged pair: each level multiplies the work by `fanout`."""
    lines = ["a0: &a0 {k: v}"]
    lines += [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * fanout)}]}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def nested(depth: int, kind: str) -> str:
    if kind == "flow_seq":
        return "[" * depth + "]" * depth
    if kind == "flow_map":
        return "{a: " * depth + "1" + "}" * depth
    if kind == "block_map":  # its text grows as depth**2: 1 MiB at ~1400 levels; 120 is past the limit of 64
        depth = min(depth, 120)
        return "".join(" " * i + "a:\n" for i in range(depth)) + " " * depth + "1\n"
    if kind == "block_seq":
        return "- " * depth + "x\n"
    if kind == "unclosed":
        return "[" * depth
    if kind == "self":
        return "a: &a [*a, {b: *a}]\n" * min(depth, 1) + "b: &b {c: *b}\n"
    raise AssertionError(kind)


def inside(text: str, where: str) -> str:
    """The document at the top, inside our config's body, or inside a ConfigMap's data."""
    if where == "top":
        return text
    indented = "".join("    " + line + "\n" for line in text.splitlines())
    if where == "config":
        return "vLLMLoRAConfig:\n  name: x\n  extra:\n" + indented
    return "kind: ConfigMap\ndata:\n  configmap.yaml: |\n    vLLMLoRAConfig: {}\n" + indented


def timed_parse(raw: bytes) -> float:
    """CPU seconds this thread spends on check_parse(raw), the garbage collector paused (see the module
    docstring)."""
    gc.disable()
    try:
        started = time.thread_time()
        check_parse(raw)
        return time.thread_time() - started
    finally:
        gc.enable()


WHERE = st.sampled_from(("top", "config", "configmap"))
# In-process depths stay far below where libyaml's recursive C code overflows the stack (~30_000 in a
# thread); deeper documents are in test_files_up_to_the_size_cap_are_read_safely, in a child process.
DEPTHS = (1, 2, 63, 64, 65, 66, 100, 300, 330, 340, 500, 1000, 1400)
KINDS = ("flow_seq", "unclosed", "flow_map", "block_map", "block_seq", "self")


@examples()
@given(shape=st.one_of(
    st.tuples(st.just("laughs"), st.integers(1, 10), st.integers(2, 10), st.booleans()),
    st.tuples(st.just("nested"), st.sampled_from(DEPTHS), st.sampled_from(KINDS), st.just(False)),
), where=WHERE)
def test_alias_bombs_and_deep_nesting_are_refused_fast(shape, where):
    kind, a, b, c = shape
    text = billion_laughs(a, b, c) if kind == "laughs" else nested(a, b)
    assert timed_parse(inside(text, where).encode()) < BOMB_SECONDS


@examples()
@example(levels=20, fanout=2, where="top")
@given(levels=st.integers(1, 20), fanout=st.integers(2, 4), where=WHERE)
def test_merge_key_bombs_are_refused_fast(levels, fanout, where):
    while fanout**levels > 2**20:  # keep a failing run short: the work grows as fanout ** levels
        levels -= 1
    assert timed_parse(inside(merge_key_bomb(levels, fanout), where).encode()) < BOMB_SECONDS


def peak_while(parse: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        parse()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


SMALL_BOMBS = {
    "billion laughs, 10^10": billion_laughs(10, 10, False),
    "billion laughs of mappings": billion_laughs(9, 10, True),
    "self-referencing aliases": nested(1, "self"),
    "deep block sequences": nested(2000, "block_seq"),
    "deep block mappings": nested(300, "block_map"),
    "deep flow mappings": nested(5000, "flow_map"),
    "bomb inside a ConfigMap": inside(billion_laughs(10, 10, False), "configmap"),
}


@pytest.mark.parametrize("name", SMALL_BOMBS)
def test_small_bombs_stay_within_time_and_memory(name):
    raw = SMALL_BOMBS[name].encode()
    assert timed_parse(raw) < BOMB_SECONDS
    assert peak_while(lambda: check_parse(raw)) < PEAK_BYTES


# Files near the 1 MiB cap, and nesting deep enough to crash a recursive parser, run in a child process
# (from the repository root, so it imports sidecar.py) with a deadline: a crash or a runaway parse costs
# seconds here, not the test run. The child reports the CPU seconds and its peak RSS growth while parsing
# (VmHWM after resetting it, minus VmRSS).
MIB = sidecar.MAX_CONFIG_BYTES
BIG_RSS_BYTES = 48 * 1024 * 1024  # the container limit is 128 MiB; the idle sidecar uses ~40 MiB of it
BIG_FILES = {
    "1 MiB scalar": lambda: b"a: " + b"x" * (MIB - 3),
    "deep block sequence, 20k levels": lambda: nested(20_000, "block_seq").encode(),
    "deep flow sequence, 100k levels": lambda: nested(100_000, "flow_seq").encode(),
    "deep flow mapping, 100k levels": lambda: nested(100_000, "flow_map").encode()[:MIB],
    "1 MiB of '['": lambda: b"[" * MIB,
    "1 MiB of '- '": lambda: b"- " * (MIB // 2),
    "1 MiB flow list of 500k items": lambda: b"[" + b"1," * (MIB // 2 - 2) + b"1]",
    "1 MiB of 100k keys": lambda: b"".join(b"k%d: 1\n" % i for i in range(110_000))[:MIB],
    "merge-key bomb, 30 levels": lambda: merge_key_bomb(30, 2).encode(),
}
CHILD = """
import sys, time
import sidecar
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
raw = sys.stdin.buffer.read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak RSS
before = status("VmRSS:")
started = time.process_time()
try:
    sidecar.parse_config(raw, "big.yaml")
except sidecar.ConfigError:
    pass
seconds = time.process_time() - started
print(f"seconds {seconds}\\nrss_growth {status('VmHWM:') - before}", flush=True)
"""


@pytest.mark.parametrize(
    "name",
    list(BIG_FILES),
)
def test_files_up_to_the_size_cap_are_read_safely(name):
    raw = BIG_FILES[name]()
    assert len(raw) <= MIB
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=REPO)
    limit = 3 * BIG_FILE_SECONDS + 10  # wall clock, start-up and reading included: only a runaway parse hits it
    try:
        out, err = child.communicate(raw, timeout=limit)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    assert child.returncode == 0, f"the parser died (exit {child.returncode}); stderr: {err.decode()[-300:]}"
    report = dict(line.split() for line in out.decode().splitlines())
    assert "seconds" in report, f"no answer within {limit} s"
    assert float(report["seconds"]) < BIG_FILE_SECONDS, report
    assert int(report["rss_growth"]) < BIG_RSS_BYTES, report


def test_a_long_list_of_models_is_checked_in_bounded_time():
    models = [{"id": f"a{i}", "source": f"/adapters/{i}"} for i in range(5_000)]
    raw = json.dumps({"vLLMLoRAConfig": {"ensureExist": {"models": models}}}).encode()
    started = time.thread_time()
    desired = check_parse(raw)
    assert desired is not None and len(desired.ensure_exist) == 5_000
    assert time.thread_time() - started < BIG_FILE_SECONDS


# ------------------------------------------------------------------ (b) server answers


URL = "http://vllm.test:8000"
HEALTH, MODELS = f"{URL}/health", f"{URL}/v1/models"
LOAD, UNLOAD = f"{URL}/v1/load_lora_adapter", f"{URL}/v1/unload_lora_adapter"
POOL = ("a", "b", "c", "d", "base", "x y", "ü")
SOURCES = ("/s/1", "/s/2", "org/repo")


@dataclass(frozen=True)
class Answer:
    """One answer of the mocked server: a status and body, or an exception instead of an answer."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    error: type[requests.RequestException] | None = None


ERRORS = (requests.ConnectionError, requests.ReadTimeout, requests.ConnectTimeout,
          requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)
STATUSES = (200, 201, 204, 301, 400, 401, 403, 404, 405, 409, 422, 429, 500, 502, 503, 504, 599)
CONTENT_TYPES = (None, "application/json", "text/plain", "text/html; charset=utf-8")


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def weighted(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`common` three times in four. Generating text is costly; most values come from tables."""
    return st.one_of(common, common, common, rare)


# Model cards from a table built once (ids, roots and parents of every type, some keys missing),
# plus now and then a card with generated text: drawing from a table is far cheaper.
CARD_IDS = (*POOL, "", None, 3, [1], "bulk-1")
CARD_ROOTS = (*SOURCES, "/models/base", None, 7, "")
CARD_PARENTS = ("base", None, 0, "")
CARD_TABLE = tuple(
    {k: v for k, v in {"id": i, "object": "model", "root": r, "parent": p}.items() if k != missing}
    for i in CARD_IDS for r in CARD_ROOTS for p in CARD_PARENTS for missing in ("", "id", "root", "parent")
)
odd_cards = st.builds(lambda i, r, p: {"id": i, "root": r, "parent": p}, odd_text, odd_text,
                      st.sampled_from(("base", None)))
model_cards = weighted(st.sampled_from(CARD_TABLE), odd_cards)


def _bulk(count: int, make: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    return [make(i) for i in range(count)]


BASE_CARD = {"id": "base", "object": "model", "root": "/models/base", "parent": None}
# Bodies built once: 10^4-entry lists, wrong types, not JSON at all, JSON too deep to parse.
FIXED_MODEL_BODIES = (
    json_bytes({"object": "list", "data": [BASE_CARD, *_bulk(10_000, lambda i: {
        "id": f"bulk-{i}", "root": f"/b/{i}", "parent": "base"})]}),
    json_bytes({"object": "list", "data": [BASE_CARD, *_bulk(10_000, lambda i: {
        "id": POOL[i % 3], "root": SOURCES[i % 2], "parent": "base"})]}),  # duplicates
    json_bytes({"object": "list", "data": [BASE_CARD, *_bulk(9_999, lambda i: {
        "id": f"bulk-{i}", "root": None, "parent": "base"}), {"id": 7}]}),  # one bad entry at the end
    *(json_bytes(v) for v in ({"data": "unavailable"}, {"data": None}, {"data": {}}, [], "list", 3, None,
                              {"object": "list"}, {"data": [[1]]}, {"data": [None]}, {"object": "list", "data": []})),
    b'{"object":"list","data":[{"id":', b"", b"<html>502</html>", b"\xff\xfe",
    b'{"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deeper than json's recursion limit
)


CARD_LISTS = st.lists(model_cards, max_size=4)


@st.composite
def card_lists(draw: st.DrawFn) -> bytes:
    return json_bytes({"object": "list", "data": [BASE_CARD] * draw(BOOLS) + draw(CARD_LISTS)})


SMALL_FIXED_BODIES, BULK_BODIES = FIXED_MODEL_BODIES[3:], FIXED_MODEL_BODIES[:3]


@st.composite
def model_list_answers(draw: st.DrawFn) -> Answer:
    """Mostly generated lists of cards; the 10^4-entry bodies now and then (each costs ~20 ms to read)."""
    roll = draw(st.integers(0, 99))
    if roll < 58:
        return Answer(200, draw(card_lists()), "application/json")
    if roll < 78:
        return Answer(200, draw(st.sampled_from(SMALL_FIXED_BODIES)), draw(st.sampled_from(CONTENT_TYPES)))
    if roll < 90:
        return Answer(draw(st.sampled_from(STATUSES)), draw(card_lists() | st.binary(max_size=20)))
    if roll < 97:
        return Answer(error=draw(st.sampled_from(ERRORS)))
    return Answer(200, draw(st.sampled_from(BULK_BODIES)), "application/json")


SUCCESS = (Answer(200, b"Success: LoRA adapter 'a' added successfully."), Answer(200, b"", "application/json"))
ACTION_BODIES = (
    b"Success: LoRA adapter 'a' added successfully.",
    json_bytes({"error": {"message": "The lora adapter 'a' has already been loaded. If you want to load the adapter "
                                     "in place, set 'load_inplace' to True.", "type": "x", "code": 400}}),
    json_bytes({"error": {"message": "Loading lora a failed: No adapter found for <path>", "code": 404}}),
    json_bytes({"error": {"message": "LoRA rank 16 is greater than max_lora_rank 8.", "code": 500}}),
    json_bytes({"detail": "Not Found"}),
    json_bytes({"error": "Unauthorized"}),
    json_bytes({"error": {"message": ["not", "a", "string"]}}),
    json_bytes({"error": None, "detail": {"x": 1}}),
    b"x" * 5000,
    b"",
    b"\xff\xfe\x00",
    b'{"error":' + b"[" * 100_000,
)
ACTION_ANSWERS = tuple(Answer(s, b, c) for s in STATUSES for b in ACTION_BODIES for c in CONTENT_TYPES[:2])
action_answers = st.one_of(
    st.sampled_from(SUCCESS),
    st.sampled_from(ACTION_ANSWERS),
    st.builds(Answer, st.sampled_from(STATUSES), st.binary(max_size=30), st.sampled_from(CONTENT_TYPES)),
    st.builds(Answer, error=st.sampled_from(ERRORS)),
)
health_answers = st.sampled_from((Answer(),) * 6 + (Answer(503), Answer(500), Answer(404)) + tuple(
    Answer(error=e) for e in ERRORS))


def answers(one: st.SearchStrategy[Answer]) -> st.SearchStrategy[list[Answer]]:
    return st.lists(one, min_size=1, max_size=3)


SOURCE_CHOICES = st.sampled_from(SOURCES)
WANTED_BASES = st.sampled_from((None, None, "base", "/models/base", "other"))
SERVED_BASES = st.lists(st.sampled_from(("base", "other", "x y")), max_size=2, unique=True)
SERVED_ROOTS = st.lists(st.sampled_from(("/models/base", "/models/other")), max_size=2)
LOADED = st.dictionaries(weighted(st.sampled_from(POOL), odd_text), st.sampled_from((None, *SOURCES)), max_size=8)


ADAPTER_TABLE = tuple(Adapter(i, src, base) for i in POOL for src in SOURCES
                      for base in (None, None, "base", "/models/base", "other"))
ADAPTER_LISTS = st.lists(weighted(st.sampled_from(ADAPTER_TABLE), st.builds(Adapter, odd_name, SOURCE_CHOICES,
                                                                           WANTED_BASES)),
                         max_size=6, unique_by=lambda a: a.id)


@st.composite
def desired_states(draw: st.DrawFn, hosts: tuple[str, ...] = ("vllm.test",)) -> DesiredState:
    chosen = draw(ADAPTER_LISTS)
    split = draw(st.integers(0, len(chosen)))
    return DesiredState(hosts[draw(st.integers(0, len(hosts) - 1))], 8000, "http", "t", None,
                        tuple(chosen[:split]), tuple(chosen[split:]))


@dataclass
class Call:
    route: str  # health | models | load | unload
    body: Any
    answer: Answer


@dataclass
class MockServer:
    """Serves each route's answers in turn (cycling) and records every call with the answer it got.
    The sidecar sends several requests at once, so the bookkeeping takes a lock."""

    routes: dict[str, list[Answer]]
    calls: list[Call] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, route: str) -> Callable[[requests.PreparedRequest], tuple[int, dict[str, str], bytes]]:
        def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
            body = json.loads(request.body) if request.body else None
            with self.lock:
                queue = self.routes[route]
                given_answer = queue[self.served.get(route, 0) % len(queue)]
                self.served[route] = self.served.get(route, 0) + 1
                self.calls.append(Call(route, body, given_answer))
            if given_answer.error is not None:
                raise given_answer.error("injected")
            headers = {"Content-Type": given_answer.content_type} if given_answer.content_type else {}
            return given_answer.status, headers, given_answer.body

        return answer


@contextmanager
def quiet_sidecar(now: list[float]) -> Iterator[None]:
    """The sidecar's clock under test control, its log silenced (thousands of examples log a lot)."""
    saved_clock, saved_disabled = sidecar.clock, sidecar.logger.disabled
    sidecar.clock = lambda: now[0]
    sidecar.logger.disabled = True
    try:
        yield
    finally:
        sidecar.clock, sidecar.logger.disabled = saved_clock, saved_disabled


def listed_adapters(answer: Answer) -> dict[str, str | None] | None:
    """What the sidecar may believe the server holds after this /v1/models answer; None: nothing."""
    if answer.error is not None or answer.status != 200:
        return None
    return _listed(answer.body)


@functools.lru_cache(maxsize=64)
def _listed(body: bytes) -> dict[str, str | None] | None:
    try:
        return dict(parse_model_list(json.loads(body)).adapters)
    except (ValueError, RecursionError):
        return None


def check_cycle(calls: list[Call], desired: DesiredState) -> int:
    """The calls of one cycle against the rules; returns how many unloads were reload fallbacks."""
    keep = {a.id: a for a in desired.ensure_exist}
    drop = {a.id for a in desired.ensure_not_exist}
    models = [i for i, c in enumerate(calls) if c.route == "models"]
    assert len(models) <= 1, "more than one GET /v1/models in a cycle"
    posts = [i for i, c in enumerate(calls) if c.route in ("load", "unload")]
    if not posts:
        return 0
    assert models and models[0] < posts[0], "a load or unload before reading the model list"
    listed = listed_adapters(calls[models[0]].answer)
    assert listed is not None, "a load or unload after a model list that could not be read"
    fallbacks = 0
    for i in posts:
        call = calls[i]
        name = call.body.get("lora_name")
        staged_for = name.removesuffix(STAGING_SUFFIX) if name.endswith(STAGING_SUFFIX) else None
        if call.route == "load":
            wanted = keep.get(staged_for or name)
            assert wanted, f"load of {name!r}, which ensureExist does not name"
            assert call.body["lora_path"] == wanted.source
            assert set(call.body) <= {"lora_name", "lora_path", "load_inplace"}
            if call.body.get("load_inplace"):
                assert listed.get(name) not in (None, wanted.source), f"needless in-place reload of {name!r}"
            continue
        assert set(call.body) == {"lora_name"}
        if staged_for in keep or staged_for in drop:
            continue  # a staging copy: dropped after a swap, or left over from one
        proven = [c for c in calls[:i] if c.route == "load" and c.body.get("lora_name") == name + STAGING_SUFFIX
                  and c.answer.error is None and c.answer.status in (200, 400)]
        if name in keep and proven and listed.get(name) not in (None, keep[name].source):
            fallbacks += 1  # by design: a new version proven under the staging name, then unload + load
            continue
        assert name in drop, f"unload of {name!r}, which ensureNotExist does not name"
        assert name in listed, f"unload of {name!r}, which the server did not list"
    return fallbacks


DEEP_JSON = b"[" * 100_000


def run_cycles(desireds: list[DesiredState], server: MockServer) -> tuple[list[sidecar.CycleResult],
                                                                         list[BaseException | None]]:
    """One reconcile per desired state, the last one twice (a retry after backoff), checking every
    cycle's calls. Returns the cycles' results and any exception that escaped a sidecar thread."""
    reconciler = Reconciler(VLLMClient(requests.Session(), 1.0), 5.0, 300.0)
    now = [1000.0]
    results = []
    lost: list[BaseException | None] = []  # exceptions that escaped a thread of the sidecar's
    saved_hook = threading.excepthook
    threading.excepthook = lambda args: lost.append(args.exc_value)
    try:
        with quiet_sidecar(now), responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            for route, url, method in (("health", HEALTH, "GET"), ("models", MODELS, "GET"),
                                       ("load", LOAD, "POST"), ("unload", UNLOAD, "POST")):
                mock.add_callback(method, url, callback=server.callback(route), content_type=None)
            for desired in [*desireds, desireds[-1]]:
                first = len(server.calls)
                result = reconciler.reconcile(desired)  # must not raise
                if currently_in_test_context():
                    note(f"cycle {reconciler.cycles}: {result}")
                check_cycle(server.calls[first:], desired)
                results.append(result)
                now[0] += 1_000.0  # past any backoff, so failed adapters are tried again
    finally:
        threading.excepthook = saved_hook
        reconciler.client.session.close()
    return results, lost


@examples()
@given(desireds=st.lists(desired_states(("vllm.test", "vllm.test", "vllm.test", "elsewhere.test")), min_size=1,
                         max_size=2),
       health=answers(health_answers), models=answers(model_list_answers()), load=answers(action_answers),
       unload=answers(action_answers))
def test_reconcile_never_raises_and_never_unloads_what_the_config_keeps(desireds, health, models, load, unload):
    server = MockServer({"health": health, "models": models, "load": load, "unload": unload})
    results, lost = run_cycles(desireds, server)
    assert not lost, f"an exception escaped a sidecar thread: {lost[0]!r}"
    for result in results:
        assert not (result.error or "").startswith("internal error"), result.error


@pytest.mark.parametrize("route", ["models", "load"])
def test_a_deeply_nested_json_answer_is_an_ordinary_failure(route):
    deep = Answer(500 if route == "load" else 200, b'{"error":' + DEEP_JSON, "application/json")
    ok_list = Answer(200, json_bytes({"object": "list", "data": []}))
    server = MockServer({"health": [Answer()], "models": [deep if route == "models" else ok_list],
                         "load": [deep if route == "load" else Answer()], "unload": [Answer()]})
    keep = (Adapter("a", "/s/1"), Adapter("b", "/s/2"))
    results, lost = run_cycles([DesiredState("vllm.test", 8000, "http", "t", None, keep, ())], server)
    assert not lost, f"an exception escaped a sidecar thread: {lost[0]!r}"
    assert all(not (r.error or "").startswith("internal error") for r in results), [r.error for r in results]
    if route == "load":
        assert any(c.route == "load" and c.body["lora_name"] == "b" for c in server.calls), "b was never tried"


# ------------------------------------------------------------------ (c) plan


@st.composite
def plan_cases(draw: st.DrawFn) -> tuple[DesiredState, ServerState]:
    desired = draw(desired_states(("vllm.test",)))
    bases = tuple(draw(SERVED_BASES))
    roots = frozenset(draw(SERVED_ROOTS))
    loaded = draw(LOADED)
    return desired, ServerState(bases, roots, loaded)


def apply(planned: sidecar.Plan, server: ServerState) -> ServerState:
    adapters = dict(server.adapters)
    for action in planned.actions:
        if action.op is Op.UNLOAD:
            del adapters[action.adapter.id]
        else:
            adapters[action.adapter.id] = action.adapter.source
    return ServerState(server.base_models, server.base_model_roots, adapters)


@examples()
@given(case=plan_cases())
def test_plan_touches_only_named_adapters_once_and_converges(case):
    desired, server = case
    planned = plan(desired, server)
    keep = {a.id: a for a in desired.ensure_exist}
    drop = {a.id: a for a in desired.ensure_not_exist}
    touched = [a.adapter.id for a in planned.actions]
    assert len(touched) == len(set(touched)), f"one id in two actions: {planned.actions}"
    for action in planned.actions:
        if action.op is Op.UNLOAD:
            assert action.adapter == drop.get(action.adapter.id) and action.adapter.id in server.adapters
        else:
            assert action.adapter == keep.get(action.adapter.id)
            assert (action.op is Op.LOAD) == (action.adapter.id not in server.adapters)
    for skip in planned.skipped:
        assert skip.adapter == keep.get(skip.adapter.id) and skip.adapter.id not in touched
    after = apply(planned, server)
    unnamed = set(server.adapters) - set(keep) - set(drop)
    assert {k: after.adapters[k] for k in unnamed} == {k: server.adapters[k] for k in unnamed}
    again = plan(desired, after)
    assert again.actions == (), f"not converged after one plan: {again.actions}"
    assert again.skipped == planned.skipped


logging.getLogger("hypothesis").setLevel(logging.WARNING)
