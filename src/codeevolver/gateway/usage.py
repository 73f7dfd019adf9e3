"""Metering LLM responses as they stream past: tokens, normalised, then priced.

The gateway never holds a response back to meter it. A :class:`UsageMeter` is
a pass-through filter on the body: for a JSON body it keeps a copy (up to a
cap) and reads ``usage`` at the end; for an SSE stream it scans complete
``data:`` lines for the events that carry usage:

- OpenAI chat/completions: the final chunk with ``usage`` (``stream_options.include_usage``,
  which the gateway turns on for streamed requests);
- OpenAI responses: ``response.completed`` -> ``response.usage``;
- Anthropic messages: ``message_start`` -> ``message.usage``, then ``message_delta`` -> ``usage``
  (cumulative output tokens; later fields win).

Token conventions differ: OpenAI's prompt/input tokens *include* cached ones,
Anthropic's ``input_tokens`` exclude both cache reads and cache writes. Both are
normalised to (uncached input, cache read, cache write, output) before pricing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

Provider = Literal["openai", "anthropic"]
MILLION = Decimal(1_000_000)
_JSON_CAP = 16 * 1024 * 1024
_LINE_CAP = 16 * 1024 * 1024


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens. Cache prices default to the input price when unknown."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None


@dataclass(frozen=True)
class Tokens:
    uncached_input: int = 0
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and value > 0 else 0


def normalise(provider: Provider, usage: dict[str, Any]) -> Tokens:
    """One provider usage object -> :class:`Tokens` (uncached input excludes every cache token)."""
    if provider == "anthropic":
        return Tokens(
            uncached_input=_int(usage.get("input_tokens")),
            cache_read=_int(usage.get("cache_read_input_tokens")),
            cache_write=_int(usage.get("cache_creation_input_tokens")),
            output=_int(usage.get("output_tokens")),
        )
    if "prompt_tokens" in usage:  # chat/completions, completions, embeddings
        details = usage.get("prompt_tokens_details") or {}
        cached = _int(details.get("cached_tokens"))
        output = _int(usage.get("completion_tokens"))
    else:  # the responses API
        details = usage.get("input_tokens_details") or {}
        cached = _int(details.get("cached_tokens"))
        output = _int(usage.get("output_tokens"))
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    return Tokens(uncached_input=max(prompt - cached, 0), cache_read=cached, output=output)


class UsageMeter:
    """A body filter that watches an LLM response go by and ends up knowing its usage."""

    def __init__(self, provider: Provider, *, sse: bool | None = None) -> None:
        """``sse`` None: decided by the first byte of the body (``{`` is JSON, anything else SSE)."""
        self.provider = provider
        self.sse = sse
        self.usage: dict[str, Any] = {}
        self.model: str | None = None
        self.request_id: str | None = None
        self._buffer = bytearray()
        self._overflow = False

    @property
    def found(self) -> bool:
        return bool(self.usage)

    def tokens(self) -> Tokens:
        return normalise(self.provider, self.usage)

    def feed(self, data: bytes) -> bytes:
        if self._overflow:
            return data
        if self.sse is None:
            start = data.lstrip()[:1]
            if not start:
                return data
            self.sse = start not in (b"{", b"[")
        self._buffer += data
        if self.sse:
            *lines, rest = self._buffer.split(b"\n")
            for line in lines:
                self._line(bytes(line))
            self._buffer = bytearray(rest)
            limit = _LINE_CAP
        else:
            limit = _JSON_CAP
        if len(self._buffer) > limit:
            self._overflow = True
            self._buffer.clear()
        return data

    def end(self) -> bytes:
        if self._overflow:
            return b""
        if self.sse:
            self._line(bytes(self._buffer))
        else:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                self._event(json.loads(self._buffer))
        self._buffer.clear()
        return b""

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:") or b"usage" not in line:
            return
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            self._event(json.loads(line[5:]))

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self._note(event["message"])
            self._merge(event["message"].get("usage"))
        elif kind in ("response.completed", "response.done", "response.incomplete") and isinstance(
            event.get("response"), dict
        ):
            self._note(event["response"])
            self._merge(event["response"].get("usage"))
        else:
            self._note(event)
            self._merge(event.get("usage"))

    def _note(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("id"), str) and self.request_id is None:
            self.request_id = obj["id"]
        if isinstance(obj.get("model"), str) and obj["model"]:
            self.model = obj["model"]

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if v is not None})


def price(tokens: Tokens, prices: Prices) -> Decimal:
    """Exact cost in US dollars."""
    read = prices.cache_read if prices.cache_read is not None else prices.input
    write = prices.cache_write if prices.cache_write is not None else prices.input
    return (
        prices.input * tokens.uncached_input
        + read * tokens.cache_read
        + write * tokens.cache_write
        + prices.output * tokens.output
    ) / MILLION


@lru_cache(maxsize=256)
def litellm_prices(provider: Provider, model: str) -> Prices:
    """litellm's list prices for ``model`` (zero when it does not know the model)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:  # pragma: no cover - litellm is a dependency
        return Prices(Decimal(0), Decimal(0))
    for key in (model, f"{provider}/{model}", model.split("/", 1)[-1]):
        entry = litellm.model_cost.get(key)
        if entry:

            def per_m(field: str, entry: dict[str, Any] = entry) -> Decimal | None:
                value = entry.get(field)
                return None if value is None else Decimal(str(value)) * MILLION

            return Prices(
                input=per_m("input_cost_per_token") or Decimal(0),
                output=per_m("output_cost_per_token") or Decimal(0),
                cache_read=per_m("cache_read_input_token_cost"),
                cache_write=per_m("cache_creation_input_token_cost"),
            )
    return Prices(Decimal(0), Decimal(0))
