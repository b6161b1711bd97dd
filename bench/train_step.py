"""Training-step benchmark (issue 7, "Measure").

GPU mode (default when CUDA is present; no Ray): the `1b` preset (random init, bf16) on one packed
16,384-token row of 8 samples with 16 tiles. Runs side by side in this process:
  ours   - train.loop.train_step: varlen attention, supervised-only chunked CE, square averaging;
  stock  - transformers' packed path: model(input_ids, pixel_values, position_ids, labels) with SDPA and the
           dense block mask it derives from position_ids, full-vocab logits, token-mean loss;
  rows   - stock, the same tokens as 8 separate rows (no packing), for reference.
Prints tokens/s, peak memory, MFU (same FLOP count for every path) and the ours/stock ratio, and checks
that our token-averaged loss equals the stock loss on the same weights.

CPU mode (`--cpu`): the `tiny` preset through Ray Train with 2 workers on packed shards (`--data DIR`, or a
small set built from real images and SmolLM2's tokenizer), and the same steps in one process without Ray.

    .venv/bin/python bench/train_step.py            # GPU
    .venv/bin/python bench/train_step.py --cpu      # CPU, Ray Train 2 workers

`bench/gpu_train.sh` is the prepared GPU check as `ivl train` runs (fp32 master weights under bf16 autocast,
48 tiles, activation checkpointing); this script's GPU mode keeps the issue-7 setup (pure bf16 weights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.build import from_preset  # noqa: E402
from model.tiling import TOKENS_PER_TILE  # noqa: E402
from train import attention as A  # noqa: E402
from train.loop import peak_flops, step_flops, train_step  # noqa: E402
from train.loss import PackedLoss, shift_targets, token_weights, weighted_cross_entropy  # noqa: E402
from train.stages import apply_stage, build_optimizer, build_scheduler, stage_config  # noqa: E402

VOCAB = 151_674  # Qwen2.5 tokenizer + InternVL special tokens (InternVL2.5-1B)


def synthetic_row(device, tokens=16_384, samples=8, tiles=16, vocab=VOCAB, image_token_id=VOCAB - 1, seed=0):
    """One packed row: each sample = 64 prompt tokens, <img> + 256*tiles_per_sample + </img>, 64 question
    tokens, then the answer (supervised) filling the sample's share of the row."""
    g = torch.Generator().manual_seed(seed)
    per, tps = tokens // samples, tiles // samples
    ids, labels, pos, cu = [], [], [], [0]
    for _ in range(samples):
        n_img = TOKENS_PER_TILE * tps
        prompt = torch.randint(0, vocab - 3, (64,), generator=g)
        img = torch.full((n_img + 2,), image_token_id)
        img[0], img[-1] = vocab - 3, vocab - 2  # <img>, </img>
        q = torch.randint(0, vocab - 3, (64,), generator=g)
        ans = torch.randint(0, vocab - 3, (per - 128 - n_img - 2,), generator=g)
        s = torch.cat([prompt, img, q, ans])
        lab = torch.cat([torch.full((128 + n_img + 2,), -100), ans])
        ids.append(s)
        labels.append(lab)
        pos.append(torch.arange(per))
        cu.append(cu[-1] + per)
    pixel = torch.randn(tiles, 3, 448, 448, generator=g)
    return {
        "input_ids": torch.cat(ids).to(device),
        "labels": torch.cat(labels).to(device),
        "position_ids": torch.cat(pos).to(device),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=device),
        "pixel_values": pixel.to(device, torch.bfloat16),
        "has_image": True,
        "num_tiles": tiles,
    }


def varlen_vs_stock(model, row) -> tuple[torch.Tensor, float, float]:
    """Forward only, same weights: (our varlen last hidden states, our token-averaged loss, transformers' stock
    loss with SDPA and the dense block mask it derives from position_ids). Leaves the model in SDPA mode."""
    t = shift_targets(row["labels"], row["cu_seqlens"])
    w = token_weights(t, row["cu_seqlens"], "token")
    with torch.no_grad():
        A.set_packed_attention(model, A.VARLEN)
        h = A.packed_hidden_states(model, row)
        ours = float(weighted_cross_entropy(h, model.lm_head.weight, t, w) / w.sum())
        A.set_packed_attention(model, A.SDPA)
        stock = float(
            model(
                input_ids=row["input_ids"][None],
                pixel_values=row["pixel_values"],
                position_ids=row["position_ids"][None],
                labels=row["labels"][None],
            ).loss
        )
    return h, ours, stock


