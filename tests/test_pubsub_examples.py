"""The pub/sub examples run to completion (exit code 0) as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(("script", "last_line"), [
    ("pubsub_events.py", "24 orders, revenue 2400"),
    ("watch_config.py", "all 3 workers stopped with factor 13, mode plain"),
])
def test_example_runs(script: str, last_line: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], env=env,
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(last_line)
    assert "Traceback" not in result.stderr
