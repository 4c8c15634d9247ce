"""The project documents itself: every public name appears in ``docs/``, every relative link
in the docs and the README resolves, and no text points outside the repository for the ops'
semantics."""

import pathlib
import re
import subprocess

import pytest

import fastattn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


@pytest.mark.parametrize(
    "module, names",
    [
        ("fastattn", [n for n in fastattn.__all__ if n not in ("nn", "autograd", "numpy", "reference")]),
        ("fastattn.nn", fastattn.nn.__all__),
        ("fastattn.numpy", fastattn.numpy.__all__),
    ],
)
def test_every_public_name_is_documented(module, names):
    text = _docs_text()
    missing = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", text)]
    assert not missing, f"{module}: not in docs/: {missing}"


def test_every_family_has_a_page_linked_from_the_index():
    index = (DOCS / "index.md").read_text()
    for page in ("conventions", "attention", "neighborhood", "linear", "flow", "hilo", "landmark", "runtime",
                 "benchmarks"):
        assert (DOCS / f"{page}.md").exists(), page
        assert f"({page}.md)" in index, page


def test_relative_links_resolve():
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_nothing_refers_to_a_spec_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    spec = "SPEC"  # spelled in pieces so this file does not match itself
    outside = re.compile(r"\.\./" + "shared" + "|shared/" + spec + r"|\b" + spec + " §")
    hits = [f for f in files if f.endswith((".py", ".rs", ".md", ".toml", ".sh"))
            and outside.search((ROOT / f).read_text(errors="ignore"))]
    assert not hits, hits
