"""The curate job's configuration: typed, validated, and importable without Ray, so a bad config is one
line on stderr before Ray (or datasketch) is imported (`ivl curate` checks it first)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import operators
from operators.base import REGISTRY, Operator, resolve_operator


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
    local_components_max_edges: int = Field(
        200_000, ge=0, description="verified edges up to which one task runs union-find (tens of MB in Python; more "
                                   "edges: distributed large/small-star rounds; 0: always distributed)"
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


@dataclass(frozen=True, eq=False)
class Stage:
    """One configured operator stage, resolved once when the config loads: what the planner, the workers, the
    report and distillation get (picklable: its class and params travel by reference to their modules)."""

    label: str  # the stage's `name:`, else the operator's name: keys its reasons, seconds and report items
    op: str  # the operator as written: a registered name or `module:Class`
    cls: type[Operator]
    params: BaseModel | None  # the operator's validated `Params`; None: a plugin without one takes `kwargs`
    kwargs: tuple[tuple[str, Any], ...] = ()
    needs_model: bool = False  # declared by the operator: setup() loads a model
    num_gpus: float = 0.0  # GPUs one instance needs (an LLM judge's from its backend settings)
    num_cpus: float = 1.0
    key: str = field(default="", repr=False)  # the resolved stage as canonical JSON: equality and hash

    def build(self) -> Operator:
        """A fresh operator on the resolved settings (cheap: models load in its setup())."""
        return self.cls(self.params) if self.params is not None else self.cls(**dict(self.kwargs))

    def spec(self) -> dict[str, Any]:
        """The stage as a YAML mapping: `op`, `name` when it is not the default label, the settings given."""
        given = self.params.model_dump(mode="json", exclude_unset=True) if self.params is not None else dict(self.kwargs)
        named = {"name": self.label} if self.label != default_label(self.op) else {}
        return {"op": self.op, **named, **given}

    def __eq__(self, other) -> bool:
        return isinstance(other, Stage) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def default_label(op: str) -> str:
    """A stage's label without a `name:`: the operator's name (a plugin's class name)."""
    return str(op).rpartition(":")[2]


def resolve_stage(spec: dict[str, Any]) -> Stage:
    """A YAML stage (`{op: <name or module:Class>, name?: <label>, <param>: <value>, ...}`) validated into a
    Stage: the operator's `Params` checked once, the operator built once to read what it declares
    (ValueError / ValidationError on a bad stage)."""
    if not isinstance(spec, dict) or "op" not in spec:
        raise ValueError(f"a stage is a mapping with an `op:`, got {spec!r}")
    load_operators()
    given = {k: v for k, v in spec.items() if k not in ("op", "name")}
    cls = resolve_operator(spec["op"])
    params = cls.Params(**given) if cls.Params is not None else None
    kwargs = () if params is not None else tuple(sorted(given.items()))
    op = cls(params) if params is not None else cls(**given)  # its own checks (e.g. structure's tokenizer)
    resolved = {"op": str(spec["op"]), "name": spec.get("name") or default_label(spec["op"]),
                "params": params.model_dump(mode="json") if params is not None else dict(kwargs)}
    return Stage(label=resolved["name"], op=resolved["op"], cls=cls, params=params, kwargs=kwargs,
                 needs_model=bool(op.needs_model), num_gpus=float(op.num_gpus or 0), num_cpus=float(op.num_cpus),
                 key=json.dumps(resolved, sort_keys=True, default=str))


def resolve_stages(specs: list[dict[str, Any]], where: str = "") -> list[Stage]:
    """Every stage resolved, one line naming the first bad one (`stage <i> (<op>): <why>`) and two stages
    that share a label."""
    out, labels = [], set()
    for i, spec in enumerate(specs):
        if isinstance(spec, Stage):
            stage = spec
        else:
            try:
                stage = resolve_stage(spec)
            except (ValidationError, ValueError, TypeError) as e:
                op = spec.get("op") if isinstance(spec, dict) else None
                raise ValueError(f"{where}stage {i} ({op}): {one_line(e)}") from None
        if stage.label in labels:
            raise ValueError(f"{where}two stages are named {stage.label!r}; give one a `name:`")
        labels.add(stage.label)
        out.append(stage)
    return out


def llm_stage_index(stages: list[Stage]) -> int:
    """Position of the one teacher stage (an operator declaring `distill_teacher`, e.g. `llm_quality`) that
    distillation replaces (ValueError if not exactly one)."""
    load_operators()
    teachers = sorted(n for n, c in REGISTRY.items() if c.distill_teacher)
    found = [i for i, s in enumerate(stages) if s.cls.distill_teacher]
    if len(found) != 1:
        raise ValueError(f"distill needs exactly one {' or '.join(teachers)} stage to replace, found {len(found)}")
    return found[0]


class CurateConfig(BaseModel):
    """A curate job: operator stages in order, then optional global dedup."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    stages: list[Stage] = Field(
        default_factory=list, description="[{op: name or module:Class, name?: label, ...params}], resolved into Stages")
    dedup: DedupConfig | None = Field(None, description="global dedup settings (null or {}: no dedup)")
    batch_size: int = Field(256, description="rows per map_batches call")
    actors: int | None = Field(
        None, ge=1, description="actor pool size for operators that hold a model (null: sized from their resources)")
    cpu_models: Literal["tasks", "actors"] = Field(
        "tasks", description="CPU-only model holders (language_id, fasttext_quality): in the task segments, "
                             "loaded once per worker process, or in their own actor pools")
    distill: DistillConfig | None = Field(
        None, description="LLM on a sample + fastText on all rows instead of llm_quality on all rows")

    @field_validator("stages", mode="before")
    @classmethod
    def _resolve(cls, specs):
        return resolve_stages(specs) if isinstance(specs, list) else specs

    @field_validator("dedup", mode="before")
    @classmethod
    def _empty_is_off(cls, v):
        return None if v == {} else v  # `dedup: {}` has always meant no dedup

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
    except OSError as e:
        raise FileNotFoundError(f"config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path}: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: a mapping of settings, got {type(raw).__name__}")
    if isinstance(raw.get("stages"), list):  # one line naming the bad stage, before the other settings
        raw = {**raw, "stages": resolve_stages(raw["stages"], f"config {path}: ")}
    if isinstance(raw.get("dedup"), dict):
        try:
            raw = {**raw, "dedup": DedupConfig(**raw["dedup"]) if raw["dedup"] else None}
        except ValidationError as e:
            raise ValueError(f"config {path}: dedup: {one_line(e)}") from None
    try:
        return CurateConfig(**raw)
    except (ValidationError, TypeError) as e:
        raise ValueError(f"config {path}: {one_line(e)}") from None


def one_line(e: Exception) -> str:
    """An exception as one line: a validation error's first field and message, else its first line."""
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

