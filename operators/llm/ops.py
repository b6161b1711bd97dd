"""The LLM filters: `llm_quality` and `llm_repetition` (InternVL 2.5 §4.3, "Data filtering").

- llm_quality: pure-text rows only (the paper scores pure text); the domain prompt comes from the
  row's source/category through the `domains` map. Expected score < threshold (7) is rejected.
- llm_repetition: text and multimodal rows (multimodal rows get the prompt variant that says
  images are present); sources listed in `exempt_sources` are skipped (the paper exempts
  high-quality academic datasets). Expected score <= threshold (3) is rejected.

A band of +-`review_band` around the threshold goes to review instead (the expected score of a
0-10 distribution is uncertain near the cut), so `review_band: 0` reproduces the paper's rule.
A row whose scoring fails goes to review with rule "error" and the message in `llm_<task>_error`;
a row whose probability mass on the score tokens is below `min_mass` goes to review with rule
"low_mass" (the model was not answering with a score, so its distribution means little); rows an
operator does not score (skipped) are kept with null scores. A backend that fails as a whole (engine
dead, server down, bad key) raises: the shard fails, writes no marker, and a rerun scores it.

Columns (every row, null where not scored): `score_<task>` expected score, `score_<task>_argmax`,
`dist_<task>` the distribution over 0..10 (list<float>), `llm_<task>_mass` the unnormalised
probability on valid scores, `llm_<task>_approx` (null when the distribution is exact, else what
approximated it, e.g. a top-5 cut of a server), `llm_<task>_error` (null when fine),
`llm_<task>_injection` (null, or the kinds of text aimed at the judge that were cut out of what it read:
operators/llm/injection.py; such a row goes to review with rule "injection" unless its score rejects it);
llm_quality adds `llm_quality_domain`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..base import REJECT, REVIEW, Operator, Verdict, register
from .backends import BackendConfig, ScoringBackend, make_backend
from .injection import neutralise
from .prompts import DOMAINS, quality_template, render_sample, repetition_template, resolve_domain
from .scoring import ScoreResult


def decide(
    scores: np.ndarray,
    errors: list[str | None],
    threshold: float,
    band: float,
    inclusive: bool,
    reject_rule: str,
    mass: np.ndarray | None = None,
    min_mass: float = 0.0,
) -> Verdict:
    """Decisions from expected scores: reject below the band, review inside it, keep above.

    `inclusive` makes the lower edge rejecting (repetition: score <= 3 is rejected); NaN scores
    without an error are rows the operator skipped (kept); mass below `min_mass` -> review."""
    n = len(scores)
    v = Verdict.keep_all(n)
    lo, hi = threshold - band, threshold + band
    for i in range(n):
        if errors[i] is not None:
            v.flag(i, "error", REVIEW)
            continue
        s = scores[i]
        if math.isnan(s):
            continue
        if mass is not None and mass[i] < min_mass:
            v.flag(i, "low_mass", REVIEW)
            continue
        if (s <= lo) if inclusive else (s < lo):
            v.flag(i, reject_rule, REJECT)
        elif band > 0 and ((s <= hi) if inclusive else (s < hi)):
            v.flag(i, "near_threshold", REVIEW)
    return v


class JudgeParams(BaseModel):
    """What both LLM filters take: the model, the review band, the mass floor and the injection policy."""

    model_config = ConfigDict(extra="forbid")

    backend: BackendConfig = Field(default_factory=BackendConfig, description="model and how to run it")
    review_band: float = Field(
        0.5, ge=0, description="scores within +- this of the threshold go to review"
    )
    min_mass: float = Field(
        0.05, ge=0, le=1, description="rows whose probability on the score tokens is below this go to review"
    )
    injection: Literal["review", "off"] = Field(
        "review",
        description="text aimed at the judge (chat-control tokens, instructions to a grader): cut out of what the "
                    "judge reads and the row sent to review (rule injection); off: the sample is judged as it is",
    )


class LLMScoreOperator(Operator):
    """Shared body: plan which rows get which prompt, score them, build columns and decisions."""

    needs_model: ClassVar[bool] = True
    reject_rule: ClassVar[str] = ""
    inclusive: ClassVar[bool] = False

    def __init__(self, params: JudgeParams | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.num_gpus = self.params.backend.gpus_per_actor()  # per actor of the runner's pool
        self.backend: ScoringBackend | None = None

    def setup(self) -> None:
        if self.backend is None:
            self.backend = make_backend(self.params.backend)

    def thresholds(self) -> dict[str, list[float]]:
        return {f"score_{self.task}": [self.params.threshold], f"llm_{self.task}_mass": [self.params.min_mass]}

    def plan(self, table: pa.Table) -> tuple[list[tuple[str, str] | None], list[str | None]]:
        """Per row: (prompt template, sample text) or None to skip; plus per-row extra label."""
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> Verdict:
        self.setup()
        n = table.num_rows
        plan, labels = self.plan(table)
        results: list[ScoreResult | None] = [None] * n
        injected: list[str | None] = [None] * n
        by_template: dict[str, list[int]] = {}
        for i, p in enumerate(plan):
            if p is None:
                continue
            if self.params.injection != "off":  # the judge reads the sample without text aimed at it
                text, kinds = neutralise(p[1])
                plan[i], injected[i] = (p[0], text), ",".join(kinds) or None
            by_template.setdefault(p[0], []).append(i)
        for template, rows in by_template.items():
            # no try: a backend that raises (engine dead, outage) fails the shard, so no marker hides it
            scored = self.backend.score(template, [plan[i][1] for i in rows])
            for i, r in zip(rows, scored):
                results[i] = r
        return self.verdict(results, labels, injected)

    def verdict(
        self, results: list[ScoreResult | None], labels: list[str | None], injected: list[str | None] | None = None
    ) -> Verdict:
        t = self.task
        ok = [r is not None and r.ok for r in results]
        missing = ~np.array(ok, dtype=bool)
        expected = np.array([r.expected if k else math.nan for r, k in zip(results, ok)], dtype=np.float64)
        mass = np.array([r.mass if k else math.nan for r, k in zip(results, ok)], dtype=np.float64)
        errors = [r.error if r is not None else None for r in results]
        p = self.params
        v = decide(expected, errors, p.threshold, p.review_band, self.inclusive, self.reject_rule, mass, p.min_mass)
        # Arrow arrays with nulls (never NaN) where a row was not scored; the runner scatters them
        v.columns[f"score_{t}"] = pa.array(expected, pa.float64(), mask=missing)
        v.columns[f"score_{t}_argmax"] = pa.array([r.argmax if k else None for r, k in zip(results, ok)], pa.int64())
        v.columns[f"dist_{t}"] = pa.array([r.dist if k else None for r, k in zip(results, ok)], pa.list_(pa.float64()))
        v.columns[f"llm_{t}_mass"] = pa.array(mass, pa.float64(), mask=missing)
        v.columns[f"llm_{t}_approx"] = pa.array([r.approx if k else None for r, k in zip(results, ok)], pa.string())
        v.columns[f"llm_{t}_error"] = pa.array(errors, pa.string())
        injected = injected or [None] * len(results)
        v.columns[f"llm_{t}_injection"] = pa.array(injected, pa.string())
        for i, kinds in enumerate(injected):
            # a rejection on the score and a failed row stand; anything else is looked at by a person, as this
            if kinds is not None and v.decision[i] != REJECT and errors[i] is None:
                v.decision[i], v.rule[i] = REVIEW, "injection"
        if any(lab is not None for lab in labels):
            v.columns[f"llm_{t}_domain"] = labels
        return v


def _has_images(table: pa.Table) -> list[bool]:
    lengths = pc.fill_null(pc.list_value_length(table.column("images")), 0)
    return [x > 0 for x in lengths.to_pylist()]


@register
class LLMQuality(LLMScoreOperator):
    """LLM quality score 0-10 with a domain-specific prompt, pure-text rows (InternVL 2.5 §4.3)."""

    name = "llm_quality"
    task = "quality"
    distill_teacher = True  # pipeline/distill_stage.py scores a sample with it and trains fastText on that
    reject_rule = "low_quality"

    class Params(JudgeParams):
        threshold: float = Field(7.0, description="expected score below this is rejected (paper: 7)")
        domains: dict[str, str] = Field(
            default_factory=dict, description="source or category -> domain prompt"
        )
        default_domain: str = Field("general", description="domain for rows the map does not name")
        turns: str = Field("all", description="turns shown to the rater: all | gpt | human")

        @field_validator("default_domain")
        @classmethod
        def _known_domain(cls, v: str) -> str:
            if v not in DOMAINS:
                raise ValueError(f"unknown domain {v!r}; known: {', '.join(DOMAINS)}")
            return v

        @field_validator("domains")
        @classmethod
        def _known_domains(cls, v: dict[str, str]) -> dict[str, str]:
            bad = sorted(set(v.values()) - set(DOMAINS))
            if bad:
                raise ValueError(f"unknown domain(s) {bad}; known: {', '.join(DOMAINS)}")
            return v

    def plan(self, table):
        p = self.params
        convs = table.column("conversations").to_pylist()
        sources = table.column("source").to_pylist()
        cats = table.column("category").to_pylist()
        plan, labels = [], []
        for conv, src, cat, mm in zip(convs, sources, cats, _has_images(table)):
            if mm:  # the paper's LLM quality scoring is for pure text
                plan.append(None)
                labels.append(None)
                continue
            domain = resolve_domain(cat, src, p.domains, p.default_domain)
            plan.append((quality_template(domain), render_sample(conv, p.turns)))
            labels.append(domain)
        return plan, labels


@register
class LLMRepetition(LLMScoreOperator):
    """LLM repetition score 0-10 (10 = no repetition), text and multimodal rows (InternVL 2.5 §4.3)."""

    name = "llm_repetition"
    task = "repetition"
    reject_rule = "repetitive"
    inclusive = True  # paper: score <= 3 removed

    class Params(JudgeParams):
        threshold: float = Field(3.0, description="expected score at or below this is rejected (paper: 3)")
        turns: str = Field("gpt", description="turns shown to the rater: gpt (assistant) | all | human")
        exempt_sources: list[str] = Field(
            default_factory=list, description="sources not checked (trusted academic sets)"
        )
        multimodal: bool = Field(
            True, description="also check rows with images (text only, images marked <image>)"
        )

    def plan(self, table):
        p = self.params
        convs = table.column("conversations").to_pylist()
        sources = table.column("source").to_pylist()
        exempt = set(p.exempt_sources)
        plan = []
        for conv, src, mm in zip(convs, sources, _has_images(table)):
            if src in exempt or (mm and not p.multimodal):
                plan.append(None)
            else:
                plan.append((repetition_template(mm), render_sample(conv, p.turns)))
        return plan, [None] * len(plan)
