"""LLM scoring operators (InternVL 2.5 §4.3): `llm_quality` and `llm_repetition`, with transformers,
vLLM and OpenAI-compatible backends sharing prompts, truncation, batching and score parsing.
Importing the package registers the operators; backends load their heavy libraries lazily."""

from .ops import LLMQuality, LLMRepetition, decide

__all__ = ["LLMQuality", "LLMRepetition", "decide"]