def time_steps(fn, warmup, iters, device):
    """Seconds per call of fn after warm-up, and peak GPU memory in GiB (None on CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters, (
        torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    )


def gpu_bench(args) -> dict:
    device = torch.device(args.device)
    cfg = stage_config("2", {"attention": A.VARLEN, "warmup_steps": 0, "drop_path": 0.0, "grad_clip": 1.0})
    model = from_preset(args.preset, vocab_size=VOCAB, seed=0).to(device, torch.bfloat16)
    apply_stage(model, cfg)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    row = synthetic_row(device, tokens=args.tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10_000)
    nullctx = contextlib.nullcontext()
    seq_lens = (row["cu_seqlens"][1:] - row["cu_seqlens"][:-1]).tolist()
    t = shift_targets(row["labels"], row["cu_seqlens"])
    n_sup = int((t != -100).sum())
    flops = step_flops(model, cfg, seq_lens, row["num_tiles"], n_sup)
    peak = peak_flops(device) or 989e12
    n_tok = sum(seq_lens)

    # loss equality on identical weights (forward only): ours with token averaging vs stock
    _, ours_loss, stock_loss = varlen_vs_stock(model, row)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)"
    results = {
        "device": name,
        "preset": args.preset,
        "tokens": n_tok,
        "samples": len(seq_lens),
        "tiles": row["num_tiles"],
        "varlen_kernel": A.varlen_kernel_name(device),
        "loss_ours_token_avg": ours_loss,
        "loss_stock": stock_loss,
    }

    step_module = PackedLoss(model, cfg.ce_chunk)
    if args.compile:
        step_module = torch.compile(step_module, dynamic=True)

    def ours():
        A.set_packed_attention(model, A.VARLEN)
        train_step(step_module, [row], cfg, opt, sched, params, nullctx)

    def stock():
        A.set_packed_attention(model, A.SDPA)
        out = model(
            input_ids=row["input_ids"][None],
            pixel_values=row["pixel_values"],
            position_ids=row["position_ids"][None],
            labels=row["labels"][None],
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    per = n_tok // len(seq_lens)

    def rows():
        A.set_packed_attention(model, A.SDPA)
        out = model(
            input_ids=row["input_ids"].view(len(seq_lens), per),
            pixel_values=row["pixel_values"],
            labels=row["labels"].view(len(seq_lens), per),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, fn in (("ours", ours), ("stock_packed", stock), ("stock_8_rows", rows)):
        torch.cuda.empty_cache()
        try:
            dt, mem = time_steps(fn, args.warmup, args.iters, device)
        except torch.cuda.OutOfMemoryError:
            results[name] = {"error": "out of memory"}
            continue
        results[name] = {
            "step_s": dt,
            "tokens_per_s": n_tok / dt,
            "peak_mem_gb": mem,
            "mfu": flops / dt / peak,
        }
    if "step_s" in results.get("ours", {}) and "step_s" in results.get("stock_packed", {}):
        results["speedup_vs_stock_packed"] = results["stock_packed"]["step_s"] / results["ours"]["step_s"]
    return results


def cpu_bench(args) -> dict:
    from pipeline.session import init_ray
    from train.launcher import run_train

    tmp = Path(tempfile.mkdtemp(prefix="ivl_bench_train_"))
    data = args.data
    if data is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest_train import small_packed_dataset, smollm_tokenizer

        tok = smollm_tokenizer(tmp)
        data = small_packed_dataset(tmp / "packed", tok, n_rows=8, per_row=3, max_tiles=2)
    cfg = {"warmup_steps": 0, "save_every": 0, "log_every": 1}
    results = {}
    for name, kw in (
        ("ray_2_workers", dict(workers=2, use_ray=True)),
        ("in_process_1", dict(workers=1, use_ray=False)),
    ):
        if kw["use_ray"]:
            init_ray(num_cpus=4)
        t0 = time.perf_counter()
        run_train(args.stage, data, "tiny", tmp / name, config=cfg, max_steps=args.steps, **kw)
        wall = time.perf_counter() - t0
        recs = [json.loads(ln) for ln in (tmp / name / "metrics.jsonl").read_text().splitlines()]
        steady = recs[1:] or recs  # first step includes warm-up
        tok = sum(r["tokens"] for r in steady)
        secs = sum(r["step_time_s"] for r in steady)
        results[name] = {
            "steps": len(recs),
            "tokens_per_s": tok / secs,
            "samples_per_s": sum(r["samples"] for r in steady) / secs,
            "wall_s": wall,
            "final_loss": recs[-1]["loss"],
        }
    results["ray_vs_in_process_tokens_per_s"] = (
        results["ray_2_workers"]["tokens_per_s"] / results["in_process_1"]["tokens_per_s"]
    )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny preset through Ray Train with 2 CPU workers")
    ap.add_argument(
        "--data", type=Path, default=None, help="packed data dir for --cpu (default: build a small one)"
    )
    ap.add_argument("--stage", default="2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile our step module")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (both paths)")
    ap.add_argument("--preset", default="1b", help="GPU mode model preset (tiny for a smoke run)")
    ap.add_argument("--tokens", type=int, default=16_384, help="GPU mode packed row length")
    ap.add_argument("--device", default="cuda", help="GPU mode device (cpu only for a smoke run of the code)")
    args = ap.parse_args()
    if not args.cpu and args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU mode skipped (use --cpu for the tiny Ray Train figure)")
        return
    res = cpu_bench(args) if args.cpu else gpu_bench(args)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
