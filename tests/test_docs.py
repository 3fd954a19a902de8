"""The documentation matches the code: every citation of docs/methods.md in the code and configs
names a section that exists, nothing cites the METHODS.md this repository does not have, and
every library module opens with a docstring saying its job."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pretrain", "transfer", "tools", "configs", "bench")
# docs/methods.md, "Section" (or 'Section'); a citation may wrap onto the next line
CITATION = re.compile(r"docs/methods\.md,\s+[\"']([^\"']+)[\"']")


def _files():
    for top in SOURCES:
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith((".py", ".yaml", ".sh")):
                    yield os.path.join(folder, name)


def _sections():
    with open(os.path.join(ROOT, "docs", "methods.md")) as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    # a section is cited by its title: the heading without the "(...)" that may follow it
    return {h.split(" (")[0] for h in headings}


def test_every_cited_section_of_docs_methods_exists():
    sections = _sections()
    assert {"Losses", "SiMo", "Augmentation", "Linear evaluation", "Conversion"} <= sections
    cited = {}
    for path in _files():
        with open(path) as f:
            text = " ".join(line.strip().lstrip("#").strip() for line in f)
        for title in CITATION.findall(text):
            cited.setdefault(title, []).append(os.path.relpath(path, ROOT))
    assert len(cited) >= 5  # the check finds the citations it claims to check
    missing = {t: files for t, files in cited.items() if t not in sections}
    assert not missing, f"cited sections missing from docs/methods.md: {missing}"


def test_nothing_cites_a_methods_md_outside_the_repository():
    offenders = []
    for path in _files():
        with open(path) as f:
            if re.search(r"(?<!docs/)\bMETHODS\.md", f.read()):
                offenders.append(os.path.relpath(path, ROOT))
    assert not offenders


def test_every_library_module_says_its_job():
    for top in ("pretrain", "transfer"):
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path) as f:
                        doc = ast.get_docstring(ast.parse(f.read()))
                    assert doc and len(doc.split()) >= 5, os.path.relpath(path, ROOT)


def test_readme_opens_with_the_two_commands_and_points_at_what_exists():
    """The README's first screen: `make demo` and `make test` first, the whole file short
    (measurements live in docs/results.md); every file it links and config it names exists."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    lines = text.splitlines()
    assert len(lines) <= 150, len(lines)
    start = lines.index("```bash")
    assert start < 10 and not any(line.startswith("```") for line in lines[:start])
    block = lines[start + 1 : lines.index("```", start + 1)]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    assert "docs/results.md" in links
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing
    top = os.path.join(ROOT, "configs")
    configs = {os.path.relpath(os.path.join(d, n), top) for d, _, ns in os.walk(top) for n in ns}
    named = set(re.findall(r"`((?:pretrain/|lincls/)?[\w.-]+\.yaml)`", text))
    named |= set(re.findall(r"configs/([\w/.-]+\.yaml)", text))
    named.discard("config.yaml")  # what every run writes, not a shipped config
    assert len(named) >= 10
    found = {n for n in named if n in configs or any(c.endswith("/" + n) for c in configs)}
    assert named == found, sorted(named - found)
