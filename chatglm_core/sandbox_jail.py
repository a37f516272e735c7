"""How a sandbox kernel is contained: the command that wraps it, its environment, and a process watchdog.

`sandbox.py` decides *what* runs (a Jupyter kernel) and this module decides *where*:

- ``bubblewrap`` (``bwrap``), when it is on PATH and a probe shows it works: the kernel gets its own
  PID, network, IPC and UTS namespaces, a filesystem view made of read-only system/Python directories
  plus its own working directory (the only writable place besides a private /tmp), no capabilities,
  and dies with the process that started it.
- Always: rlimits set by a tiny launcher before it execs the kernel (address space, CPU seconds, no
  core files), a parent-death signal, and a minimal environment (no secrets from ours).
- Always: `Watchdog`, one thread that counts each sandbox's processes (and their memory once there is
  more than one) and kills the sandbox over its limits. RLIMIT_NPROC is not used: it counts every
  process of the *user* (the app's own included) and root ignores it.

Kernels are started from one long-lived thread (`in_keeper_thread`): a parent-death signal fires when
the *thread* that forked the child ends, and Streamlit runs every script run in a short-lived thread.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# /etc entries a Python kernel needs (dynamic linker, time zone, fonts, TLS roots, user names);
# the rest of /etc (shadow files, app configuration, keys) stays out of the sandbox.
ETC_ALLOWLIST = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "fonts", "ssl", "ca-certificates",
    "passwd", "group", "nsswitch.conf", "hosts", "host.conf", "gai.conf", "protocols", "services",
    "alternatives", "mime.types", "matplotlibrc", "os-release", "locale.alias",
)

# Runs as `python -I -S -c LAUNCHER mem_bytes cpu_s parent_pid supervise argv...`: set limits, then
# exec argv (bwrap: it kills its namespace when we die) or, without bwrap, stay as a small supervisor
# that kills the kernel's whole process group when the app dies (a parent-death signal alone would
# kill the kernel but orphan its children).
LAUNCHER = """
import os, sys, resource, ctypes, signal
mem, cpu, parent, supervise = (int(a) for a in sys.argv[1:5])
argv = sys.argv[5:]
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if mem: resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
if cpu: resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
os.environ.pop("JPY_PARENT_PID", None)  # ipykernel would exit: its parent is not the app
if supervise: signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
try: ctypes.CDLL(None).prctl(1, signal.SIGTERM if supervise else signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception: pass
if os.getppid() != parent: os._exit(1)  # the app died before prctl took effect
if not supervise: os.execvp(argv[0], argv)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execvp(argv[0], argv)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
os._exit(128 - code if code < 0 else code)  # like a shell (and bwrap): 128 + signal
"""


# --- starting processes from a thread that lives as long as the app ------------------------------
_keeper_queue: queue.Queue[tuple[Callable[[], Any], queue.Queue]] = queue.Queue()
_keeper_lock = threading.Lock()
_keeper: threading.Thread | None = None


def _keeper_loop() -> None:
    while True:
        fn, reply = _keeper_queue.get()
        try:
            reply.put((True, fn()))
        except BaseException as e:  # handed back to the caller, re-raised there
            reply.put((False, e))


def in_keeper_thread(fn: Callable[[], Any]) -> Any:
    """Run fn in the one long-lived spawner thread and return (or raise) its result."""
    global _keeper
    with _keeper_lock:
        if _keeper is None or not _keeper.is_alive():
            _keeper = threading.Thread(target=_keeper_loop, name="sandbox-keeper", daemon=True)
            _keeper.start()
    if threading.current_thread() is _keeper:
        return fn()
    reply: queue.Queue = queue.Queue(maxsize=1)
    _keeper_queue.put((fn, reply))
    ok, value = reply.get()
    if not ok:
        raise value
    return value


# --- the command and the environment ------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def python_dirs(executable: str) -> tuple[str, ...]:
    """The directories an interpreter needs (prefixes and its default sys.path), () if not a Python."""
    code = ("import sys, json; "
            "print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.executable] + sys.path))")
    try:
        out = subprocess.run([executable, "-I", "-c", code], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", os.defpath)}, check=True).stdout
        paths = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return ()
    dirs = set()
    for p in paths:
        p = os.path.dirname(p) if os.path.isfile(p) else p
        if p and p != "/" and os.path.isdir(p):
            dirs.add(os.path.abspath(p))
            dirs.add(os.path.realpath(p))
    # drop directories already inside another one
    return tuple(sorted(d for d in dirs if not any(d != o and d.startswith(o + os.sep) for o in dirs)))


@functools.lru_cache(maxsize=1)
def bwrap_version() -> tuple[int, ...]:
    try:
        out = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, timeout=10).stdout
        return tuple(int(x) for x in out.split()[-1].split("."))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return (0,)


def bwrap_args(work_dir: Path, kernel_dir: Path, ro_dirs: tuple[str, ...], tmp_mb: int = 256) -> list[str]:
    """bubblewrap options for a kernel that may write only work_dir (and a private, capped /tmp)."""
    args = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox"]
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL"]
    for d in ("/usr",):
        args += ["--ro-bind", d, d]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for name in ETC_ALLOWLIST:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # tmpfs pages are RAM that no process's memory accounts for: cap them (bwrap >= 0.7 has --size).
    # Mounted before the interpreter's directories, which may live under /tmp (a checkout there):
    # a tmpfs mounted after them would hide them.
    size = ["--size", str(tmp_mb * 2**20)] if bwrap_version() >= (0, 7) else []
    args += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm", *size, "--tmpfs", "/tmp"]
    for d in ro_dirs:
        args += ["--ro-bind", d, d]
    # If the sandboxes' parent directory is visible through a read-only bind (a data dir inside the
    # venv's tree, say), hide it so other sessions' directories stay invisible.
    parent = str(work_dir.parent)
    if any(parent.startswith(d + os.sep) for d in ro_dirs) and not any(d.startswith(parent + os.sep) for d in ro_dirs):
        args += ["--tmpfs", parent]
    args += ["--bind", str(work_dir), str(work_dir), "--bind", str(kernel_dir), str(kernel_dir),
             "--remount-ro", "/",  # the root holding the mount points is a tmpfs too: no writes there
             "--chdir", str(work_dir), "--"]
    return args


@functools.lru_cache(maxsize=8)
def bwrap_probe(executable: str) -> str | None:
    """None if bubblewrap can run `executable` here, else why not (a short reason)."""
    if shutil.which("bwrap") is None:
        return "bwrap not found on PATH"
    ro_dirs = python_dirs(executable)
    if not ro_dirs:
        return f"{executable} is not a Python we can inspect"
    with tempfile.TemporaryDirectory(prefix="chatglm-probe-") as tmp:
        work, rt = Path(tmp, "w"), Path(tmp, "r")
        work.mkdir()
        rt.mkdir()
        cmd = bwrap_args(work, rt, ro_dirs) + [executable, "-I", "-S", "-c", "print('ok')"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=minimal_env(work, rt))
        except (OSError, subprocess.SubprocessError) as e:
            return f"bwrap failed: {e}"
        if proc.returncode != 0 or proc.stdout.strip() != "ok":
            return "bwrap failed: " + (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return None


def launcher_args(memory_mb: int, cpu_seconds: int, supervise: bool) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, str(memory_mb * 2**20), str(cpu_seconds), str(os.getpid()),
            str(int(supervise))]


def minimal_env(work_dir: Path, kernel_dir: Path, executable: str = sys.executable) -> dict[str, str]:
    """The kernel's whole environment: nothing of ours (API keys, tokens) leaks in."""
    threads = str(min(4, os.cpu_count() or 1))  # OpenBLAS reserves memory per thread; RLIMIT_AS counts it
    return {
        "PATH": os.pathsep.join([os.path.dirname(executable), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(work_dir),
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MPLCONFIGDIR": str(kernel_dir / "mpl"),
        "IPYTHONDIR": str(kernel_dir / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }


# --- runtime directories of an app that was killed ----------------------------------------------
RUNTIME_PREFIX = "chatglm-k-"
_swept = False


def claim_runtime_dir(runtime_dir: Path, own_work_dir: Path | None) -> int:
    """Lock runtime_dir for this process (the lock goes when the process does, however it ends).

    The lock file appears under its final name already locked, so a sweeper never sees it free.
    The work dir we created is recorded beside it (outside what the kernel can write).
    """
    if own_work_dir is not None:
        (runtime_dir / "work_dir").write_text(str(own_work_dir))
    tmp = runtime_dir / "owner.lock.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, runtime_dir / "owner.lock")
    return fd


def sweep_stale_runtime_dirs() -> None:
    """Once per process: remove what sandboxes of dead processes (SIGKILL, power loss) left behind."""
    global _swept
    if _swept:
        return
    _swept = True
    for d in Path(tempfile.gettempdir()).glob(RUNTIME_PREFIX + "*"):
        try:
            fd = os.open(d / "owner.lock", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        finally:
            os.close(fd)
        record = d / "work_dir"
        work = Path(record.read_text()) if record.is_file() else None
        if work is not None and work.name.startswith("sb-"):
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


# --- processes ----------------------------------------------------------------------------------
def _stat(path: str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if gone."""
    try:
        with open(path, "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _pss_bytes(proc_dir: str) -> int:
    try:
        with open(f"{proc_dir}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Watched:
    """One sandbox's processes: `leader` is the launched process (bwrap, or the supervisor)."""

    leader: int
    namespaced: bool
    max_procs: int
    max_memory: int
    on_limit: Callable[[str], None]
    ns_init: int | None = None  # host pid of bwrap's init, found on first poll

    def pids(self, all_stats: dict[int, list[str]] | None = None) -> tuple[str, list[int]]:
        """(proc root, pids under it) of the sandbox's processes, bwrap's init excluded."""
        if self.namespaced and self.ns_init is None:
            stats = all_stats if all_stats is not None else scan_proc()
            self.ns_init = next((p for p, st in stats.items() if int(st[1]) == self.leader), None)
        if self.namespaced and self.ns_init is not None:
            root = f"/proc/{self.ns_init}/root/proc"  # the namespace's own /proc: only its processes
            try:
                return root, [int(p) for p in os.listdir(root) if p.isdigit() and p != "1"]
            except OSError:  # init gone, or its root unreadable: count by session below
                pass
        stats = all_stats if all_stats is not None else scan_proc()
        # the kernel's session, without the supervisor (or bwrap) that leads it
        return "/proc", [p for p, st in stats.items() if int(st[3]) == self.leader and p != self.leader]

    def check(self, all_stats: dict[int, list[str]] | None) -> None:
        root, pids = self.pids(all_stats)
        if len(pids) > self.max_procs:
            self.on_limit(f"it started more than {self.max_procs} processes")
        elif len(pids) > 1 and self.max_memory:  # one process alone is held by its RLIMIT_AS
            used = sum(_pss_bytes(f"{root}/{p}") for p in pids)
            if used > self.max_memory:
                self.on_limit(f"its processes used more than {self.max_memory // 2**20} MiB of memory")


def scan_proc() -> dict[int, list[str]]:
    """pid -> stat fields (state, ppid, pgrp, session, ...) of every process on the host."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(f"/proc/{name}/stat")
            if st is not None:
                out[int(name)] = st
    return out


class Watchdog:
    """One daemon thread polling every registered sandbox every `interval` seconds."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._watched: dict[object, Watched] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, key: object, watched: Watched) -> None:
        with self._lock:
            self._watched[key] = watched
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sandbox-watchdog", daemon=True)
                self._thread.start()

    def remove(self, key: object) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                watched = list(self._watched.values())
            if not watched:
                continue
            needs_scan = any(not w.namespaced or w.ns_init is None for w in watched)
            stats = scan_proc() if needs_scan else None
            for w in watched:
                try:
                    w.check(stats)
                except Exception:  # a process vanishing mid-check must not stop the watchdog
                    pass


WATCHDOG = Watchdog()


def kill_tree(leader: int, namespaced: bool) -> None:
    """SIGKILL a sandbox: its process group, and (namespaced) bwrap, whose init takes the namespace down."""
    for kill in (os.killpg, os.kill):
        try:
            kill(leader, signal.SIGKILL)
        except OSError:
            pass
    if not namespaced:  # children that left the process group but kept the session
        for pid, st in scan_proc().items():
            if int(st[3]) == leader:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
