"""Git operations on the user's repository, done so that nothing in a worktree can act on the host.

A candidate's working directory is a plain export of its commit (no ``.git``
inside), so code running in the sandbox cannot touch the repository, its
config or its hooks. Commits are made with git plumbing against the main
repository using a private index: ``commit-tree`` never runs hooks, and
``core.hooksPath=/dev/null`` and ``core.fsmonitor=false`` are forced on every
call anyway. ``git add`` stores symlinks as links and never follows them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from codeevolver.errors import GitError

_SAFE = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.pager=cat"]
_AUTHOR = {
    "GIT_AUTHOR_NAME": "CodeEvolver",
    "GIT_AUTHOR_EMAIL": "codeevolver@localhost",
    "GIT_COMMITTER_NAME": "CodeEvolver",
    "GIT_COMMITTER_EMAIL": "codeevolver@localhost",
}


def git(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    check: bool = True,
) -> str:
    """Run one git command with hooks and fsmonitor disabled; raise GitError on failure."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    full_env.update(_AUTHOR)
    full_env.update(env or {})
    proc = subprocess.run(["git", *_SAFE, *args], cwd=cwd, env=full_env, input=stdin, capture_output=True, check=False)
    if check and proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"git {args[0]} failed in {cwd}: {message[-1] if message else proc.returncode}")
    return proc.stdout.decode("utf-8", "replace")


