"""FSDP2 that shards (issue 13 item 3): two CPU ranks over gloo, no Ray. Each rank builds the model on the
meta device, shards it, holds only its shards and reads only its shards' rows from the checkpoint's
safetensors; the weights it ends with are exactly the checkpoint's (bf16 -> fp32 masters)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest_train import small_packed_dataset

pytestmark = pytest.mark.slow
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, src: str, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from model.build import from_checkpoint
        from train.checkpoint import full_state_dict
        from train.data import iterate_local, list_shards, plan_items, shard_row_counts
        from train.loop import TrainJob, local_param_numel, setup_training, train_step
        from train.stages import build_optimizer, build_scheduler, stage_config

        cfg = stage_config("2", {"fsdp": True, "warmup_steps": 0, "drop_path": 0.0})
        files = [str(f) for f in list_shards(data)]
        job = TrainJob(stage=cfg.model_dump(), model=src, data=data, out=out, files=files,
                       counts=shard_row_counts(files), plan=[[0], [1]], total_steps=1)
        model, step_module, _ = setup_training(job, cfg, torch.device("cpu"))
        ref = from_checkpoint(src, dtype=torch.float32)  # the test's own unsharded copy, for comparison
        total = sum(p.numel() for p in {id(p): p for p in ref.parameters()}.values())
        local = local_param_numel(model)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        assert abs(local / total - 1 / WORLD) < 0.02, f"rank {rank} holds {local} of {total} elements"
        read = model.elements_read  # parameter rows read from disk by this rank (+ persistent buffers)
        assert abs(read / total - 1 / WORLD) < 0.02, f"rank {rank} read {read} of {total} elements"
        full = full_state_dict(model)
        if rank == 0:
            expected = ref.state_dict()
            assert full.keys() == expected.keys()
            for k, v in expected.items():
                assert torch.equal(full[k], v), k  # loaded sharded, bit-exact
        bufs = dict(ref.named_buffers())
        for name, b in model.named_buffers():  # RoPE inv_freq: not in the state dict, broadcast from rank 0
            assert torch.equal(b, bufs[name]), name
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, 1)
        params = [p for p in model.parameters() if p.requires_grad]
        item = next(iterate_local(files, job.counts, plan_items(job.plan[rank], 0, rank, WORLD), 0, prefetch=0))
        from train.data import to_device

        res = train_step(step_module, [to_device(item, torch.device("cpu"))], cfg, opt, sched, params,
                         torch.autocast("cpu", enabled=False))
        assert res.skipped == "" and res.loss > 0
        assert local_param_numel(model) == local  # still sharded after a step
    finally:
        dist.destroy_process_group()


def test_fsdp2_builds_on_meta_and_holds_one_shard_per_rank(train_tok, tmp_path):
    from model.build import from_preset

    src = tmp_path / "src"
    m = from_preset("tiny", train_tok, seed=3).to(torch.bfloat16)  # a bf16 checkpoint, as -hf ones are
    m.save_pretrained(src)
    train_tok.save_pretrained(src)
    data = small_packed_dataset(tmp_path / "packed", train_tok, n_rows=2, per_row=2, max_tiles=1)
    mp.spawn(_rank, args=(_free_port(), str(src), str(data), str(tmp_path / "out")), nprocs=WORLD, join=True)
