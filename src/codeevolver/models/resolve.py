"""Which models a run uses: the user's flags, then provider keys, then the embedded local model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal

import httpx

from codeevolver.errors import ModelError
from codeevolver.models.base import LanguageModel, ModelSpec

DEFAULT_ANTHROPIC = "anthropic/claude-sonnet-4-5"
DEFAULT_OPENAI = "openai/gpt-4.1-mini"


@dataclass
class ModelPlan:
    task: ModelSpec
    reflection: ModelSpec
    agent: ModelSpec
    embedded: bool = False


def _with_provider(name: str) -> str:
    return name if "/" in name else f"openai/{name}"


def first_served_model(api_base: str, api_key: str | None) -> str:
    """Ask an OpenAI-compatible endpoint which model it serves (``GET /models``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(api_base.rstrip("/") + "/models", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise ModelError(
            f"cannot reach model endpoint {api_base} ({type(exc).__name__}: {exc})",
            "check that the server is running and --api-base is right",
        ) from None
    if response.status_code in (401, 403):
        raise ModelError(
            f"model endpoint {api_base} rejected the API key (HTTP {response.status_code})",
            "set a valid OPENAI_API_KEY for that endpoint",
        )
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ModelError(
            f"{api_base}/models did not list any model (HTTP {response.status_code})",
            "pass the model name with --model",
        ) from None


def plan_models(
    *,
    model: str | None,
    reflection_model: str | None,
    agent_model: str | None,
    api_base: str | None,
    env: Mapping[str, str],
) -> ModelPlan | None:
    """Return the plan, or None when nothing is configured (use the embedded model)."""
    if api_base:
        key = env.get("OPENAI_API_KEY") or "codeevolver"
        served = model or reflection_model or first_served_model(api_base, key)

        def spec(name: str | None) -> ModelSpec:
            return ModelSpec(_with_provider(name or served), api_base=api_base, api_key=key)

        reflection = spec(reflection_model)
        return ModelPlan(task=spec(model), reflection=reflection, agent=spec(agent_model or reflection.name))
    if not (model or reflection_model or env.get("ANTHROPIC_API_KEY") or env.get("OPENAI_API_KEY")):
        return None
    default = DEFAULT_ANTHROPIC if env.get("ANTHROPIC_API_KEY") else DEFAULT_OPENAI
    reflection = ModelSpec(reflection_model or model or default)
    task = ModelSpec(model or reflection.name)
    return ModelPlan(task=task, reflection=reflection, agent=ModelSpec(agent_model or reflection.name))


def with_prices(plan: ModelPlan, prices: Mapping[str, tuple[Decimal, Decimal]]) -> ModelPlan:
    """Price the plan's models from ``[optimize] model_prices`` (by full name or without the provider)."""

    def priced(spec: ModelSpec) -> ModelSpec:
        for key in (spec.name, spec.name.split("/", 1)[-1]):
            if key in prices:
                per_in, per_out = prices[key]
                return replace(spec, input_usd_per_m=per_in, output_usd_per_m=per_out)
        return spec

    return replace(plan, task=priced(plan.task), reflection=priced(plan.reflection), agent=priced(plan.agent))


def embedded_plan(spec: ModelSpec) -> ModelPlan:
    return ModelPlan(task=spec, reflection=spec, agent=spec, embedded=True)


def preflight(spec: ModelSpec) -> None:
    """One tiny call, so a wrong key or a dead endpoint fails before anything is written."""
    probe = ModelSpec(
        spec.name,
        api_base=spec.api_base,
        api_key=spec.api_key,
        max_tokens=1,
        input_usd_per_m=Decimal(0),
        output_usd_per_m=Decimal(0),
    )
    LanguageModel(probe, timeout_s=30, num_retries=0).complete(
        [{"role": "user", "content": "Reply with OK."}], purpose="reflection"
    )


def program_env(plan: ModelPlan, env: Mapping[str, str]) -> dict[str, str]:
    """The model variables the user's program sees (later: the gateway with placeholder keys)."""
    task = plan.task
    out = {"CODEEVOLVER_MODEL": task.name, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if task.api_base:
        out["OPENAI_BASE_URL"] = task.api_base
        out["OPENAI_API_KEY"] = task.api_key or "codeevolver"
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"):
        if name in env and name not in out:
            out[name] = env[name]
    return out
