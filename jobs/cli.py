"""The `ivl` command line: one sub-command per job (README.md, "Jobs"; the contract in ARCHITECTURE.md).

Jobs parse flags, start Ray and call library code; the logic lives in pipeline/, operators/, train/.
Exit status: 0 done; 2 with one clear line on bad configuration or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.io import DEFAULT_ROWS_PER_SHARD
from pipeline.readers import INPUT_FORMATS
from pipeline.records import DEFAULT_INSTRUCTION


class UsageError(Exception):
    """Bad configuration or input, reported as one line."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster to join (default: an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded local Ray")


def _done(summary_path: str, summary: dict, keys=("input", "kept", "rejected", "review")) -> None:
    from pipeline.html_report import write_job_report

    counts = ", ".join(f"{k} {summary[k]}" for k in keys if k in summary)
    page = write_job_report(os.path.dirname(os.path.dirname(summary_path)))
    print(f"{counts}\nreport: {summary_path}\npage: {page}")


def cmd_ingest(a) -> None:
    from pipeline.ingest import plan_ingest, run_ingest
    from pipeline.io import check_readable

    # sources, layouts and flags are checked before Ray is imported, so an error is the one line printed
    plan = plan_ingest(a.src, a.image_root, a.rows_per_shard, input_format=a.input_format, encoding=a.encoding,
                       instruction=a.caption_instruction, remote_images=a.remote_images)
    if a.fail_fast:
        check_readable(sorted({t["entry"]["path"] for t in plan.tasks if t["entry"]["kind"] in ("tar", "parquet")}))
    from pipeline.session import ray_session

    with ray_session(a.address, a.num_cpus):
        s = run_ingest(plan, a.out, fmt=a.format, rows_per_shard=a.rows_per_shard)
    _done(os.path.join(a.out, "report", "summary.json"), s)


def cmd_curate(a) -> None:
    from pipeline.curate_config import load_curate_config
    from pipeline.io import check_readable, list_input_shards

    shards = list_input_shards(a.inp)  # a missing or empty --in fails first, before anything heavy is imported
    cfg = load_curate_config(a.config)  # a bad config too: pipeline.curate_config imports no Ray
    from pipeline.curate import run_curate
    from pipeline.session import ray_session

    if a.fail_fast:
        check_readable(shards)
    with ray_session(a.address, a.num_cpus):
        s = run_curate(a.inp, a.out, cfg, rows_per_shard=a.rows_per_shard, fmt=a.format)
    _done(os.path.join(a.out, "report", "summary.json"), s)


def check_pack_args(a) -> None:
    """Before Ray (and transformers) load: the input's shards, the tokenizer path and the budgets."""
    from pipeline.io import list_input_shards

    list_input_shards(a.inp)
    # a hub name is `org/name`; anything else with a path shape must exist here
    looks_local = a.tokenizer.endswith(".gguf") or a.tokenizer.startswith((".", "/", "~")) or a.tokenizer.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(a.tokenizer)):
        raise UsageError(f"tokenizer {a.tokenizer} does not exist")
    for flag, v in (("--max-tokens", a.max_tokens), ("--max-tiles", a.max_tiles), ("--buffer-size", a.buffer_size),
                    ("--rows-per-shard", a.rows_per_shard)):
        if v is not None and v <= 0:
            raise UsageError(f"{flag} must be positive, got {v}")


def cmd_pack(a) -> None:
    check_pack_args(a)
    from pipeline.pack_job import run_pack
    from pipeline.session import ray_session

    with ray_session(a.address, a.num_cpus):
        s = run_pack(a.inp, a.out, a.tokenizer, max_tokens=a.max_tokens, max_tiles=a.max_tiles,
                     buffer_size=a.buffer_size, mode=a.mode, seed=a.seed, rows_per_shard=a.rows_per_shard)
    _done(os.path.join(a.out, "report", "summary.json"), s, ("samples", "packs", "token_fill", "rejected"))


