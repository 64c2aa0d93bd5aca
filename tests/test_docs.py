"""The docs stay true to the code: the API reference is generated, links resolve, the site
builds in strict mode, and zkv logs as the guide says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_relative_links_resolve() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# -- the documentation site ----------------------------------------------------------------

_SITE_SOURCES = ["mkdocs.yml", "README.md", "CHANGELOG.md", "LICENSE", "docs", "examples"]


def _mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e . --group docs")
    pytest.importorskip("material", reason="mkdocs-material is not installed: "
                                           "pip install -e . --group docs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "--config-file", str(root / "mkdocs.yml"), "--site-dir", str(site)],
                          capture_output=True, text=True, timeout=50, env=env, cwd=root)


def test_site_builds_in_strict_mode(tmp_path: Path) -> None:
    done = _mkdocs_build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "guide/index.html", "cli/index.html", "recipes/index.html",
                 "api/index.html", "changelog/index.html", "examples/pool_demo.py"):
        assert (tmp_path / "site" / page).is_file(), page
    home = (tmp_path / "site" / "index.html").read_text()
    assert "When to use zkv" in home and 'href="guide/"' in home  # README, links rewritten


def test_a_broken_link_fails_the_site_build(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for name in _SITE_SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            copy.mkdir(exist_ok=True)
            shutil.copy(source, copy / name)
    page = copy / "docs" / "cli.md"
    page.write_text(page.read_text() + "\nSee [the options](guide.md#no-such-heading).\n")
    done = _mkdocs_build(copy, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-heading" in done.stdout + done.stderr


# -- logging -------------------------------------------------------------------------------

_FAILING_CALLBACK = """
import logging, sys, threading
import zkv
if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.WARNING)
kv = zkv.serve()
later = threading.Event()

@kv.on_subscriber_receive("news")
def callback(data):
    if data == 1:
        raise ValueError("this callback fails on purpose")
    later.set()

kv.publish("news", 1)
kv.publish("news", 2)
assert later.wait(10), "the second message did not reach the callback"
kv.close()
print("done")
"""


@pytest.mark.parametrize("logging_configured", [False, True])
def test_zkv_writes_to_stderr_only_when_logging_is_configured(logging_configured: bool) -> None:
    """As docs/guide.md ("Logging") says: a failing callback is logged, and the log reaches
    stderr only if the program configured logging."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
    done = subprocess.run([sys.executable, "-c", _FAILING_CALLBACK,
                           "configured" if logging_configured else "bare"],
                          capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr
    if logging_configured:
        assert "this callback fails on purpose" in done.stderr
        assert "zkv.dispatch" in done.stderr
    else:
        assert done.stderr == ""
