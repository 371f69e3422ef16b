"""The README and docs/: the README's file tour names every module, every relative link resolves, the README
stays a short first page."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TOUR_HEADING = "## Read these files first"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), ![alt](target)


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def tour_section() -> str:
    text = README.read_text(encoding="utf-8")
    assert TOUR_HEADING in text, f"README.md has no '{TOUR_HEADING}' section"
    section = text.split(TOUR_HEADING, 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]


def test_readme_tour_names_every_vae_module_and_package():
    tour = tour_section()
    modules = sorted(p.name for p in (REPO / "vae").glob("*.py") if p.name != "__init__.py")
    packages = sorted(f"{p.parent.name}/" for p in (REPO / "vae").glob("*/__init__.py"))
    assert modules and packages, "no modules or packages found under vae/"
    # whole names: a tour naming run_state.py does not name a state.py, nor models/ a mymodels/
    missing = [name for name in modules + packages if not re.search(rf"(?<![\w.]){re.escape(name)}", tour)]
    assert not missing, f"README.md's '{TOUR_HEADING}' section does not name: {', '.join(missing)}"


def test_every_relative_link_resolves():
    broken = []
    for md in markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.DOTALL)  # code blocks are not links
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(REPO)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_readme_is_a_short_first_page():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 160, f"README.md has {lines} lines; move reference material into docs/ (at most 160)"
