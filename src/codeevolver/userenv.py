"""The interpreter that runs the user's program, kept apart from ours.

The orchestrator's dependencies (litellm, SQLAlchemy, ...) must never be
importable by the user's program, and the user's pins must never fight ours.
So the user's program always runs in a virtual environment of its own, without
system site packages: built from the repo's ``requirements.txt`` when there is
one, or an empty one otherwise. Environments are cached by content, built in a
temporary folder and renamed into place when complete (a killed build leaves
no half environment), under a file lock (concurrent builders wait, then reuse).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from codeevolver.errors import UserProgramError

REQUIREMENTS = "requirements.txt"
PIP_TIMEOUT_S = 1800.0
COMPLETE_MARKER = ".codeevolver-complete"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "codeevolver" / "envs"


def default_base_python() -> str:
    """The interpreter our own venv was made from (not the venv itself, whose packages are ours)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def resolve_python(repo: Path, cache_dir: Path | None = None, base_python: str | None = None) -> Path:
    """Return the python executable of an isolated environment for the program in ``repo``.

    With ``requirements.txt`` the environment holds exactly what it asks for;
    without one it is an empty venv, so the base interpreter's own site-packages
    stay invisible too. The cache key is the sha256 of requirements.txt plus the
    base interpreter's path, so changing either builds a new environment. Only
    that file's bytes count: a ``-r other.txt`` or ``-e .`` line it contains is
    installed but does not change the key.
    """
    base = base_python or default_base_python()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    requirements = Path(repo) / REQUIREMENTS
    digest = hashlib.sha256()
    if requirements.is_file():
        digest.update(requirements.read_bytes())
        prefix = "req"
    else:
        prefix = "bare"
    digest.update(b"\0" + os.path.realpath(base).encode())
    key = f"{prefix}-{digest.hexdigest()[:32]}"
    final = root / key
    python = final / "bin" / "python"
    if (final / COMPLETE_MARKER).is_file():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        if (final / COMPLETE_MARKER).is_file():
            return python  # another builder finished while we waited
        _remove_leftovers(root, key, final)
        tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _create_venv(base, tmp, with_pip=prefix == "req")
            if prefix == "req":
                _pip_install(tmp, requirements)
            _point_scripts_at(tmp, final)
            (tmp / COMPLETE_MARKER).write_text(f"{base}\n")
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return python


def python_prefixes(python: Path) -> tuple[Path, ...]:
    """The folders an interpreter needs to be visible: its venv and the base install it links to."""
    python = Path(python)
    found = [python.parent.parent]
    real = Path(os.path.realpath(python))
    if real.parent.parent not in found:
        found.append(real.parent.parent)
    return tuple(found)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path, key: str, final: Path) -> None:
    """Under the lock, any temp dir for ``key`` is from a dead builder, and ``final`` is incomplete."""
    for stale in root.glob(f".{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    """Our environment for the build (proxies, pip config), minus what would point at our interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _create_venv(base: str, target: Path, with_pip: bool) -> None:
    argv = [base, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(target)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserProgramError(
            f"cannot create a virtual environment with {base}: {exc}",
            "point base_python at a working Python 3.9+ interpreter with the venv module",
        ) from exc
    if proc.returncode != 0:
        raise UserProgramError(
            f"cannot create a virtual environment with {base}:\n{_tail(proc.stdout + proc.stderr)}",
            "point base_python at a working Python 3.9+ interpreter with the venv module",
        )


def _pip_install(venv: Path, requirements: Path) -> None:
    argv = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", "-r", str(requirements)]
    try:
        proc = subprocess.run(
            argv,
            cwd=requirements.parent,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=PIP_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise UserProgramError(
            f"pip install -r {requirements} did not finish in {PIP_TIMEOUT_S:g}s",
            f"trim {REQUIREMENTS} or check the package index is reachable",
        ) from exc
    if proc.returncode != 0:
        raise UserProgramError(
            f"pip could not install {requirements}:\n{_tail(proc.stdout + proc.stderr)}",
            f"fix the failing line in {REQUIREMENTS} (package name, version pin, or index access)",
        )


def _point_scripts_at(built_at: Path, final: Path) -> None:
    """Rewrite the scripts in ``bin/`` (shebangs, activate) for the folder they are renamed to."""
    old, new = str(built_at).encode(), str(final).encode()
    for script in (built_at / "bin").iterdir():
        if script.is_symlink() or not script.is_file() or script.stat().st_size > 1_000_000:
            continue
        data = script.read_bytes()
        if old in data:
            script.write_bytes(data.replace(old, new))


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])
