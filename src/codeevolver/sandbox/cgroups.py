"""Per-run cgroups: the only thing that caps processes and memory and finds every descendant.

A pid namespace does not limit how many processes a sandbox makes, and a
double-forked daemon leaves the process group; a cgroup sees them all. Each
run gets its own group (memory, pids, cpu, and a freezer to stop a fork bomb
while it is being killed), entered while bwrap waits on its block fd, so no
user code ever runs outside it.

Both layouts are handled: cgroup v1 (one hierarchy per controller, as on
hybrid hosts) and the unified v2 hierarchy. On v1 run groups are made right
in *this* process's own groups, so limits set on us still apply and nothing
of ours is left there once the run is over (a leftover child would keep
whoever made our group from removing it). On v2 they go under
``<v2 root>/codeevolver``: the "no processes in inner nodes" rule forbids
children of our own busy group.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
SETTLE_S = 2.0


class CgroupUnavailable(RuntimeError):
    """This host gives us no writable cgroup hierarchy with the controllers we need."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None
    pids: int
    cpu_percent: int | None


@dataclass(frozen=True)
class Layout:
    """Where run groups go: one parent per v1 controller, or one v2 parent."""

    version: int
    parents: dict[str, Path]


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fstype, super options) of every cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        found.append((fields[3], fields[4].replace("\\040", " "), rfields[0], set(rfields[2].split(","))))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Our cgroup path per v1 controller, plus key "" for the v2 hierarchy."""
    paths = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def detect(mountinfo: str | None = None, proc_cgroup: str | None = None) -> Layout:
    """Find a writable layout with memory, pids and cpu (and a freezer on v1)."""
    mountinfo = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    proc_cgroup = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    mounts = _mounts(mountinfo)
    own = _own_paths(proc_cgroup)
    for _root, point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        available = set((Path(point) / "cgroup.controllers").read_text().split()) if _readable(point) else set()
        if set(V2_CONTROLLERS) <= available:
            return Layout(2, {"": Path(point) / "codeevolver"})
    parents: dict[str, Path] = {}
    for root, point, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for name in V1_CONTROLLERS:
            if name in options and name not in parents:
                path = own.get(name, "/")
                rel = path[len(root) :] if path.startswith(root) else path
                parents[name] = Path(point) / rel.lstrip("/")
    missing = [name for name in V1_CONTROLLERS if name not in parents]
    if missing:
        raise CgroupUnavailable(f"no cgroup hierarchy with the {', '.join(missing)} controller is mounted")
    return Layout(1, parents)


def _readable(point: str) -> bool:
    return os.access(os.path.join(point, "cgroup.controllers"), os.R_OK)


_layout: Layout | None = None
_layout_lock = threading.Lock()


def layout() -> Layout:
    """The host's layout, detected once and its parents created."""
    global _layout
    with _layout_lock:
        if _layout is None:
            found = detect()
            try:
                for parent in found.parents.values():
                    parent.mkdir(exist_ok=True)
                if found.version == 2:
                    _enable_v2(found.parents[""])
            except OSError as exc:
                raise CgroupUnavailable(f"cannot create {exc.filename}: {exc.strerror}") from exc
            _layout = found
        return _layout


def _enable_v2(parent: Path) -> None:
    """Turn the controllers on for our parent's children (and in the parent's parent for the parent)."""
    wanted = " ".join(f"+{name}" for name in V2_CONTROLLERS)
    for node in (parent.parent, parent):
        (node / "cgroup.subtree_control").write_text(wanted)


class RunGroup:
    """One run's cgroup (a directory per v1 controller, or one v2 directory)."""

    def __init__(self, found: Layout, limits: Limits) -> None:
        self.version = found.version
        name = f"run-{uuid.uuid4().hex[:16]}"
        self.dirs = {controller: parent / name for controller, parent in found.parents.items()}
        made: list[Path] = []
        try:
            for path in self.dirs.values():
                path.mkdir()
                made.append(path)
            self._apply(limits)
        except OSError as exc:
            for path in made:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise CgroupUnavailable(f"cannot set up {exc.filename or 'a cgroup'}: {exc.strerror}") from exc

    @property
    def procs_files(self) -> list[Path]:
        """Every ``cgroup.procs`` a process must be written into to be fully inside."""
        return [path / "cgroup.procs" for path in self.dirs.values()]

    def enter(self, *pids: int) -> None:
        """Move ``pids`` (each a single-threaded process) into every hierarchy of this group."""
        for procs in self.procs_files:
            for pid in pids:
                _write(procs, str(pid))

    def _dir(self, controller: str) -> Path:
        return self.dirs[controller if self.version == 1 else ""]

    def _apply(self, limits: Limits) -> None:
        if self.version == 1:
            _write(self._dir("pids") / "pids.max", str(limits.pids))
            if limits.memory_bytes is not None:
                memory = self._dir("memory")
                _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
                swap = memory / "memory.memsw.limit_in_bytes"
                if swap.exists():  # memory + swap, so the limit cannot be dodged by swapping
                    _write(swap, str(limits.memory_bytes))
            if limits.cpu_percent is not None:
                cpu = self._dir("cpu")
                _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(max(1000, limits.cpu_percent * CPU_PERIOD_US // 100)))
            return
        path = self._dir("")
        _write(path / "pids.max", str(limits.pids))
        if limits.memory_bytes is not None:
            _write(path / "memory.max", str(limits.memory_bytes))
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
        if limits.cpu_percent is not None:
            quota = max(1000, limits.cpu_percent * CPU_PERIOD_US // 100)
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")

    def pids(self) -> list[int]:
        """Processes in the group right now."""
        try:
            text = (self._dir("pids") / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split()]

    def oom_killed(self) -> bool:
        """Whether the kernel killed something here for exceeding the memory limit."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            text = (self._dir("memory") / name).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip() not in ("", "0"):
                return True
        return False

    def kill_all(self) -> None:
        """SIGKILL every process in the group, fork bombs and daemons included."""
        if not self.pids():
            return
        if self.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            _write(self.dirs[""] / "cgroup.kill", "1")
        else:
            self._freeze(True)
            try:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            finally:
                self._freeze(False)
        deadline = time.monotonic() + SETTLE_S
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():  # anything that slipped in before the freeze took hold
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def _freeze(self, frozen: bool) -> None:
        if self.version == 1:
            state = self.dirs["freezer"] / "freezer.state"
            _write(state, "FROZEN" if frozen else "THAWED")
            deadline = time.monotonic() + SETTLE_S
            while frozen and state.read_text().strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.001)
            return
        _write(self.dirs[""] / "cgroup.freeze", "1" if frozen else "0")
        deadline = time.monotonic() + SETTLE_S
        while frozen and "frozen 1" not in (self.dirs[""] / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)

    def remove(self) -> None:
        """Kill what is left and delete the group's directories."""
        self.kill_all()
        for path in self.dirs.values():
            for _ in range(200):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.005)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
