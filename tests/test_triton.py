"""The Triton kernels' logic on CPU, through Triton's interpreter (GPU runs use test_core's cases)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = os.path.join(os.path.dirname(__file__), "triton_interpreted.py")
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all cases match" in result.stdout


def test_launches_cover_the_plan():
    from dilated_attention.backends.triton import launches
    from dilated_attention.plan import build_plan

    paper = build_plan(100, 6, [10, 40], [1, 4], "paper")
    assert launches(paper) == [(10, 1, -1, 0, 6), (40, 4, -1, 0, 6)]
    groups = build_plan(100, 5, [10, 40], [1, 4], "head_groups")
    assert launches(groups) == [(10, 1, -1, 0, 3), (40, 4, 1, 3, 2)]
