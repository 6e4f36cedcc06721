"""Peak resident memory of a command run in a fresh process (the benchmarks and the streaming memory test).

A small launcher forks and execs the command and reports its ru_maxrss. Measuring through it matters:
Linux carries the forking parent's resident size into the child's ru_maxrss, and the calling process
(torch, the generator, pytest) is far larger than what is being measured.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write('\\nPEAK_RSS_KB=%d\\n' % usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[str, float, float]:
    """Run `cmd` from the repository root (with `env`, default this process's); return (its stdout, wall
    seconds, peak RSS in MB of it and its children). Raises RuntimeError with the end of its stderr when it fails.
    """
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB=", 1)[1].split()[0])
    return proc.stdout, wall, peak_kb / 1024
