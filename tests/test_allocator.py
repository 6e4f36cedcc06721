"""malloc tuning: applied on Linux/glibc, exported to child processes, and switchable off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stellarlab.run.allocator import keep_freed_blocks

CHILD = """
import os, sys
from stellarlab.run.allocator import keep_freed_blocks
print(keep_freed_blocks(float(sys.argv[1]) if sys.argv[1] != "None" else None))
print(os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"))
"""


def _run(value: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, value], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt thresholds are a Linux/glibc setting")
def test_thresholds_are_set_and_exported_for_spawned_processes():
    applied, exported = _run("64")[:2]
    assert applied == "True"
    assert exported == f"{64 * 2**20} {128 * 2**20}"


@pytest.mark.slow
def test_null_or_zero_leaves_malloc_alone():
    assert _run("None")[:2] == ["False", "None None"]
    assert _run("0")[:2] == ["False", "None None"]


@pytest.mark.slow
def test_huge_values_are_capped_at_what_mallopt_takes():
    if not sys.platform.startswith("linux"):
        assert keep_freed_blocks(10**9) is False
        return
    applied, exported = _run(str(10**9))[:2]
    assert applied == "True" and exported == f"{2**31 - 1} {2**31 - 1}"


CHILD_TWICE = """
import os
from stellarlab.run.allocator import keep_freed_blocks
print(keep_freed_blocks(64), keep_freed_blocks(32))  # the second: the next job of a single-process multirun
print(os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt thresholds are a Linux/glibc setting")
@pytest.mark.parametrize(
    "user_env, expected",
    [
        ({}, ["True True", f"{32 * 2**20} {64 * 2**20}"]),  # the later call replaces its own export
        ({"MALLOC_MMAP_THRESHOLD_": "1234"}, ["False False", "1234 None"]),  # the user's malloc setting wins
        # inherited from a parent that made the same setting (DDP spawn): applied here too
        ({"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20)},
         ["True True", f"{32 * 2**20} {64 * 2**20}"]),
    ],
)
@pytest.mark.slow
def test_a_later_call_replaces_its_own_export_but_never_the_users(user_env, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | user_env
    out = subprocess.run([sys.executable, "-c", CHILD_TWICE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == expected
