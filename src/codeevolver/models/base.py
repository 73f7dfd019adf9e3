"""The LanguageModel: every model call CodeEvolver itself makes goes through here.

One implementation over litellm covers Anthropic, OpenAI, vLLM, Ollama,
llama.cpp and any OpenAI-compatible endpoint. Each call reports a
:class:`~codeevolver.types.UsageRecord` to ``on_usage`` (the store's usage
ledger). litellm's exceptions are translated to :class:`ModelError` here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from codeevolver.errors import ModelError
from codeevolver.types import Purpose, UsageRecord

# litellm downloads its price map at import unless told not to; we run offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to call and how to price it.

    ``name`` is a litellm model name (``anthropic/claude-sonnet-4-5``,
    ``openai/smollm2``). Prices in US dollars per million tokens override
    litellm's table; a model litellm does not know and without prices costs 0.
    """

    name: str
    api_base: str | None = None
    api_key: str | None = None
    input_usd_per_m: Decimal | None = None
    output_usd_per_m: Decimal | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    def describe(self) -> str:
        return f"{self.name} at {self.api_base}" if self.api_base else self.name


@dataclass
class Completion:
    text: str
    message: dict[str, Any]
    """The assistant message as a dict, ready to append to the conversation."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Each ``{"id", "name", "arguments"}`` with ``arguments`` a JSON string."""
    usage: UsageRecord | None = None


UsageSink = Callable[[UsageRecord], object]


class LanguageModel:
    """A model endpoint plus the ledger that meters it. Thread-safe."""

    def __init__(
        self,
        spec: ModelSpec,
        on_usage: UsageSink | None = None,
        *,
        run_id: str | None = None,
        timeout_s: float = 300.0,
        num_retries: int = 2,
    ) -> None:
        self.spec = spec
        self.on_usage = on_usage
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.num_retries = num_retries

    def complete(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        purpose: Purpose,
        tools: Sequence[dict[str, Any]] | None = None,
        candidate_id: str | None = None,
    ) -> Completion:
        """Send one chat request; raise :class:`ModelError` if the endpoint fails."""
        import litellm

        litellm.suppress_debug_info = True  # its "Give Feedback" banner; our ModelError says what failed
        kwargs: dict[str, Any] = {
            "model": self.spec.name,
            "messages": list(messages),
            "timeout": self.timeout_s,
            "num_retries": self.num_retries,
        }
        if self.spec.api_base:
            kwargs["api_base"] = self.spec.api_base
        if self.spec.api_key:
            kwargs["api_key"] = self.spec.api_key
        if self.spec.temperature is not None:
            kwargs["temperature"] = self.spec.temperature
        if self.spec.max_tokens is not None:
            kwargs["max_tokens"] = self.spec.max_tokens
        if tools:
            kwargs["tools"] = list(tools)
            # llama.cpp's function-calling format ignores tools unless tool_choice is sent.
            kwargs["tool_choice"] = "auto"
        try:
            response = litellm.completion(**kwargs)
        except Exception as exc:  # litellm raises many types; translate them all here
            raise translate_model_error(exc, self.spec) from exc
        return self._to_completion(response, purpose, candidate_id)

    def _to_completion(self, response: Any, purpose: Purpose, candidate_id: str | None) -> Completion:
        try:
            choice = response.choices[0]
            message = choice.message
        except (AttributeError, IndexError) as exc:
            raise ModelError(
                f"model {self.spec.describe()} returned no choices",
                "check that the endpoint speaks the OpenAI chat-completions protocol",
            ) from exc
        text = message.content or ""
        tool_calls = [
            {"id": call.id, "name": call.function.name, "arguments": call.function.arguments or "{}"}
            for call in (message.tool_calls or [])
        ]
        raw: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            raw["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in tool_calls
            ]
        usage = self._usage(response, purpose, candidate_id)
        if self.on_usage is not None:
            self.on_usage(usage)
        return Completion(text=text, message=raw, tool_calls=tool_calls, usage=usage)

    def _usage(self, response: Any, purpose: Purpose, candidate_id: str | None) -> UsageRecord:
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        output = int(getattr(usage, "completion_tokens", 0) or 0)
        details = getattr(usage, "prompt_tokens_details", None)
        cached = int(getattr(details, "cached_tokens", 0) or 0)
        return UsageRecord(
            model=self.spec.name,
            purpose=purpose,
            input_tokens=prompt - cached,
            output_tokens=output,
            cached_tokens=cached,
            cost_usd=self.price(prompt - cached, cached, output),
            request_id=getattr(response, "id", None),
            run_id=self.run_id,
            candidate_id=candidate_id,
        )

    def price(self, uncached_in: int, cached_in: int, output: int) -> Decimal:
        """Cost in dollars; our configured prices first, then litellm's table, else 0."""
        in_price, out_price = self.spec.input_usd_per_m, self.spec.output_usd_per_m
        if in_price is None or out_price is None:
            in_price, out_price = _litellm_prices(self.spec.name)
        return (in_price * (uncached_in + cached_in) + out_price * output) / MILLION


def _litellm_prices(model: str) -> tuple[Decimal, Decimal]:
    import litellm

    for key in (model, model.split("/", 1)[-1]):
        entry = litellm.model_cost.get(key)
        if entry:
            per_in = Decimal(str(entry.get("input_cost_per_token") or 0)) * MILLION
            per_out = Decimal(str(entry.get("output_cost_per_token") or 0)) * MILLION
            return per_in, per_out
    return Decimal(0), Decimal(0)


def translate_model_error(exc: Exception, spec: ModelSpec) -> ModelError:
    """Turn a litellm/httpx exception into one clear ModelError."""
    name = type(exc).__name__
    where = spec.describe()
    text = str(exc).splitlines()[0][:300] if str(exc) else name
    if "Authentication" in name or "PermissionDenied" in name or " 401" in text or " 403" in text:
        return ModelError(
            f"model endpoint {where} rejected the API key ({text})",
            "set a valid key (ANTHROPIC_API_KEY / OPENAI_API_KEY) or fix --api-base",
        )
    if "Connection" in name or "Timeout" in name or "connect" in text.lower():
        return ModelError(
            f"cannot reach model endpoint {where} ({text})",
            "check that the server is running and --api-base / the model name are right",
        )
    if "NotFound" in name or "BadRequest" in name:
        return ModelError(
            f"model endpoint {where} refused the request ({text})",
            "check the model name and that the endpoint serves it",
        )
    return ModelError(f"model call to {where} failed: {name}: {text}", "see --debug for details")
