"""`make bench` keeps working: its per-backend part runs end to end on a few tokens.

Speed is never asserted here (figures move with the machine); this checks that every row the
closing notes quote is still measured and printed, so a change elsewhere cannot silently break the
benchmark (as a changed `plan_chat` signature once did).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from chatglm_core.backends import llamacpp

ROOT = Path(__file__).resolve().parents[1]


def test_bench_perf_part_runs_every_row(test_data_dir):
    part = "llamacpp" if llamacpp.available() else "transformers"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGLM_", "MODEL_PATH"))}
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
