"""The prompt library: one quality prompt per domain and a repetition prompt (text and multimodal).

InternVL 2.5 §4.3 groups pure-text datasets by domain (disciplinary, programming, mathematics,
general), scores each sample 0-10 with an LLM and a domain-specific prompt, and runs a specialised
repetition prompt; the paper publishes neither prompt, so these are ours. They are versioned: the
version is stored with the scores (`PROMPT_VERSION`) and a change of wording must bump it.

Every prompt asks for one integer 0-10 and nothing else, so the answer's first token carries the
score (operators/llm/scoring.py). Scales point the same way for both tasks: higher is better
(quality 10 = excellent; repetition 10 = no repetition, 0 = degenerate looping), which is why the
paper's rule reads "repetition score <= 3 rejected".
"""

from __future__ import annotations

from collections.abc import Mapping

PROMPT_VERSION = "ivl-llm-v1"
DOMAINS = ("disciplinary", "programming", "mathematics", "general")
SAMPLE_MARKER = "{sample}"

SYSTEM = "You are a strict, careful annotator of training data for AI assistants."

_ANSWER = "Answer with a single integer from 0 to 10 and nothing else."

_QUALITY_HEAD = (
    "Rate the quality of the conversation sample below as training data for a helpful assistant, "
    "on a scale from 0 to 10.\n"
)
_QUALITY_SCALE = (
    "Scale: 0-2 = wrong, garbled, off-topic or harmful; 3-4 = major errors or mostly unhelpful; "
    "5-6 = usable but with clear flaws; 7-8 = correct and helpful with minor issues; "
    "9-10 = excellent, exemplary.\n"
)
_QUALITY_CRITERIA = {
    "disciplinary": (
        "Domain: academic and professional subjects (science, medicine, law, history, economics, ...).\n"
        "Judge: factual accuracy; sound reasoning; use of correct terminology; whether the answer "
        "addresses the question asked; clear structure.\n"
    ),
    "programming": (
        "Domain: programming and software.\n"
        "Judge: whether the code is correct and would run; whether it solves the stated task; "
        "idiomatic style and sensible naming; accurate explanations; no invented APIs.\n"
    ),
    "mathematics": (
        "Domain: mathematics.\n"
        "Judge: correctness of every step and of the final answer; rigour of the reasoning; "
        "clear notation; whether the solution answers exactly what was asked.\n"
    ),
    "general": (
        "Domain: general conversation and instructions.\n"
        "Judge: helpfulness; correctness; fluency and coherence; following the user's instructions; "
        "appropriate length and tone.\n"
    ),
}

_REPETITION_HEAD = (
    "Rate how free the conversation sample below is from abnormal repetition, on a scale from 0 to 10.\n"
    "Abnormal repetition: the same sentence, line, phrase or list item repeated over and over, "
    "text that loops or degenerates into copies of itself, long runs of one character or token. "
    "Normal repetition (a term used again, a refrain in a poem, repeated code patterns that the "
    "task needs) is not a problem.\n"
    "Scale: 0-1 = degenerate looping for most of the text; 2-3 = heavy repetition; "
    "4-6 = noticeable repetition; 7-8 = slight; 9-10 = none.\n"
)
_MULTIMODAL_NOTE = (
    "The sample comes with images that you cannot see; each <image> marks where one was shown. "
    "Judge only the text; answers that describe the same object again and again count as repetition.\n"
)


def _user(head: str, body: str) -> str:
    return f"{head}{body}\nSample:\n<sample>\n{SAMPLE_MARKER}\n</sample>\n\n{_ANSWER}"


def quality_template(domain: str) -> str:
    if domain not in _QUALITY_CRITERIA:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    return _user(_QUALITY_HEAD, _QUALITY_CRITERIA[domain] + _QUALITY_SCALE)


def repetition_template(multimodal: bool) -> str:
    return _user(_REPETITION_HEAD, _MULTIMODAL_NOTE if multimodal else "")


def build_messages(template: str, sample: str) -> list[dict[str, str]]:
    """Chat messages for one sample; the sample is inserted verbatim (no format() on user text)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": template.replace(SAMPLE_MARKER, sample)},
    ]


def quality_messages(domain: str, sample: str) -> list[dict[str, str]]:
    return build_messages(quality_template(domain), sample)


def repetition_messages(sample: str, multimodal: bool = False) -> list[dict[str, str]]:
    return build_messages(repetition_template(multimodal), sample)


_ROLE_NAMES = {"system": "System", "human": "User", "gpt": "Assistant"}


def render_sample(conversations: list[dict] | None, which: str = "all") -> str:
    """The conversation as plain text for the rater: `User: ...` / `Assistant: ...` blocks.

    which = all | gpt | human picks the turns (repetition looks at the assistant's turns)."""
    parts = []
    for turn in conversations or []:
        role = turn.get("from") or ""
        if which != "all" and role != which:
            continue
        parts.append(f"{_ROLE_NAMES.get(role, role)}: {turn.get('value') or ''}")
    return "\n\n".join(parts)


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt string the model sees, through the tokenizer's own chat template, ending where
    the assistant's answer begins. A tokenizer without a template gets a plain layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "\n\n".join(m["content"] for m in messages)
    return f"{text}\n\nScore:"


def resolve_domain(
    category: str | None, source: str | None, mapping: Mapping[str, str], default: str = "general"
) -> str:
    """The quality domain of a row: the config maps dataset names (`source`) and `category` tags to
    domains; a source entry wins (the paper groups whole datasets), then the category, then default."""
    for key in (source, category):
        if key and key in mapping:
            return mapping[key]
    return default
