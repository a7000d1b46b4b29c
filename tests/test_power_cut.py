"""Power cuts replayed (tools/power_cut.py): the backing tree on ext4 on a disk that logs every
write and flush; every acknowledged operation must be in effect in each crash state after it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "power_cut.py"

_MISSING = os.geteuid() != 0 or not (shutil.which("losetup") and shutil.which("mkfs.ext4"))
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(_MISSING, reason="needs root, losetup and mkfs.ext4")]


def test_every_acknowledged_operation_survives_each_replayed_power_cut():
    states = os.environ.get("FUSESTORE_POWER_CUT_STATES", "12")
    result = subprocess.run([sys.executable, str(TOOL), states, "--ops", "60", "--seed", "7"],
                            capture_output=True, text=True, timeout=280)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(summary)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary.startswith(f"power cuts: {states} crash states") and summary.endswith(" 0 state(s) with a problem")
    assert " 0 unflushed writes kept" not in summary  # the states include writes after their flush
    assert "fusestore-power-cut" not in open("/proc/self/mountinfo").read()  # nothing left mounted
