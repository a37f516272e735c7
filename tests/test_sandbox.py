"""The code-interpreter sandbox, on real kernels: outputs, limits, isolation, cleanup.

Kernels are shared per module where a test doesn't depend on a fresh one. "jailed" tests need
bubblewrap (installed by `make test` as root); without it they skip, and the fallback's weaker
guarantees are what the module docstring documents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from chatglm_core import sandbox_jail as jail
from chatglm_core.errors import ConfigError
from chatglm_core.sandbox import TRUNCATED, ExecResult, Sandbox, truncate
from chatglm_core.sandbox_jail import bwrap_probe
from chatglm_core.sandbox_pool import SandboxPool
from chatglm_core.settings import Settings

HAVE_BWRAP = bwrap_probe(sys.executable) is None
REPO = Path(__file__).resolve().parents[1]


def procs_with(marker: str) -> list[int]:
    """Host pids whose command line mentions marker (a sandbox's runtime dir is in all of its kernel's)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sandboxes")


@pytest.fixture(scope="module")
def box(root):
    with Sandbox(root=root, timeout=10) as sb:
        yield sb


@pytest.fixture(scope="module")
def plain(root):
    """The rlimits-only fallback, whatever this machine has."""
    with Sandbox(root=root, isolate=False, timeout=10, interrupt_grace=1.0) as sb:
        yield sb


@pytest.fixture(scope="module")
def small(root):
    """Tight limits for the bombs."""
    with Sandbox(root=root, memory_mb=768, max_procs=16) as sb:
        yield sb


@pytest.fixture(scope="module")
def jailed(box):
    if not HAVE_BWRAP:
        pytest.skip(f"bubblewrap unusable here ({bwrap_probe(sys.executable)}): isolation is rlimits only")
    return box


# --- outputs --------------------------------------------------------------------------------------
def test_streams_and_results_in_order(box):
    r = box.run("import sys\nprint('out', flush=True)\nprint('err', file=sys.stderr, flush=True)\n40 + 2")
    assert (r.status, r.text, r.images, r.error) == ("ok", "out\nerr\n42\n", [], None)


def test_display_data_text_and_html_as_text(box):
    r = box.run(textwrap.dedent("""
        from IPython.display import display, HTML, Markdown
        display('shown')
        display(HTML('<b>bold</b><p>para<br>graph</p><script>x=1</script>'))
        display(Markdown('**md**'))
        import pandas as pd
        pd.DataFrame({'a': [1, 2]})
    """))
    assert r.status == "ok"
    assert r.text == "'shown'\nbold\npara\ngraph\n**md**\n   a\n0  1\n1  2\n"


def test_error_has_clean_traceback_and_keeps_earlier_output(box):
    r = box.run("print('before')\ndef f():\n    raise ValueError('bad value')\nf()")
    assert r.status == "error"
    assert r.text == "before\n"
    assert "\x1b" not in r.error
    assert "ValueError: bad value" in r.error and "----> 4 f()" in r.error
    assert r.observation() == "before\n" + r.error


def test_input_is_an_error_not_a_hang(box):
    r = box.run("input('name? ')", timeout=5)
    assert r.status == "error" and "StdinNotImplementedError" in r.error


def test_matplotlib_show_and_figure_left_at_the_end_are_pngs(box):
    r = box.run(textwrap.dedent("""
        import matplotlib.pyplot as plt
        plt.plot([1, 2, 3]); plt.show()
        print('between')
        plt.figure(); plt.bar(['a', 'b'], [3, 1])
    """))
    assert r.status == "ok"
    assert len(r.images) == 2 and all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in r.images)
    assert r.images[0] != r.images[1]
    assert "between" in r.text
    assert r.observation().startswith("[Image]\n[Image]\nbetween")


def test_state_is_kept_between_runs(box):
    box.run("counter = 41")
    assert box.run("counter += 1\ncounter").text == "42\n"


def test_huge_output_is_truncated_with_a_marker(box):
    limit = box.limits.max_output_chars
    r = box.run("for i in range(20000): print(f'line {i}')")
    assert r.status == "ok"
    assert "[... output truncated:" in r.text
    assert len(r.text) < limit + 200
    assert r.text.startswith("line 0\nline 1\n") and r.text.endswith("line 19999\n")
    full = "".join(f"line {i}\n" for i in range(20000))
    head, rest = r.text.split("\n[... output truncated: ")
    hidden, tail = rest.split(" characters not shown ...]\n")
    assert full.startswith(head) and full.endswith(tail) and len(head) + int(hidden) + len(tail) == len(full)


