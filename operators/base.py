"""The operator contract: a plain class with `setup()` and a call over a pyarrow.Table.

An operator never starts Ray, parses flags or writes files (ARCHITECTURE.md). It returns a `Verdict`:
per row a decision (KEEP / REVIEW / REJECT), the rule that fired (the runner prefixes the operator
name, giving `reject_reason = "<operator>:<rule>"`), and score columns to keep on every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

KEEP, REVIEW, REJECT = 0, 1, 2


@dataclass
class Verdict:
    decision: np.ndarray  # int8 per row: KEEP, REVIEW or REJECT
    rule: list[str]  # per row: the rule that fired ("" when kept)
    columns: dict[str, Any] = field(default_factory=dict)  # added columns, e.g. score_<name>, lang

    @classmethod
    def keep_all(cls, n: int, columns: dict[str, Any] | None = None) -> Verdict:
        return cls(np.zeros(n, dtype=np.int8), [""] * n, columns or {})

    def flag(self, row: int, rule: str, decision: int) -> None:
        """Record a hit; the strongest decision wins and the first rule at that strength is kept."""
        if decision > self.decision[row]:
            self.decision[row] = decision
            self.rule[row] = rule


class Operator:
    """Base class. Subclasses set `name`, declare `Params` (a pydantic model) and implement `__call__`."""

    name: ClassVar[str] = "operator"
    Params: ClassVar[type[BaseModel] | None] = None  # the typed settings (extra="forbid"); None: a plugin's own kwargs
    needs_model: ClassVar[bool] = False  # True: setup() loads a model, once per worker process or actor
    num_gpus: ClassVar[float] = 0.0  # GPUs one instance needs: > 0 puts it in an actor pool sized by the GPUs
    num_cpus: ClassVar[float] = 1.0  # CPUs one instance uses (an actor pool of a CPU model holder is sized by it)
    task: ClassVar[str] = ""  # a judge's score task: the LLM report draws its `score_<task>` columns
    distill_teacher: ClassVar[bool] = False  # distillation may replace this stage by a student classifier

    def __init__(self, params: BaseModel | None = None, **kwargs):
        """`params`: validated settings (a stage resolved at config load, pipeline/curate_config.py:Stage), taken
        as they are; else keyword arguments, validated here."""
        self.params = params if params is not None else self.Params(**kwargs)

    def setup(self) -> None:  # load models once per worker
        pass

    def __call__(self, table: pa.Table) -> Verdict:
        raise NotImplementedError

    def thresholds(self) -> dict[str, list[float]]:
        """Score column -> the values this operator cuts at, drawn on the report's histogram of that column
        (every float `score_*` column an operator adds gets a fixed-bin histogram in the markers)."""
        return {}


REGISTRY: dict[str, type[Operator]] = {}


def register(cls: type[Operator]) -> type[Operator]:
    REGISTRY[cls.name] = cls
    return cls


def conversation_texts(table: pa.Table, which: str = "gpt") -> list[str]:
    """Per row, the text of the chosen turns joined by newlines: which = gpt | human | all."""
    out = []
    for conv in table.column("conversations").to_pylist():
        turns = conv or []
        if which == "all":
            parts = [t["value"] or "" for t in turns]
        else:
            parts = [t["value"] or "" for t in turns if t["from"] == which]
        out.append("\n".join(parts))
    return out


def resolve_operator(name: str) -> type[Operator]:
    """A registered name (`text_rules`) or a plugin given as `package.module:ClassName`."""
    if isinstance(name, str) and ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import operator {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise ValueError(f"{name!r} is not an Operator subclass")
        return cls
    if name not in REGISTRY:
        raise ValueError(f"unknown operator {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_operator(spec: dict) -> Operator:
    """Build one operator from a YAML stage: `{op: <name or module:Class>, <param>: <value>, ...}`.

    Operator classes validate their own keyword arguments (a nested pydantic `Params` model with
    extra="forbid"), so a misspelt threshold fails at start with one clear line."""
    spec = dict(spec)
    return resolve_operator(spec.pop("op", None))(**spec)
