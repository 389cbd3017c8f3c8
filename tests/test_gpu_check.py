"""benchmarks/gpu_check.sh where there is no GPU: one line saying so, exit 0, and quickly
(it must not load torch's CUDA stack for long to find out). CUDA_VISIBLE_DEVICES hides any
GPU, so the branch is the same on a machine that has one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
# Generous for a loaded 2-core machine: the branch itself takes well under a second without
# nvidia-smi, a torch import with it.
LIMIT_SECONDS = 120


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            timeout=LIMIT_SECONDS)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    [line] = result.stdout.splitlines()
    assert line.startswith("gpu_check: no GPU here") and "nothing checked" in line
