"""The README stays short and points to docs/; every relative link in README.md and docs/*.md leads somewhere real."""
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README_MAX_LINES = 250

_MD = MarkdownIt("commonmark").enable("table")


def _tokens(path: Path):
    for token in _MD.parse(path.read_text(encoding="utf-8")):
        yield token
        yield from token.children or ()


def links(path: Path) -> list[str]:
    """Every link target in a Markdown file (code spans and blocks excluded, as GitHub renders them)."""
    return [t.attrs["href"] for t in _tokens(path) if t.type == "link_open"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a file's headings; a repeated heading gets -1, -2, ..."""
    found, seen = set(), {}
    tokens = _MD.parse(path.read_text(encoding="utf-8"))
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children
                       if child.type in ("text", "code_inline"))
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, file it points to, anchor) for every link that is not to another site."""
    out = []
    for href in links(path):
        parts = urlsplit(href)
        if parts.scheme or parts.netloc:
            continue
        target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        out.append((href, target, unquote(parts.fragment)))
    return out


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into a docs/ page (at most {README_MAX_LINES})"


def test_docs_exist():
    names = {p.name for p in PAGES}
    for page in ("serving.md", "deploying.md", "fine-tuning.md", "training-data.md", "improving.md",
                 "gguf-export.md", "benchmarks.md"):
        assert page in names


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for href, target, anchor in relative_links(path):
        if not target.exists():
            broken.append(f"{href}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
            broken.append(f"{href}: no heading with anchor #{anchor}")
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


CODE_DIRS = ("training", "chatbot", "tools", "benchmarks", "tests")


def stale_code_names(text: str, root: Path = ROOT) -> list[str]:
    """Repository paths (`training/export/merge.py`) and modules (`training.trainer.hardware.decide`) named in
    the text that do not exist: code moves, and the docs must follow it."""
    stale = []
    dirs = "|".join(CODE_DIRS)
    for path in set(re.findall(rf"(?<![\w./-])((?:{dirs})/[\w./-]*\w)", text)):
        if not (root / path).exists():
            stale.append(path)
    for dotted in set(re.findall(rf"(?<![\w./-])((?:{dirs})(?:\.\w+)+)", text)):
        parts = dotted.split(".")
        if dotted.endswith((".py", ".md", ".yaml", ".jsonl")):
            continue
        if not any((root / Path(*parts[:n])).with_suffix(".py").is_file() or (root / Path(*parts[:n])).is_dir()
                   for n in range(2, len(parts) + 1)):
            stale.append(dotted)
    return sorted(stale)


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_named_in_the_docs_exists(path):
    stale = stale_code_names(path.read_text(encoding="utf-8"))
    assert not stale, f"{path.relative_to(ROOT)} names files or modules that do not exist: {stale}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target for _, target, _ in relative_links(README)}
    missing = [p.name for p in PAGES if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


# The checker itself, on text whose answer is known.

def test_slug_follows_github():
    assert slug("Losing the machine (Colab, spot instances)") == "losing-the-machine-colab-spot-instances"
    assert slug("What is kept, and where") == "what-is-kept-and-where"
    assert slug("Which base model and quantisation for the Space?") == "which-base-model-and-quantisation-for-the-space"
    assert slug("The `openai` backend") == "the-openai-backend"
    assert slug("Time to first token, by stage") == "time-to-first-token-by-stage"


def test_checker_finds_broken_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Same\n\n## Same\n\n## The `x` part\n")
    page.write_text(
        "# Page\n\n[ok](other.md#same-1) [ok](other.md#the-x-part) [ok](#page) [web](https://example.com/x.md)\n\n"
        "| a | b |\n|---|---|\n| [missing](missing.md) | [bad anchor](other.md#nope) |\n\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link](nowhere.md)\n```\n")
    found = {href: (target.name, anchor) for href, target, anchor in relative_links(page)}
    assert set(found) == {"other.md#same-1", "other.md#the-x-part", "#page", "missing.md", "other.md#nope"}
    assert anchors(tmp_path / "other.md") == {"other", "same", "same-1", "the-x-part"}
    assert "nope" not in anchors(tmp_path / "other.md")
    assert not (tmp_path / "missing.md").exists()


def test_checker_finds_code_that_moved(tmp_path):
    (tmp_path / "training" / "trainer").mkdir(parents=True)
    (tmp_path / "training" / "trainer" / "hardware.py").write_text("")
    (tmp_path / "training" / "data").mkdir()
    text = ("`training/trainer/hardware.py`, `training.trainer.hardware.decide(device, request)`, "
            "`python -m training.data`, `training/hardware.py`, `training.hardware.probe()`, RUN_DIR/training/x")
    assert stale_code_names(text, tmp_path) == ["training.hardware.probe", "training/hardware.py"]
