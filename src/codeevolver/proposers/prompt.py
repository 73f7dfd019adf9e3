"""Prompt mutation: one reflection call that rewrites one component's text."""

from __future__ import annotations

import re

from codeevolver.models.base import LanguageModel
from codeevolver.proposers.reflective import render

TEMPLATE = """You are improving one prompt of an AI application. The application was run on a few
examples with the current prompt; each example shows its inputs, the application's output,
the score it got (higher is better) and feedback from the metric.

## The prompt to improve (component "{component}")
```
{current}
```

## How the application did
{records}
{instructions}
## Your task
Work out what the failures have in common and what the prompt must say so that the
application gets them right, including any domain facts or output-format rules the feedback
reveals. Keep what already works. Reply with the complete new prompt text between a pair of
``` fences and nothing else after it.
"""

_FENCED = re.compile(r"```[a-zA-Z]*\n?(.*?)```", re.DOTALL)


def extract_text(reply: str) -> str:
    """The last fenced block of the reply, or the whole reply when it has none."""
    blocks = _FENCED.findall(reply)
    text = blocks[-1] if blocks else reply
    return text.strip()


class PromptProposer:
    def __init__(self, lm: LanguageModel, additional_instructions: str = "") -> None:
        self.lm = lm
        self.additional_instructions = additional_instructions.strip()

    def build_prompt(self, component: str, current: str, records: list[dict[str, str]]) -> str:
        instructions = (
            f"\n## Constraints and ideas from the user\n{self.additional_instructions}\n"
            if self.additional_instructions
            else ""
        )
        return TEMPLATE.format(component=component, current=current, records=render(records), instructions=instructions)

    def propose(
        self, component: str, current: str, records: list[dict[str, str]], candidate_id: str | None = None
    ) -> str:
        """Return the new text for ``component`` (may equal ``current`` if the model had no idea)."""
        prompt = self.build_prompt(component, current, records)
        reply = self.lm.complete([{"role": "user", "content": prompt}], purpose="reflection", candidate_id=candidate_id)
        return extract_text(reply.text)
