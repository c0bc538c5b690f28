"""Process helpers shared by every floor: environments for helper processes, and process groups that never
outlive their owner nor leave vLLM's shared memory behind.

vLLM (server or offline engine) spawns an EngineCore and workers that share memory through
``/dev/shm/psm_*`` segments (Python's ``multiprocessing.shared_memory``) and ``sem.mp-*`` semaphores.
Python's resource tracker unlinks them when their creators die, unless it is killed too (a SIGKILL of
the whole group). So every engine (and training) runs in a process group of its own, led by a *guard*::

    python -m rlt.procs guard [--grace S] [--remove DIR] -- CMD ...

The guard has the parent-death signal (SIGTERM when whoever started it dies, even by SIGKILL) and is a
child subreaper. It notes, every few seconds, the processes under it (:class:`Tree`: its group, and its
descendants in other sessions, such as torchrun's ranks) and the segments they map (after a SIGKILL /proc
no longer tells). When CMD exits or it receives SIGTERM/SIGINT/SIGHUP it stops them all (SIGTERM,
``grace`` seconds, SIGKILL), unlinks the segments that are left, removes ``--remove`` directories and
exits with CMD's code (128 + signal when it was stopped by a signal). Its owner (:class:`Guarded`) notes
the same from outside, so a SIGKILL of the whole group (guard included) is cleaned up too.

From a terminal, ``python -m rlt.procs run -- CMD ...`` (:func:`supervise`) runs CMD under a guard while
staying in the terminal's process group: Ctrl-C and kill reach it and it passes them on; rlt.distill and
rlt.eval do this to themselves (:func:`run_supervised`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DIST_ENV_PREFIXES = ("ACCELERATE_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE")
# A cluster launcher's variables that would make a single-node launch act as one rank of a larger job (launch.sh
# drops the same names in bash).
CLUSTER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT")
CLUSTER_ENV_PREFIXES = ("PET_", "TORCHELASTIC_")
SHM = Path("/dev/shm")
SHM_PREFIXES = ("psm_", "sem.mp-")  # multiprocessing.shared_memory segments and named semaphores
PARENT_ENV = "RLT_GUARD_PARENT"     # pid of the guard's owner: the guard dies with it
SUPERVISED_ENV = "RLT_SUPERVISED_BY"  # pid of the guard a self-supervised entry point runs under
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
USAGE = ("usage: python -m rlt.procs guard [--grace S] [--remove DIR] -- CMD ...   (in a group of its own)\n"
         "       python -m rlt.procs run -- CMD ...                                 (from a terminal or script)")
SCAN_INTERVAL = 2.0  # seconds between two looks at a group's segments (they live as long as the engine)


def non_distributed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the variables of a distributed launch, for helper
    processes (a tiny-model build, a vLLM server) started from inside one."""
    return {k: v for k, v in (os.environ if env is None else env).items() if not k.startswith(DIST_ENV_PREFIXES)}


def drop_cluster_env(env=None) -> list[str]:
    """Remove :data:`CLUSTER_ENV` and ``PET_*``/``TORCHELASTIC_*`` from ``env`` (default: this process's
    environment); returns the names removed."""
    env = os.environ if env is None else env
    names = sorted(k for k in env if k in CLUSTER_ENV or k.startswith(CLUSTER_ENV_PREFIXES))
    for k in names:
        del env[k]
    return names


# ----------------------------------------------------------------------------------------- parent death
def set_parent_death_signal(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux). ``parent``: the pid the
    parent had when it started us; if it is already gone (we were re-parented), ``sig`` is sent now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init (Linux), so they stay in its tree."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


# ----------------------------------------------------------------------------------------- process trees
def process_table() -> dict[int, tuple[int, int, int]]:
    """{pid: (parent pid, process group, start time)} of every live (non-zombie) process, from /proc/*/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[0] not in "ZX":
            table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int, int]]) -> dict[int, int]:
    """{pid: start time} of the live descendants of ``root``, in any session (torchrun starts each rank in a
    session of its own)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out[pid] = table[pid][2]
        todo += children.get(pid, ())
    return out


def shm_segments(pids) -> set[str]:
    """The /dev/shm segments (``psm_*``, ``sem.mp-*``) that ``pids`` have mapped, from /proc/PID/maps.

    A named semaphore's creator maps it under a temporary name that glibc's ``sem_open`` unlinks once the file
    is linked as ``sem.mp-*``, so its line reads ``/dev/shm/sem.XXXXXX (deleted)``; such files are found by
    device and inode among the names /dev/shm has now.
    """
    found, deleted = set(), set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(None, 5)
            path = parts[5] if len(parts) == 6 else ""
            if not path.startswith("/dev/shm/"):
                continue
            if path.endswith(" (deleted)"):
                major, minor = parts[3].split(":")
                deleted.add((os.makedev(int(major, 16), int(minor, 16)), int(parts[4])))
                continue
            name = path[len("/dev/shm/"):]
            if "/" not in name and name.startswith(SHM_PREFIXES):
                found.add(str(SHM / name))
    if deleted:
        try:
            names = [e for e in os.scandir(SHM) if e.name.startswith(SHM_PREFIXES)]
        except OSError:
            names = []
        for entry in names:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in deleted:
                found.add(str(SHM / entry.name))
    return found


