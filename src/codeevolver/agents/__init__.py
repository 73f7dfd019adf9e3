"""Coding agent backends, looked up by short name and imported lazily.

``AGENTS`` is the extension point: each backend adds its ``module:Class`` here
(``mini``: mini-swe-agent for OpenAI-compatible models; ``claude``: the Claude
Agent SDK with the Claude Code CLI in the sandbox). Lazy import keeps a backend's heavy
dependencies out of runs that do not use it.
"""

from __future__ import annotations

import importlib

from codeevolver.agents.base import AgentResult, AgentTask, CodingAgent
from codeevolver.errors import ConfigError

AGENTS: dict[str, str] = {
    "mini": "codeevolver.agents.mini:MiniSweAgent",
    "claude": "codeevolver.agents.claude:ClaudeCodeAgent",
}

__all__ = ["AGENTS", "AgentResult", "AgentTask", "CodingAgent", "get_agent"]


def get_agent(name: str) -> CodingAgent:
    """Return an instance of the coding agent called ``name``."""
    try:
        target = AGENTS[name]
    except KeyError:
        raise ConfigError(
            f"unknown coding agent {name!r}",
            f"use one of: {', '.join(sorted(AGENTS))}",
        ) from None
    module, _, attr = target.partition(":")
    agent: CodingAgent = getattr(importlib.import_module(module), attr)()
    return agent
