"""Route a support ticket to a team and a priority.

The program is deliberately plain Python on the standard library: one call to
an OpenAI-compatible chat-completions endpoint, then a parser that turns the
model's free text into a label and a priority. Both the prompt
(``prompts["classify"]``) and the parser below are fair game for CodeEvolver.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Mapping
from typing import Any

LABELS = ("billing", "technical", "account", "shipping", "other")
PRIORITIES = ("low", "normal", "urgent")


def route(example: dict[str, Any], prompts: Mapping[str, str]) -> dict[str, Any]:
    """Classify ``example["ticket"]``; return the label, the priority and the model's raw text."""
    raw = chat(
        [
            {"role": "system", "content": prompts["classify"]},
            {"role": "user", "content": example["ticket"]},
        ]
    )
    label, priority = parse(raw)
    return {"label": label, "priority": priority, "raw": raw}


def parse(text: str) -> tuple[str, str]:
    """Read the label from the first word and the priority from the second.

    Naive on purpose: "Billing", "billing." or "Category: billing" all fall
    through to "other", and anything but an exact second word is "normal".
    """
    words = text.split()
    label = words[0] if words and words[0] in LABELS else "other"
    priority = words[1] if len(words) > 1 and words[1] in PRIORITIES else "normal"
    return label, priority


def chat(messages: list[dict[str, str]], timeout_s: float = 120.0) -> str:
    """One chat completion against $OPENAI_BASE_URL with the model in $CODEEVOLVER_MODEL."""
    base = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
    model = os.environ.get("CODEEVOLVER_MODEL", "gpt-4o-mini").removeprefix("openai/")
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 48}
    request = urllib.request.Request(
        f"{base}/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}",
        },
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        payload = json.load(response)
    return payload["choices"][0]["message"].get("content") or ""