def test_truncate_and_observation_are_plain_functions():
    assert truncate("abc", 10) == "abc"
    cut = truncate("x" * 90 + "END", 30)
    assert cut == "x" * 20 + "\n" + TRUNCATED.format(n=63) + "\n" + "x" * 7 + "END"
    assert ExecResult("ok").observation() == "(no output)"
    assert ExecResult("ok", "hi\n", [b"png"], None).observation() == "[Image]\nhi"
    assert ExecResult("timeout", "", [], "timed out").observation() == "timed out"


# --- time, crashes, interrupts --------------------------------------------------------------------
def test_timeout_interrupts_and_keeps_state(box):
    box.run("kept = 'yes'")
    r = box.run("while True: pass", timeout=1)
    assert r.status == "timeout" and "variables are kept" in r.error
    assert 1 <= r.elapsed < 4
    assert box.run("kept").text == "'yes'\n"


def test_timeout_restarts_a_kernel_that_ignores_interrupts(plain):
    plain.run("kept = 1")
    r = plain.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass", timeout=1)
    assert r.status == "timeout" and "restarted" in r.error and "lost" in r.error
    after = plain.run("print('fresh'); kept")
    assert after.text == "fresh\n" and "NameError" in after.error


def test_interrupt_from_another_thread(box):
    threading.Timer(0.5, box.interrupt).start()
    r = box.run("import time; time.sleep(20)")
    assert r.status == "error" and "KeyboardInterrupt" in r.error and r.elapsed < 5
    assert box.run("1").text == "1\n"


def test_a_kernel_that_died_between_runs_is_replaced_with_a_notice(plain):
    plain.run("import os, threading\nthreading.Timer(0.2, os._exit, [5]).start()")
    time.sleep(1)
    r = plain.run("print('next')")
    assert r.status == "ok"
    assert r.text == "[the previous kernel died (exit code 5); started a fresh one]\nnext\n"


def test_close_from_another_thread_ends_a_running_cell(root):
    sb = Sandbox(root=root)
    threading.Timer(0.5, sb.close).start()
    r = sb.run("import time; time.sleep(20)")
    assert r.status == "died" and r.elapsed < 5 and "fresh kernel" not in r.error
    assert wait_until(lambda: sb.closed and not procs_with(str(sb.runtime_dir)))


@pytest.mark.parametrize("code, how", [("import os; os._exit(3)", "exit code 3"),
                                       ("import ctypes; ctypes.string_at(0)", "SIGSEGV")])
def test_kernel_death_is_reported_and_the_next_run_gets_a_fresh_kernel(plain, code, how):
    plain.run("doomed = 1")
    r = plain.run(code)
    assert r.status == "died" and how in r.error and "fresh kernel" in r.error
    after = plain.run("print('alive'); doomed")
    assert after.text == "alive\n" and "NameError" in after.error


def test_cpu_seconds_limit_kills_the_kernel(root):
    with Sandbox(root=root, cpu_seconds=1) as sb:
        r = sb.run("while True: pass", timeout=20)
        assert r.status == "died" and "CPU time limit of 1 s" in r.error
        assert sb.run("2 + 2").text == "4\n"


def test_restart_loses_variables_but_keeps_files(root):
    with Sandbox(root=root) as sb:
        sb.run("v = 1\nopen('kept.txt', 'w').write('data')")
        sb.restart()
        assert "NameError" in sb.run("v").error
        assert sb.run("open('kept.txt').read()").text == "'data'\n"


# --- resource limits -------------------------------------------------------------------------------
def test_memory_bomb_is_a_clean_error(small):
    for code in ("x = bytearray(4 * 2**30)", "import numpy as np; np.ones(2**31)",
                 "hog = []\nwhile True: hog.append(bytearray(50 * 2**20))"):
        r = small.run(code, timeout=20)
        assert r.status == "error" and "MemoryError" in r.error, code
    small.run("hog = None")  # a MemoryError leaves what was allocated in the namespace
    assert small.run("print('still here')").text == "still here\n"


