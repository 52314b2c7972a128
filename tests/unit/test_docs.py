"""The documentation stands alone: no pointer a user cannot open, every relative link resolves, examples run.

- No text in the package, the READMEs, the benchmark scripts and presets, the configs or ``docs/`` cites the
  project's private notes (``resad.md`` and its siblings, ``§`` sections, ``../shared``) or an issue number:
  a user of the repository has none of them.
- Every relative markdown link (and image) in the READMEs, ``docs/*.md`` and the notes in
  ``benchmarks/results`` points at a file or folder of the repository, and an ``#anchor`` at a heading of
  the target file.
- Every model folder has anomalib's layout (``__init__.py``, ``lightning_model.py``, ``torch_model.py``,
  ``README.md``); extra modules are listed here, so a new one is noticed.
- The docstring examples (``>>>``) of the package run and print what they say (no training: they build
  untrained models with ``backbone_weights=None`` or tensors only; about 10 s on a CPU).

Each checker is also run on a small broken input, so the checks can fail.
"""

from __future__ import annotations

import doctest
import importlib
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "anomalib_cgad"

# The private notes and issue numbers the documentation must not point at.
FORBIDDEN = re.compile(
    r"resad\.md|metaad\.md|anomalib\.md|anchors\.md|§|\.\./shared|\bissues? \d|\(issue\b|(?<![\w&])#\d+\b",
    re.IGNORECASE,
)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}


def scanned_files() -> list[Path]:
    """Text files a user reads: package, READMEs, benchmark scripts and presets, configs, docs, result notes."""
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    files += sorted((ROOT / "benchmarks" / "presets").glob("*.yaml"))
    files += sorted((ROOT / "benchmarks" / "results").rglob("*.md"))  # notes; csv/json are machine output
    for folder in (PACKAGE, ROOT / "configs", ROOT / "docs"):
        files += sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    return [p for p in files if p.is_file()]


def forbidden_references(path: Path) -> list[str]:
    """``file:line: text`` for every line of ``path`` that cites a private note or an issue number."""
    lines = enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in lines if FORBIDDEN.search(line)]


def markdown_files() -> list[Path]:
    """The markdown a user browses: READMEs (top level, benchmarks, models), docs/ and result-folder notes."""
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    files += sorted((PACKAGE / "models").glob("*/README.md"))
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "benchmarks" / "results").rglob("*.md"))
    return [p for p in files if p.is_file()]


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path`` (lower case, punctuation dropped, spaces to hyphens)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:  # repeated headings get -1, -2, ...
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def broken_links(path: Path) -> list[str]:
    """``file: target (why)`` for every relative link of ``path`` that does not resolve inside the repository."""
    problems = []
    for target in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if file_part.startswith("/") or not resolved.is_relative_to(ROOT):
            problems.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file or folder)")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            problems.append(f"{where} (no heading with that anchor)")
    return problems


def test_no_reference_to_private_notes_or_issue_numbers() -> None:
    files = scanned_files()
    assert len(files) > 50  # the package and the READMEs were found
    found = [hit for path in files for hit in forbidden_references(path)]
    assert not found, "\n".join(found)


def test_forbidden_reference_check_catches_each_form(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    lines = ["see resad.md", "spec §15.9", "../shared/docs/x", "(issue 7)", "Issues 5, 7", "fixed in #21", "ok"]
    sample = tmp_path / "x.md"
    sample.write_text("\n".join(lines))
    assert forbidden_references(sample) == [f"x.md:{n}: {line}" for n, line in enumerate(lines[:-1], 1)]
    # no false alarm on HTML entities, colours, numbering or the word itself
    assert not FORBIDDEN.search("&#8212; colour #1f77b4, step 1. of 3, 'issues' with tissue 3")


def test_every_relative_markdown_link_resolves() -> None:
    files = markdown_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"README.md", "benchmarks/README.md", "anomalib_cgad/models/cgad/README.md"} <= names
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_link_check_catches_missing_files_anchors_and_escapes(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "other.md").write_text("# A title\n\n## Result table (k = 4)\n")
    page = tmp_path / "sub" / "page.md"
    page.write_text(
        "[ok](../other.md#result-table-k--4) [ok](../other.md) [ok](#here) [web](https://example.com/x)\n"
        "[gone](../missing.md) [bad anchor](../other.md#nope) [escape](../../outside.md) ![img](pic.png)\n"
        "```\n[in code](not_checked.md)\n```\n# Here\n"
    )
    problems = broken_links(page)
    assert len(problems) == 4, problems
    assert any("missing.md (no such" in p for p in problems)
    assert any("#nope (no heading" in p for p in problems)
    assert any("outside.md (outside" in p for p in problems)
    assert any("pic.png (no such" in p for p in problems)


MODEL_FILES = {"__init__.py", "lightning_model.py", "torch_model.py", "README.md"}
# Modules a model keeps beside anomalib's four files (none: stages shared by several models live in components/).
EXTRA_MODEL_FILES: dict[str, set[str]] = {}


def test_every_model_folder_has_anomalibs_layout() -> None:
    # a model folder holds a model; a sub-package of shared code (no lightning or torch model) is not one
    folders = sorted(
        p
        for p in (PACKAGE / "models").iterdir()
        if p.is_dir() and any((p / name).exists() for name in ("lightning_model.py", "torch_model.py"))
    )
    assert {p.name for p in folders} >= {"cgad", "resad", "metaad"}
    for folder in folders:
        files = {p.name for p in folder.iterdir() if p.is_file() and p.suffix in {".py", ".md"}}
        assert files == MODEL_FILES | EXTRA_MODEL_FILES.get(folder.name, set()), folder.name


def modules_with_examples() -> list[str]:
    """Dotted names of the package's modules whose docstrings hold ``>>>`` examples."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


EXAMPLE_MODULES = modules_with_examples()


def run_examples(module: types.ModuleType) -> doctest.TestResults:
    """Run ``module``'s docstring examples as ``pytest --doctest-modules`` does (ELLIPSIS on)."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS, verbose=False)
    for test in doctest.DocTestFinder().find(module, module.__name__):
        runner.run(test)
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("name", EXAMPLE_MODULES)
def test_docstring_examples_run(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    result = run_examples(importlib.import_module(name))
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"


def test_examples_are_found_and_a_wrong_one_fails() -> None:
    assert len(EXAMPLE_MODULES) >= 15
    assert "anomalib_cgad.components.reference_bank" in EXAMPLE_MODULES
    probe = types.ModuleType("probe")
    probe.__doc__ = ">>> 1 + 1\n3\n"
    assert run_examples(probe) == doctest.TestResults(failed=1, attempted=1)
