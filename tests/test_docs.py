"""The docs site: the generated API reference is current, and every relative link and image resolves."""

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current(tmp_path):
    gen_api = load_generator()
    fresh = tmp_path / "api.md"
    assert gen_api.main(["--output", str(fresh)]) == 0
    text = fresh.read_text()
    for name in ("ScoreModel", "MSGMPipeline", "ModeratedScoreScheduler", "VPSDE", "MSGMLoss", "project_score",
                 "undesirable_generation_rate", "load_image_dataset", "push_folder_to_hub"):
        assert f"`{name}" in text, name
    assert (DOCS / "api.md").read_text() == text, "docs/api.md is out of date: run `python docs/gen_api.py`"


def relative_links(markdown: Path) -> list[str]:
    text = CODE.sub("", markdown.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t)]


def test_every_relative_link_and_image_resolves():
    pages = sorted(DOCS.rglob("*.md")) + [REPO / "README.md"]
    broken, checked = [], 0
    for page in pages:
        for target in relative_links(page):
            checked += 1
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert checked > 20 and not broken, broken


def test_index_links_every_page():
    linked = {(DOCS / t.split("#", 1)[0]).resolve() for t in relative_links(DOCS / "index.md")}
    pages = {p.resolve() for p in DOCS.glob("*.md")} - {(DOCS / "index.md").resolve()}
    assert not sorted(p.name for p in pages - linked), "pages not linked from docs/index.md"
