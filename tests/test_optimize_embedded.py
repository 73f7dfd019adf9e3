"""`optimize` with no model configured and no API key: the embedded SmolLM2 server is started
for the run, used by the program and the reflection, and stopped when the run ends."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

from codeevolver.models.embedded import available
from codeevolver.store import Store
from scripted import cli_env, make_repo, run_cli

pytestmark = pytest.mark.slow


def shrink(repo: Path) -> None:
    """A small dataset keeps the tiny model's run to a few minutes on 2 cores."""
    for name, keep in (("train", 18), ("val", 6)):
        path = repo / "data" / f"{name}.jsonl"
        path.write_text("\n".join(path.read_text().splitlines()[:keep]) + "\n")


def test_optimize_with_the_embedded_model(tmp_path: Path) -> None:
    ok, reason = available()
    assert ok, f"the embedded model must be installed for `make test`: {reason}"
    repo = make_repo(tmp_path / "repo", shrink)
    proc = run_cli(
        "optimize", str(repo), "--mutate", "prompts", "--max-metric-calls", "45", "--concurrency", "1", "--json",
        env=cli_env(), timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seed_score"] is not None and result["metric_calls"] <= 45
    with Store(f"sqlite:///{repo / '.codeevolver' / 'runs.db'}") as store:
        run = store.get_run(result["run_id"])
        assert run.config["_resolved"]["embedded"] is True
        models = next(e.data["models"] for e in store.events(run.id) if e.kind == "run_started")
        assert models == {"task": "openai/smollm2", "reflection": "openai/smollm2", "agent": "openai/smollm2"}
        assert len(store.list_candidates(run.id)) > 1, "no proposal was made"
    assert result["usage"]["calls"] >= 1  # the reflection went to the local model, metered
    port = urlparse(run.config["_resolved"]["api_base"]).port
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the embedded server outlived the run"