def test_memory_spread_over_processes_kills_the_sandbox(small):
    # 3 children x 300 MiB (each under the per-process limit), 900 MiB in total > 768 MiB.
    r = small.run(textwrap.dedent("""
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                block = bytearray(300 * 2**20)
                for i in range(0, len(block), 4096): block[i] = 1
                time.sleep(30); os._exit(0)
        time.sleep(25)
    """), timeout=28)
    assert r.status == "died" and "768 MiB" in r.error
    assert small.run("print('ok')").text == "ok\n"


def test_fork_bomb_is_contained(small):
    baseline = len(procs_with(str(small.runtime_dir)))
    # bounded: at most 300 sleeping children, so a failure cannot take the machine down
    r = small.run(textwrap.dedent("""
        import os, time
        for _ in range(300):
            if os.fork() == 0:
                time.sleep(60); os._exit(0)
        time.sleep(30)
    """), timeout=30)
    assert r.status == "died" and "more than 16 processes" in r.error and r.elapsed < 10
    assert wait_until(lambda: len(procs_with(str(small.runtime_dir))) == baseline)
    assert small.run("print('ok')").text == "ok\n"


# --- isolation -------------------------------------------------------------------------------------
def test_secrets_in_our_environment_are_invisible(root, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    for isolate in (False, None):
        with Sandbox(root=root, isolate=isolate) as sb:
            names = set(json.loads(sb.run("import os, json; print(json.dumps(sorted(os.environ)))").text))
            assert "OPENAI_API_KEY" not in names
            assert names <= {"PATH", "HOME", "LANG", "TMPDIR", "MPLBACKEND", "MPLCONFIGDIR", "IPYTHONDIR", "PWD",
                             "JUPYTER_PLATFORM_DIRS", "PYDEVD_DISABLE_FILE_VALIDATION", "PYTHONDONTWRITEBYTECODE",
                             "MALLOC_ARENA_MAX", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                             "PYDEVD_USE_FRAME_EVAL", "TERM", "CLICOLOR", "FORCE_COLOR", "CLICOLOR_FORCE",
                             "PAGER", "GIT_PAGER", "JPY_PARENT_PID", "JPY_SESSION_NAME"}
            if sb.isolation.startswith("bubblewrap"):  # the app's /proc/<pid>/environ is out of sight too
                r = sb.run("import glob\nany(b'sk-test-secret' in open(p, 'rb').read() "
                           "for p in glob.glob('/proc/*/environ'))")
                assert r.text == "False\n"


def test_variables_are_per_sandbox(box, plain):
    box.run("only_in_box = 1")
    assert "NameError" in plain.run("only_in_box").error


def test_sandboxes_do_not_see_each_others_files(jailed, root):
    jailed.run("open('mine.txt', 'w').write('private')")
    with Sandbox(root=root) as other:
        r = other.run(f"import os\nprint(os.path.exists({str(jailed.work_dir / 'mine.txt')!r}))\n"
                      f"print(sorted(os.listdir({str(root)!r})))")
        assert r.text == f"False\n{[other.work_dir.name]}\n"


def test_writes_outside_the_working_dir_do_not_reach_the_host(jailed, tmp_path):
    target = tmp_path / "escaped.txt"
    r = jailed.run(textwrap.dedent(f"""
        import os
        for path in ({str(target)!r}, {str(REPO / 'escaped.txt')!r}, '/usr/escaped.txt', '/etc/escaped.txt'):
            try:
                open(path, 'w').write('x'); print('wrote', path)
            except OSError as e:
                print('blocked', type(e).__name__)
        open('/tmp/scratch.txt', 'w').write('private tmp is fine')
        try:  # the private /tmp holds a quarter of memory_mb (512 MiB here)
            with open('/tmp/big', 'wb') as f:
                for _ in range(40): f.write(bytes(16 * 2**20))
        except OSError as e:
            print('capped', e.errno)
        os.remove('/tmp/big')
        # the venv may live inside the repo (bound read-only); the repo's own files must not show
        print(os.path.exists('/etc/shadow'), os.path.exists({str(REPO / 'chatglm_core')!r}))
    """))
    # a checkout under /tmp shows inside as a mount point in the kernel's private /tmp: writable, but
    # the write stays in that tmpfs (the host file is checked below)
    in_private_tmp = str(REPO).startswith("/tmp/")
    assert r.text.count("blocked") == 4 - in_private_tmp, r.text
    assert r.text.endswith("capped 28\nFalse False\n")  # ENOSPC
    assert not target.exists() and not (REPO / "escaped.txt").exists() and not Path("/tmp/scratch.txt").exists()


def test_no_network(jailed):
    r = jailed.run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)")
    assert r.status == "error" and "OSError" in r.error


