"""Assemble a run from the user's repo and options, and drive it: the one place that wires parts.

``start_run`` checks everything that can be wrong *before* anything is written
(repo, config, datasets, budgets, sandbox, models, the program itself on a few
rows); only then does it create the run in the store and hand over to the
engine. ``resume_run`` rebuilds the same parts from the run's saved settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codeevolver.agents import get_agent
from codeevolver.config import ProjectConfig, load_config, parse_config, resolve_components
from codeevolver.dataset import load_dataset, split
from codeevolver.engine.engine import Budget, Engine, EngineSettings, Parts
from codeevolver.engine.pareto import mean_score
from codeevolver.engine.selection import ComponentSelector
from codeevolver.errors import ConfigError, SandboxError, StoreError, UserProgramError
from codeevolver.evaluator import Evaluator
from codeevolver.models.base import LanguageModel, ModelSpec
from codeevolver.models.resolve import (
    ModelPlan,
    embedded_plan,
    plan_models,
    preflight,
    program_env,
    with_prices,
)
from codeevolver.proposers.code import CodeProposer
from codeevolver.proposers.prompt import PromptProposer
from codeevolver.sandbox import TIERS, get_sandbox
from codeevolver.sandbox.base import Sandbox
from codeevolver.store import Store
from codeevolver.types import Candidate, ExampleResult
from codeevolver.userenv import python_prefixes, resolve_python
from codeevolver.workspace.git import GitWorkspace, check_repo

if TYPE_CHECKING:
    from codeevolver.egress import RunEgress

STATE_DIR = ".codeevolver"
VALIDATION_ROWS = 15
Progress = Callable[[dict[str, Any]], None]


@dataclass
class RunOptions:
    """What the CLI (or the service) asks for; ``overrides`` are ``section.key`` → value."""

    path: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    dangerously_skip_sandbox: bool = False
    state_dir: Path | None = None


@dataclass
class RunSummary:
    run_id: str
    status: str
    seed_score: float | None
    best_score: float | None
    best_candidate: str | None
    best_branch: str | None
    metric_calls: int
    usage: dict[str, Any]
    reason: str | None = None
    """Why the run ended (the budget that ran out, a stop, a failure); None while it runs."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def state_dir_for(repo: Path, explicit: Path | None) -> Path:
    return (explicit or repo / STATE_DIR).resolve()


def open_store(state_dir: Path, create: bool) -> Store:
    db = state_dir / "runs.db"
    if not create and not db.is_file():
        raise StoreError(f"no CodeEvolver runs in {state_dir}", "run `codeevolver optimize` first")
    return Store(f"sqlite:///{db}")


@dataclass
class _Prepared:
    repo: Path
    head: str
    config: ProjectConfig
    trainset: list[dict[str, Any]]
    valset: list[dict[str, Any]]
    components: dict[str, str]
    component_files: dict[str, str]
    sandbox: Sandbox
    plan: ModelPlan


def _check_budget(config: ProjectConfig, n_train: int, n_val: int) -> None:
    opt = config.optimize
    for name, value in (
        ("max_metric_calls", opt.max_metric_calls),
        ("max_usd", opt.max_usd),
        ("max_minutes", opt.max_minutes),
    ):
        if value is not None and value <= 0:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"budget {name} is {value}: nothing could run", f"set {flag} above 0")
    checks = min(VALIDATION_ROWS, n_train)
    need = checks + n_val
    if opt.max_metric_calls is not None and opt.max_metric_calls < need:
        raise ConfigError(
            f"max_metric_calls {opt.max_metric_calls} cannot even score the seed "
            f"({checks} validation rows + {n_val} valset rows)",
            f"set --max-metric-calls to at least {need} (more to leave room for proposals)",
        )


def _choose_sandbox(config: ProjectConfig, skip: bool) -> Sandbox:
    """The configured tier, checked: available here, and ``unsafe`` only with the explicit opt-in."""
    import importlib
    import sys

    from codeevolver.sandbox.unsafe import UNPROTECTED

    sandbox = get_sandbox(config.sandbox.tier)
    if not sandbox.isolated:
        if not skip:
            raise SandboxError(
                f"sandbox tier {sandbox.name!r} is unprotected: {UNPROTECTED}",
                "use --sandbox bwrap (or gvisor), or pass --dangerously-skip-sandbox if you accept the risk",
            )
        print(f"WARNING: running without a sandbox: {UNPROTECTED}.", file=sys.stderr)
        return sandbox
    module = importlib.import_module(TIERS[sandbox.name].partition(":")[0])
    check = getattr(module, "available", None)
    if check is not None:
        ok, reason = check()
        if not ok:
            raise SandboxError(
                f"sandbox tier {sandbox.name!r} cannot run here: {reason}",
                "`codeevolver doctor` lists the tiers that work on this machine and how to fix the others",
            )
    return sandbox


