"""CodeEvolver's exception tree.

Every error a user can cause is a :class:`CodeEvolverError` carrying one clear
message and, where we know it, the fix. Errors of libraries underneath (git,
litellm, SQLAlchemy, subprocess) are translated into this tree at the
boundary; the CLI prints ``message`` and ``fix`` and exits with status 2.

    CodeEvolverError
    ├── ConfigError          codeevolver.toml or flags are wrong
    ├── DatasetError         a dataset file or row is unusable
    ├── UserProgramError     the user's program or metric cannot run
    ├── GitError             the target is not a usable git repository
    ├── ModelError           a model endpoint is unreachable or refuses us
    ├── SandboxError         a sandbox tier cannot start or run a command
    ├── StoreError           the state directory or database is unusable
    └── RunNotFound          resume/status of a run that does not exist
"""

from __future__ import annotations


class CodeEvolverError(Exception):
    """A user-facing error: one message naming the problem, and the fix."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message}\n  fix: {self.fix}"
        return self.message


class ConfigError(CodeEvolverError):
    """codeevolver.toml or a CLI flag is wrong."""


class DatasetError(CodeEvolverError):
    """A dataset file is missing, empty or has a malformed row."""


class UserProgramError(CodeEvolverError):
    """The user's program or metric cannot be imported or run."""


class GitError(CodeEvolverError):
    """The target is not a git repository, is dirty, or a git command failed."""


class ModelError(CodeEvolverError):
    """A model endpoint is unreachable, rejects our key, or returns garbage."""


class SandboxError(CodeEvolverError):
    """A sandbox tier is unavailable or failed to run a command."""


class StoreError(CodeEvolverError):
    """The state directory or the run database cannot be used."""


class RunNotFound(CodeEvolverError):
    """A run id that the store does not know."""
