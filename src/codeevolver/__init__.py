"""CodeEvolver: evolve an AI application's prompts and code against a dataset and a metric.

The public API is small; everything else is internal and may change.
"""

from typing import TYPE_CHECKING, Any

from codeevolver.errors import (
    CodeEvolverError,
    ConfigError,
    DatasetError,
    GitError,
    ModelError,
    RunNotFound,
    SandboxError,
    StoreError,
    UserProgramError,
)

__version__ = "0.1.0"

_SESSION_NAMES = ("RunOptions", "RunSummary", "resume_run", "start_run")


def __getattr__(name: str) -> Any:
    """Import the run API on first use: the sandbox launcher and the user runner import this
    package too, and must not pay for SQLAlchemy, alembic and litellm at every start."""
    if name in _SESSION_NAMES:
        from codeevolver import session

        return getattr(session, name)
    raise AttributeError(f"module 'codeevolver' has no attribute {name!r}")


if TYPE_CHECKING:
    from codeevolver.session import RunOptions, RunSummary, resume_run, start_run

__all__ = [
    "CodeEvolverError",
    "ConfigError",
    "DatasetError",
    "GitError",
    "ModelError",
    "RunNotFound",
    "RunOptions",
    "RunSummary",
    "SandboxError",
    "StoreError",
    "UserProgramError",
    "__version__",
    "resume_run",
    "start_run",
]
