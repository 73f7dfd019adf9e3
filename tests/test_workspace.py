"""GitWorkspace: exports, commits of an agent's tree, and adopting that tree as the child's export."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from codeevolver.workspace.git import GitWorkspace


def _repo(root: Path) -> str:
    root.mkdir()
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text("X = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / ".gitignore").write_text("*.log\ncache/\n")
    os.symlink("pkg/mod.py", root / "link.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "core.hooksPath=/dev/null"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "seed"], cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def _snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root``: kind, permission bits, content or link target."""
    found: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", 0, os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", info.st_mode & 0o7777, "")
            elif stat.S_ISREG(info.st_mode):
                found[rel] = ("file", info.st_mode & 0o7777, path.read_bytes().hex())
            else:  # a fifo or socket: never opened, it could block
                found[rel] = ("other", info.st_mode, "")
    return found


def test_adopted_agent_tree_equals_a_fresh_export_of_its_commit(tmp_path: Path) -> None:
    seed = _repo(tmp_path / "repo")
    ws = GitWorkspace(tmp_path / "repo", tmp_path / "work")
    tree = ws.export(seed, tmp_path / "work" / "agent-c001")
    # What an agent leaves behind: an edit, a new file, a deletion, a chmod, ignored files,
    # a nested repository, a fifo, a stray symlink to a host path and a locked-down folder.
    (tree / "pkg" / "mod.py").write_text("X = 2\n")
    (tree / "pkg" / "new.py").write_text("Y = 3\n")
    (tree / "run.sh").unlink()
    (tree / "pkg" / "mod.py").chmod(0o600)
    (tree / "debug.log").write_text("noise\n")
    (tree / "cache").mkdir()
    (tree / "cache" / "blob.bin").write_bytes(b"\0" * 64)
    (tree / ".git").mkdir()
    (tree / ".git" / "config").write_text("[core]\n\tfsmonitor = evil\n")
    os.mkfifo(tree / "pkg" / "pipe")
    os.symlink("/etc/passwd", tree / "stray.log")
    (tree / "pkg").chmod(0o700)

    commit = ws.commit_dir(tree, seed, "agent change")
    assert commit is not None
    adopted = ws.adopt(tree, commit)

    assert not tree.exists()
    assert ws.evaluation_dir(commit) == adopted  # the cached export, not a second one
    fresh = ws.export(commit, tmp_path / "fresh")
    assert _snapshot(adopted) == _snapshot(fresh)
    assert (adopted / "pkg" / "mod.py").read_text() == "X = 2\n"
    assert not (adopted / "run.sh").exists()
    assert os.readlink(adopted / "link.py") == "pkg/mod.py"
    assert (tmp_path / "repo" / "pkg" / "mod.py").read_text() == "X = 1\n"  # the user's checkout untouched


def test_dropping_an_adopted_export_removes_it(tmp_path: Path) -> None:
    seed = _repo(tmp_path / "repo")
    ws = GitWorkspace(tmp_path / "repo", tmp_path / "work")
    tree = ws.export(seed, tmp_path / "work" / "agent-c002")
    (tree / "pkg" / "mod.py").write_text("X = 5\n")
    commit = ws.commit_dir(tree, seed, "agent change")
    assert commit is not None
    adopted = ws.adopt(tree, commit)
    ws.drop_export(commit)
    assert not adopted.exists()
    again = ws.evaluation_dir(commit)  # exported afresh on demand
    assert (again / "pkg" / "mod.py").read_text() == "X = 5\n"
