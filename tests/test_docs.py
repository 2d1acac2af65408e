"""The docs stay honest, cheaply: the README's "Code organisation" and docs/design.md §8 name
every module of the package, every file path written in backticks in CONTRIBUTING.md and
docs/design.md exists, CONTRIBUTING.md's test layout lists every test file, and design.md keeps
the numbered sections that code comments cite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "onnx_pathwise"
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"

#: The numbered sections of docs/design.md (comments cite them as "docs/design.md §4").
DESIGN_SECTIONS = [
    "1. Models it accepts",
    "2. Terms",
    "3. Unwrapping (the local affine model)",
    "4. Pathwise explanation (Lim, Jo, Lee, Choi, AISTATS 2024)",
    "5. Baselines and metrics (same engine, no autodiff framework)",
    "6. Execution and speed",
    "7. Linearised mode (beyond piecewise-linear networks)",
    "8. Architecture",
    "9. How to add an op, a method, an output format",
    "10. Limits and the memory budget",
    "11. Errors and exit codes",
]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section (up to the next heading of level 2 or 1)."""
    m = re.search(rf"^## {re.escape(title)}[^\n]*\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert m, f"no section '## {title}'"
    return m.group(1)


def inline_code(text: str) -> list[str]:
    """Every `inline code` span outside fenced code blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def looks_like_path(span: str) -> bool:
    """A repository path: no spaces, a slash, and a file extension, a trailing slash or a first
    part that is a top-level entry of the repository (``.ci/run``). Templates
    (``rules/<family>.py``) and URLs are not checked."""
    if any(c.isspace() for c in span) or "/" not in span or "<" in span or "://" in span:
        return False
    return (span.endswith("/") or re.search(r"\.[A-Za-z0-9]+$", span) is not None
            or (ROOT / span.split("/")[0]).exists())


def modules() -> list[str]:
    """Every module of the package, relative to it (``cli/__init__.py``, ``rules/linear.py``, ...)."""
    return [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py"))]


def test_readme_code_organisation_names_every_module() -> None:
    listed = section(read(README), "Code organisation")
    missing = [m for m in modules() if f"`{m}`" not in listed]
    assert not missing, f"README's 'Code organisation' does not list {missing}"


def test_design_architecture_names_every_module() -> None:
    architecture = section(read(DESIGN), "8. Architecture")
    missing = [m for m in modules() if f"`onnx_pathwise/{m}`" not in architecture]
    assert not missing, f"docs/design.md §8 does not name {missing} (as `onnx_pathwise/<module>`)"


@pytest.mark.parametrize("doc", [CONTRIBUTING, DESIGN], ids=lambda p: p.name)
def test_paths_in_backticks_exist(doc: Path) -> None:
    paths = [s for s in inline_code(read(doc)) if looks_like_path(s)]
    assert paths, f"{doc.name}: no path found (is the check still looking?)"
    missing = sorted({p for p in paths if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())})
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_contributing_lists_every_test_file() -> None:
    layout = section(read(CONTRIBUTING), "Test layout")
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if f"`tests/{p.name}`" not in layout]
    assert not missing, f"CONTRIBUTING.md's test layout does not list {missing}"


def test_design_keeps_its_numbered_sections() -> None:
    headings = re.findall(r"^## (\d+\. .*)$", read(DESIGN), re.M)
    assert headings == DESIGN_SECTIONS


def test_the_checks_can_fail() -> None:
    """The helpers find what they look for (so that the tests above cannot pass vacuously)."""
    text = "## A\nsee `x.py`\n```\n`not/this.py`\n```\n## B\n`tests/` and `rules/<f>.py`, `a/b`\n"
    assert section(text, "A").strip().startswith("see `x.py`")
    assert inline_code(text) == ["x.py", "tests/", "rules/<f>.py", "a/b"]
    assert [s for s in inline_code(text) if looks_like_path(s)] == ["tests/"]
    assert "cli/__init__.py" in modules() and "rules/__init__.py" in modules()
