"""What a user checks in deployment.yaml, configmap.yaml and the Dockerfile before applying them.

kubernetes-validate and hadolint (.ci/validate-manifests, run by `make lint`) prove the manifests fit
the Kubernetes schema and the Dockerfile lints clean; these tests prove they fit the sidecar: its flags,
its ports and paths, its config file, its image.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from sidecar_process import clean_env

ROOT = Path(__file__).resolve().parent.parent
SIDECAR_IMAGE = "lora-sidecar"
SECRET_ENV = "VLLM_API_KEY"  # read by sidecar.py directly, not through a flag


# ------------------------------------------------------------------ helpers


def load_docs(name: str) -> list[dict[str, Any]]:
    with (ROOT / name).open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def the_one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def is_sidecar(container: dict[str, Any]) -> bool:
    return container.get("image", "").split(":")[0].rsplit("/", 1)[-1] == SIDECAR_IMAGE


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return named[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in lines]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD of the last stage, flags (--chown ...) dropped."""
    result = []
    for op, args in dockerfile_instructions():
        if op in ("COPY", "ADD"):
            words = (
                json.loads(args) if args.startswith("[") else [w for w in shlex.split(args) if not w.startswith("--")]
            )
            result.append((words[:-1], words[-1]))
    return result


def dockerignore_allows(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last matching rule wins)."""
    ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        return True
    allowed = True
    for line in ignore.read_text(encoding="utf-8").splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        if fnmatch(path, pattern) or fnmatch(path, pattern + "/*"):
            allowed = negate
    return allowed


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def sidecar() -> Any:
    return importlib.import_module("sidecar")


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return load_docs("deployment.yaml")


@pytest.fixture(scope="module")
def pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return the_one(manifests, "Deployment")["spec"]["template"]


@pytest.fixture(scope="module")
def sidecar_container(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod["spec"].get("initContainers", []) if is_sidecar(c)]
    assert len(found) == 1, f"expected one {SIDECAR_IMAGE} init container, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def vllm_container(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod["spec"]["containers"] if "vllm" in c.get("image", "")]
    assert len(found) == 1, f"expected one vLLM container, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def configmap() -> dict[str, Any]:
    return the_one(load_docs("configmap.yaml"), "ConfigMap")


@pytest.fixture(scope="module")
def lora_config(configmap: dict[str, Any]) -> dict[str, Any]:
    (text,) = configmap["data"].values()
    return yaml.safe_load(text)["vLLMLoRAConfig"]


@pytest.fixture
def sidecar_args(sidecar: Any, sidecar_container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The sidecar's settings in the pod: its args parsed by its own parser, under the pod's env only."""
    for name in list(os.environ):
        if name.startswith("LORA_SIDECAR_") or name in ("DYNAMIC_LORA_ROLLOUT_CONFIG", SECRET_ENV):
            monkeypatch.delenv(name)
    for var in sidecar_container.get("env", []):
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    command = sidecar_container.get("command", [])
    assert not command, "command would replace the image's ENTRYPOINT (python -m sidecar)"
    args = [str(a) for a in sidecar_container.get("args", [])]
    try:
        return sidecar.build_parser().parse_args(args)
    except SystemExit:  # argparse printed why on stderr
        pytest.fail(f"sidecar.py rejects the container's args {args}")


# ------------------------------------------------------------------ the sidecar container


def test_sidecar_is_a_native_sidecar(pod: dict[str, Any], sidecar_container: dict[str, Any]) -> None:
    # An init container with restartPolicy Always starts before vLLM and runs beside it;
    # without the restartPolicy it would be a plain init container that blocks the pod forever.
    assert sidecar_container.get("restartPolicy") == "Always"
    assert not [c for c in pod["spec"]["containers"] if is_sidecar(c)], "the sidecar must not also be a container"


def test_sidecar_args_parse_with_its_own_parser(sidecar_args: Any) -> None:
    assert sidecar_args.mode == "run", "--once/--dry-run/--validate would exit and be restarted in a loop"
    assert sidecar_args.reconcile_period > 0
    assert sidecar_args.log_format == "json"


def test_sidecar_env_is_only_what_the_sidecar_reads(sidecar: Any, sidecar_container: dict[str, Any]) -> None:
    read = set(re.findall(r"\[env\s+([A-Z0-9_]+)\]", sidecar.build_parser().format_help())) | {SECRET_ENV}
    given = {v["name"] for v in sidecar_container.get("env", [])}
    unknown = {name for name in given - read if not name.startswith("AWS_")}  # boto3's standard chain reads AWS_*
    assert not unknown, f"the sidecar ignores these variables: {sorted(unknown)}"


