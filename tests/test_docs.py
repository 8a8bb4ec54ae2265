"""The documentation stays true to the code and to itself: the option reference is the one generated from the
argument dataclasses, the README stays short, and every relative link (and its #anchor) leads somewhere."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 260
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]


def _gen_options():
    """docs/gen_options.py as a module, loaded from its path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_options", REPO / "docs" / "gen_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_option_reference_is_the_one_generated_from_the_argument_dataclasses():
    gen = _gen_options()
    committed = (REPO / "docs" / "options.md").read_text()
    assert committed == gen.render(), "docs/options.md is out of date: run `python docs/gen_options.py` to refresh"


def test_the_generator_checks_as_a_script():
    run = subprocess.run([sys.executable, "docs/gen_options.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_option_of_every_argument_dataclass_is_in_the_reference():
    import dataclasses

    from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, ModelArguments, TrainArguments

    text = (REPO / "docs" / "options.md").read_text()
    for cls in (ModelArguments, DataArguments, GRPOArguments, TrainArguments):
        assert f"## {cls.__name__}" in text
        for field in dataclasses.fields(cls):
            assert f"| `--{field.name}`" in text, field.name


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the detail to a page under docs/"
    )


# ------------------------------------------------------------------------------------------------ links
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans, where a `[x](y)` is code, not a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = _prose(text)
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def anchors(text: str) -> set[str]:
    """The #fragments GitHub gives the headings of a Markdown file (lower case, punctuation dropped, spaces to
    hyphens, repeats numbered)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        plain = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", plain.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page.read_text()):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text()):
            broken.append(f"{target} (no heading #{fragment} in {resolved.relative_to(REPO)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_points_to_an_existing_file(page):
    assert page.exists(), f"{page.relative_to(REPO)} is missing"
    assert not broken_links(page), f"{page.relative_to(REPO)} links to what does not exist: {broken_links(page)}"


def test_the_link_check_sees_links_and_ignores_code():
    text = ("See [a](docs/a.md#b-c) and ![img](images/x.png \"title\"); `[not](a link)`.\n"
            "```\n[also not](code.md)\n```\n[ref]: ../b.md\n")
    assert links(text) == ["docs/a.md#b-c", "images/x.png", "../b.md"]
    assert anchors("# What `\"auto\"` resolves to\n## Prefix trees: shared segments\n## X\n## X\n") == {
        "what-auto-resolves-to", "prefix-trees-shared-segments", "x", "x-1"}


def test_the_auto_table_of_the_deepspeed_configs_is_written_once():
    """One place for one fact: the other pages link to docs/deepspeed.md#what-auto-resolves-to."""
    holding = [p.relative_to(REPO).as_posix() for p in PAGES if "stage3_param_persistence_threshold" in p.read_text()]
    assert holding == ["docs/deepspeed.md"], holding
