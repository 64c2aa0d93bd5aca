"""Every recipe of docs/recipes.md runs as a user runs it (``python examples/recipes/X.py``)
and prints what the page says; the page shows each file exactly as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"

#: recipe -> the lines its output must end with
EXPECTED = {
    "pytest_fixture.py": [],  # checked below: "2 passed"
    "memoise.py": ["20 calls, 4 computed"],
    "work_queue.py": ["30 jobs done by 3 workers, each job once"],
    "run_once_leader.py": ["set-up ran 1 time(s) for 8 workers",
                           "3 leaders, one after the other"],
    "progress_bar.py": ["[##############################] 40/40"],
    "config_reload.py": ["start:  {'config.rate': 3, 'config.mode': 'plain'}",
                         "reload: {'config.rate': 5, 'config.mode': 'plain'}",
                         "reload: {'config.rate': 5}",
                         "worker exited with 0"],
    "migrate_manager.py": ["Manager: {'a': 3, 'b': 2, 'c': 1}",
                           "zkv:     {'a': 3, 'b': 2, 'c': 1}"],
}


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Every recipe, started at once (they are small; together they take about a second)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
    started = {name: subprocess.Popen([sys.executable, str(RECIPES / name)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name in sorted(EXPECTED)}
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_every_recipe_is_tested() -> None:
    assert sorted(p.name for p in RECIPES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_runs(runs: dict[str, subprocess.Popen[str]], name: str) -> None:
    out, err = runs[name].communicate(timeout=50)
    assert runs[name].returncode == 0, out + err
    assert "Traceback" not in err, err
    lines = out.strip().splitlines()
    if name == "pytest_fixture.py":
        assert lines[-1].startswith("2 passed"), out
    else:
        assert lines[-len(EXPECTED[name]):] == EXPECTED[name], out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_page_shows_the_file(name: str) -> None:
    page = (ROOT / "docs" / "recipes.md").read_text()
    assert f"```python\n{(RECIPES / name).read_text()}```" in page, \
        f"docs/recipes.md does not show examples/recipes/{name} as it is"
