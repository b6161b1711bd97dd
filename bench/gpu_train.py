"""One prepared GPU training check (issue 13 item 12), run by `bench/gpu_train.sh`; never imports Ray.

On one H100/H200 (well under 8 minutes), in this one process:
1. varlen attention == per-sample attention on the GPU: `train.attention.varlen_attention_forward` (the
   kernel: torch.nn.attention.varlen or flash-attn) against plain causal SDPA run on each sample alone, in
   fp32, for the output and for dq/dk/dv, on a 16,384-token row of 8 samples with Qwen2.5-0.5B's heads;
2. the same packed row through the model both ways: ours (varlen) vs transformers' stock SDPA with the dense
   block mask it derives from position_ids -- last hidden states and the token-averaged loss must agree;
3. the timed training step of the `1b` preset on one packed row of 16,384 tokens and 48 tiles, as training
   runs it: fp32 master weights, bf16 autocast, activation checkpointing (ViT + LLM), AdamW step;
     ours  - train.loop.train_step: varlen, supervised-only chunked CE, square averaging;
     stock - model(input_ids, pixel_values, position_ids, labels) with SDPA and its dense mask;
   prints step time, tokens/s, MFU (one model-FLOP count for both) and peak memory, and ours/stock.
`--dry` runs all of it on CPU with the tiny preset and small shapes (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_step import VOCAB, synthetic_row, time_steps, varlen_vs_stock  # noqa: E402

from model.build import from_preset  # noqa: E402
from train import attention as A  # noqa: E402
from train.loop import peak_flops, step_flops, train_step  # noqa: E402
from train.loss import PackedLoss, shift_targets  # noqa: E402
from train.stages import (  # noqa: E402
    apply_stage,
    build_optimizer,
    build_scheduler,
    grad_checkpointing_state,
    set_grad_checkpointing,
    stage_config,
)


def check_varlen_kernel(device, tokens: int, samples: int, heads: int, kv_heads: int, dim: int) -> dict:
    """Kernel vs per-sample SDPA in fp32: forward output and input gradients."""
    g = torch.Generator(device="cpu").manual_seed(0)
    cuts = sorted(torch.randperm(tokens - 1, generator=g)[: samples - 1].add(1).tolist())
    cu = torch.tensor([0, *cuts, tokens], dtype=torch.int32, device=device)
    q = torch.randn(1, heads, tokens, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
    k = torch.randn(1, kv_heads, tokens, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
    v = torch.randn(1, kv_heads, tokens, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
    grad_out = torch.randn(1, tokens, heads, dim, generator=g).to(device, torch.bfloat16)
    scale = dim**-0.5
    kernel = A.varlen_kernel_name(device)
    out, _ = A.varlen_attention_forward(None, q, k, v, None, scaling=scale, cu_seq_lens_q=cu)
    (out.float() * grad_out.float()).sum().backward()
    got = [out.detach().float(), *(t.grad.float() for t in (q, k, v))]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = A.per_sample_sdpa(*(t[0].transpose(0, 1) for t in (q32, k32, v32)), cu, scale).unsqueeze(0)
    (ref * grad_out.float()).sum().backward()
    want = [ref.detach(), q32.grad, k32.grad, v32.grad]
    err = {
        name: float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)
    }
    return {"kernel": kernel, "pieces": samples, "tokens": tokens, "max_rel_err": err, "ok": max(err.values()) < 2e-2}


def check_model_paths(model, row) -> dict:
    """The packed row through the LLM with varlen vs with stock SDPA's dense block mask."""
    with torch.no_grad(), autocast(row["input_ids"].device):
        h_var, ours, stock = varlen_vs_stock(model, row)  # leaves the model in SDPA mode
        h_var = h_var.float()
        h_sdpa = A.packed_hidden_states(model, row).float()
    rel = float((h_var - h_sdpa).abs().max() / h_sdpa.abs().max())
    return {
        "hidden_max_rel_diff": rel,
        "loss_ours_token_avg": ours,
        "loss_stock": stock,
        "ok": rel < 5e-2 and abs(ours - stock) < 1e-2 * abs(stock),
    }


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def timed(fn, device, warmup: int, iters: int) -> dict:
    dt, mem = time_steps(fn, warmup, iters, device)
    return {"step_s": dt, "peak_mem_gb": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny preset, small shapes (the tests run this)")
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--tiles", type=int, default=48)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if args.dry:
        args.preset, args.tokens, args.tiles, args.samples, args.warmup, args.iters = "tiny", 2048, 4, 4, 0, 1
        device, vocab = torch.device("cpu"), 4096
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_train: no CUDA device (use --dry on CPU)")
        device, vocab = torch.device("cuda"), VOCAB
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"}
    res["torch"] = torch.__version__

    # 1. the kernel against per-sample attention (Qwen2.5-0.5B: 14 q heads, 2 kv heads, head dim 64)
    res["varlen_vs_per_sample"] = check_varlen_kernel(device, args.tokens, args.samples, 14, 2, 64)

    # the model as training holds it: fp32 masters (bf16 compute under autocast), checkpointing on
    cfg = stage_config("2", {"attention": A.VARLEN, "warmup_steps": 0, "drop_path": 0.0})
    with device:
        model = from_preset(args.preset, vocab_size=vocab, seed=0).float()
    apply_stage(model, cfg)
    set_grad_checkpointing(model, cfg)
    res["grad_checkpointing"] = grad_checkpointing_state(model)
    model.train()
    row = synthetic_row(device, tokens=args.tokens, samples=args.samples, tiles=args.tiles, vocab=vocab,
                        image_token_id=vocab - 1)
    row["pixel_values"] = row["pixel_values"].float()
    model.config.image_token_id = vocab - 1

    # 2. varlen vs stock SDPA through the model
    res["model_varlen_vs_stock"] = check_model_paths(model, row)

    # 3. the timed step, ours vs stock
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10_000)
    seq_lens = (row["cu_seqlens"][1:] - row["cu_seqlens"][:-1]).tolist()
    n_sup = int((shift_targets(row["labels"], row["cu_seqlens"]) != -100).sum())
    flops = step_flops(model, cfg, seq_lens, args.tiles, n_sup)
    peak = peak_flops(device)
    step_module = PackedLoss(model, cfg.ce_chunk)

    def ours():
        A.set_packed_attention(model, A.VARLEN)
        train_step(step_module, [row], cfg, opt, sched, params, autocast(device))

    def stock():
        A.set_packed_attention(model, A.SDPA)
        with autocast(device):
            out = model(
                input_ids=row["input_ids"][None],
                pixel_values=row["pixel_values"],
                position_ids=row["position_ids"][None],
                labels=row["labels"][None],
                use_cache=False,
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res.update(preset=args.preset, tokens=sum(seq_lens), samples=len(seq_lens), tiles=args.tiles)
    for name, fn in (("ours", ours), ("stock_packed_sdpa", stock)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            r = timed(fn, device, args.warmup, args.iters)
        except torch.cuda.OutOfMemoryError:
            res[name] = {"error": "out of memory"}
            continue
        r["tokens_per_s"] = sum(seq_lens) / r["step_s"]
        r["mfu"] = flops / r["step_s"] / peak if peak else None
        res[name] = r
    if "step_s" in res["ours"] and "step_s" in res["stock_packed_sdpa"]:
        res["speedup_ours_vs_stock"] = res["stock_packed_sdpa"]["step_s"] / res["ours"]["step_s"]
    res["ray_imported"] = "ray" in sys.modules
    res["ok"] = bool(
        res["varlen_vs_per_sample"]["ok"] and res["model_varlen_vs_stock"]["ok"] and not res["ray_imported"]
    )
    print(json.dumps(res, indent=2))
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
