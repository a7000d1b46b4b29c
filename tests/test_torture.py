"""The model-based exerciser of tools/torture in a short mode: random operations applied to the
mount and to a plain directory side by side must agree on every result, errno and tree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import torture  # noqa: E402


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mount_and_plain_directory_agree(mount, tmp_path, seed):
    plain = tmp_path / "plain"
    plain.mkdir()
    ops = int(os.environ.get("FUSESTORE_TORTURE_OPS", "1500"))
    torture.run(str(mount.mnt), str(plain), ops, seed)
