"""MkDocs hooks of zkv's documentation site (``mkdocs.yml``: ``hooks``).

The Markdown files are written for the repository, where they are read too: README.md links to
``docs/guide.md``, a page of docs/ to ``../examples/pool_demo.py``. The site is built from the
same files, with no copy:

- README.md becomes the home page (``index.md``) and CHANGELOG.md the page ``changelog.md``;
- the example scripts and LICENSE are copied into the site, so that links to them work there;
- every relative link is rewritten from the repository's layout to the site's. A link to a
  folder (``examples/``) becomes its name in code, since the site has no folder listings.

A link to something that exists in neither place is left alone, so the strict build fails on
it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

#: Site pages made from files of the repository: page -> file.
PAGES = {"index.md": "README.md", "changelog.md": "CHANGELOG.md"}
#: Files of the repository copied into the site as they are (patterns under ROOT).
COPIED = ["examples/*.py", "examples/recipes/*.py", "LICENSE"]

_SOURCES = {source: page for page, source in PAGES.items()}
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s#]+)(#[^)\s]*)?\)")


def on_files(files: Files, config: Any) -> Files:
    for page, source in PAGES.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / source)))
    for pattern in COPIED:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(),
                                        abs_src_path=str(path)))
    return files


def _site_target(repo_path: str) -> str | None:
    """Where ``repo_path`` (relative to the repository) is in the site; None for a folder."""
    if repo_path in _SOURCES:
        return _SOURCES[repo_path]
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    if (ROOT / repo_path).is_dir():
        return None
    return repo_path


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    source = PAGES.get(page.file.src_uri, f"docs/{page.file.src_uri}")
    here = posixpath.dirname(source)

    def rewrite(match: re.Match[str]) -> str:
        opening, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        if "://" in target or target.startswith(("mailto:", "/")):
            return match.group(0)
        repo_path = posixpath.normpath(posixpath.join(here, target))
        site = _site_target(repo_path)
        if site is None:  # a folder: name it
            text = opening[opening.index("[") + 1:-2]
            if text.strip("`").rstrip("/") == repo_path:
                return f"`{repo_path}/`"
            return f"{text} (`{repo_path}/`)"
        relative = posixpath.relpath(site, posixpath.dirname(page.file.src_uri) or ".")
        return f"{opening}{relative}{anchor})"

    return _LINK.sub(rewrite, markdown)
