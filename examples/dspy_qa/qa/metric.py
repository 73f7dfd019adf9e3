"""Score an answer (0.8) and its topic (0.2), with feedback saying which was wrong."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

ANSWER_WEIGHT = 0.8
TOPIC_WEIGHT = 0.2
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
NUMBER_WORDS = {word: str(i) for i, word in enumerate([*_NUMBERS, "twelve"])}


def normalize(text: str) -> list[str]:
    """Lower-case words without accents, punctuation, articles; number words as digits."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode().lower()
    words = re.findall(r"[a-z0-9]+", text)
    return [NUMBER_WORDS.get(w, w) for w in words if w not in {"a", "an", "the"}]


def contains(said: str, gold: str) -> bool:
    """True when the gold answer's words appear, in order, inside what was said."""
    got, want = normalize(said), normalize(gold)
    return bool(want) and any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1))


def score(example: Any, pred: Any, trace: Any = None) -> dict[str, Any]:
    """Return ``{"score", "feedback"}``; works with dspy.Example/Prediction or dicts."""
    gold_answer, gold_topic = _get(example, "answer"), _get(example, "topic")
    answer, topic = str(_get(pred, "answer") or ""), str(_get(pred, "topic") or "")
    answer_ok = contains(answer, gold_answer)
    topic_ok = normalize(topic)[:1] == normalize(gold_topic)
    value = ANSWER_WEIGHT * answer_ok + TOPIC_WEIGHT * topic_ok
    wrong = f"Answer wrong: expected {gold_answer!r}, got {answer!r}."
    notes = ["Answer correct." if answer_ok else wrong]
    if not topic_ok:
        notes.append(f"Topic wrong: expected {gold_topic!r}, got {topic!r} (must be exactly one topic word).")
    if answer_ok and len(normalize(answer)) > len(normalize(gold_answer)) + 6:
        notes.append("The answer is correct but wordy; a short answer is preferred.")
    return {"score": round(value, 4), "feedback": " ".join(notes)}


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