def check_repo(path: Path, state_dir_name: str = ".codeevolver") -> tuple[Path, str]:
    """Return (repository root, HEAD commit); refuse a non-repo, an empty repo or a dirty one."""
    if not path.is_dir():
        raise GitError(f"{path} is not a directory", "pass the path of your project's git repository")
    proc = subprocess.run(
        ["git", *_SAFE, "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise GitError(
            f"{path} is not a git repository",
            f"run `git init && git add -A && git commit -m init` in {path}",
        )
    root = Path(proc.stdout.strip())
    head = subprocess.run(
        ["git", *_SAFE, "rev-parse", "--verify", "HEAD^{commit}"], cwd=root, capture_output=True, text=True
    )
    if head.returncode != 0:
        raise GitError(f"{root} has no commits yet", "commit your project first: git add -A && git commit -m init")
    exclude_state_dir(root, state_dir_name)
    dirty = git("status", "--porcelain", "--untracked-files=normal", cwd=root).strip()
    if dirty:
        first = dirty.splitlines()[0]
        raise GitError(
            f"{root} has uncommitted changes ({first.strip()}"
            + (f" and {len(dirty.splitlines()) - 1} more" if len(dirty.splitlines()) > 1 else "")
            + ")",
            "commit or stash them first, so every candidate starts from a known commit",
        )
    return root, head.stdout.strip()


def exclude_state_dir(root: Path, name: str) -> None:
    """Keep CodeEvolver's state directory out of ``git status`` without touching tracked files."""
    info = Path(git("rev-parse", "--git-path", "info/exclude", cwd=root).strip())
    info = info if info.is_absolute() else root / info
    lines = info.read_text().splitlines() if info.exists() else []
    if f"/{name}/" not in lines:
        info.parent.mkdir(parents=True, exist_ok=True)
        with info.open("a") as handle:
            handle.write(f"/{name}/\n")


class GitWorkspace:
    """Worktree directories and commits for one run. Thread-safe."""

    def __init__(self, repo: Path, work_root: Path) -> None:
        self.repo = repo
        self.work_root = work_root
        self._lock = threading.Lock()
        self._exports: dict[str, Path] = {}
        self._export_locks: dict[str, threading.Lock] = {}
        self._trees: dict[str, str] = {}
        """commit -> its tree, for commits made or looked up here (one ``rev-parse`` fewer per code change)."""
        self.git_dir = git("rev-parse", "--absolute-git-dir", cwd=repo).strip()
        work_root.mkdir(parents=True, exist_ok=True)

    def export(self, commit: str, dest: Path) -> Path:
        """Write the tree of ``commit`` into a fresh directory ``dest`` (no .git inside)."""
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        with tempfile.NamedTemporaryFile(dir=self.work_root, prefix="index-") as index:
            env = self._env(index.name, dest)
            git("read-tree", commit, cwd=dest, env=env)
            # Parallel checkout (a worker per core): creating the files dominates a large tree's export.
            git("-c", "checkout.workers=0", "checkout-index", "--all", "--force", cwd=dest, env=env)
        return dest

    def evaluation_dir(self, commit: str) -> Path:
        """A shared, cached export of ``commit`` to run evaluations in."""
        with self._lock:
            if commit in self._exports:
                return self._exports[commit]
            lock = self._export_locks.setdefault(commit, threading.Lock())
        with lock:
            with self._lock:
                if commit in self._exports:
                    return self._exports[commit]
            path = self.export(commit, self.work_root / f"eval-{commit[:16]}")
            with self._lock:
                self._exports[commit] = path
            return path

    def _env(self, index: str, worktree: Path) -> dict[str, str]:
        return {"GIT_INDEX_FILE": index, "GIT_DIR": self.git_dir, "GIT_WORK_TREE": str(worktree)}

    def commit_dir(self, worktree: Path, parent: str, message: str) -> str | None:
        """Commit everything in ``worktree`` on top of ``parent``; None when nothing changed."""
        with tempfile.NamedTemporaryFile(dir=self.work_root, prefix="index-") as index:
            env = self._env(index.name, worktree)
            git("read-tree", parent, cwd=worktree, env=env)
            git("add", "--all", ".", cwd=worktree, env=env)
            tree = git("write-tree", cwd=worktree, env=env).strip()
        if tree == self._tree_of(parent):
            return None
        commit = git("commit-tree", tree, "-p", parent, "-m", message, cwd=self.repo).strip()
        self._trees[commit] = tree
        return commit

    def _tree_of(self, commit: str) -> str:
        tree = self._trees.get(commit)
        if tree is None:
            tree = self._trees[commit] = git("rev-parse", f"{commit}^{{tree}}", cwd=self.repo).strip()
        return tree

    def adopt(self, worktree: Path, commit: str) -> Path:
        """Make an agent's ``worktree``, just committed as ``commit``, the evaluation export of ``commit``.

        Saves writing the whole tree a second time. Whatever the commit does not hold (files
        that ``.gitignore`` kept out, a nested ``.git``, fifos) is removed and file modes are
        reset to what an export would give, so the directory equals a fresh export. Only call
        it once nothing runs in ``worktree`` any more.
        """
        with self._lock:
            known = self._exports.get(commit)
        if known is not None:
            self.remove(worktree)
            return known
        listing = git("ls-tree", "-r", "-z", "--full-tree", commit, cwd=self.repo).split("\0")
        modes = {}
        for line in filter(None, listing):
            meta, path = line.split("\t", 1)
            modes[path] = meta.split(" ", 1)[0]
        _prune_to(worktree, "", modes, _parent_dirs(modes))
        dest = self.work_root / f"eval-{commit[:16]}"
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(worktree, dest)
        with self._lock:
            self._exports[commit] = dest
        return dest

    def commit_files(self, parent: str, files: dict[str, str], message: str) -> str:
        """Commit new contents for a few files on top of ``parent`` without any checkout."""
        if not files:
            return parent
        with tempfile.NamedTemporaryFile(dir=self.work_root, prefix="index-") as index:
            env = {"GIT_INDEX_FILE": index.name}
            git("read-tree", parent, cwd=self.repo, env=env)
            changed = False
            for path, text in files.items():
                blob = git("hash-object", "-w", "--stdin", cwd=self.repo, stdin=text.encode()).strip()
                old = git("ls-tree", parent, "--", path, cwd=self.repo).split()
                changed |= not old or old[2] != blob
                git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", cwd=self.repo, env=env)
            if not changed:
                return parent
            tree = git("write-tree", cwd=self.repo, env=env).strip()
        commit = git("commit-tree", tree, "-p", parent, "-m", message, cwd=self.repo).strip()
        self._trees[commit] = tree
        return commit

    def set_ref(self, ref: str, commit: str) -> None:
        """Point ``ref`` (``refs/heads/...`` for a visible branch) at ``commit``."""
        git("update-ref", ref, commit, cwd=self.repo)

    def read_file(self, commit: str, path: str) -> str | None:
        out = subprocess.run(
            ["git", *_SAFE, "show", f"{commit}:{path}"], cwd=self.repo, capture_output=True, check=False
        )
        return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else None

    def list_files(self, commit: str, limit: int = 400) -> list[str]:
        files = git("ls-tree", "-r", "--name-only", commit, cwd=self.repo).splitlines()
        return files[:limit]

    def diff(self, old: str, new: str) -> str:
        return git("diff", "--no-ext-diff", "--no-textconv", old, new, cwd=self.repo)

    def drop_export(self, commit: str) -> None:
        """Delete the cached evaluation export of ``commit`` (a rejected candidate's)."""
        with self._lock:
            path = self._exports.pop(commit, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


_FILE_MODES = {"100644": 0o644, "100755": 0o755}


def _parent_dirs(paths: dict[str, str]) -> set[str]:
    dirs = {path for path, mode in paths.items() if mode == "160000"}  # a submodule exports as an empty dir
    for path in paths:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return dirs


def _prune_to(root: Path, prefix: str, modes: dict[str, str], dirs: set[str]) -> None:
    """Remove from ``root`` every entry that is not in the commit; reset modes. Never follows a link."""
    with os.scandir(root) as entries:
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if rel not in dirs:
                    shutil.rmtree(entry.path)
                    continue
                if entry.stat(follow_symlinks=False).st_mode & 0o7777 != 0o755:
                    os.chmod(entry.path, 0o755)
                if modes.get(rel) == "160000":
                    with os.scandir(entry.path) as inner_entries:
                        for inner in inner_entries:
                            _remove_entry(inner)
                else:
                    _prune_to(Path(entry.path), rel + "/", modes, dirs)
                continue
            mode = modes.get(rel)
            if entry.is_symlink():
                if mode != "120000":
                    os.unlink(entry.path)
            elif entry.is_file(follow_symlinks=False) and mode in _FILE_MODES:
                if entry.stat(follow_symlinks=False).st_mode & 0o7777 != _FILE_MODES[mode]:
                    os.chmod(entry.path, _FILE_MODES[mode])
            else:
                os.unlink(entry.path)


def _remove_entry(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)
