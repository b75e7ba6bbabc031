"""Process tests of remote adapter sources: s3:// prefixes and https:// archives downloaded
into --adapter-dir, checked, loaded from their version folder, and deleted only once vLLM no longer
lists them.

sidecar.py runs as a process against the vLLM look-alike (tests/fake_vllm.py), moto's S3 server and a
local HTTPS file server (tests/remote_sources.py), reached through the settings a user gives it
(AWS_* variables, REQUESTS_CA_BUNDLE). Each test checks what a user can see: /status, /metrics, the
log, the requests and adapters of the server, and the files in --adapter-dir (README, "Remote
sources").

Every wait is on a condition, with a deadline that measures nothing. Listings of --adapter-dir are
taken while /status shows no download in flight (quiet_listing), so a retry under way is not
mistaken for something left behind.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from fake_vllm import FakeVLLM, make_adapter
from remote_sources import (
    SECRET_KEY,
    UNSAFE_KINDS,
    HttpsFiles,
    MotoS3,
    fill_adapter,
    folder_size,
    sha256_bytes,
    tar_gz,
    tree_digest,
    unsafe_archive,
    version_dir,
    zip_archive,
)
from sidecar_process import (
    Sidecar,
    converge,
    free_port,
    loads,
    lora_config,
    posts,
    run_sidecar,
    unloads,
    wait_cycles,
    wait_until,
)

StartSidecar = Callable[..., Sidecar]

INCOMING = ".incoming-"
STAGING = "~staging"


# --------------------------------------------------------------------------------- helpers


def run(start_sidecar: StartSidecar, config: Path, adapter_dir: Path | None, *flags: object,
        env: Mapping[str, str] | None = None) -> Sidecar:
    """A sidecar with JSON logs on `config`, downloading into `adapter_dir` (None: no --adapter-dir)."""
    where = ["--adapter-dir", adapter_dir] if adapter_dir is not None else []
    return start_sidecar(["--config", config, "--log-format", "json", *where, *flags], dict(env or {}))


def model(adapter_id: str, source: str, sha256: str | None = None) -> dict[str, str]:
    entry = {"id": adapter_id, "source": source}
    if sha256 is not None:
        entry["sha256"] = sha256
    return entry


def new_adapter(root: Path, name: str, size: int = 4_000, seed: str = "") -> Path:
    """An adapter folder the fake accepts, with `size` bytes of weights and a nested file."""
    return fill_adapter(make_adapter(root / "sources" / name), size, seed)


def loaded_from_https(fake: FakeVLLM, https_files: HttpsFiles, kubelet: Any, start_sidecar: StartSidecar,
                      tmp_path: Path) -> tuple[Sidecar, Path, Path, dict[str, str]]:
    """A sidecar that has loaded `a`, a pinned https:// archive: the sidecar, --adapter-dir, a's version
    folder and its config entry."""
    data = tar_gz(new_adapter(tmp_path, "a"))
    entry = model("a", https_files.put("/a.tar.gz", data), sha256_bytes(data))
    adapter_dir = make_adapter_dir(tmp_path)
    folder = version_dir(adapter_dir, "a", sha256_bytes(data))
    kubelet.write(lora_config(fake.port, [entry]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, env=https_files.env)
    converge(fake, {"a": str(folder)}, sidecar=sidecar)
    return sidecar, adapter_dir, folder, entry


def make_adapter_dir(tmp_path: Path) -> Path:
    """--adapter-dir: the volume shared with vLLM (it exists before the sidecar starts, as a mount does)."""
    folder = tmp_path / "adapter-dir"
    folder.mkdir()
    return folder


def adapter(sidecar: Sidecar, name: str) -> dict[str, Any]:
    return sidecar.status()["adapters"][name]


def wait_failed(sidecar: Sidecar, name: str, *fragments: str, download: bool = False) -> dict[str, Any]:
    """Until /status shows `name` failed with a last_error holding every fragment (and with `download`, its
    last download failed and no retry in flight); return the record."""

    def failed() -> dict[str, Any] | None:
        record = adapter(sidecar, name)
        error = record["last_error"] or ""
        if download and (record["download"] or {}).get("state") != "failed":
            return None
        return record if record["state"] == "failed" and all(f in error for f in fragments) else None

    return sidecar.wait_for(failed, what=f"{name} failed with {fragments} in last_error")


def wait_listed(sidecar: Sidecar, name: str, folder: Path) -> dict[str, Any]:
    """Until /status shows `name` loaded with observed_source the version folder; return the record."""
    return sidecar.wait_for(
        lambda: (r := adapter(sidecar, name))["state"] == "loaded" and r["observed_source"] == str(folder) and r,
        what=f"{name} loaded, observed_source {folder}")


def listing(adapter_dir: Path) -> list[str]:
    return sorted(p.name for p in adapter_dir.iterdir()) if adapter_dir.exists() else []


def quiet_listing(sidecar: Sidecar, adapter_dir: Path, expected: Iterable[str] | None = None) -> list[str]:
    """The names in --adapter-dir, taken while /status shows no download in flight before and after the
    listing and nothing changed in between (a retry cannot start or finish unseen). With `expected`, waits
    until the quiet listing is exactly that."""
    wanted = sorted(expected) if expected is not None else None

    def downloads() -> dict[str, Any]:
        return {name: (r["download"], r["failures"], r["state"]) for name, r in sidecar.status()["adapters"].items()}

    def snapshot() -> tuple[list[str]] | None:
        before = downloads()
        if any(d and d["state"] == "downloading" for d, _, _ in before.values()):
            return None
        names = listing(adapter_dir)
        if downloads() != before or (wanted is not None and names != wanted):
            return None
        return (names,)

    return sidecar.wait_for(snapshot, what=f"--adapter-dir quiet{f' and holding {wanted}' if wanted else ''}; "
                                           f"it holds {listing(adapter_dir)}")[0]


def log_records(sidecar: Sidecar, msg: str) -> list[dict[str, Any]]:
    return [line for line in sidecar.json_lines() if line.get("msg") == msg]


def remote_posts(fake: FakeVLLM, name: str, since: float = 0.0) -> list[dict[str, Any]]:
    """Loads and unloads of `name` and of its staging copy since `since`."""
    return [e for e in posts(fake.requests(), since)
            if isinstance(e["body"], dict) and e["body"].get("lora_name") in (name, name + STAGING)]


def served_roots(fake: FakeVLLM) -> set[str]:
    return {root.rstrip("/") for root in fake.adapters().values()}


class FolderWatch(threading.Thread):
    """Samples, until stop(), whether each folder exists while the server lists an adapter rooted there;
    a folder missing between two samples that both saw it listed is a violation (vLLM would lose the
    files of an adapter it serves)."""

    def __init__(self, fake: FakeVLLM, folders: Sequence[Path]) -> None:
        super().__init__(daemon=True)
        self.fake, self.folders = fake, list(folders)
        self.violations: list[str] = []
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for folder in self.folders:
                listed_before = str(folder) in served_roots(self.fake)
                exists = folder.is_dir()
                if listed_before and not exists and str(folder) in served_roots(self.fake):
                    self.violations.append(f"{folder.name} deleted while the server lists it")
            self.samples += 1
            self._halt.wait(0.005)

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(5)
        return self.violations


def reconcile_cycles(sidecar: Sidecar) -> float:
    return sidecar.metrics().total("lora_sidecar_reconcile_total")


# ============================================================ downloads that succeed


def test_s3_prefix_pinned_by_its_tree_digest_loads_from_its_version_folder(
    fake, s3_server, s3_bucket, kubelet, start_sidecar, tmp_path
):
    source_dir = new_adapter(tmp_path, "a", 20_000)
    source = s3_server.put_folder(s3_bucket, "team/a/v1/", source_dir)
    digest, size = tree_digest(source_dir), folder_size(source_dir)
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model("team/a", source, digest)]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, env=s3_server.env)

    folder = version_dir(adapter_dir, "team/a", digest)
    assert folder.name == f"team_a@{digest[:16]}"
    converge(fake, {"team/a": str(folder)}, sidecar=sidecar)
    sent = loads(fake.requests(), "team/a")
    assert [(e["body"]["lora_path"], e["status"]) for e in sent] == [(str(folder), 200)]
    assert tree_digest(folder) == digest, "the folder vLLM loads holds exactly the files under the prefix"

    record = wait_listed(sidecar, "team/a", folder)
    download = record["download"]
    assert (download["state"], download["bytes"], download["sha256"]) == ("done", size, digest), download
    assert isinstance(download["seconds"], int | float) and download["seconds"] >= 0
    assert quiet_listing(sidecar, adapter_dir) == [folder.name], "nothing but the version folder"

    done = log_records(sidecar, "download done: team/a")
    assert len(done) == 1, sidecar.log_text()
    assert (done[0]["level"], done[0]["bytes"], done[0]["sha256"]) == ("info", size, digest), done[0]
    assert done[0]["duration_s"] >= 0

    sidecar.wait_metric("lora_sidecar_adapter_dir_bytes", size)
    m = sidecar.metrics()
    assert m.value("lora_sidecar_downloads_total", result="success") == 1
    assert m.total("lora_sidecar_downloads_total", result="error") == 0
    assert m.value("lora_sidecar_download_bytes_total") == size
    assert m.value("lora_sidecar_download_seconds_count") == 1


ARCHIVES = {
    # case: (URL suffix, top-level folder in the archive or None, whether the config pins the sha256)
    "tar.gz": (".tar.gz", None, True),
    "tgz-with-top-folder": (".tgz", "my-adapter", True),
    "zip-with-top-folder-unpinned": (".zip", "my-adapter", False),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_https_archive_downloads_in_the_background_and_loads_from_its_version_folder(
    case, fake, https_files, kubelet, start_sidecar, tmp_path
):
    suffix, top, pinned = ARCHIVES[case]
    source_dir = new_adapter(tmp_path, "a", 30_000)
    data = zip_archive(source_dir, top) if suffix == ".zip" else tar_gz(source_dir, top)
    path = f"/models/a{suffix}"
    url = https_files.put(path, data)
    local = str(make_adapter(tmp_path / "local" / "l"))
    adapter_dir = make_adapter_dir(tmp_path)
    https_files.hold(path)  # the download stays in flight until released
    kubelet.write(lora_config(fake.port, [model("a", url, sha256_bytes(data) if pinned else None),
                                          model("l", local)]))
    # --request-timeout bounds a read of the held archive too: long enough to look around meanwhile.
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, "--request-timeout", "10", env=https_files.env)

    # While it downloads: the loop goes on (the local adapter loads), /healthz answers, the adapter is pending.
    wait_until(lambda: https_files.count(path) >= 1, message=lambda: "the archive asked for\n" + sidecar.diagnose())
    converge(fake, {"l": local}, sidecar=sidecar)
    record = adapter(sidecar, "a")
    assert (record["state"], (record["download"] or {}).get("state")) == ("pending", "downloading"), record
    assert adapter(sidecar, "l")["download"] is None, "a local source has no download"
    assert sidecar.healthz() == 200
    assert not loads(fake.requests(), "a")

    https_files.release(path)
    folder = version_dir(adapter_dir, "a", sha256_bytes(data) if pinned else None, source=url)
    converge(fake, {"l": local, "a": str(folder)}, sidecar=sidecar)
    assert [(e["body"]["lora_path"], e["status"]) for e in loads(fake.requests(), "a")] == [(str(folder), 200)]
    assert (folder / "adapter_config.json").is_file(), "the archive's top-level folder is the adapter"
    assert tree_digest(folder) == tree_digest(source_dir)
    record = wait_listed(sidecar, "a", folder)
    assert (record["download"]["state"], record["download"]["bytes"], record["download"]["sha256"]) == \
        ("done", len(data), sha256_bytes(data)), record["download"]
    assert quiet_listing(sidecar, adapter_dir) == [folder.name]
    assert https_files.count(path) == 1, "downloaded once"
    sidecar.wait_ready()


def test_at_most_two_downloads_run_at_once(fake, https_files, kubelet, start_sidecar, tmp_path):
    names = ("a", "b", "c")
    archives = {name: tar_gz(new_adapter(tmp_path, name)) for name in names}
    urls = {name: https_files.put(f"/{name}.tar.gz", data) for name, data in archives.items()}
    for name in names:
        https_files.hold(f"/{name}.tar.gz")
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model(n, urls[n], sha256_bytes(archives[n])) for n in names]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, "--request-timeout", "10", env=https_files.env)

    def asked() -> list[str]:
        return [n for n in names if https_files.count(f"/{n}.tar.gz")]

    sidecar.wait_for(lambda: len(asked()) >= 2, what="two downloads under way")
    wait_cycles(fake, 3)
    assert len(asked()) == 2, f"downloads in flight at once: {asked()}"
    waiting = [n for n in names if n not in asked()]
    assert adapter(sidecar, waiting[0])["state"] == "pending"

    for name in names:
        https_files.release(f"/{name}.tar.gz")
    converge(fake, {n: str(version_dir(adapter_dir, n, sha256_bytes(archives[n]))) for n in names}, sidecar=sidecar)
    assert [https_files.count(f"/{n}.tar.gz") for n in names] == [1, 1, 1]


# ============================================================ downloads that fail


def test_sha256_mismatch_fails_that_adapter_leaves_nothing_and_the_others_load(
    fake, s3_server, s3_bucket, https_files, kubelet, start_sidecar, tmp_path
):
    good_dir = new_adapter(tmp_path, "good")
    good = s3_server.put_folder(s3_bucket, "good/", good_dir)
    bad_data = tar_gz(new_adapter(tmp_path, "bad", 10_000))
    bad_url = https_files.put("/bad.tar.gz", bad_data)
    pinned = sha256_bytes(b"some other archive")
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model("bad", bad_url, pinned), model("good", good, tree_digest(good_dir))]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, env={**s3_server.env, **https_files.env})

    good_folder = version_dir(adapter_dir, "good", tree_digest(good_dir))
    converge(fake, {"good": str(good_folder)}, sidecar=sidecar)
    record = wait_failed(sidecar, "bad", "sha256 mismatch", download=True)
    assert record["last_action"] == "download"
    # retried with backoff, like a failing load
    sidecar.wait_for(lambda: https_files.count("/bad.tar.gz") >= 2, what="the download retried")
    wait_failed(sidecar, "bad", "sha256 mismatch")

    assert not remote_posts(fake, "bad"), "nothing is loaded for an adapter whose download does not match"
    assert quiet_listing(sidecar, adapter_dir) == [good_folder.name], "nothing on disk for it"
    assert not version_dir(adapter_dir, "bad", pinned).exists()
    warnings = log_records(sidecar, "download failed: bad")
    assert warnings and warnings[0]["level"] == "warning" and "sha256 mismatch" in warnings[0]["error"], warnings
    m = sidecar.metrics()
    assert m.value("lora_sidecar_downloads_total", result="error") >= 1
    assert m.value("lora_sidecar_downloads_total", result="success") == 1
    assert adapter(sidecar, "good")["state"] == "loaded"


def test_an_interrupted_download_fails_leaves_nothing_and_loads_on_a_retry_once_the_server_is_fixed(
    fake, https_files, kubelet, start_sidecar, tmp_path
):
    data = tar_gz(new_adapter(tmp_path, "a", 200_000))
    url = https_files.put("/a.tar.gz", data)
    https_files.interrupt("/a.tar.gz", after=len(data) // 3)
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model("a", url, sha256_bytes(data))]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, env=https_files.env)

    record = wait_failed(sidecar, "a", download=True)
    assert record["last_action"] == "download" and record["last_error"], record
    assert sidecar.log_matching("download failed: a")
    assert quiet_listing(sidecar, adapter_dir) == [], "no .incoming-* and no version folder left behind"
    assert not loads(fake.requests(), "a")

    https_files.interrupt("/a.tar.gz", None)
    folder = version_dir(adapter_dir, "a", sha256_bytes(data))
    converge(fake, {"a": str(folder)}, timeout=20.0, sidecar=sidecar)  # after the backoff of the failures so far
    assert https_files.count("/a.tar.gz") >= 2
    assert [(e["body"]["lora_path"], e["status"]) for e in loads(fake.requests(), "a")] == [(str(folder), 200)]
    assert tree_digest(folder) == tree_digest(tmp_path / "sources" / "a")
    wait_listed(sidecar, "a", folder)
    assert quiet_listing(sidecar, adapter_dir) == [folder.name]


def test_a_download_that_trickles_is_cut_at_the_download_timeout_and_the_loop_goes_on(
    fake, https_files, kubelet, start_sidecar, tmp_path
):
    data = tar_gz(new_adapter(tmp_path, "slow"))
    url = https_files.put("/slow.tar.gz", data)
    https_files.trickle("/slow.tar.gz", 0.2)  # every read answers within --request-timeout; the whole takes minutes
    adapter_dir = make_adapter_dir(tmp_path)
    local = make_adapter(tmp_path / "sources" / "local")
    kubelet.write(lora_config(fake.port, [model("slow", url, sha256_bytes(data)), model("local", str(local))]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, "--download-timeout", "2", env=https_files.env)

    converge(fake, {"local": str(local)}, timeout=20.0, sidecar=sidecar)  # the other adapter does not wait
    record = wait_failed(sidecar, "slow", download=True)
    assert "--download-timeout" in record["last_error"], record
    assert sidecar.get("/healthz").status_code == 200
    assert quiet_listing(sidecar, adapter_dir) == []
    assert not loads(fake.requests(), "slow")


UNSAFE_S3 = {
    # kind: the key under the adapter's prefix that must fail it
    "s3-dotdot": "../evil",
    "s3-empty-segment": "tokenizer//evil",
}


@pytest.mark.parametrize("kind", [*UNSAFE_KINDS, *UNSAFE_S3])
def test_an_unsafe_entry_fails_the_adapter_and_nothing_is_written_outside_the_adapter_dir(
    kind, fake, s3_server, s3_bucket, https_files, kubelet, start_sidecar, tmp_path
):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "evil"
    if kind in UNSAFE_S3:
        source = s3_server.put_folder(s3_bucket, "a/", new_adapter(tmp_path, "a"))
        s3_server.put(s3_bucket, "a/" + UNSAFE_S3[kind], b"written by an unsafe key\n")
        entry, fragment, pin = UNSAFE_S3[kind], "unsafe path", None
    else:
        data, entry = unsafe_archive(kind, str(target))
        source = https_files.put("/a" + (".zip" if kind.startswith("zip-") else ".tar.gz"), data)
        fragment, pin = "unsafe path in archive", sha256_bytes(data)
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model("a", source, pin)]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, env={**s3_server.env, **https_files.env})

    record = wait_failed(sidecar, "a", fragment)
    assert entry in record["last_error"], f"the error names the entry {entry!r}: {record['last_error']}"
    assert record["last_action"] == "download"
    assert quiet_listing(sidecar, adapter_dir) == []
    assert not loads(fake.requests(), "a")
    assert not target.exists() and not target.is_symlink() and list(outside.iterdir()) == []
    written = [p for p in tmp_path.rglob("*") if p.name == "evil" and p != outside]
    assert written == [], f"written outside the adapter's folder: {written}"
    assert not [p for p in adapter_dir.rglob("*") if p.is_symlink()]


# ============================================================ the disk budget


def upload_versions(s3: MotoS3, bucket: str, root: Path, count: int, size: int) -> list[tuple[str, str]]:
    """`count` versions of adapter "a" of the same size in bytes, each under its own prefix: [(source, digest)]."""
    versions = []
    for i in range(1, count + 1):
        folder = fill_adapter(make_adapter(root / "sources" / f"a-v{i}"), size, seed=f"v{i}")
        versions.append((s3.put_folder(bucket, f"a/v{i}/", folder), tree_digest(folder)))
    return versions


@pytest.mark.slow  # four versions, one after another
def test_with_a_budget_unused_versions_are_kept_as_a_cache_and_evicted_oldest_first(
    fake, s3_server, s3_bucket, kubelet, start_sidecar, tmp_path
):
    versions = upload_versions(s3_server, s3_bucket, tmp_path, 4, 20_000)
    size = folder_size(tmp_path / "sources" / "a-v1")
    budget = int(3.5 * size)  # three versions fit, four do not
    adapter_dir = make_adapter_dir(tmp_path)
    folders = [version_dir(adapter_dir, "a", digest) for _, digest in versions]
    kubelet.write(lora_config(fake.port, [model("a", *versions[0])]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, "--adapter-dir-max-bytes", budget, env=s3_server.env)
    converge(fake, {"a": str(folders[0])}, sidecar=sidecar)

    for i in (1, 2):
        kubelet.write(lora_config(fake.port, [model("a", *versions[i])]))
        converge(fake, {"a": str(folders[i])}, sidecar=sidecar)
        wait_cycles(fake, 2)
    assert quiet_listing(sidecar, adapter_dir) == sorted(f.name for f in folders[:3]), \
        "versions no longer listed are kept while they fit the budget"

    kubelet.write(lora_config(fake.port, [model("a", *versions[3])]))
    converge(fake, {"a": str(folders[3])}, sidecar=sidecar)
    wait_cycles(fake, 2)
    assert quiet_listing(sidecar, adapter_dir) == sorted(f.name for f in folders[1:]), \
        "the oldest unused version is evicted to make room, and only it"
    assert sidecar.metrics().value("lora_sidecar_adapter_dir_bytes") <= budget
    assert sidecar.log_matching(folders[0].name), "the deletion is logged"


def test_a_budget_for_one_version_evicts_the_unlisted_one_to_make_room_for_another(
    fake, s3_server, s3_bucket, https_files, kubelet, start_sidecar, tmp_path
):
    a_dir, b_dir = new_adapter(tmp_path, "a", 20_000), new_adapter(tmp_path, "b", 20_000)
    a = s3_server.put_folder(s3_bucket, "a/", a_dir)
    b_data = tar_gz(b_dir)
    b = https_files.put("/b.tar.gz", b_data)
    budget = int(1.5 * folder_size(a_dir))
    adapter_dir = make_adapter_dir(tmp_path)
    a_folder = version_dir(adapter_dir, "a", tree_digest(a_dir))
    b_folder = version_dir(adapter_dir, "b", sha256_bytes(b_data))
    kubelet.write(lora_config(fake.port, [model("a", a, tree_digest(a_dir))]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, "--adapter-dir-max-bytes", budget,
                  env={**s3_server.env, **https_files.env})
    converge(fake, {"a": str(a_folder)}, sidecar=sidecar)

    watch = FolderWatch(fake, [a_folder])
    watch.start()
    kubelet.write(lora_config(fake.port, [model("b", b, sha256_bytes(b_data))], [model("a", a)]))
    # b's download may first find no room while a is still listed; a retry makes it once a is unloaded.
    converge(fake, {"b": str(b_folder)}, timeout=20.0, sidecar=sidecar)
    assert quiet_listing(sidecar, adapter_dir) == [b_folder.name]
    assert watch.stop() == [] and watch.samples > 0
    wait_listed(sidecar, "b", b_folder)


@pytest.mark.parametrize("via", ["s3", "https"])
def test_an_adapter_bigger_than_the_budget_fails_naming_the_flag_and_the_others_load(
    via, fake, s3_server, s3_bucket, https_files, kubelet, start_sidecar, tmp_path
):
    small_dir = new_adapter(tmp_path, "small", 10_000)
    big_dir = new_adapter(tmp_path, "big", 200_000)
    small = s3_server.put_folder(s3_bucket, "small/", small_dir)
    if via == "s3":
        big, big_pin = s3_server.put_folder(s3_bucket, "big/", big_dir), tree_digest(big_dir)
    else:
        data = tar_gz(big_dir)
        big, big_pin = https_files.put("/big.tar.gz", data), sha256_bytes(data)
    local = str(make_adapter(tmp_path / "local" / "l"))
    budget = 4 * folder_size(small_dir)
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model("big", big, big_pin), model("small", small, tree_digest(small_dir)),
                                          model("l", local)]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, "--adapter-dir-max-bytes", budget,
                  env={**s3_server.env, **https_files.env})

    small_folder = version_dir(adapter_dir, "small", tree_digest(small_dir))
    converge(fake, {"small": str(small_folder), "l": local}, sidecar=sidecar)
    record = wait_failed(sidecar, "big", "--adapter-dir-max-bytes")
    assert record["last_action"] == "download"
    assert not remote_posts(fake, "big")
    assert quiet_listing(sidecar, adapter_dir) == [small_folder.name]
    assert sidecar.metrics().value("lora_sidecar_adapter_dir_bytes") <= budget


# ============================================================ deletion only once vLLM no longer lists a version


@pytest.mark.slow  # unloads that fail, with backoff
def test_a_version_folder_stays_while_listed_and_goes_after_the_confirmed_unload(
    fake, https_files, kubelet, start_sidecar, tmp_path
):
    sidecar, adapter_dir, folder, entry = loaded_from_https(fake, https_files, kubelet, start_sidecar, tmp_path)

    watch = FolderWatch(fake, [folder])
    watch.start()
    fake.set_fault("unload_noop")  # unloads answer 200 and the adapter stays listed
    kubelet.write(lora_config(fake.port, [], [entry]))
    sidecar.wait_for(lambda: len(unloads(fake.requests(), "a")) >= 2, what="two unloads of a answered 200")
    wait_cycles(fake, 2)
    assert fake.adapters() == {"a": str(folder)}
    assert folder.is_dir() and (folder / "adapter_config.json").is_file(), "deleted while vLLM still lists it"

    fake.clear_fault()
    wait_until(lambda: fake.adapters() == {}, 20.0, message=lambda: "a unloaded\n" + sidecar.diagnose())
    sidecar.wait_for(lambda: not folder.exists(), what=f"{folder.name} deleted once a is no longer listed")
    assert watch.stop() == [] and watch.samples > 0
    assert quiet_listing(sidecar, adapter_dir) == []
    assert sidecar.metrics().value("lora_sidecar_adapter_dir_bytes") == 0


@pytest.mark.parametrize("how", ["server-stopped", "models-dropped"])
def test_nothing_is_deleted_while_the_server_cannot_be_asked(how, fake, https_files, kubelet, start_sidecar, tmp_path):
    sidecar, _, folder, entry = loaded_from_https(fake, https_files, kubelet, start_sidecar, tmp_path)

    # a stays loaded; the sidecar just cannot see it: the server is gone, or /health answers and
    # /v1/models closes the connection unanswered
    if how == "server-stopped":
        fake.stop()
    else:
        fake.set_fault("models_drop")
    kubelet.write(lora_config(fake.port, [], [entry]))
    sidecar.wait_for(lambda: adapter(sidecar, "a")["desired"] == "absent", what="the new config adopted")
    if how == "server-stopped":
        sidecar.wait_for(lambda: sidecar.status()["server"]["up"] is False, what="the server seen down")
    cycles = reconcile_cycles(sidecar)
    sidecar.wait_for(lambda: reconcile_cycles(sidecar) >= cycles + 3, what="three more reconcile cycles")
    assert folder.is_dir() and (folder / "adapter_config.json").is_file(), \
        "deleted in a cycle where /v1/models got no answer"

    assert fake.adapters() == {"a": str(folder)}
    if how == "server-stopped":
        fake.start()
    else:
        fake.clear_fault()
    wait_until(lambda: fake.adapters() == {}, message=lambda: "a unloaded once listed again\n" + sidecar.diagnose())
    sidecar.wait_for(lambda: not folder.exists(), what=f"{folder.name} deleted once the server lists no a")


# ============================================================ version updates


@pytest.mark.slow  # two updates, one after the other
def test_a_version_update_swaps_folders_and_a_bad_update_keeps_the_previous_version_serving(
    fake, https_files, kubelet, start_sidecar, tmp_path
):
    v1 = tar_gz(new_adapter(tmp_path, "a-v1", seed="1"))
    v2 = tar_gz(new_adapter(tmp_path, "a-v2", seed="2"))
    v3 = tar_gz(new_adapter(tmp_path, "a-v3", seed="3"))
    urls = [https_files.put(f"/a/v{i}.tar.gz", data) for i, data in enumerate((v1, v2, v3), 1)]
    adapter_dir = make_adapter_dir(tmp_path)
    x1, x2 = version_dir(adapter_dir, "a", sha256_bytes(v1)), version_dir(adapter_dir, "a", sha256_bytes(v2))
    kubelet.write(lora_config(fake.port, [model("a", urls[0], sha256_bytes(v1))]))
    sidecar = run(start_sidecar, kubelet.path, adapter_dir, "--request-timeout", "10", env=https_files.env)
    converge(fake, {"a": str(x1)}, sidecar=sidecar)
    watch = FolderWatch(fake, [x1, x2])
    watch.start()

    # 1. a new version: the old one serves until the new one is downloaded
    https_files.hold("/a/v2.tar.gz")
    updated = time.monotonic()
    kubelet.write(lora_config(fake.port, [model("a", urls[1], sha256_bytes(v2))]))
    wait_until(lambda: https_files.count("/a/v2.tar.gz") == 1, message=lambda: "v2 asked for\n" + sidecar.diagnose())
    wait_cycles(fake, 2)
    assert fake.adapters() == {"a": str(x1)} and not remote_posts(fake, "a", updated), \
        "nothing changes on the server before the new version is on disk"
    assert adapter(sidecar, "a")["download"]["state"] == "downloading"
    https_files.release("/a/v2.tar.gz")
    converge(fake, {"a": str(x2)}, sidecar=sidecar)
    sent = [e for e in remote_posts(fake, "a", updated) if e["path"] == "/v1/load_lora_adapter"]
    assert sent and all(e["body"]["lora_path"] == str(x2) for e in sent), \
        [(e["body"]["lora_name"], e["body"]["lora_path"]) for e in sent]
    sidecar.wait_for(lambda: not x1.exists(), what="the old version's folder deleted once no longer listed")
    assert quiet_listing(sidecar, adapter_dir) == [x2.name]
    assert tree_digest(x2) == tree_digest(tmp_path / "sources" / "a-v2")
    wait_listed(sidecar, "a", x2)

    # 2. a version that cannot be had: the one serving stays, listed all along
    bad = time.monotonic()
    kubelet.write(lora_config(fake.port, [model("a", urls[2], sha256_bytes(b"not v3"))]))
    record = wait_failed(sidecar, "a", "sha256 mismatch")
    assert record["observed_source"] == str(x2)
    wait_cycles(fake, 3)
    assert fake.adapters() == {"a": str(x2)}
    assert remote_posts(fake, "a", bad) == [], "no load or unload for a version that failed to download"
    assert quiet_listing(sidecar, adapter_dir) == [x2.name]
    assert watch.stop() == [] and watch.samples > 0


# ============================================================ secrets


def test_credentials_and_presigned_queries_never_appear_in_logs_status_or_metrics(
    fake, s3_server, s3_bucket, https_files, kubelet, start_sidecar, tmp_path
):
    signatures = {f"sig-{kind}": f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAPRESIGNED{kind.upper()}"
                                 f"&X-Amz-Signature=5ec7e7{kind}0123456789abcdef"
                  for kind in ("ok", "refused", "untrusted", "forbidden")}
    secrets = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": "session-TOKEN-never-logged-b71e",
               "password": "hunter2-PASSWORD-never-logged", **signatures}
    s3_dir = new_adapter(tmp_path, "s3")
    s3_source = s3_server.put_folder(s3_bucket, "s3/", s3_dir)
    data = tar_gz(new_adapter(tmp_path, "h"))
    https_files.put("/h.tar.gz", data)
    https_files.put("/f.tar.gz", data)
    https_files.fail("/f.tar.gz", 403)
    presigned = https_files.url("/h.tar.gz", signatures["sig-ok"])
    userinfo = https_files.url("/h.tar.gz").replace("https://", f"https://robot:{secrets['password']}@")
    # a server whose certificate the sidecar does not trust, and a port nobody listens on
    untrusted = HttpsFiles(trustme.CA(), https_files.ca_file).start()
    untrusted.put("/u.tar.gz", data)
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [
        model("s3", s3_source, tree_digest(s3_dir)),
        model("presigned", presigned, sha256_bytes(data)),
        model("userinfo", userinfo),
        model("forbidden", https_files.url("/f.tar.gz", signatures["sig-forbidden"])),
        model("refused", f"https://127.0.0.1:{free_port()}/r.tar.gz?{signatures['sig-refused']}"),
        model("untrusted", untrusted.url("/u.tar.gz", signatures["sig-untrusted"])),
    ]))
    env = {**s3_server.env, **https_files.env, "AWS_SESSION_TOKEN": secrets["AWS_SESSION_TOKEN"]}
    try:
        sidecar = run(start_sidecar, kubelet.path, adapter_dir, env=env)
        wait_listed(sidecar, "s3", version_dir(adapter_dir, "s3", tree_digest(s3_dir)))
        wait_listed(sidecar, "presigned", version_dir(adapter_dir, "presigned", sha256_bytes(data)))
        wait_listed(sidecar, "userinfo", version_dir(adapter_dir, "userinfo", source=userinfo))
        for name in ("forbidden", "refused", "untrusted"):
            wait_failed(sidecar, name)
            sidecar.wait_for_log(f"download failed: {name}")
        assert signatures["sig-ok"] in https_files.queries("/h.tar.gz"), "the whole presigned URL was used"
        assert untrusted.count("/u.tar.gz") == 0, "no request past a TLS handshake that failed"

        status = sidecar.get("/status").text
        texts = {"log": sidecar.log_text(), "stdout": "\n".join(sidecar.stdout_lines()), "/status": status,
                 "/metrics": sidecar.get("/metrics").text, "vLLM requests": json.dumps(fake.requests())}
        leaks = [f"{where}: {name}" for where, text in texts.items() for name, secret in secrets.items()
                 if secret in text or secret.split("&")[-1] in text]
        assert leaks == [], f"secrets shown: {leaks}"
        shown = adapter(sidecar, "presigned")["source"]
        assert shown == https_files.url("/h.tar.gz") + "?***", f"/status shows the source as {shown!r}"
    finally:
        untrusted.stop()


# ============================================================ without --adapter-dir


def test_without_adapter_dir_remote_sources_fail_naming_the_flag_and_local_ones_load(
    fake, s3_server, s3_bucket, https_files, kubelet, start_sidecar, tmp_path
):
    s3_source = s3_server.put_folder(s3_bucket, "a/", new_adapter(tmp_path, "a"))
    url = https_files.put("/b.tar.gz", tar_gz(new_adapter(tmp_path, "b")))
    local = str(make_adapter(tmp_path / "local" / "l"))
    kubelet.write(lora_config(fake.port, [model("a", s3_source), model("b", url), model("l", local)]))
    sidecar = run(start_sidecar, kubelet.path, None, env={**s3_server.env, **https_files.env})

    converge(fake, {"l": local}, sidecar=sidecar)
    for name in ("a", "b"):
        wait_failed(sidecar, name, "--adapter-dir")
        assert not remote_posts(fake, name)
    assert https_files.count("/b.tar.gz") == 0, "nothing downloaded with nowhere to put it"
    assert adapter(sidecar, "l")["state"] == "loaded"


# ============================================================ the digest of a folder


def test_digest_prints_the_tree_digest_a_prefix_is_pinned_with(tmp_path):
    folder = new_adapter(tmp_path, "a", 5_000)
    result = run_sidecar(["--digest", folder])
    assert result.code == 0, result.stderr
    assert result.stdout.split() == [tree_digest(folder)], result.stdout


def test_dry_run_names_the_download_and_once_downloads_loads_and_exits_in_sync(fake, https_files, kubelet, tmp_path):
    data = tar_gz(new_adapter(tmp_path, "a"))
    url = https_files.put("/a.tar.gz", data) + "?X-Amz-Signature=never-printed"
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model("a", url, sha256_bytes(data))]))
    args = ["--config", kubelet.path, "--adapter-dir", adapter_dir]

    dry = run_sidecar([*args, "--dry-run"], https_files.env)
    assert dry.code == 1 and dry.stdout.startswith("download a  source=https://"), dry
    assert "never-printed" not in dry.stdout + dry.stderr and https_files.count("/a.tar.gz") == 0

    once = run_sidecar([*args, "--once"], https_files.env)
    folder = version_dir(adapter_dir, "a", sha256_bytes(data))
    assert once.code == 0 and once.stdout.strip() == "in sync", once
    assert fake.adapters() == {"a": str(folder)}


def test_a_restarted_sidecar_keeps_staged_versions_and_clears_a_download_cut_short(
    fake, https_files, kubelet, start_sidecar, tmp_path
):
    data = tar_gz(new_adapter(tmp_path, "a"))
    url = https_files.put("/a.tar.gz", data)
    adapter_dir = make_adapter_dir(tmp_path)
    cut_short = adapter_dir / f"{INCOMING}killed-mid-download"
    cut_short.mkdir()
    (cut_short / "adapter_config.json").write_text("{")  # half written when the pod was killed
    kubelet.write(lora_config(fake.port, [model("a", url, sha256_bytes(data))]))
    folder = version_dir(adapter_dir, "a", sha256_bytes(data))

    first = run(start_sidecar, kubelet.path, adapter_dir, env=https_files.env)
    converge(fake, {"a": str(folder)}, sidecar=first)
    assert not cut_short.exists()
    first.stop()
    fake.set_adapters({}, replace=True)  # vLLM restarted too: everything must be loaded again

    second = run(start_sidecar, kubelet.path, adapter_dir, env=https_files.env)
    converge(fake, {"a": str(folder)}, sidecar=second)
    assert https_files.count("/a.tar.gz") == 1, "the staged version is loaded again, not downloaded again"
    assert quiet_listing(second, adapter_dir) == [folder.name]


def test_an_archive_stored_with_content_encoding_gzip_is_pinned_by_the_file_as_served(
    fake, https_files, kubelet, tmp_path
):
    data = tar_gz(new_adapter(tmp_path, "a"))  # S3 and gzip_static servers label such a file Content-Encoding: gzip
    url = https_files.put("/a.tar.gz", data)
    https_files.encode("/a.tar.gz", "gzip")
    adapter_dir = make_adapter_dir(tmp_path)
    kubelet.write(lora_config(fake.port, [model("a", url, sha256_bytes(data))]))
    once = run_sidecar(["--config", kubelet.path, "--adapter-dir", adapter_dir, "--once"], https_files.env)
    assert once.code == 0, once
    assert fake.adapters() == {"a": str(version_dir(adapter_dir, "a", sha256_bytes(data)))}
