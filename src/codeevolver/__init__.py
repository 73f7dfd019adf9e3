"""CodeEvolver: evolve an AI application's prompts and code against a dataset and a metric.

The public API is small; everything else is internal and may change.
"""

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
from codeevolver.session import RunOptions, RunSummary, resume_run, start_run

__version__ = "0.1.0"

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