def unlink_segments(paths) -> list[str]:
    """Unlink the segments that still exist and belong to this user; returns the ones removed."""
    removed = []
    for path in sorted(paths):
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("could not remove %s: %s", path, e)
    return removed


class Tree:
    """What runs under ``root`` (a guard): its descendants in any session and the members of the process group
    it leads, and the shared memory they map. A process once seen stays known by pid and start time, so it
    is still found after its parent died; ``include_root``: the root itself counts (not for the guard)."""

    def __init__(self, root: int, include_root: bool = True):
        self.root = root
        self.root_start = process_table().get(root, (0, 0, None))[2]
        self.include_root = include_root
        self.seen: dict[int, int] = {}
        self.segments: set[str] = set()
        self._lock = threading.Lock()  # a recorder thread and a stop may look at once

    def scan(self, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
        """Look again; returns the live processes (segments they map are added to ``segments``)."""
        table = process_table() if table is None else table
        with self._lock:
            return self._scan(table)

    def _scan(self, table: dict[int, tuple[int, int, int]]) -> list[int]:
        if self.root_start is not None and table.get(self.root, (0, 0, None))[2] == self.root_start:
            self.seen.update(descendants(self.root, table))
            if self.include_root:
                self.seen[self.root] = self.root_start
        # a group outlives its leader while it has members, and its id is not reused meanwhile
        self.seen.update({pid: t for pid, (_, pgid, t) in table.items() if pgid == self.root})
        if not self.include_root:
            self.seen.pop(self.root, None)
        self.seen = {pid: t for pid, t in self.seen.items() if table.get(pid, (0, 0, None))[2] == t}
        self.segments |= shm_segments(self.seen)
        return list(self.seen)


def _kill(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_stopped(tree: Tree, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while tree.scan():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_tree(tree: Tree, grace: float = 15.0) -> list[str]:
    """SIGTERM every process of ``tree``, SIGKILL what is left after ``grace`` seconds, then unlink the segments
    they mapped that are left. Returns the segments removed.

    Python's resource trackers (they ignore SIGTERM) are killed last: once the processes they serve are gone
    they unlink what those leaked, including semaphores nobody maps any more, and exit by themselves.
    """
    live = tree.scan()
    if live:
        _kill(live, signal.SIGTERM)
        if not _wait_stopped(tree, grace):
            logger.warning("processes under %d still running %.0fs after SIGTERM: sending SIGKILL", tree.root, grace)
            _kill([p for p in tree.scan() if not _is_resource_tracker(p)], signal.SIGKILL)
            if not _wait_stopped(tree, 5.0):
                _kill(tree.scan(), signal.SIGKILL)
                if not _wait_stopped(tree, 10.0):
                    logger.warning("processes under %d still running after SIGKILL: %s", tree.root, tree.scan())
    return unlink_segments(tree.segments)


class TreeRecorder:
    """Looks at some :class:`Tree` s every ``interval`` seconds in a daemon thread (after a SIGKILL /proc no
    longer tells which processes and segments were theirs)."""

    def __init__(self, interval: float = SCAN_INTERVAL):
        self.interval = interval
        self.trees: dict[int, Tree] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlt-tree-recorder", daemon=True)

    def watch(self, root: int) -> Tree:
        with self._lock:
            tree = self.trees.setdefault(root, Tree(root))
        if not self._thread.is_alive() and not self._done.is_set():
            self._thread.start()
        return tree

    def scan(self) -> None:
        table = process_table()
        with self._lock:
            trees = list(self.trees.values())
        for tree in trees:
            tree.scan(table)

    def close(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.scan()


# ----------------------------------------------------------------------------------------- guard
def guard_command(cmd: list[str], grace: float = 15.0, remove: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "rlt.procs", "guard", "--grace", str(grace),
            *[a for d in remove for a in ("--remove", str(d))], "--", *cmd]


class Guarded:
    """CMD under a guard (module docstring): the guard leads a new session (``pgid``), dies with this process
    and stops everything under it on SIGTERM; ``tree`` is what ``recorder`` notes of it from outside, for
    :meth:`stop` to clean up whatever the guard could not."""

    def __init__(self, cmd: list[str], recorder: TreeRecorder, grace: float = 15.0,
                 remove: tuple[str, ...] = (), env: dict[str, str] | None = None, **popen_kwargs):
        self.grace = grace
        env = dict(os.environ if env is None else env, **{PARENT_ENV: str(os.getpid())})
        self.proc = subprocess.Popen(guard_command(cmd, grace, remove), env=env, start_new_session=True,
                                     **popen_kwargs)
        self.pgid = self.proc.pid
        self.tree = recorder.watch(self.pgid)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Ask the guard to stop, wait for it, then sweep: stop whatever is left under it and unlink the
        segments noted. Returns the guard's exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=self.grace + 20)
            except subprocess.TimeoutExpired:
                pass
        removed = stop_tree(self.tree, grace=2.0)
        if removed:
            logger.info("guard %d: removed %d shared-memory segment(s) left behind", self.pgid, len(removed))
        return self.proc.wait()


def exclusive_lock(path: str | Path, busy: str, hold: bool = True):
    """An exclusive, non-blocking ``flock`` on ``path`` for this process. ``hold``: take it and return the open
    file (the lock lasts while the file is open, at most as long as the process); else only see that nobody
    holds it (an absent file: nobody; nothing is created). Held by another process: :class:`ConfigError`
    ``busy``. A filesystem without flock (Lustre or NFS mounted without it): a warning, and no lock."""
    import fcntl

    from rlt.errors import ConfigError

    path = Path(path)
    if not hold and not path.exists():
        return None
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(busy) from None
    except OSError as e:
        f.close()
        logger.warning("%s: cannot be locked on this filesystem (%s); a second run there would not be refused",
                       path, e.strerror or e)
        return None
    if hold:
        return f
    f.close()
    return None


def shell_exit_code(rc: int) -> int:
    """A Popen return code as a shell reports it: killed by signal N (rc -N) -> 128 + N."""
    return 128 - rc if rc < 0 else rc


def guard_main(argv: list[str]) -> int:
    """``guard [--grace S] [--remove DIR ...] -- CMD ...`` (see the module docstring)."""
    grace, remove = 15.0, []
    while argv and argv[0] != "--":
        opt, value, argv = argv[0], argv[1], argv[2:]
        if opt == "--grace":
            grace = float(value)
        elif opt == "--remove":
            remove.append(value)
        else:
            raise SystemExit(f"rlt.procs guard: unknown option {opt}")
    cmd = argv[1:]
    logging.basicConfig(format="[rlt.procs guard] %(levelname)s %(message)s")
    if not cmd:
        raise SystemExit(USAGE)
    stopped: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    if PARENT_ENV in os.environ:
        set_parent_death_signal(int(os.environ.pop(PARENT_ENV)))
    if stopped:  # the owner died (or stopped us) before we were ready
        return 128 + stopped[0]
    set_child_subreaper()  # orphans (a rank whose launcher died) stay under the guard
    me = os.getpid()
    child = subprocess.Popen(cmd, env={**os.environ, SUPERVISED_ENV: str(me)})
    tree, scanned = Tree(me, include_root=False), 0.0
    while child.poll() is None and not stopped:
        if time.monotonic() - scanned >= SCAN_INTERVAL:
            tree.scan()
            scanned = time.monotonic()
        time.sleep(0.2)
    stop_tree(tree, grace)
    for d in remove:
        remove_private_dir(d)
    rc = child.wait()
    reap_children()
    return 128 + stopped[0] if stopped else shell_exit_code(rc)


def reap_children() -> None:
    """Collect the exit status of every child that has exited. A subreaper adopts orphans (vLLM's EngineCore
    once its API server died first); unreaped they stay zombies in the group after we exit, until init gets
    to them, so the group would look alive to whoever waited for us."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            logger.warning("children still running: %s", sorted(descendants(os.getpid(), process_table())))
            return


def remove_private_dir(path: str | Path) -> None:
    """Remove a directory this user owns (never through a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- entry points
def supervise(cmd: list[str]) -> int:
    """Run ``cmd`` under a guard and return its exit code (128 + signal when stopped by one).

    This process stays in the terminal's process group (Ctrl-C reaches it) and passes SIGINT/SIGTERM/SIGHUP
    on to the guard; if it is killed outright the guard's parent-death signal stops the command. Either way
    nothing the command started (vLLM's EngineCore and workers, training ranks) or its shared memory
    outlives it. Also on the command line: ``python -m rlt.procs run -- CMD ...``.
    """
    recorder = TreeRecorder()
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if g.poll() is None:
            g.proc.send_signal(signum)

    g = Guarded(cmd, recorder)
    old = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        g.proc.wait()
    finally:
        rc = g.stop()
        recorder.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if received:
        logger.warning("stopped by %s: %s", signal.Signals(received[0]).name, " ".join(cmd[:4]))
    return shell_exit_code(rc)


def run_supervised(module: str, argv: list[str]) -> int | None:
    """:func:`supervise` ``python -m module argv`` and return its exit code, or None when this process already
    is that supervised run (then the caller does the work). For entry points that start vLLM's offline
    engine in-process."""
    if os.environ.get(SUPERVISED_ENV) == str(os.getppid()):
        return None
    return supervise([sys.executable, "-m", module, *argv])


if __name__ == "__main__":
    if sys.argv[1:2] == ["guard"]:
        sys.exit(guard_main(sys.argv[2:]))
    if sys.argv[1:3] == ["run", "--"] and sys.argv[3:]:
        logging.basicConfig(format="[rlt.procs] %(levelname)s %(message)s")
        sys.exit(supervise(sys.argv[3:]))
    raise SystemExit(USAGE)