def test_config_file_is_a_whole_configmap_volume(
    pod: dict[str, Any],
    sidecar_container: dict[str, Any],
    sidecar_args: Any,
    configmap: dict[str, Any],
) -> None:
    config_path = PurePosixPath(sidecar_args.config_path)
    mounts = [
        m for m in sidecar_container.get("volumeMounts", []) if PurePosixPath(m["mountPath"]) == config_path.parent
    ]
    assert len(mounts) == 1, f"nothing mounted at {config_path.parent}"
    mount = mounts[0]
    # A subPath mount is a copy made once: the kubelet's ..data swap never reaches it.
    assert "subPath" not in mount and "subPathExpr" not in mount, "a subPath mount never sees a ConfigMap edit"
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "configMap" in volume, "the config volume must be the ConfigMap"
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    items = {i["key"]: i["path"] for i in volume["configMap"].get("items", [])}
    keys = set(configmap["data"])
    files = {items[k] for k in keys if k in items} if items else keys
    assert config_path.name in files, f"{config_path.name} is not a file of the volume ({sorted(files)})"


def test_probes_use_the_sidecars_paths_and_port(
    sidecar: Any, sidecar_container: dict[str, Any], sidecar_args: Any
) -> None:
    expected = {
        # The kubelet starts vLLM only once the startup probe passes; /readyz waits for
        # vLLM, so a startup probe on /readyz would never pass.
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = sidecar_container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["path"] in sidecar.StatusHandler.PATHS, probe
        assert resolve_port(sidecar_container, get["port"]) == sidecar_args.metrics_port, probe


def test_metrics_port_and_scrape_annotations(
    sidecar: Any, pod: dict[str, Any], sidecar_container: dict[str, Any], sidecar_args: Any
) -> None:
    assert resolve_port(sidecar_container, "metrics") == sidecar_args.metrics_port
    annotations = pod["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(sidecar_args.metrics_port)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    assert "/metrics" in sidecar.StatusHandler.PATHS


def test_sidecar_runs_locked_down(sidecar_container: dict[str, Any]) -> None:
    context = sidecar_container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] > 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    resources = sidecar_container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


# ------------------------------------------------------------------ vLLM beside it


def test_vllm_allows_runtime_lora_updates(vllm_container: dict[str, Any]) -> None:
    env = {v["name"]: v.get("value") for v in vllm_container.get("env", [])}
    assert str(env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "")).lower() in ("1", "true")
    args = [str(a) for a in vllm_container.get("args", [])] + [str(a) for a in vllm_container.get("command", [])]
    assert "--enable-lora" in args
    assert any(a == "--max-loras" or a.startswith("--max-loras=") for a in args)


def test_sidecar_reaches_vllm_in_the_pod(vllm_container: dict[str, Any], lora_config: dict[str, Any]) -> None:
    # The sidecar talks to the config's host:port; in the pod that is vLLM on localhost.
    assert lora_config.get("host", "localhost") in ("localhost", "127.0.0.1", "::1")
    port = lora_config.get("port", 8000)
    assert port in [p["containerPort"] for p in vllm_container["ports"]]
    get = vllm_container["readinessProbe"]["httpGet"]
    assert get["path"] == "/health"
    assert resolve_port(vllm_container, get["port"]) == port


def test_default_base_model_is_what_vllm_serves(vllm_container: dict[str, Any], lora_config: dict[str, Any]) -> None:
    # Else the sidecar skips every adapter as "base model not served".
    args = [str(a) for a in vllm_container.get("args", [])]
    served = set()
    for flag in ("--served-model-name", "--model"):
        if flag in args:
            served.add(args[args.index(flag) + 1])
    if args and not args[0].startswith("-"):
        served.add(args[0])  # vllm serve MODEL
    assert lora_config["defaultBaseModel"] in served


def test_both_containers_share_the_api_key(
    manifests: list[dict[str, Any]], sidecar_container: dict[str, Any], vllm_container: dict[str, Any]
) -> None:
    def ref(container: dict[str, Any]) -> tuple[str, str]:
        (var,) = [v for v in container.get("env", []) if v["name"] == SECRET_ENV]
        secret = var["valueFrom"]["secretKeyRef"]
        return secret["name"], secret["key"]

    assert ref(sidecar_container) == ref(vllm_container)
    name, key = ref(vllm_container)
    for secret in (d for d in manifests if d["kind"] == "Secret" and d["metadata"]["name"] == name):
        assert key in {**secret.get("data", {}), **secret.get("stringData", {})}


