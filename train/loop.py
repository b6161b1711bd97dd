"""The per-worker training loop: plain PyTorch, setup -> load checkpoint -> train -> report.

`train_worker(config)` is the Ray Train entry (`TorchTrainer(train_loop_per_worker=train_worker)`);
`run_local(job)` runs the same loop in one process without Ray (CPU or GPU; how the benchmark runs it).
One micro-batch is one packed row (InternVL 2.5: one packed row per GPU); `grad_accum` rows per step.
Parameters are fp32 master weights whatever the checkpoint's dtype, computed in bf16 under autocast on GPU
(InternVL trains bf16 with fp32 masters); a step whose loss denominator is 0 or whose gradients are not
finite is skipped and counted (`skipped_steps`), never applied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from model.build import (
    CheckpointRows,
    MappingRows,
    build_model,
    fill_computed_buffers,
    from_checkpoint,
    load_sharded,
)
from model.presets import PRESETS
from model.tokenizer import IMG_CONTEXT, load_tokenizer
from train import attention as A
from train.checkpoint import (
    MASTER_FILE,
    STATE_FILE,
    full_state_dict,
    latest_checkpoint,
    load_master_weights,
    load_optimizer_state,
    load_trainer_state,
    optimizer_state,
    save_checkpoint,
    unwrap,
    write_final,
)
from train.data import iterate_local, plan_items, to_device
from train.loss import PackedLoss, global_denominator, shift_targets, token_weights
from train.stages import StageConfig, apply_stage, build_optimizer, build_scheduler, set_grad_checkpointing

logger = logging.getLogger("ivl.train")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense


@dataclass
class TrainJob:
    """Everything a worker needs (picklable: it travels as Ray Train's train_loop_config)."""

    stage: dict  # StageConfig fields
    model: str  # preset name or checkpoint dir
    data: str  # packed data dir (its tokenizer/ is used with a preset)
    out: str
    files: list[str]
    counts: list[int]
    plan: list[list[int]]  # (world_size, total_steps * grad_accum) global row ids
    total_steps: int
    start_step: int = 0
    resume_from: str | None = None  # checkpoint dir to continue from
    use_gpu: bool = False
    stop_at_step: int | None = None  # stop (checkpointed) after this step, as an interruption would
    fingerprint: list = field(default_factory=list)  # [file name, bytes, rows] per shard; resume checks it
    planned_at: float = 0.0  # driver's time.time() when it planned this run: newer checkpoints are this run's


# ---------------------------------------------------------------- FLOPs / MFU
def step_flops(model, cfg: StageConfig, seq_lens: list[int], n_tiles: int, n_supervised: int) -> float:
    """Model FLOPs of one step: 6N (trained), 4N (frozen but back-propagated through), 2N (frozen, forward
    only) per token, causal attention 6*L*d*len^2 per sample in the LLM, 12*L*d*T^2 per tile in the ViT,
    and the LM head only on supervised tokens (the only logits the loss needs)."""
    inner = unwrap(model)
    core = inner.model
    tc, vc = inner.config.text_config, inner.config.vision_config
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    emb = inner.get_input_embeddings().weight.numel()
    llm_body = n(core.language_model) - emb
    f_llm = 6 if "llm" in cfg.trainable else 4
    f_vit = 6 if "vision" in cfg.trainable else 2
    tokens = sum(seq_lens)
    flops = f_llm * llm_body * tokens + f_llm / 2 * tc.num_hidden_layers * tc.hidden_size * sum(
        s * s for s in seq_lens
    )
    flops += f_llm * emb * n_supervised  # LM head (tied or not, V x d)
    vit_tokens = (vc.image_size[0] // vc.patch_size[0]) ** 2 + 1
    flops += f_vit * n(core.vision_tower) * n_tiles * vit_tokens
    flops += f_vit * 2 * vc.num_hidden_layers * vc.hidden_size * vit_tokens**2 * n_tiles
    flops += 6 * n(core.multi_modal_projector) * n_tiles * 256
    return float(flops)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------- setup
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_full_model(job: TrainJob):
    """The whole model on CPU in fp32 (master weights, whatever dtype the checkpoint holds), and its tokenizer."""
    if job.resume_from:
        model, tok = from_checkpoint(job.resume_from, dtype=torch.float32), load_tokenizer(job.resume_from)
        load_master_weights(job.resume_from, model)  # the exact fp32 weights, not the saved bf16 rounding
    else:
        model, tok = build_model(job.model, data_dir=job.data, seed=StageConfig(**job.stage).seed)
    return model.float(), tok  # build_model loads a checkpoint in its own dtype (bf16 for -hf ones)


def prepare_model(model, cfg: StageConfig, device: torch.device) -> None:
    """Stage freezing and drop path, the packed attention path, activation checkpointing."""
    apply_stage(model, cfg)
    mode = A.default_mode(device) if cfg.attention == "auto" else cfg.attention
    A.set_packed_attention(model, mode)
    set_grad_checkpointing(model, cfg)


def setup_model(job: TrainJob, cfg: StageConfig, device: torch.device):
    """Unsharded: the fp32 model with the stage applied, on `device`."""
    model, tok = load_full_model(job)
    prepare_model(model, cfg, device)
    model.to(device).train()
    return model, tok


def sharded_layers(model) -> list[torch.nn.Module]:
    """FSDP2 units: every ViT and LLM layer; the rest (embeddings, projector, norms, head) is the root unit."""
    return [*model.model.vision_tower.encoder.layer, *model.model.language_model.layers]


def checkpoint_source(job: TrainJob):
    """Where a sharded run reads its weights (a row-range reader), its config and tokenizer; None for a preset
    (random init: nothing to read) or a checkpoint whose tokenizer would grow its vocabulary."""
    from transformers import AutoConfig

    path = job.resume_from or (None if job.model in PRESETS else job.model)
    if path is None:
        return None
    config, tok = AutoConfig.from_pretrained(str(path)), load_tokenizer(path)
    if len(tok) > config.text_config.vocab_size:
        return None  # the embeddings grow (mean of the old rows): built whole on rank 0, see `load_full_model`
    config.image_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
    master = Path(path) / MASTER_FILE if job.resume_from else None
    if master is not None and master.exists():  # the exact fp32 weights, not the saved bf16 rounding
        source = MappingRows(torch.load(master, map_location="cpu", weights_only=True, mmap=True))
    else:
        source = CheckpointRows(path)
    return source, config, tok


def setup_sharded(job: TrainJob, cfg: StageConfig, device: torch.device):
    """FSDP2 without ever holding the full model: every rank builds the model on the meta device, shards it,
    allocates only its shards (`to_empty`) and reads only its shards' rows from the checkpoint (safetensors
    slices; torchtitan's meta-device init), counted in `model.elements_read`. Non-persistent buffers (RoPE
    inv_freq) are recomputed on every rank. A preset has no checkpoint: rank 0 initialises it and broadcasts it
    shard by shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    rank, _ = _dist()
    found = checkpoint_source(job)
    full = None
    if found is not None:
        source, config, tok = found
    else:
        full, tok = load_full_model(job) if rank == 0 else (None, None)
        box = [full.config.to_dict() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        config = InternVLConfig.from_dict(box[0])
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config).float()
    prepare_model(model, cfg, device)
    step_module = PackedLoss(model, cfg.ce_chunk)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if device.type == "cuda" and cfg.bf16 else {}
    for layer in sharded_layers(model):
        fully_shard(layer, **kw)
    fully_shard(step_module, **kw)
    step_module.to_empty(device=device)
    model.tie_weights()  # to_empty re-creates parameters: tie the LM head to the embeddings again
    fill_computed_buffers(model, device)
    if found is not None:
        model.elements_read = load_sharded(model, source)
    else:
        set_model_state_dict(
            model,
            full.state_dict() if rank == 0 else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
    del full
    model.train()
    return model, step_module, tok


def setup_training(job: TrainJob, cfg: StageConfig, device: torch.device):
    """(model, step module, tokenizer): PackedLoss(model), under DDP or FSDP2 when running distributed."""
    _, world = _dist()
    if world > 1 and cfg.fsdp:
        return setup_sharded(job, cfg, device)
    model, tok = setup_model(job, cfg, device)
    step_module = PackedLoss(model, cfg.ce_chunk)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, device_ids=ids)
    return model, step_module, tok


def local_param_numel(model) -> int:
    """Parameter elements this rank holds (its FSDP2 shards, or the whole model)."""
    return sum(
        (p.to_local() if type(p).__name__ == "DTensor" else p).numel()
        for p in {id(p): p for p in unwrap(model).parameters()}.values()
    )


# ---------------------------------------------------------------- the loop
class MetricsLog:
    """metrics.jsonl (rank 0), trimmed on resume so the file tells one continuous run."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            old = self.path.read_text().splitlines() if self.path.exists() else []
            kept = [ln for ln in old if ln.strip() and json.loads(ln)["step"] <= start_step]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, rec: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")


def plot_training(metrics_path: Path, report_dir: Path) -> None:
    """report/loss.png and report/throughput.png from metrics.jsonl (the training report's plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    stage = recs[0]["stage"] if recs else "?"
    report_dir.mkdir(parents=True, exist_ok=True)
    for key, label, name in (("loss", "loss", "loss.png"), ("tokens_per_s", "tokens/s", "throughput.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in recs if key in r], [r[key] for r in recs if key in r], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"stage {stage} training {label}")
        fig.tight_layout()
        fig.savefig(report_dir / name, dpi=100)
        plt.close(fig)


def _finite(x):
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def _all_reduce(values: list[float], device, op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _gather(obj) -> list:
    rank, world = _dist()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    weights: list[torch.Tensor]
    skipped: str = ""  # why the update was not applied ("" = applied)


def train_step(
    step_module, micro: list[dict], cfg: StageConfig, optimizer, scheduler, params, autocast
) -> StepResult:
    """One optimizer step over `micro` (prepared rows on the device): global-denominator weighted loss,
    backward per row (DDP syncs on the last), clip, AdamW, LR schedule.

    Never applies a NaN update: a window whose global denominator is 0 (no supervised token on any rank)
    runs no forward at all, and non-finite gradients (the global norm, so every rank agrees) are dropped
    before AdamW sees them. The schedule still advances: a step number stays a data position."""
    device = micro[0]["input_ids"].device
    targets = [shift_targets(b["labels"], b["cu_seqlens"]) for b in micro]
    weights = [token_weights(t, b["cu_seqlens"], cfg.loss_averaging) for t, b in zip(targets, micro)]
    denom = global_denominator(sum(w.sum() for w in weights), device).to(device)
    lr = scheduler.get_last_lr()[0]
    skipped, loss_sum, grad_norm = "", torch.zeros((), device=device), torch.zeros(())
    if float(denom) == 0.0:
        skipped = "no supervised tokens"  # same on every rank: the denominator is all-reduced
    else:
        for i, (b, t, w) in enumerate(zip(micro, targets, weights)):
            sync = i == len(micro) - 1 or not hasattr(step_module, "no_sync")
            with contextlib.nullcontext() if sync else step_module.no_sync(), autocast:
                loss = step_module(b, t, w) / denom
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            skipped = "non-finite gradients"
        else:
            optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(float(loss_sum), float(grad_norm), lr, weights, skipped)


def train(
    job: TrainJob,
    device: torch.device,
    batches: Callable[[int], Iterator[dict]],
    report: Callable[[dict, Path | None], None] | None = None,
) -> dict:
    """Run the stage from job.start_step. `batches(start_micro)` yields prepared rows of this rank's plan."""
    cfg = StageConfig(**job.stage)
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    model, step_module, tok = setup_training(job, cfg, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, job.total_steps)
    start, skipped_steps = 0, 0
    if job.resume_from:
        state = load_trainer_state(Path(job.resume_from))
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
        skipped_steps = int(state.get("extra", {}).get("skipped_steps", 0))  # the count is for the whole run
    out = Path(job.out)
    log = MetricsLog(out, start, rank == 0)
    peak = peak_flops(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.bf16
        else contextlib.nullcontext()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    it = batches(start * cfg.grad_accum)
    last_ckpt, rec = None, {}
    end = job.total_steps if job.stop_at_step is None else min(job.total_steps, job.stop_at_step)
    for step in range(start, end):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # drop path draws, same on resume
        micro = [to_device(next(it), device) for _ in range(cfg.grad_accum)]
        res = train_step(step_module, micro, cfg, optimizer, scheduler, params, autocast)
        loss_sum, grad_norm, lr, weights = res.loss, res.grad_norm, res.lr, res.weights
        if res.skipped:
            skipped_steps += 1
            if rank == 0:
                logger.warning("step %d skipped (%s): %s", step + 1, res.skipped, [b["sample_ids"] for b in micro])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0

        seq_lens = [int(x) for b in micro for x in (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).tolist()]
        n_tok, n_samp = sum(seq_lens), len(seq_lens)
        n_tiles = sum(b["num_tiles"] for b in micro)
        n_sup = sum(int((w > 0).sum()) for w in weights)
        flops = step_flops(model, cfg, seq_lens, n_tiles, n_sup) if peak else 0.0
        g_loss, g_tok, g_samp, g_flops, g_dt = _all_reduce([loss_sum, n_tok, n_samp, flops, dt], device)
        g_dt = g_dt / world  # mean step time
        rec = {
            "stage": cfg.stage,
            "step": step + 1,
            "loss": g_loss / world,  # DDP averages gradients over ranks: the loss is the mean of their shares
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(g_tok),
            "samples": int(g_samp),
            "tokens_per_s": g_tok / g_dt,
            "samples_per_s": g_samp / g_dt,
            "padding_fraction": 1.0 - g_tok / (world * cfg.grad_accum * cfg.context_length),
            "step_time_s": g_dt,
            "skipped": res.skipped,
            "skipped_steps": skipped_steps,
            "plan_index": [i for r in _gather([b["plan_index"] for b in micro]) for i in r],
            "sample_ids": [s for r in _gather([s for b in micro for s in b["sample_ids"]]) for s in r],
        }
        if peak:
            rec["mfu"] = g_flops / g_dt / (peak * world)
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        ckpt = None
        last = step + 1 == end
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            sd, osd = full_state_dict(model), optimizer_state(model, optimizer)
            if rank == 0:
                ckpt = save_checkpoint(
                    out,
                    model,
                    tok,
                    osd,
                    scheduler,
                    step + 1,
                    {
                        "step": step + 1,
                        "micro_batches_per_rank": (step + 1) * cfg.grad_accum,
                        "world_size": world,
                        "fingerprint": job.fingerprint,
                    },
                    extra={"skipped_steps": skipped_steps},
                    state_dict=sd,
                    dtype=cfg.save_dtype,
                )
                last_ckpt = ckpt
            if world > 1:
                dist.barrier()
        if (step + 1) % cfg.log_every == 0 or last:
            log.write(rec)
            if report:
                report(rec, ckpt)
    finished = end == job.total_steps
    summary = {
        "stage": cfg.stage,
        "steps": end,
        "total_steps": job.total_steps,
        "finished": finished,
        "final_loss": _finite(rec.get("loss")),  # null, not NaN: summary.json stays strict JSON
        "skipped_steps": skipped_steps,
        "resumed_from": job.resume_from,  # set by --resume, or by Ray Train restarting a failed group
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "out": str(out),
    }
    if rank == 0 and finished and last_ckpt is not None:
        write_final(out, last_ckpt, summary)
        plot_training(log.path, out / "report")
    return summary


# ---------------------------------------------------------------- entry points
def run_local(job: TrainJob, device: torch.device | None = None) -> dict:
    """The whole loop in this process, without Ray (world size 1)."""
    device = device or torch.device("cuda" if job.use_gpu and torch.cuda.is_available() else "cpu")
    seed = StageConfig(**job.stage).seed

    def batches(start_micro: int) -> Iterator[dict]:
        return iterate_local(job.files, job.counts, plan_items(job.plan[0], start_micro), seed)

    return train(job, device, batches)


def train_worker(config: dict) -> None:
    """Ray Train per-worker entry: this rank's plan dataset is `rank<r>`, prepared by Ray Data on CPUs."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    job = TrainJob(**config)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    planned_start = job.start_step * StageConfig(**job.stage).grad_accum
    latest = latest_checkpoint(Path(job.out))
    # Ray Train restarted the worker group after a worker died (FailureConfig): go on from the newest complete
    # checkpoint in OUT, exactly as --resume would. A checkpoint this run wrote counts even when the worker died
    # before Ray registered its report (then get_checkpoint() is None), so OUT decides, not Ray's record.
    if latest is not None and (
        ray.train.get_checkpoint() is not None or (latest / STATE_FILE).stat().st_mtime > job.planned_at
    ):
        job.resume_from = str(latest)

    def batches(start_micro: int) -> Iterator[dict]:
        # the driver built this dataset from the job's start on; after a restart skip what was trained
        skip = start_micro - planned_start
        for i, b in enumerate(shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2)):
            if i >= skip:
                yield {k: v[0] for k, v in b.items()}

    def report(metrics: dict, ckpt: Path | None) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        ray.train.report(scalars, checkpoint=Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    train(job, device, batches, report)


def job_dict(job: TrainJob) -> dict:
    return asdict(job)
