"""The DSPy program CodeEvolver evolves.

Two predictors run on every question: ``classify`` names the topic and
``answer`` answers with the topic as a hint. ``verify`` is declared but never
called, so CodeEvolver finds no trace of it and leaves it out of the
components it evolves.

The module never configures an LM: CodeEvolver's runner sets
``dspy.LM($CODEEVOLVER_MODEL, api_base=$OPENAI_BASE_URL, api_key=$OPENAI_API_KEY)``
when none is configured. Run this file directly to try one question by hand.
"""

from __future__ import annotations

import os
import sys

import dspy

TOPICS = ("geography", "science", "math", "history", "language")


class Classify(dspy.Signature):
    """Name the topic of the question."""

    question: str = dspy.InputField()
    topic: str = dspy.OutputField(desc="one of: " + ", ".join(TOPICS))


class Answer(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    topic: str = dspy.InputField()
    answer: str = dspy.OutputField()


class QA(dspy.Module):
    """question -> topic -> short answer."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)
        self.answer = dspy.ChainOfThought(Answer)
        self.verify = dspy.Predict("question, answer -> is_correct: bool")  # never called

    def forward(self, question: str) -> dspy.Prediction:
        topic = self.classify(question=question).topic
        answer = self.answer(question=question, topic=topic).answer
        return dspy.Prediction(topic=topic, answer=answer)


if __name__ == "__main__":
    model = os.environ.get("CODEEVOLVER_MODEL", "openai/gpt-4o-mini")
    base, key = os.environ.get("OPENAI_BASE_URL"), os.environ.get("OPENAI_API_KEY")
    dspy.configure(lm=dspy.LM(model, api_base=base, api_key=key))
    question = " ".join(sys.argv[1:]) or "What is the capital of Australia?"
    print(QA()(question=question))