def test_service_routes_to_vllm(
    manifests: list[dict[str, Any]], pod: dict[str, Any], vllm_container: dict[str, Any]
) -> None:
    for service in (d for d in manifests if d["kind"] == "Service"):
        labels = pod["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
        # A Service named "vllm" injects VLLM_PORT=tcp://..., which vLLM misreads as its own setting.
        assert service["metadata"]["name"] != "vllm" or pod["spec"].get("enableServiceLinks") is False
        for port in service["spec"]["ports"]:
            assert resolve_port(vllm_container, port.get("targetPort", port["port"])) in [
                p["containerPort"] for p in vllm_container["ports"]
            ]


# ------------------------------------------------------------------ the image


def test_dockerfile_user_is_numeric_non_root(sidecar_container: dict[str, Any]) -> None:
    users = [args for op, args in dockerfile_instructions() if op == "USER"]
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) > 0, f"USER {users[-1]}: runAsNonRoot can only check a numeric user"
    assert not group or group.isdigit()
    assert sidecar_container["securityContext"]["runAsUser"] == int(user)


def test_image_holds_sidecar_and_schema_side_by_side() -> None:
    entrypoint = [json.loads(args) for op, args in dockerfile_instructions() if op == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["python", "-m", "sidecar"]
    env = " ".join(args for op, args in dockerfile_instructions() if op == "ENV")
    app = PurePosixPath("/app")
    assert f"PYTHONPATH={app}" in env, "python -m sidecar must find the module whatever the working directory"
    copied = {}
    for sources, dest in copies():
        for source in sources:
            target = PurePosixPath(dest) / PurePosixPath(source).name if dest.endswith("/") else PurePosixPath(dest)
            copied[source] = target
    # sidecar.py loads validation.yaml from its own folder.
    assert copied.get("sidecar.py") == app / "sidecar.py"
    assert copied.get("validation.yaml") == app / "validation.yaml"
    assert set(copied) == {"sidecar.py", "validation.yaml"}, "the image should carry only these two files"
    for source in copied:
        assert dockerignore_allows(source), f".dockerignore keeps {source} out of the build context"


def test_the_images_files_run_as_the_image_runs_them_and_validate_the_shipped_config(tmp_path: Path) -> None:
    """What the Dockerfile does, on this machine: the files it copies (and nothing else of the
    repository) in a read-only app folder, and `python -m sidecar` started elsewhere with PYTHONPATH
    pointing at the app folder, validating the shipped configmap.yaml."""
    app = tmp_path / "app"
    app.mkdir()
    for sources, _ in copies():
        for source in sources:
            shutil.copy2(ROOT / source, app / Path(source).name)
    app.chmod(0o555)  # read-only, as in the image: no bytecode cache can be written
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "--validate", "--config", str(ROOT / "configmap.yaml")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=clean_env({"PYTHONPATH": str(app), "PYTHONDONTWRITEBYTECODE": "1"}), check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "valid: " in result.stdout, result.stdout


def test_image_installs_the_pinned_requirements() -> None:
    runs = " ".join(args for op, args in dockerfile_instructions() if op == "RUN")
    assert re.search(r"pip install\b.*--no-cache-dir", runs)
    assert re.search(r"(-r|--requirement)[ =]\S*requirements\.txt", runs)
    assert dockerignore_allows("requirements.txt")
    env = " ".join(args for op, args in dockerfile_instructions() if op == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    exposed = " ".join(args for op, args in dockerfile_instructions() if op == "EXPOSE").split()
    assert "8080" in exposed or "8080/tcp" in exposed


def test_boto3_is_in_the_image_only_when_built_for_s3() -> None:
    instructions = dockerfile_instructions()
    assert ("ARG", "WITH_S3=0") in instructions  # the default image does not grow
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r'"\$WITH_S3" = "1".*(-r|--requirement)[ =]\S*requirements-s3\.txt', runs)
    assert dockerignore_allows("requirements-s3.txt")
    assert "boto3" not in (ROOT / "requirements.txt").read_text()
    assert re.search(r"^boto3==", (ROOT / "requirements-s3.txt").read_text(), re.M)


def test_downloads_go_to_a_volume_vllm_sees_at_the_same_path(
    pod: dict[str, Any], sidecar_container: dict[str, Any], vllm_container: dict[str, Any], sidecar_args: Any,
) -> None:
    adapter_dir = PurePosixPath(sidecar_args.adapter_dir)
    mounts = {c["name"]: {m["name"]: m for m in c.get("volumeMounts", [])} for c in (sidecar_container, vllm_container)}
    (name,) = [n for n, m in mounts[sidecar_container["name"]].items() if PurePosixPath(m["mountPath"]) == adapter_dir]
    seen_by_vllm = mounts[vllm_container["name"]][name]
    assert PurePosixPath(seen_by_vllm["mountPath"]) == adapter_dir  # vLLM loads the very path the sidecar sends
    assert seen_by_vllm.get("readOnly") is True and not mounts[sidecar_container["name"]][name].get("readOnly")
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == name]
    budget = sidecar_args.adapter_dir_max_bytes
    size_limit = volume["emptyDir"]["sizeLimit"]
    assert size_limit.endswith("Gi") and 0 < budget < int(size_limit[:-2]) * 2**30  # the budget fits the volume