def _composed_model(a) -> str:
    """--vit/--llm: assemble the model into OUT/_composed (kept on --resume) and train it as --model."""
    from model.build import compose_checkpoint

    if not (a.vit and a.llm):
        raise UsageError("--vit and --llm go together (progressive scaling)")
    if a.model:
        raise UsageError("give --model, or --vit and --llm, not both")
    if a.stage != "1":
        raise UsageError("progressive scaling trains a new projector first: use --stage 1")
    return str(compose_checkpoint(a.vit, a.llm, os.path.join(a.out, "_composed"), data_dir=a.data, reuse=a.resume))


def cmd_train(a) -> None:
    from train.launcher import run_train

    if a.vit or a.llm:  # progressive scaling (InternVL 2.5 §3.3): ViT of a stage-1.5 run + a larger LLM
        a.model = _composed_model(a)
    elif not a.model:
        raise UsageError("train needs --model, or --vit and --llm")
    flags = {"grad_checkpointing": a.grad_checkpointing, "save_dtype": a.save_dtype}
    s = run_train(stage=a.stage, data=a.data, model=a.model, out=a.out, resume=a.resume, workers=a.workers,
                  use_gpu=a.gpu, config=a.config, max_steps=a.max_steps, address=a.address, overrides=flags)
    print(f"trained: {json.dumps(s, default=str)[:300]}\ncheckpoint: {a.out}")


def cmd_convert(a) -> None:
    from model.convert import convert_checkpoint

    out = convert_checkpoint(a.src, a.dst, a.from_format, a.to_format)
    print(f"converted {a.src} ({a.from_format}) -> {out} ({a.to_format})")


def cmd_fasttext_train(a) -> None:
    from operators.fasttext_ops import label_rows_from_dirs, train_quality_classifier

    texts, labels = label_rows_from_dirs(a.inp, a.label_column)
    path = train_quality_classifier(texts, labels, a.out, epoch=a.epoch)
    print(f"trained on {len(texts)} rows: {path}")


def cmd_demo(a) -> None:
    from jobs.demo import run_demo

    run_demo(a.out, address=a.address, steps=a.steps)