def _load(options: RunOptions, env: dict[str, str]) -> _Prepared:
    repo, head = check_repo(options.path.resolve(), STATE_DIR)
    config = load_config(repo, options.overrides)
    components, files = resolve_components(config, repo)
    prog = config.program
    trainset = load_dataset(repo / prog.trainset, prog.input_keys)
    if prog.valset:
        valset = load_dataset(repo / prog.valset, prog.input_keys)
    else:
        trainset, valset = split(trainset, prog.val_fraction, config.optimize.seed)
    _check_budget(config, len(trainset), len(valset))
    sandbox = _choose_sandbox(config, options.dangerously_skip_sandbox)
    opt = config.optimize
    plan = plan_models(
        model=opt.model,
        reflection_model=opt.reflection_model,
        agent_model=opt.agent_model,
        api_base=opt.api_base,
        env=env,
    )
    if plan is not None:
        plan = with_prices(plan, _prices(opt))
    placeholder = ModelSpec("openai/unset")
    return _Prepared(
        repo, head, config, trainset, valset, components, files, sandbox, plan or embedded_plan(placeholder)
    )


def _prices(opt: Any) -> dict[str, tuple[Decimal, Decimal]]:
    return {name: (Decimal(str(p.input)), Decimal(str(p.output))) for name, p in opt.model_prices.items()}


@contextlib.contextmanager
def _models(prepared: _Prepared, progress: Progress | None = None) -> Iterator[ModelPlan]:
    """Start the embedded model when no model is configured; stop it when the run ends."""
    if not prepared.plan.embedded:
        preflight(prepared.plan.reflection)
        yield prepared.plan
        return
    from codeevolver.models.embedded import EmbeddedModelServer

    if progress is not None:
        message = "no model configured and no API key set: serving SmolLM2-135M locally (llama.cpp)"
        progress({"kind": "phase", "message": message})
    with EmbeddedModelServer() as server:
        plan = embedded_plan(server.spec())
        prepared.plan = plan
        yield plan


def _validate_seed(
    evaluator: Evaluator, workdir: Path, seed: Candidate, trainset: list[dict[str, Any]]
) -> list[ExampleResult]:
    """Run the seed on up to 15 train rows; fail fast if the program clearly cannot work."""
    rows = [(i, trainset[i]) for i in range(min(VALIDATION_ROWS, len(trainset)))]
    results = evaluator.evaluate(workdir, seed.components, rows, True)
    errors = [r for r in results if r.error]
    if len(errors) > 0.1 * len(results):
        shown = "\n".join(f"  row {r.index}: {r.error}" for r in errors[:3])
        raise UserProgramError(
            f"the program failed on {len(errors)} of {len(results)} validation rows before the run started:\n{shown}",
            "fix the program or metric (try it on those rows by hand), then run again",
        )
    if all(r.score == 0 for r in results):
        feedback = "\n".join(f"  row {r.index}: {r.feedback or '(no feedback)'}" for r in results[:3])
        raise UserProgramError(
            f"every score on {len(results)} validation rows is 0: nothing to improve from\n{feedback}",
            "check the metric and that the program reaches its model (see the feedback above)",
        )
    return results


def _drop_unused_predictors(components: dict[str, str], results: list[ExampleResult]) -> dict[str, str]:
    used = {name for r in results for name, calls in r.traces.items() if calls}
    kept = {name: text for name, text in components.items() if name in used}
    return kept or components


def _check_agent_route(agent: str, egress: RunEgress | None) -> None:
    """The Claude Code CLI reaches its model only through the gateway's Anthropic route."""
    if agent != "claude":
        return
    if egress is None:
        raise ConfigError(
            "coding_agent 'claude' runs the Claude Code CLI behind the egress gateway, which the unsafe tier lacks",
            'use --sandbox bwrap, or coding_agent = "mini"',
        )
    if "anthropic" not in egress.routes:
        raise ConfigError(
            "coding_agent 'claude' needs an Anthropic Messages endpoint and this run has none",
            "set ANTHROPIC_API_KEY, or point --api-base at an OpenAI-compatible server (the gateway translates)",
        )


