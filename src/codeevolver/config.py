"""The user's contract: ``codeevolver.toml``, validated with pydantic, overridable by flags.

Every mistake becomes one :class:`ConfigError` naming the file, the key and the
fix (with a did-you-mean for misspelled keys). Nothing here touches the disk
except reading the file and the component files it names.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from codeevolver.errors import ConfigError

CONFIG_FILE = "codeevolver.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelPrice(_Section):
    input: float = Field(ge=0)
    output: float = Field(ge=0)


class ProgramConfig(_Section):
    framework: Literal["python", "dspy"]
    entry: str
    metric: str
    trainset: str
    valset: str | None = None
    input_keys: list[str] | None = None
    val_fraction: float = Field(0.3, gt=0, lt=1)
    example_timeout_s: float = Field(60.0, gt=0)

    @field_validator("entry", "metric")
    @classmethod
    def _dotted(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"{value!r} is not of the form 'package.module:name'")
        return value


class OptimizeConfig(_Section):
    max_metric_calls: int | None = Field(400, ge=0)
    max_usd: float | None = Field(None, ge=0)
    max_minutes: float | None = Field(None, ge=0)
    concurrency: int = Field(1, ge=1, le=64)
    seed: int = 0
    model: str | None = None
    reflection_model: str | None = None
    agent_model: str | None = None
    api_base: str | None = None
    coding_agent: str = "mini"
    mutate: Literal["prompts", "code", "both"] = "both"
    minibatch_size: int = Field(3, ge=1)
    prompts_per_code: int = Field(1, ge=0)
    prompts_per_code_decay_every: int | None = Field(None, ge=1)
    code_cutoff_iteration: int | None = Field(None, ge=0)
    skip_perfect_score: bool = True
    perfect_score: float = 1.0
    additional_instructions: str = ""
    reflection_agent: bool = Field(
        True,
        description="Code mutations: let the reflection model read the repository with read-only tools before "
        "writing the change request; false (or a model without tool calls) uses one reflection call.",
    )
    model_prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description="US dollars per million tokens for models litellm does not price (self-hosted, fine-tuned): "
        '{ "qwen2.5-coder" = { input = 0.2, output = 0.6 } }; also what the gateway bills their calls at',
    )
    agent_max_steps: int = Field(30, ge=1)
    agent_timeout_s: float = Field(900.0, gt=0)
    agent_max_usd: float | None = Field(
        default=None,
        gt=0,
        description="US dollars one coding agent may spend on one code mutation; None: bounded only by the run's "
        "max_usd. With max_usd set, an agent is never allowed more than what is left of the run's budget.",
    )


class SandboxConfig(_Section):
    tier: str = "bwrap"
    allow_domains: list[str] = Field(default_factory=list)
    secrets: dict[str, str] = Field(default_factory=dict)


class ProjectConfig(_Section):
    program: ProgramConfig
    components: dict[str, str] = Field(default_factory=dict)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)


_SECTIONS: dict[str, type[BaseModel]] = {
    "program": ProgramConfig,
    "optimize": OptimizeConfig,
    "sandbox": SandboxConfig,
}


def load_config(repo: Path, overrides: dict[str, Any] | None = None) -> ProjectConfig:
    """Read ``repo/codeevolver.toml`` and apply CLI overrides to ``[optimize]``/``[sandbox]``.

    ``overrides`` keys are ``optimize.<key>`` or ``sandbox.<key>``; ``None`` values are ignored.
    """
    path = repo / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"no {CONFIG_FILE} in {repo}",
            f"create {path} with a [program] section (see examples/support_router/{CONFIG_FILE})",
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the syntax at that line") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> ProjectConfig:
    """Validate a parsed TOML document; translate pydantic's errors into one ConfigError."""
    if "program" not in raw:
        raise ConfigError(
            f"{path}: missing section [program]",
            "add [program] with framework, entry, metric and trainset",
        )
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise _translate(exc, path) from None


def _translate(exc: ValidationError, path: Path) -> ConfigError:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    section = loc[0] if loc else ""
    key = loc[1] if len(loc) > 1 else ""
    where = f"[{section}] {key}".strip() if key else f"[{section}]"
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _SECTIONS.get(section, ProjectConfig)
        names = list(model.model_fields) if section in _SECTIONS else list(ProjectConfig.model_fields)
        shown = key if section in _SECTIONS else section
        close = difflib.get_close_matches(shown, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(names)}"
        return ConfigError(f"{path}: unknown key {where if section in _SECTIONS else section!r}", hint)
    if kind == "missing":
        return ConfigError(f"{path}: missing required key {where}", f"add `{key} = ...` under [{section}]")
    return ConfigError(f"{path}: {where}: {error['msg']}", "see DESIGN §4 / README for the accepted values")


def resolve_components(config: ProjectConfig, repo: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Return (texts, files): each component's seed text, and the repo path of file-backed ones.

    A value that names an existing file (relative to the repo) is read from it; a
    value that looks like a path but does not exist is an error; anything else is
    the prompt text itself.
    """
    texts: dict[str, str] = {}
    files: dict[str, str] = {}
    for name, value in config.components.items():
        candidate = repo / value
        looks_like_path = "\n" not in value and " " not in value and Path(value).suffix != ""
        if looks_like_path:
            if not candidate.is_file():
                raise ConfigError(
                    f"{repo / CONFIG_FILE}: [components] {name} names {value!r}, which does not exist",
                    f"create {candidate} or put the prompt text inline",
                )
            if not candidate.resolve().is_relative_to(repo.resolve()):
                raise ConfigError(
                    f"[components] {name}: {value!r} is outside the repository",
                    "keep prompt files inside the repository",
                )
            texts[name] = candidate.read_text(encoding="utf-8")
            files[name] = value
        else:
            texts[name] = value
    if config.program.framework == "python" and not texts and config.optimize.mutate == "prompts":
        raise ConfigError(
            f"{repo / CONFIG_FILE}: --mutate prompts but [components] is empty",
            "name at least one prompt under [components], or use --mutate code",
        )
    return texts, files
