"""`make bench` keeps working: its per-backend part runs end to end on a few tokens, and so does its
comparison with llama.cpp's own server where one is built (`make llama-server`, or LLAMA_SERVER).

Speed is never asserted here (figures move with the machine); this checks that every row the
closing notes quote is still measured and printed, so a change elsewhere cannot silently break the
benchmark (as a changed `plan_chat` signature once did).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatglm_core.backends import llamacpp

ROOT = Path(__file__).resolve().parents[1]


def test_bench_perf_part_runs_every_row(test_data_dir):
    part = "llamacpp" if llamacpp.available() else "transformers"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATGLM_", "MODEL_PATH")) or k == "CHATGLM_THREADS"}  # the Makefile's
    proc = subprocess.run([sys.executable, "benchmarks/bench_perf.py", "--part", part, "--quick", "--tokens", "8",
                           "--data-dir", str(test_data_dir)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = ["decode", "time to first token", "via Engine.stream", "via API SSE", "via app page",
            "8 callers aggregate ", "8 callers first token", "8 callers aggregate, sampled", "-token prompt joins"]
    if part == "llamacpp":
        rows += ["llamacpp default (float16 copy) decode", "llamacpp native (its own Q4_1) decode",
                 "llamacpp default decode, sampled"]
    missing = [r for r in rows if r not in proc.stdout]
    assert not missing, proc.stdout
    assert "ratio" in proc.stdout and "tok/s" in proc.stdout


LLAMA_SERVER = os.environ.get("LLAMA_SERVER") or str(ROOT / ".llama-server" / "bin" / "llama-server")


@pytest.mark.skipif(not os.access(LLAMA_SERVER, os.X_OK),
                    reason=f"no llama-server at {LLAMA_SERVER}: `make llama-server` builds it (several minutes), "
                           "or set LLAMA_SERVER=/path/to/llama-server")
@pytest.mark.skipif(not llamacpp.available(), reason="the comparison runs our llama.cpp backend: llama-cpp-python "
                                                     "is not installed")
def test_bench_vs_llama_server_prints_every_row_with_both_figures(test_data_dir):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vs_llama_server import ROWS

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATGLM_", "MODEL_PATH")) or k == "CHATGLM_THREADS"}  # the Makefile's
    # one thread a side: on a busy machine every step of a multi-threaded one waits for a core (minutes here)
    proc = subprocess.run([sys.executable, "benchmarks/bench_vs_llama_server.py", "--runs", "1", "--tokens", "6",
                           "--turn-tokens", "3", "--turn-samples", "2", "--threads", "1", "--data-dir",
                           str(test_data_dir), "--llama-server", LLAMA_SERVER, "--peer-load-mode", "none"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {cells[0]: cells[1:] for row in proc.stdout.splitlines() if row.startswith("| ")
             for cells in [[c.strip() for c in row.strip("|").split("|")]]}
    for row in ROWS[:7]:
        ours, theirs, ratio, won = table[row]
        for figure in (ours, theirs):
            value, unit = figure.split(" ", 1)
            assert float(value) > 0 and unit in ("tok/s", "ms"), (row, figure)
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
        if row in ROWS[4:6]:  # two conversations in the one run: two side-by-side pairs
            k, of, n = won.split()
            assert of == "of" and n == "2" and 0 <= int(k) <= 2, (row, won)
    assert ROWS[7] in table  # the cached-token counts (a number, or n/a where a server does not report it)
    assert "1 thread(s) per step on both sides" in proc.stdout
    assert "weights: ours read into memory (CHATGLM_LLAMA_LOAD=auto), llama-server read into memory" in proc.stdout
