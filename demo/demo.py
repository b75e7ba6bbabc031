"""`make demo`: a real vLLM server, the sidecar, and a config that changes under it.

Run by `make demo` after it has built the vLLM environment and the tiny model
(e2e/setup_vllm.sh, e2e/build_model.py). Everything it starts, it stops.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kubelet import KubeletConfigDir
from vllm_server import MODELS, VLLMServer

REPO = Path(__file__).resolve().parent.parent

ADAPTERS = MODELS / "adapters"
API_KEY = "demo-key-not-a-secret"
PERIOD = 2


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n=== {title}")


def config(keep: dict[str, str], drop: dict[str, str]) -> str:
    def models(entries: dict[str, str]) -> list[dict[str, str]]:
        return [{"id": name, "source": str(ADAPTERS / folder)} for name, folder in entries.items()]

    # The canary proves each adapter after its load: one greedy completion through it and one
    # through the base model; the same text means the adapter changes nothing (inert).
    body: dict = {"name": "demo", "host": "127.0.0.1", "port": 0, "defaultBaseModel": "tiny",
                  "canary": {"enabled": True}, "ensureExist": {"models": models(keep)}}
    if drop:
        body["ensureNotExist"] = {"models": models(drop)}
    return json.dumps({"vLLMLoRAConfig": body}, indent=2)  # JSON is YAML


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"demo: gave up waiting for {what} after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def show_server(server: VLLMServer, names: list[str]) -> None:
    models = server.models()
    for model_id, entry in models.items():
        kind = "base model" if entry.get("parent") is None else "adapter   "
        say(f"  {kind} {model_id:<6} root={os.path.relpath(entry['root'], REPO)}")
    for name in names:
        status, text = server.complete(name)
        shown = repr(text) if status == 200 else f"HTTP {status} ({json.loads(text)['error']['message']})"
        say(f"  completion via {name:<6} -> {shown}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sidecar_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.load(response)


def proven(port: int, names: list[str]) -> bool:
    """Each adapter has its canary's verdict for the version now loaded."""
    try:
        adapters = sidecar_status(port)["adapters"]
    except OSError:
        return False
    return all((adapters.get(name) or {}).get("canary") for name in names)


def show_proof(port: int) -> None:
    for name, adapter in sidecar_status(port)["adapters"].items():
        canary = adapter["canary"]
        proof = f"canary={canary['result']} in {canary['seconds']} s" if canary else "(not loaded: no canary)"
        say(f"  /status {name:<6} state={adapter['state']:<7} {proof}")


def follow_log(process: subprocess.Popen) -> None:
    for line in process.stderr:
        say(f"  sidecar | {line.rstrip()}")


def main() -> int:
    started = time.monotonic()
    step("Starting a real vLLM server (CPU build, a tiny local Llama, runtime LoRA on)")
    server = VLLMServer(api_key=API_KEY)
    say(f"  {' '.join(server.command()[1:4])} ... (log: {server.log_path})")
    sidecar = None
    try:
        server.start()
        say(f"  vLLM is healthy at {server.url} after {server.start_seconds:.0f} s")
        folder = KubeletConfigDir(Path(tempfile.mkdtemp(prefix="lora-demo-")) / "config")

        def write(keep: dict[str, str], drop: dict[str, str]) -> None:
            text = config(keep, drop).replace('"port": 0', f'"port": {server.port}')
            folder.write(text)

        step("Config v1: ensureExist a1, a2 (written the kubelet's way)")
        write({"a1": "a1", "a2": "a2"}, {})
        env = {**os.environ, "VLLM_API_KEY": API_KEY}
        port = free_port()
        command = [sys.executable, str(REPO / "sidecar.py"), "--config", str(folder.path), "--reconcile-trigger",
                   str(PERIOD), "--metrics-address", "127.0.0.1", "--metrics-port", str(port),
                   "--health-check-interval", "0.5"]
        say(f"  $ VLLM_API_KEY=... python sidecar.py {' '.join(command[3:])}")
        sidecar = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=follow_log, args=(sidecar,), daemon=True).start()
        took = wait_for("a1 and a2", lambda: {"a1", "a2"} <= set(server.models()))
        say(f"\n  both adapters loaded {took:.1f} s after the sidecar started; the server now has:")
        show_server(server, ["tiny", "a1", "a2"])
        wait_for("the canaries of a1 and a2", lambda: proven(port, ["a1", "a2"]), timeout=120)
        say("\n  each adapter answers unlike the base model: the canary verified it")
        show_proof(port)

        step("Config v2: add a3, move a2 to ensureNotExist, give a1 a new version (a1v2)")
        write({"a1": "a1v2", "a3": "a3"}, {"a2": "a2"})

        def followed() -> bool:
            models = server.models()
            # a1 is unlisted for one load's time during its swap (vLLM 0.32 has no safe in-place load)
            return "a2" not in models and "a3" in models and models.get("a1", {}).get("root", "").endswith("a1v2")

        took = wait_for("the server to follow v2", followed)
        say(f"\n  the server followed {took:.2f} s after the swap; it now has:")
        show_server(server, ["tiny", "a1", "a2", "a3"])

        step("Config v3: add `inert`, a real LoRA whose weights change nothing (lora_B = 0)")
        write({"a1": "a1v2", "a3": "a3", "inert": "inert"}, {"a2": "a2"})
        wait_for("the canary of inert", lambda: proven(port, ["a1", "a3", "inert"]), timeout=120)
        say("\n  vLLM loaded and lists it, yet it answers exactly as the base model does:")
        show_server(server, ["tiny", "inert"])
        show_proof(port)

        step("Stopping the sidecar: nothing is unloaded on shutdown")
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(timeout=5)
        say(f"  sidecar stopped (exit {sidecar.returncode}); adapters stay loaded: {sorted(server.models())}")
    finally:
        if sidecar and sidecar.poll() is None:
            sidecar.kill()
        server.stop()
    say(f"\nDemo done in {time.monotonic() - started:.0f} s; vLLM stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