def test_isolation_is_reported(box, plain):
    assert box.isolation.startswith("bubblewrap" if HAVE_BWRAP else "rlimits only")
    assert plain.isolation.startswith("rlimits only")
    if not HAVE_BWRAP:
        with pytest.raises(ConfigError, match="bubblewrap"):
            Sandbox(isolate=True)


# --- configuration ---------------------------------------------------------------------------------
def test_from_settings_uses_the_sandbox_settings(tmp_path):
    settings = Settings(data_dir=tmp_path, sandbox_timeout=7, sandbox_max_output_chars=500, sandbox_max_images=1)
    with Sandbox.from_settings(settings) as sb:
        assert sb.work_dir.parent == (tmp_path / "sandboxes").resolve()
        assert (sb.limits.timeout, sb.limits.max_output_chars, sb.limits.max_images) == (7, 500, 1)
        r = sb.run("import matplotlib.pyplot as plt\nfor i in range(3):\n    plt.plot([i]); plt.show()")
        assert len(r.images) == 1 and "2 more image(s) not shown" in r.text
    assert not sb.work_dir.exists()


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="IPYKERNEL='no-such-kernel'"):
        Sandbox.from_settings(Settings(data_dir=tmp_path, ipykernel="no-such-kernel"))
    with pytest.raises(ConfigError, match="timeout"):
        Sandbox(timeout=-1)
    with pytest.raises(TypeError, match="memory_gb"):
        Sandbox(memory_gb=2)


def test_bad_run_arguments_are_clear_errors(box):
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        box.run("1", timeout=0)
    with pytest.raises(TypeError, match="code must be a str"):
        box.run(b"1")


def test_a_named_kernel_spec_is_used(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / "mine"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Mine", "language": "python", "env": {"MARKER": "from-spec"}}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    with Sandbox.from_settings(Settings(data_dir=tmp_path, ipykernel="mine")) as sb:
        assert sb.run("import os; os.environ['MARKER']").text == "'from-spec'\n"


# --- cleanup ---------------------------------------------------------------------------------------
def test_close_leaves_no_process_and_no_files(root):
    sb = Sandbox(root=root)
    marker = str(sb.runtime_dir)
    sleeper = f"1000.{os.getpid()}"
    r = sb.run(f"import subprocess\nsubprocess.Popen(['sleep', '{sleeper}'])\nprint('started')")
    assert r.text == "started\n"
    assert procs_with(marker) and wait_until(lambda: procs_with(sleeper))
    sb.close()
    sb.close()  # idempotent
    assert wait_until(lambda: not procs_with(marker) and not procs_with(sleeper))
    assert not sb.work_dir.exists() and not sb.runtime_dir.exists()
    with pytest.raises(RuntimeError, match="closed"):
        sb.run("1")


def test_a_sandbox_outlives_the_thread_that_created_it(root):
    # Streamlit creates objects in short-lived script threads; a parent-death signal tied to that
    # thread would kill the kernel when the thread ends.
    made = []
    thread = threading.Thread(target=lambda: made.append(Sandbox(root=root)))
    thread.start()
    thread.join()
    with made[0] as sb:
        time.sleep(0.3)
        assert sb.run("print('still alive')").text == "still alive\n"


OWNER = """
import json, os, sys, time
from chatglm_core.sandbox_pool import SandboxPool
from chatglm_core.settings import Settings
pool = SandboxPool(Settings(data_dir=sys.argv[1]))
boxes = [pool.get("a"), pool.get("b")]
for b in boxes:
    b.run(f"import subprocess; subprocess.Popen(['sleep', '{sys.argv[3]}'])")
print(json.dumps([str(b.runtime_dir) for b in boxes]), flush=True)
sys.stdin.readline()  # the test looks at the kernels first
if sys.argv[2] == "hang":
    time.sleep(600)
"""


@pytest.mark.parametrize("ending", ["exit", "hang"])
def test_no_kernel_outlives_the_owning_process(tmp_path, ending, monkeypatch, plain):
    sleeper = f"1000.{os.getpid()}{len(ending)}"  # unique to this test, so leftovers elsewhere don't count
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), ending, sleeper], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        runtime_dirs = json.loads(owner.stdout.readline())
        assert all(procs_with(d) for d in runtime_dirs) and procs_with(sleeper)
        owner.stdin.write("go\n")
        owner.stdin.flush()
        if ending == "hang":
            time.sleep(0.2)
            owner.send_signal(signal.SIGKILL)  # no atexit: the parent-death signal must do it
        owner.wait(timeout=30)
    finally:
        owner.kill()
    assert wait_until(lambda: not any(procs_with(d) for d in runtime_dirs) and not procs_with(sleeper))
    if ending == "hang":  # nobody was left to remove the directories: the next process's first sandbox does
        assert all(Path(d).exists() for d in runtime_dirs)
        monkeypatch.setattr(jail, "_swept", False)
        jail.sweep_stale_runtime_dirs()
        assert plain.runtime_dir.exists() and plain.run("1").text == "1\n"  # a live owner's dirs stay
    assert not any((tmp_path / "sandboxes").iterdir()) and not any(Path(d).exists() for d in runtime_dirs)


