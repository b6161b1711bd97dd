"""The curate job's configuration: typed, validated, and importable without Ray, so a bad config is one
line on stderr before Ray (or datasketch) is imported (`ivl curate` checks it first)."""

from __future__ import annotations

import importlib
import os
import pkgutil
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import operators
from operators.base import REGISTRY, Operator, build_operator, resolve_operator


def bundled_config(name: str = "curate.yaml") -> str:
    """Path of a config shipped in the package (`jobs/configs/`), found as a package resource."""
    return str(resources.files("jobs").joinpath("configs", name))


DEFAULT_CONFIG = bundled_config()


class DedupConfig(BaseModel):
    """Global dedup stage of `ivl curate` (YAML key `dedup`)."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="remove rows whose normalised text + image bytes hash equal")
    minhash: bool = Field(True, description="remove near-duplicate texts (MinHash LSH)")
    threshold: float = Field(0.7, gt=0, lt=1, description="Jaccard threshold on word n-gram shingles")
    num_perm: int = Field(128, ge=2, description="MinHash permutations")
    ngram: int = Field(5, ge=1, description="tokens per shingle (words; CJK characters count one each)")
    seed: int = Field(1, description="MinHash permutation seed (datasketch's default 1)")
    hash: Literal["fast", "sha1"] = Field("fast", description="shingle hash: fast (numpy) or sha1 (datasketch)")
    # Candidates are verified, so a false positive costs one join row while a false negative loses a
    # duplicate: weigh misses 4:1. At 0.7/128 this gives 18 bands x 7 rows, catching 98.6% of pairs
    # at Jaccard 0.8 where datasketch's default 0.5/0.5 (14 x 9) catches 86.7%.
    false_positive_weight: float = Field(0.2, description="LSH band choice weight (datasketch's _optimal_param)")
    false_negative_weight: float = Field(0.8, description="LSH band choice weight (datasketch's _optimal_param)")
    keep: Literal["lowest_id", "highest_score"] = Field("lowest_id", description="survivor of a cluster")
    score_column: str | None = Field(None, description="column ranked by keep=highest_score, e.g. score_llm")
    text_only: bool = Field(
        False, description="MinHash ignores the images (before issue 12); default: a near-duplicate text is a "
                           "duplicate only when its rows carry the same image bytes (templated VQA keeps its rows)")
    image: bool = Field(False, description="also remove rows whose images are near-duplicates (pHash)")
    image_max_hamming: int = Field(4, ge=0, le=15, description="max differing pHash bits per image")
    rows_per_partition: int = Field(100_000, ge=1, description="key rows (id, hash, signature) per shuffle partition")
    join_rows_per_partition: int = Field(
        20_000, ge=1, description="full rows (with images) per partition when labels join back to rows"
    )
    local_components_max_edges: int = Field(
        0, ge=0, description="verified edges up to which one process runs union-find (0: always distributed)"
    )
    max_rounds: int = Field(40, ge=1, description="cap on large-star/small-star rounds")

    @model_validator(mode="after")
    def _score_needed(self) -> DedupConfig:
        if self.keep == "highest_score" and not self.score_column:
            raise ValueError("keep=highest_score needs score_column")
        return self


class DistillConfig(BaseModel):
    """The `distill:` block of a curate config: score a sample with the LLM, apply fastText to all rows."""

    model_config = ConfigDict(extra="forbid")

    sample_size: int = Field(2000, ge=4, description="pure-text rows scored by the LLM (train + held-out)")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of the scored sample kept out of training")
    seed: int = Field(0, description="seeds the sample, the train/held-out split and fastText's initialisation "
                                     "(its 12-thread training is not bit-reproducible)")
    edges: list[float] | None = Field(
        None, description="bucket edges on the LLM expected score; default: the llm_quality threshold")
    quantiles: list[float] | None = Field(
        None, description="instead of edges: edges at these quantiles of the sample's scores (e.g. [0.5])")
    epoch: int = Field(25, ge=1, description="fastText epochs")
    lr: float = Field(0.5, gt=0, description="fastText learning rate")
    word_ngrams: int = Field(2, ge=1, description="fastText word n-gram length")
    dim: int = Field(64, ge=2, description="fastText embedding size")
    min_count: int = Field(1, ge=1, description="fastText: words seen fewer times are dropped")
    bucket: int = Field(
        100_000, ge=1000, description="fastText n-gram hash buckets; model bytes ~ (words + bucket) * dim * 4")
    threshold: float = Field(
        0.5, ge=0, le=1, description="fasttext_quality: rows whose top-bucket probability is below this are flagged")
    action: Literal["reject", "review"] = Field("reject", description="fasttext_quality: what a flagged row does")
    batch_size: int = Field(32, ge=1, description="rows per LLM actor call while scoring the sample")
    actors: int = Field(1, ge=1, description="LLM actors scoring the sample")

    @model_validator(mode="after")
    def _one_bucketing(self) -> DistillConfig:
        if self.edges is not None and self.quantiles is not None:
            raise ValueError("give edges or quantiles, not both")
        if self.quantiles is not None and not all(0 < q < 1 for q in self.quantiles):
            raise ValueError("quantiles must lie strictly between 0 and 1")
        return self


def llm_stage_index(stages: list[dict[str, Any]]) -> int:
    """Position of the one teacher stage (an operator declaring `distill_teacher`, e.g. `llm_quality`) that
    distillation replaces (ValueError if not exactly one)."""
    load_operators()
    teachers = sorted(n for n, c in REGISTRY.items() if c.distill_teacher)
    found = [i for i, s in enumerate(stages) if _op_class(s.get("op")).distill_teacher]
    if len(found) != 1:
        raise ValueError(f"distill needs exactly one {' or '.join(teachers)} stage to replace, found {len(found)}")
    return found[0]


def _op_class(op) -> type[Operator]:
    try:
        return resolve_operator(op)
    except ValueError:
        return Operator  # an unknown operator is reported by load_curate_config, with its stage


class CurateConfig(BaseModel):
    """A curate job: operator stages in order, then optional global dedup."""

    model_config = ConfigDict(extra="forbid")
    stages: list[dict[str, Any]] = Field(
        default_factory=list, description="[{op: name or module:Class, name?: label, ...params}]")
    dedup: dict[str, Any] | None = Field(None, description="global dedup settings (pipeline.dedup_stage.DedupConfig)")
    batch_size: int = Field(256, description="rows per map_batches call")
    actors: int | None = Field(
        None, ge=1, description="actor pool size for operators that hold a model (null: sized from their resources)")
    cpu_models: Literal["tasks", "actors"] = Field(
        "tasks", description="CPU-only model holders (language_id, fasttext_quality): in the task segments, "
                             "loaded once per worker process, or in their own actor pools")
    distill: DistillConfig | None = Field(
        None, description="LLM on a sample + fastText on all rows instead of llm_quality on all rows")

    @model_validator(mode="after")
    def _distill_has_llm_stage(self) -> CurateConfig:
        if self.distill is not None:
            llm_stage_index(self.stages)
        return self


def operator_modules() -> list[str]:
    """The modules and packages of `operators/` that register operators (their source says `@register`),
    found on disk, so a new operator family needs no list here; helpers such as `operators.dedup` (which
    would import datasketch) are not imported."""
    found = []
    for info in pkgutil.iter_modules(operators.__path__):
        where = Path(info.module_finder.path) / info.name
        files = sorted(where.glob("*.py")) if info.ispkg else [where.with_suffix(".py")]
        if any("@register" in f.read_text() for f in files if f.exists()):
            found.append(f"operators.{info.name}")
    return found


def load_operators() -> None:
    """Import every operator module, so the registry knows every `op:` name."""
    for mod in operator_modules():
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but one of its imports does not
                raise


def load_curate_config(path: str | None) -> CurateConfig:
    """Read and validate the YAML; every stage is built once so a bad operator or threshold fails here."""
    path = path or DEFAULT_CONFIG
    if not os.path.exists(path) and os.sep not in path and os.path.exists(bundled_config(path)):
        path = bundled_config(path)  # a bundled config by name: `--config curate_llm.yaml`
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        cfg = CurateConfig(**raw)
    except OSError as e:
        raise FileNotFoundError(f"config {path}: {e.strerror}") from None
    except (yaml.YAMLError, ValidationError, TypeError) as e:
        raise ValueError(f"config {path}: {one_line(e)}") from None
    load_operators()
    names = set()
    for i, spec in enumerate(cfg.stages):
        try:
            build_operator(op_spec(spec))
        except (ValidationError, ValueError, TypeError) as e:
            raise ValueError(f"config {path}: stage {i} ({spec.get('op')}): {one_line(e)}") from None
        name = stage_name(spec)
        if name in names:
            raise ValueError(f"config {path}: two stages are named {name!r}; give one a `name:`")
        names.add(name)
    if cfg.dedup:
        try:
            DedupConfig(**cfg.dedup)
        except ValidationError as e:
            raise ValueError(f"config {path}: dedup: {one_line(e)}") from None
    return cfg


def one_line(e: Exception) -> str:
    """An exception as one line: a validation error's first field and message, else its first line."""
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def op_spec(spec: dict) -> dict:
    """A stage without its `name:` label: what the operator's constructor takes."""
    return {k: v for k, v in spec.items() if k != "name"}


def stage_name(spec: dict) -> str:
    """A stage's label: its `name:`, else the operator's name (a plugin's class name)."""
    return spec.get("name") or str(spec["op"]).rpartition(":")[2]