def _budget_left(store: Store, run_id: str, max_usd: float | None) -> Callable[[], Decimal] | None:
    """What is left of the run's USD budget, asked when each coding agent starts (None: no budget)."""
    if max_usd is None:
        return None
    limit = Decimal(str(max_usd))
    return lambda: limit - store.usage_totals(run_id).cost_usd


def _parts(
    prepared: _Prepared, store: Store, run_id: str, state_dir: Path, egress: RunEgress | None
) -> tuple[Parts, Evaluator]:
    config, plan = prepared.config, prepared.plan
    opt = config.optimize
    python = resolve_python(prepared.repo)
    if egress is not None:
        # Behind the gateway the sandbox gets its base URLs and a placeholder key from the session.
        model_env = {"CODEEVOLVER_MODEL": plan.task.name, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    else:
        model_env = program_env(plan, os.environ)
    evaluator = Evaluator(
        config.program.framework,
        config.program.entry,
        config.program.metric,
        config.program.input_keys,
        prepared.sandbox,
        python,
        model_env,
        config.program.example_timeout_s,
        policy_hook=egress.program_policy if egress is not None else None,
    )
    workspace = GitWorkspace(prepared.repo, state_dir / "work" / run_id)
    reflection = LanguageModel(plan.reflection, store.add_usage, run_id=run_id)
    prompt_proposer = PromptProposer(reflection, opt.additional_instructions)
    code_proposer = None
    if opt.mutate != "prompts":
        _check_agent_route(opt.coding_agent, egress)
        code_proposer = CodeProposer(
            reflection,
            LanguageModel(plan.agent, store.add_usage, run_id=run_id),
            get_agent(opt.coding_agent),
            prepared.sandbox,
            workspace,
            entry=config.program.entry,
            metric=config.program.metric,
            agent_env=model_env | {"PYTHON": str(python)},
            additional_instructions=opt.additional_instructions,
            max_steps=opt.agent_max_steps,
            timeout_s=opt.agent_timeout_s,
            reflection_agent=opt.reflection_agent,
            readonly_paths=python_prefixes(python),
            agent_session=egress.agent_session if egress is not None else None,
            agent_max_usd=opt.agent_max_usd,
            budget_left=_budget_left(store, run_id, opt.max_usd),
        )
    selector = ComponentSelector(
        opt.mutate, opt.prompts_per_code, opt.prompts_per_code_decay_every, opt.code_cutoff_iteration
    )
    parts = Parts(
        store,
        evaluator,
        workspace,
        prompt_proposer,
        code_proposer,
        selector,
        config.program.framework,
        prepared.component_files,
    )
    return parts, evaluator


def _engine(
    prepared: _Prepared,
    parts: Parts,
    run_id: str,
    state_dir: Path,
    progress: Progress | None,
    elapsed_s: float = 0.0,
) -> Engine:
    opt = prepared.config.optimize
    budget = Budget(
        max_metric_calls=opt.max_metric_calls,
        max_usd=Decimal(str(opt.max_usd)) if opt.max_usd is not None else None,
        max_seconds=opt.max_minutes * 60 - elapsed_s if opt.max_minutes is not None else None,
    )
    settings = EngineSettings(opt.concurrency, opt.minibatch_size, opt.seed, opt.skip_perfect_score, opt.perfect_score)
    return Engine(
        run_id,
        parts,
        prepared.trainset,
        prepared.valset,
        settings,
        budget,
        stop_file=state_dir / "runs" / f"{run_id}.stop",
        on_progress=progress,
    )


def start_run(options: RunOptions, progress: Progress | None = None) -> RunSummary:
    """Check everything, create the run, evolve until a budget or a stop, return the summary."""
    prepared = _load(options, dict(os.environ))
    state_dir = state_dir_for(prepared.repo, options.state_dir)
    with _models(prepared, progress) as plan:
        store = open_store(state_dir, create=True)
        try:
            with _egress(prepared, plan, store) as egress:
                return _start(prepared, plan, store, state_dir, progress, egress)
        finally:
            store.close()


def _egress(prepared: _Prepared, plan: ModelPlan, store: Store) -> contextlib.AbstractContextManager[Any]:
    """The run's gateway when the tier isolates the network; none for the unsafe tier."""
    if not prepared.sandbox.isolated:
        if prepared.config.sandbox.secrets:
            raise ConfigError(
                "[sandbox] secrets are injected by the egress gateway, which the unsafe tier does not have",
                "use the bwrap or gvisor tier, or remove [sandbox] secrets",
            )
        return contextlib.nullcontext(None)
    from codeevolver.egress import run_egress

    opt = prepared.config.optimize
    max_usd = Decimal(str(opt.max_usd)) if opt.max_usd is not None else None
    sandbox = prepared.config.sandbox
    return run_egress(store, plan, os.environ, sandbox.allow_domains, max_usd, sandbox.secrets)


def _start(
    prepared: _Prepared,
    plan: ModelPlan,
    store: Store,
    state_dir: Path,
    progress: Progress | None,
    egress: RunEgress | None,
) -> RunSummary:
    say = progress or (lambda state: None)
    rows = min(VALIDATION_ROWS, len(prepared.trainset))
    say({"kind": "phase", "message": f"checking the program on {rows} training rows ({plan.task.name})"})
    probe_ws = GitWorkspace(prepared.repo, state_dir / "work" / "preflight")
    parts, evaluator = _parts(prepared, store, "preflight", state_dir, egress)
    seed = Candidate(id="c000", components=dict(prepared.components), commit=prepared.head)
    workdir = probe_ws.evaluation_dir(prepared.head)
    try:
        if prepared.config.program.framework == "dspy":
            seed.components = evaluator.describe(workdir)
        checked = _validate_seed(evaluator, workdir, seed, prepared.trainset)
    finally:
        probe_ws.remove(workdir)
    if prepared.config.program.framework == "dspy":
        seed.components = _drop_unused_predictors(seed.components, checked)
    saved = prepared.config.model_dump(mode="json")
    # The seed as built here (DSPy predictors discovered and pruned), for a resume after a kill before it was scored.
    saved["_resolved"] = {
        "embedded": plan.embedded,
        "api_base": plan.task.api_base,
        "seed_components": seed.components,
    }
    run_id = store.create_run(saved, str(prepared.repo), prepared.head, prepared.config.optimize.seed)
    store.add_evaluations(run_id, seed.id, "train", checked, "validation")
    if egress is not None:
        egress.adopt_preflight(run_id)
        egress.open_sessions(run_id)
    store.add_event(
        run_id,
        "run_started",
        {
            "components": sorted(seed.components),
            "models": {"task": plan.task.name, "reflection": plan.reflection.name, "agent": plan.agent.name},
        },
    )
    parts, _ = _parts(prepared, store, run_id, state_dir, egress)
    engine = _engine(prepared, parts, run_id, state_dir, progress)
    say({"kind": "phase", "message": f"run {run_id}: scoring the seed on {len(prepared.valset)} valset rows"})
    _drive(engine, seed)
    return summarize(store, run_id)


def resume_run(
    run_id: str,
    path: Path,
    state_dir: Path | None = None,
    progress: Progress | None = None,
    dangerously_skip_sandbox: bool = False,
) -> RunSummary:
    """Continue a stopped or killed run from the store, within its original budget."""
    repo = path.resolve()
    state = state_dir_for(repo, state_dir)
    store = open_store(state, create=False)
    try:
        run = store.get_run(run_id)
        if run.status == "finished":
            return summarize(store, run_id)
        raw = dict(run.config)
        resolved = raw.pop("_resolved", {})
        config = parse_config(raw, Path(run.repo_path) / "codeevolver.toml")
        repo = Path(run.repo_path)
        components, files = resolve_components(config, repo) if config.components else ({}, {})
        prog = config.program
        trainset = load_dataset(repo / prog.trainset, prog.input_keys)
        if prog.valset:
            valset = load_dataset(repo / prog.valset, prog.input_keys)
        else:
            trainset, valset = split(trainset, prog.val_fraction, config.optimize.seed)
        opt = config.optimize
        plan = (
            None
            if resolved.get("embedded")
            else plan_models(
                model=opt.model,
                reflection_model=opt.reflection_model,
                agent_model=opt.agent_model,
                api_base=opt.api_base,
                env=dict(os.environ),
            )
        )
        if plan is not None:
            plan = with_prices(plan, _prices(opt))
        prepared = _Prepared(
            repo,
            run.base_commit,
            config,
            trainset,
            valset,
            components,
            files,
            _choose_sandbox(config, dangerously_skip_sandbox),
            plan or embedded_plan(ModelSpec("openai/unset")),
        )
        store.update_run(run_id, status="running", error=None)
        elapsed = (run.updated_at - run.created_at).total_seconds()
        with _models(prepared, progress) as plan, _egress(prepared, plan, store) as egress:
            if egress is not None:
                egress.open_sessions(run_id)
            parts, _ = _parts(prepared, store, run_id, state, egress)
            engine = _engine(prepared, parts, run_id, state, progress, elapsed_s=elapsed)
            _drive(engine, _unscored_seed(store, run_id, prepared, parts, resolved.get("seed_components")))
        return summarize(store, run_id)
    finally:
        store.close()


def _unscored_seed(
    store: Store, run_id: str, prepared: _Prepared, parts: Parts, saved: dict[str, str] | None
) -> Candidate | None:
    """The seed of a run killed before its valset score was stored (None once it has one), rebuilt at the
    run's base commit: from the components saved when the run was created, else as a new run builds them."""
    if any(row.status == "seed" for row in store.list_candidates(run_id)):
        return None
    head = prepared.head
    components = dict(saved) if saved is not None else None
    if components is None:  # a run created before seed_components was saved
        components = dict(prepared.components)
        for name, rel in prepared.component_files.items():
            text = parts.workspace.read_file(head, rel)
            if text is not None:
                components[name] = text
        if prepared.config.program.framework == "dspy":
            components = parts.evaluator.describe(parts.workspace.evaluation_dir(head))
    return Candidate(id="c000", components=components, commit=head)


def _drive(engine: Engine, seed: Candidate | None) -> None:
    """Run the engine; SIGINT and SIGTERM stop it gracefully (state is written first)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, engine.request_stop, f"signal {sig.name}")
        await engine.run(seed)

    asyncio.run(main())


def summarize(store: Store, run_id: str) -> RunSummary:
    run = store.get_run(run_id)
    usage = store.usage_totals(run_id)
    best = store.get_candidate(run_id, run.best_candidate_id) if run.best_candidate_id else None
    return RunSummary(
        run_id=run_id,
        status=run.status,
        seed_score=run.seed_score,
        best_score=run.best_score,
        best_candidate=run.best_candidate_id,
        best_branch=best.branch if best else None,
        metric_calls=run.metric_calls,
        reason=run.error,
        usage={
            "calls": usage.calls,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_tokens": usage.cached_tokens,
            "usd": str(usage.cost_usd),
            "calls_by_purpose": {purpose: totals.calls for purpose, totals in sorted(usage.by_purpose.items())},
        },
    )


__all__ = ["RunOptions", "RunSummary", "mean_score", "open_store", "resume_run", "start_run", "summarize"]


def apply_candidate(store: Store, run_id: str, candidate_id: str | None) -> str:
    """Check out the candidate's branch, or write its prompts back when it has none."""
    import json

    from codeevolver.workspace.git import check_repo, git

    run = store.get_run(run_id)
    cand_id = candidate_id or run.best_candidate_id
    if cand_id is None:
        raise StoreError(f"run {run_id} has no scored candidate yet", "wait for the seed to be scored")
    cand = store.get_candidate(run_id, cand_id)
    repo, _ = check_repo(Path(run.repo_path), STATE_DIR)
    if cand.branch:
        git("checkout", "--quiet", cand.branch, cwd=repo)
        where = f"checked out branch {cand.branch}"
    else:
        where = f"kept the current checkout (candidate {cand.id} is the seed)"
    config = parse_config({k: v for k, v in run.config.items() if k != "_resolved"}, repo / "codeevolver.toml")
    _, files = resolve_components(config, repo) if config.components else ({}, {})
    loose = {name: text for name, text in cand.components.items() if name not in files}
    for name, rel in files.items():
        if name in cand.components:
            (repo / rel).write_text(cand.components[name], encoding="utf-8")
    if loose:
        (repo / "codeevolver.prompts.json").write_text(json.dumps(loose, indent=2) + "\n", encoding="utf-8")
        where += "; wrote the evolved instructions of " + ", ".join(sorted(loose)) + " to codeevolver.prompts.json"
    return f"{where} (candidate {cand.id}, val score {cand.val_score})"
