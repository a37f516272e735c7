"""The code-interpreter sandbox: one Jupyter kernel per conversation, with limits.

`Sandbox.run(code)` executes a cell and returns an `ExecResult` (status, text, images, error), never
raising for anything the code does: errors, timeouts and a crashed kernel are results the model sees.
Compared with ChatGLM3's demo kernel (one kernel shared by everybody, a 30 s wait that never stops the
code, only the last output kept), each sandbox has its own kernel and directory, every output message
is kept in order, a timeout interrupts (then restarts) the kernel, and a dead kernel is replaced.

Isolation (see `sandbox_jail.py`; `Sandbox.isolation` says which applies):

- With bubblewrap (``bwrap`` on PATH and a probe run works): the kernel sees /usr, a few /etc files
  and the Python installation read-only, its own working directory read-write, a private /tmp and
  /dev/shm (each capped at a quarter of ``memory_mb``), no network, its own PID/IPC/UTS namespaces
  and no capabilities. Other sandboxes' directories, the app's files and the app's processes (so
  its /proc/<pid>/environ) are invisible. The kernel talks to us over ipc sockets in a runtime
  directory bound into the sandbox, since it has no loopback network shared with us.
- Without it (fallback): rlimits, the minimal environment, the watchdog, and its own working directory
  as cwd, nothing more. The kernel can read and write whatever the app's user can (other sandboxes'
  files, the app's /proc/<pid>/environ with its API keys), use the network, and a process that calls
  setsid() escapes both the process count and the final kill.

Always: ``memory_mb`` of address space per process (RLIMIT_AS: a big allocation is a clean
MemoryError), ``cpu_seconds`` of CPU over the kernel's whole life (RLIMIT_CPU: it dies and is
replaced), at most ``max_procs`` processes and ``memory_mb`` in total while it has children (a
watchdog polling every 0.1 s: a fork bomb runs that long before the whole sandbox is killed), no
environment variables of ours (PATH, HOME=work dir, LANG, matplotlib/IPython settings only), and
no kernel outlives the app: close() kills the process group (the PID namespace with bwrap), atexit
closes every sandbox, and a parent-death signal covers an app killed with SIGKILL.

NOT isolated, even with bubblewrap: the Linux kernel itself (an exploit escapes; this is not a VM),
CPU share (a busy loop takes a core until the timeout), disk space in the working directory, reading
the system and Python directories, and the kernel runs as the app's user (root stays uid 0 inside,
without capabilities). Files are deleted with the sandbox when it made its own directory.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatglm_core import sandbox_jail as jail
from chatglm_core.errors import ConfigError
from chatglm_core.sandbox_output import TRUNCATED, ExecResult, Output, truncate

__all__ = ["TRUNCATED", "ExecResult", "Limits", "Sandbox", "truncate"]

if TYPE_CHECKING:
    from chatglm_core.settings import Settings

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "chatglm-sandboxes"


@dataclass(frozen=True)
class Limits:
    timeout: float = 30.0
    memory_mb: int = 2048
    max_procs: int = 64
    cpu_seconds: int = 300
    max_output_chars: int = 20000
    max_images: int = 8
    max_image_bytes: int = 5_000_000
    interrupt_grace: float = 3.0  # after a timeout's interrupt, how long before the kernel is restarted
    startup_timeout: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value < 0 or (value == 0 and f.name != "max_images"):
                raise ConfigError(f"sandbox limit {f.name}={value!r} must be a positive number")


_LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for box in list(_LIVE):
        box.close()


class Sandbox:
    """A Jupyter kernel in its own directory, started eagerly, with limits. Thread-safe."""

    def __init__(self, work_dir: str | Path | None = None, *, root: str | Path | None = None,
                 kernel_name: str | None = None, isolate: bool | None = None, **limits: Any) -> None:
        unknown = set(limits) - {f.name for f in fields(Limits)}
        if unknown:
            raise TypeError(f"unknown sandbox limit(s) {sorted(unknown)}; valid: {[f.name for f in fields(Limits)]}")
        self.limits = Limits(**limits)
        self.kernel_name = kernel_name
        self._spec = self._kernel_spec()
        why_not = jail.bwrap_probe(self._spec.argv[0]) if isolate is not False else "disabled by the caller"
        if isolate and why_not:
            raise ConfigError(f"bubblewrap isolation was required but {why_not}; install it with "
                              "`apt-get install bubblewrap` or allow the rlimits-only fallback")
        self._bwrap = why_not is None
        self.isolation = ("bubblewrap: own filesystem view, no network, own PID namespace" if self._bwrap
                          else f"rlimits only ({why_not}): no filesystem or network isolation")
        self._own_dir = work_dir is None
        if work_dir is None:
            base = Path(root) if root is not None else DEFAULT_ROOT
            base.mkdir(parents=True, exist_ok=True)
            work_dir = tempfile.mkdtemp(prefix="sb-", dir=base)
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        jail.sweep_stale_runtime_dirs()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=jail.RUNTIME_PREFIX))  # ours: lock, work dir record
        self.kernel_dir = self.runtime_dir / "kernel"  # the kernel's: connection file, ipc sockets, caches
        self.kernel_dir.mkdir()
        self._owner_fd = jail.claim_runtime_dir(self.runtime_dir, self.work_dir if self._own_dir else None)
        self.last_used = time.monotonic()
        self._lock = threading.RLock()  # one run at a time; start/stop under it too
        self._ctl = threading.Lock()  # interrupt/kill, callable while a run holds _lock
        self._km: Any = None
        self._kc: Any = None
        self._leader: int | None = None
        self._kill_reason: str | None = None
        self._generation = 0  # kernels started so far: restart() skips a restart a dying run already did
        self._closed = False
        self._busy = False
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings, work_dir: str | Path | None = None, **overrides: Any) -> Sandbox:
        limits = dict(timeout=settings.sandbox_timeout, memory_mb=settings.sandbox_memory_mb,
                      max_procs=settings.sandbox_max_procs, cpu_seconds=settings.sandbox_cpu_seconds,
                      max_output_chars=settings.sandbox_max_output_chars, max_images=settings.sandbox_max_images,
                      max_image_bytes=settings.sandbox_max_image_bytes)
        limits.update(overrides)
        return cls(work_dir, root=Path(settings.data_dir) / "sandboxes", kernel_name=settings.ipykernel, **limits)

    # --- lifecycle ----------------------------------------------------------------------------
    def _kernel_spec(self) -> Any:
        from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

        if not self.kernel_name:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                                    "--HistoryManager.enabled=False", "--InteractiveShell.colors=NoColor"],
                              display_name="sandbox", language="python", interrupt_mode="message")
        try:
            spec = KernelSpecManager().get_kernel_spec(self.kernel_name)
        except NoSuchKernel:
            raise ConfigError(f"IPYKERNEL={self.kernel_name!r}: no such Jupyter kernel spec. List them with `jupyter "
                              "kernelspec list`, or unset IPYKERNEL to use this environment's Python.") from None
        argv = list(spec.argv)
        argv[0] = shutil.which(argv[0], path=jail.minimal_env(Path("/"), Path("/"))["PATH"]) or argv[0]
        # message mode: a signal would hit bwrap (the process jupyter_client knows), not the kernel
        return KernelSpec(argv=argv, display_name=spec.display_name, language=spec.language,
                          env=dict(spec.env or {}), interrupt_mode="message", resource_dir=spec.resource_dir)

    def _start(self) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        spec = self._spec
        prefix = jail.launcher_args(self.limits.memory_mb, self.limits.cpu_seconds, supervise=not self._bwrap)
        if self._bwrap:
            ro_dirs = jail.python_dirs(spec.argv[0])
            if self.kernel_name and spec.resource_dir:
                ro_dirs += (spec.resource_dir,)
            tmp_mb = max(64, self.limits.memory_mb // 4)
            prefix += jail.bwrap_args(self.work_dir, self.kernel_dir, ro_dirs, tmp_mb=tmp_mb)
        wrapped = type(spec)(argv=prefix + spec.argv, display_name=spec.display_name, language=spec.language,
                             env=spec.env, interrupt_mode=spec.interrupt_mode, resource_dir=spec.resource_dir)

        class _OneSpec(KernelSpecManager):
            def get_kernel_spec(self, kernel_name: str) -> Any:
                return wrapped

        km = KernelManager(kernel_name="sandbox", kernel_spec_manager=_OneSpec(), transport="ipc",
                           ip=str(self.kernel_dir / "k"), connection_file=str(self.kernel_dir / "kernel.json"))
        env = jail.minimal_env(self.work_dir, self.kernel_dir, spec.argv[0])
        log = open(self.kernel_dir / "kernel.log", "wb")
        try:
            jail.in_keeper_thread(lambda: km.start_kernel(env=env, cwd=str(self.work_dir),
                                                          stdout=subprocess.DEVNULL, stderr=log))
        finally:
            log.close()
        self._km, self._leader, self._kill_reason = km, km.provisioner.process.pid, None
        self._generation += 1
        self._kc = km.blocking_client()
        self._kc.start_channels(hb=False)
        try:
            self._kc.wait_for_ready(timeout=self.limits.startup_timeout)
        except RuntimeError:
            detail = (self.kernel_dir / "kernel.log").read_text(errors="replace").strip()[-2000:]
            self._stop()
            raise ConfigError(f"the sandbox kernel did not start ({self.isolation}). Check that ipykernel is "
                              f"installed for {wrapped.argv[len(prefix)]}. Kernel log:\n{detail}") from None
        leader = self._leader
        jail.WATCHDOG.add(self, jail.Watched(leader, self._bwrap, self.limits.max_procs, self.limits.memory_mb * 2**20,
                                             lambda reason: self._over_limit(reason, leader)))

    def _stop(self) -> None:
        jail.WATCHDOG.remove(self)
        km, kc, self._km, self._kc = self._km, self._kc, None, None
        if kc is not None:
            kc.stop_channels()
        if km is not None:
            with self._ctl:
                jail.kill_tree(self._leader, self._bwrap)
            try:
                km.provisioner.process.wait(timeout=10)  # reap it (SIGKILL was sent)
            except subprocess.TimeoutExpired:  # uninterruptible sleep in the host kernel; init reaps it later
                pass
            km.cleanup_resources()  # connection file and ipc sockets

    def _over_limit(self, reason: str, leader: int) -> None:
        with self._ctl:
            if leader == self._leader:  # not a kernel started since the watchdog looked
                self._kill_reason = reason
                jail.kill_tree(leader, self._bwrap)

    def _kill(self) -> None:
        with self._ctl:
            if self._leader is not None:
                jail.kill_tree(self._leader, self._bwrap)

    def _alive(self) -> bool:
        return self._km is not None and self._km.is_alive()

    def interrupt(self) -> None:
        """Stop the running cell with KeyboardInterrupt (its run() returns status "error")."""
        with self._ctl:
            km = self._km
            if km is not None and km.is_alive():
                km.interrupt_kernel()

    def restart(self) -> None:
        """A fresh kernel (all variables lost); the working directory's files stay."""
        generation = self._generation
        self._kill_reason = "it was restarted"
        self._kill()
        with self._lock:
            if self._closed or self._generation != generation:
                return
            self._stop()
            self._start()

    def close(self) -> None:
        """Kill the kernel and remove its files (the working directory too if we created it)."""
        if self._closed:
            return
        self._closed = True
        self._kill()
        with self._lock:
            self._stop()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            os.close(self._owner_fd)
            if self._own_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """True while a cell is running."""
        return self._busy

    # --- running code -----------------------------------------------------------------------------
    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        """Execute one cell; every output is collected until the kernel is idle again."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        timeout = self.limits.timeout if timeout is None else timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("this sandbox is closed; create a new one")
            self.last_used = started = time.monotonic()
            notice = ""
            if not self._alive():
                notice = f"[the previous kernel died ({self._died_how()}); started a fresh one]\n"
                self._stop()
                self._start()
            out = Output(self.limits.max_output_chars, self.limits.max_images, self.limits.max_image_bytes)
            if notice:
                out.add_text(notice)
            self._busy = True
            try:
                return self._execute(code, timeout, out, started)
            finally:
                self._busy = False
                self.last_used = time.monotonic()

    def _execute(self, code: str, timeout: float, out: Output, started: float) -> ExecResult:
        kc = self._kc
        while True:  # replies of earlier runs
            try:
                kc.get_shell_msg(timeout=0)
            except queue.Empty:
                break
        msg_id = kc.execute(code, store_history=True, allow_stdin=False)
        deadline, interrupted = started + timeout, False
        while True:
            now = time.monotonic()
            if now >= deadline:
                if interrupted:  # still busy after the grace period: start over
                    self._stop()
                    self._start()
                    return out.result("timeout", started, f"Execution timed out after {timeout:g} s and did not "
                                      "stop when interrupted; the kernel was restarted and all variables were lost.")
                self.interrupt()
                interrupted, deadline = True, now + self.limits.interrupt_grace
                continue
            try:
                msg = kc.get_iopub_msg(timeout=min(deadline - now, 0.1))
            except queue.Empty:
                if not self._alive():
                    return self._died(out, started)
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "stream":
                out.add_text(content["text"])
            elif kind in ("execute_result", "display_data", "update_display_data"):
                out.add_display(content["data"])
            elif kind == "error" and not interrupted:
                out.add_error(content)
        if interrupted:
            return out.result("timeout", started, f"Execution timed out after {timeout:g} s and was interrupted; "
                              "the kernel's variables are kept.")
        return out.result("error" if out.error else "ok", started)

    def _died(self, out: Output, started: float) -> ExecResult:
        how = self._died_how()
        if not self._closed:
            self._stop()
            self._start()
        return out.result("died", started, f"The kernel died ({how}); all variables were lost. "
                          + ("A fresh kernel was started." if not self._closed else ""))

    def _died_how(self) -> str:
        if self._kill_reason:
            return f"killed because {self._kill_reason}"
        proc = getattr(getattr(self._km, "provisioner", None), "process", None)
        code = proc.poll() if proc is not None else None
        if code is None:
            return "unknown cause"
        sig = code - 128 if code > 128 else None  # the launcher and bwrap report a signal as 128 + signal
        if sig == signal.SIGXCPU:
            return f"CPU time limit of {self.limits.cpu_seconds} s reached"
        if sig:
            return f"signal {signal.Signals(sig).name}" if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        return f"exit code {code}"

    def __repr__(self) -> str:
        return f"Sandbox({str(self.work_dir)!r}, isolation={self.isolation!r}, closed={self._closed})"