def test_pool_one_sandbox_per_session_and_idle_reaping(tmp_path):
    pool = SandboxPool(Settings(data_dir=tmp_path, sandbox_idle_seconds=0.6), reap_every=0.2)
    try:
        a, b = pool.get("a"), pool.get("b")
        assert pool.get("a") is a and a is not b and len(pool) == 2
        a.run("x = 1")
        assert wait_until(lambda: a.closed and b.closed, timeout=5)
        assert len(pool) == 0
        fresh = pool.get("a")
        assert fresh is not a and "NameError" in fresh.run("x").error
    finally:
        pool.close_all()
    assert fresh.closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.get("c")


def test_pool_does_not_reap_a_running_sandbox(tmp_path):
    pool = SandboxPool(Settings(data_dir=tmp_path, sandbox_idle_seconds=0.3), reap_every=0.1)
    try:
        r = pool.get("busy").run("import time; time.sleep(1.2); 'done'")
        assert r.text == "'done'\n"
    finally:
        pool.close_all()


@pytest.mark.parametrize("count", [15, pytest.param(50, marks=pytest.mark.slow)])
def test_many_sandboxes_open_and_close_without_leaks(root, count):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    Sandbox(root=root).close()  # first-use costs (imports, probe) out of the count
    fd_before, threads_before = fds(), threading.active_count()
    started = time.monotonic()
    runtime_dirs = []
    for i in range(count):
        with Sandbox(root=root) as sb:
            assert sb.run(f"print({i})").text == f"{i}\n"
            runtime_dirs.append(str(sb.runtime_dir))
    elapsed = time.monotonic() - started
    print(f"{count} sandboxes opened, used and closed in {elapsed:.1f} s ({elapsed / count * 1000:.0f} ms each)")
    assert wait_until(lambda: not any(procs_with(d) for d in runtime_dirs))
    assert not any(Path(d).exists() for d in runtime_dirs)
    assert fds() <= fd_before + 2 and threading.active_count() <= threads_before + 1


@pytest.mark.slow
def test_fifty_pool_sessions_opened_and_closed_leave_no_kernel(tmp_path):
    """The app's path: one pool, 50 browser sessions each get a kernel, use it, and go away."""
    pool = SandboxPool(Settings(data_dir=tmp_path), reap_every=3600)
    runtime_dirs = []
    try:
        for i in range(50):
            box = pool.get(f"session-{i}")
            assert box.run(f"print({i} * 2)").text == f"{i * 2}\n"
            runtime_dirs.append(str(box.runtime_dir))
            if i % 5:
                pool.close(f"session-{i}")  # most closed one by one, ten left for close_all
        assert len(pool) == 10
    finally:
        pool.close_all()
    assert len(pool) == 0
    assert wait_until(lambda: not any(procs_with(d) for d in runtime_dirs), timeout=30)
    assert not any(Path(d).exists() for d in runtime_dirs)


@pytest.mark.skipif(bwrap_probe(sys.executable) is not None, reason="bubblewrap unusable on this machine")
def test_an_interpreter_under_tmp_runs_jailed(tmp_path):
    # a checkout (and its .venv) under /tmp: the kernel's private /tmp must not hide the interpreter
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert str(venv).startswith("/tmp/")
    assert bwrap_probe(str(venv / "bin" / "python")) is None