def cmd_review(a) -> None:
    if not os.path.isdir(os.path.join(a.inp, "review")):
        raise UsageError(f"{a.inp} has no review/ folder: give a curate job's OUT")
    if a.action == "apply":
        from pipeline.review import apply_decisions, decisions_path

        if not a.out:
            raise UsageError("review apply needs --out DIR (the run itself is left as it was)")
        files = a.decisions or [decisions_path(a.inp)]
        for f in files:
            if not os.path.isfile(f):
                raise UsageError(f"decisions file {f} does not exist")
        s = apply_decisions(a.inp, files, a.out)
        _done(os.path.join(a.out, "report", "summary.json"), s)
        return
    from pipeline.review_server import serve

    httpd, url = serve(a.inp, host=a.host, port=a.port, decisions_file=(a.decisions or [None])[0],
                       reviewer=a.reviewer)
    print(f"reviewing {a.inp}: {url}  (decisions: {httpd.app.path}; Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def cmd_report(a) -> None:
    from pipeline.html_report import write_chain_report, write_job_report
    from pipeline.io import isdir

    for d in a.inp:
        if not isdir(d):  # a job's OUT on any storage
            raise UsageError(f"{d} is not a job's OUT folder")
    if len(a.inp) == 1 and not a.out:
        print(f"page: {write_job_report(a.inp[0])}")
        return
    names = {}
    for d in a.inp:
        name = os.path.basename(os.path.abspath(d))
        names[name if name not in names else d] = d
    print(f"page: {write_chain_report(a.out or a.inp[-1], names)}")


def cmd_mix(a) -> None:
    from pipeline.mix import load_targets, plan_datasets, run_mix
    from pipeline.session import ray_session

    if not os.path.exists(a.tokenizer):
        raise UsageError(f"tokenizer {a.tokenizer} does not exist")
    targets = load_targets(a.targets, a.preset)
    datasets = plan_datasets(a.meta, targets, a.tokenizer)  # bad meta or targets fail here, before Ray starts
    with ray_session(a.address, a.num_cpus):
        s = run_mix(a.meta, targets, a.tokenizer, a.out, cache=a.cache, datasets=datasets)
    for c, v in s["categories"].items():
        print(f"{c:>16}: target {v['target_share']:.3f}  planned {v['achieved_share']:.3f}  ({v['status']})")
    print(f"planned {s['planned_tokens']:,} tokens of {s['budget_tokens']:,} ({100 * s['budget_error']:+.2f}%)\n"
          f"planned meta: {a.out}")


def cmd_export(a) -> None:
    from pipeline.export import check_export_args, run_export

    check_export_args(a.inp, a.format)  # before Ray starts: one line on a missing input or unknown format
    from pipeline.session import ray_session

    with ray_session(a.address, a.num_cpus):
        s = run_export(a.inp, a.out, a.format, absolute_paths=a.absolute_paths)
    where = os.path.join(a.out, "meta.json") if a.format == "internvl" else a.out
    print(f"input {s['input']}, exported {s['exported']} (+{s['repeat_copies']} repeat_time copies made by the meta)\n"
          f"{a.format}: {where}\nreport: {os.path.join(a.out, 'report', 'summary.json')}")


def cmd_submit(a) -> None:
    from jobs.submit import submit

    sys.exit(submit(a.command, address=a.address, wait=not a.no_wait))


def cmd_jobs(a) -> None:
    from jobs.submit import jobs_command

    jobs_command(a.action, a.job_id, address=a.address)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ivl", description="InternVL 2.5 data pipeline on Ray")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("ingest", help="raw sources -> canonical shards")
    p.add_argument("src", nargs="+", help="InternVL meta .json, .jsonl, LLaVA .json, .parquet, WebDataset .tar[.gz], "
                   "or folders of them")
    p.add_argument("--out", required=True)
    p.add_argument("--input-format", default="auto", choices=list(INPUT_FORMATS),
                   help="layout of the sources (default: detected from each file)")
    p.add_argument("--output-format", "--format", dest="format", choices=["parquet", "webdataset"], default="parquet",
                   help="shards to write (--format is the old spelling)")
    p.add_argument("--image-root", default=None, help="image folder for bare .jsonl/.json/.parquet sources")
    p.add_argument("--encoding", default=None,
                   help="text encoding of the sources (default UTF-8: invalid bytes are rejected as bad_encoding)")
    p.add_argument("--caption-instruction", default=DEFAULT_INSTRUCTION,
                   help="the question a caption answers (img2dataset .txt captions)")
    p.add_argument("--remote-images", action="store_true",
                   help="read s3:// gs:// https:// images through pyarrow.fs/fsspec (else rejected as remote_image)")
    p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at start on a truncated/corrupt shard instead of reporting it as a rejected row")
    _add_common(p)
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("curate", help="filters -> kept/ rejected/ review/")
    p.add_argument("--in", dest="inp", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="YAML (default: jobs/configs/curate.yaml)")
    p.add_argument("--format", choices=["parquet", "webdataset"], default="parquet")
    p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at start on a truncated/corrupt shard instead of reporting it as a rejected row")
    _add_common(p)
    p.set_defaults(fn=cmd_curate)

    p = sub.add_parser("pack", help="tokenize and pack under token/tile budgets")
    p.add_argument("--in", dest="inp", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, hub name or .gguf file")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--max-tiles", type=int, default=48)
    p.add_argument("--buffer-size", type=int, default=None)
    p.add_argument("--mode", choices=["ivl", "internvl"], default="ivl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-shard", type=int, default=256, help="packs per output file")
    _add_common(p)
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("train", help="one InternVL 2.5 stage on packed shards (Ray Train)")
    p.add_argument("--stage", required=True, choices=["1", "1.5", "2"])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None, help="checkpoint folder or preset (tiny, 1b, 2b, 4b, 8b)")
    p.add_argument("--vit", default=None, help="progressive scaling: a stage-1.5 run (or checkpoint) whose ViT is kept")
    p.add_argument("--llm", default=None, help="progressive scaling: the LLM (HF causal-LM dir, InternVL checkpoint "
                   "or preset); a new projector joins them")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--config", default=None, help="YAML overriding the stage preset")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing (default on: ViT always, LLM in stages 1.5 and 2)")
    p.add_argument("--save-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of saved weights (default bfloat16; training keeps fp32 masters)")
    _add_common(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("convert", help="checkpoint layouts: OpenGVLab InternVLChatModel <-> HF InternVL")
    p.add_argument("--from", dest="from_format", required=True, choices=["opengvlab", "hf"])
    p.add_argument("--to", dest="to_format", required=True, choices=["hf", "opengvlab"])
    p.add_argument("src", metavar="IN", help="checkpoint folder in the --from layout")
    p.add_argument("dst", metavar="OUT", help="folder to write in the --to layout")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("fasttext-train", help="train a fastText quality classifier from labelled shards")
    p.add_argument("--in", dest="inp", required=True, help="a curate OUT (kept vs rejected) or shards")
    p.add_argument("--label-column", required=True, help="column whose values are labels, or _split")
    p.add_argument("--out", required=True)
    p.add_argument("--epoch", type=int, default=10)
    p.set_defaults(fn=cmd_fasttext_train)

    p = sub.add_parser("demo", help="the whole chain on the bundled sample")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--steps", type=int, default=3, help="stage-1 training steps")
    p.add_argument("--address", default=None)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("review", help="manual review of a curate run's review/ rows (web app), then apply")
    p.add_argument("action", choices=["serve", "apply"])
    p.add_argument("--in", dest="inp", required=True, help="a curate job's OUT")
    p.add_argument("--decisions", action="append", default=None,
                   help="decisions file(s) (default: IN/review/decisions.jsonl); apply merges several, latest wins")
    p.add_argument("--out", default=None, help="apply: the new run folder")
    p.add_argument("--host", default="127.0.0.1", help="serve: address to bind (default 127.0.0.1 only)")
    p.add_argument("--port", type=int, default=0, help="serve: port (0 = a free one)")
    p.add_argument("--reviewer", default="", help="serve: a name written with each decision")
    p.set_defaults(fn=cmd_review)

    p = sub.add_parser("report", help="write report/index.html for a job's OUT, or one page for a chain")
    p.add_argument("--in", dest="inp", nargs="+", required=True, help="job OUT folders, in chain order")
    p.add_argument("--out", default=None, help="folder for the chain page (default: the last job's OUT)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("mix", help="token shares per category -> repeat_time per dataset in a meta JSON")
    p.add_argument("--meta", required=True, help="InternVL meta JSON (each entry's `category` or targets' category_of)")
    p.add_argument("--targets", required=True, help="MIX.yaml: budget_tokens, categories: {name: share}, limits")
    p.add_argument("--tokenizer", required=True, help="the tokenizer ivl pack will use (folder or .gguf)")
    p.add_argument("--out", required=True, help="the planned meta JSON to write")
    p.add_argument("--preset", default=None, help="a named preset of the targets file (e.g. a training stage)")
    p.add_argument("--cache", default=None, help="token-count cache (default: beside --out)")
    _add_common(p)
    p.set_defaults(fn=cmd_mix)

    p = sub.add_parser("export", help="canonical shards -> InternVL meta+JSONL+images, LLaVA JSON, or HF Parquet")
    p.add_argument("--in", dest="inp", required=True, help="an ingest/curate OUT (its kept/) or a folder of shards")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["internvl", "llava", "parquet"], default="internvl")
    p.add_argument("--absolute-paths", action="store_true",
                   help="internvl: absolute root/annotation paths in meta.json (InternVL opens them from its cwd)")
    _add_common(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("submit", help="run an ivl command as a Ray job on a cluster")
    p.add_argument("--address", default=None, help="dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- ivl <job> ...")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("jobs", help="list Ray jobs, or show one's status/logs, or stop it")
    p.add_argument("action", nargs="?", default="list", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", default=None)
    p.set_defaults(fn=cmd_jobs)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (UsageError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        # pipeline.readers.ConfigError and pydantic's ValidationError are ValueErrors
        msg = str(e).strip().splitlines()
        print(f"ivl {args.cmd}: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
