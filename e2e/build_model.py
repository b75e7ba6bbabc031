"""Build the tiny model and LoRA adapters the e2e tests serve with a real vLLM.

Run with the vLLM venv's interpreter (it needs torch, transformers, tokenizers, peft):

    .venv-vllm/bin/python e2e/build_model.py [--out .e2e/models] [--force]

Layout under OUT (default <repo>/.e2e/models, ignored by git):

    base/                 random-init Llama: 2 layers, hidden 128, 4 heads, intermediate 256,
                          float32, byte-level BPE tokenizer of a few hundred tokens
    adapters/a1 a2 a3     LoRA r=8 on q_proj/v_proj, random A and B (each changes the output)
    adapters/a1v2         another r=8 adapter ("a new version of a1")
    adapters/big16        LoRA r=16 (rejected by a server run with --max-lora-rank 8)
    adapters/inert        a real LoRA r=8 on q_proj/v_proj whose delta is exactly zero (peft's
                          default init: random A, zero B): vLLM loads it and it answers as the
                          base model does (the canary's "inert" case)
    adapters/not-an-adapter  a folder without adapter_config.json
    manifest.json         paths and the greedy texts transformers produced (for information)
    .stamp                written last; a second run with the same script returns at once

Everything is seeded, so two builds give the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".e2e" / "models"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A sidecar keeps the adapters of a server equal to a config file.",
    "Kubernetes mounts a ConfigMap as a folder of symbolic links.",
    "Low rank adapters change the attention projections of a model.",
    "Hello world, this is a tiny language model for end to end tests.",
    "Every reconcile cycle lists the models and loads what is missing.",
    "Once upon a time there was a small server on a slow machine.",
    "Numbers like 1 2 3 4 5 6 7 8 9 10 and symbols like + - = ? ! appear too.",
]
PROMPT = "Once upon a time"

# name -> (seed, rank)
ADAPTERS = {
    "a1": (1, 8),
    "a2": (2, 8),
    "a3": (3, 8),
    "a1v2": (11, 8),
    "big16": (16, 16),
}
# Adapters whose greedy continuations must differ from the base model's and each other's.
DISTINCT = ["a1", "a2", "a3", "a1v2"]
# name -> (seed, rank): peft's own init (init_lora_weights=True), B = 0, so B @ A = 0 exactly.
INERT = {"inert": (21, 8)}


def script_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        min_frequency=1,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.model_max_length = 128
    fast.save_pretrained(out)
    return fast


def build_base(out: Path, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 32: supported by vLLM's CPU attention
        num_key_value_heads=4,
        intermediate_size=256,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


def build_adapter(base_dir: Path, out: Path, seed: int, rank: int, inert: bool = False):
    """A LoRA adapter for the base model in base_dir; inert: lora_B zero, so it changes nothing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        bias="none",
        # False: random A and B, the adapter really changes the output. True (peft's default):
        # Kaiming A, zero B, so the delta B @ A is exactly zero (a trained-for-nothing adapter).
        init_lora_weights=inert,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg).eval()
    model.save_pretrained(out)
    return model


def check_inert(folder: Path) -> None:
    """The saved weights of an inert adapter: every lora_B exactly zero, the lora_A not (a real
    adapter that does nothing, not an empty file); and targets present in both."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    a = {k: t for k, t in tensors.items() if ".lora_A." in k}
    b = {k: t for k, t in tensors.items() if ".lora_B." in k}
    if not a or len(a) != len(b):
        raise SystemExit(f"build_model: {folder.name}: expected lora_A/lora_B pairs, got {sorted(tensors)}")
    nonzero_b = [k for k, t in b.items() if bool(t.count_nonzero())]
    if nonzero_b:
        raise SystemExit(f"build_model: {folder.name}: lora_B not zero in {nonzero_b}")
    if not all(bool(t.count_nonzero()) for t in a.values()):
        raise SystemExit(f"build_model: {folder.name}: a lora_A is zero too; expected peft's random A")


def greedy(model, tokenizer, max_new_tokens: int = 8) -> str:
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def build(out: Path) -> dict:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base_dir = tmp / "base"
    adapters_dir = tmp / "adapters"
    base_dir.mkdir(parents=True)
    adapters_dir.mkdir()

    tokenizer = build_tokenizer(base_dir)
    model = build_base(base_dir, tokenizer)
    texts = {"base": greedy(model, tokenizer)}

    final_base = out / "base"
    for name, (seed, rank) in {**ADAPTERS, **INERT}.items():
        peft_model = build_adapter(base_dir, adapters_dir / name, seed, rank, inert=name in INERT)
        texts[name] = greedy(peft_model, tokenizer)
        # base_model_name_or_path: the final local folder (the tmp folder is renamed
        # below), never a hub id. vLLM does not check it; it is for information.
        cfg_path = adapters_dir / name / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = str(final_base)
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    bad = adapters_dir / "not-an-adapter"
    bad.mkdir()
    (bad / "README.txt").write_text("This folder has no adapter_config.json on purpose.\n")

    seen = {}
    for name in ["base", *DISTINCT]:
        if texts[name] in seen:
            raise SystemExit(
                f"build_model: {name} and {seen[texts[name]]} give the same greedy text "
                f"{texts[name]!r}; change a seed"
            )
        seen[texts[name]] = name
    for name in INERT:
        check_inert(adapters_dir / name)
        if texts[name] != texts["base"]:
            raise SystemExit(f"build_model: the inert adapter {name} gives {texts[name]!r}, "
                             f"the base model {texts['base']!r}")

    manifest = {
        "prompt": PROMPT,
        "base": str(final_base),
        "served_model_name": "tiny",
        "adapters": {n: str(out / "adapters" / n) for n in [*ADAPTERS, *INERT, "not-an-adapter"]},
        "ranks": {n: r for n, (_, r) in {**ADAPTERS, **INERT}.items()},
        "inert": sorted(INERT),
        "hf_greedy_texts": texts,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".stamp").write_text(script_digest() + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    stamp = out / ".stamp"
    if not args.force and stamp.is_file() and stamp.read_text().strip() == script_digest():
        print(f"build_model: {out} is up to date")
        return 0
    t0 = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    manifest = build(out)
    print(f"build_model: built {out} in {time.monotonic() - t0:.1f} s")
    for name, text in manifest["hf_greedy_texts"].items():
        print(f"  {name:6s} {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
