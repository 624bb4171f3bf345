"""The file's map is true: its sections are the ones its docstring lists, in
order; each uses only the sections above it (a subcommand may run an earlier
subcommand whole); every default and table lives in CONSTANTS."""

import ast
import re

import pytest

import sort_faces
from conftest import ROOT

pytestmark = pytest.mark.fast

SOURCE = (ROOT / "sort_faces.py").read_text()
LINES = SOURCE.splitlines()
TREE = ast.parse(SOURCE)
# the subcommands' entry functions: a later subcommand may run one whole
SUBCOMMAND_SECTIONS = {"EMBED": "embed", "CLUSTER": "cluster", "REFINE": "refine",
                       "DEDUP": "dedup", "EXTEND": "extend", "ENRICH": "enrich",
                       "EXPORT-SWAP": "export_swap", "PEOPLE": "people"}


def banners() -> list[tuple[int, str]]:
    """(line, name) of each section banner: a '# NAME' line under a '# ====' line."""
    return [(number, line[2:].strip()) for number, line in enumerate(LINES, 1)
            if re.fullmatch(r"# [A-Z][A-Z ,/&-]+", line) and LINES[number - 2].startswith("# ====")]


def section_at(line: int) -> str | None:
    found = None
    for start, name in banners():
        if start <= line:
            found = name
    return found


def defined_names(node) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def local_names(node) -> set[str]:
    """Names a definition binds itself (arguments, assignments, inner defs)."""
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        return set()
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            found.add(sub.id)
        elif isinstance(sub, ast.arg):
            found.add(sub.arg)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            found.add(sub.name)
    return found


def test_the_sections_are_the_ones_the_map_lists_in_order():
    doc = ast.get_docstring(TREE)
    listed = []
    for line in doc.split("Sections, in order", 1)[1].splitlines():
        match = re.match(r"    ([A-Z][A-Z ,/&-]*[A-Z])(?=\s|$)", line)
        if match:
            listed += [name.strip() for name in match.group(1).split(",")]
    assert listed == [name for _line, name in banners()]


def test_each_section_uses_only_the_sections_above_it():
    order = {name: index for index, (_line, name) in enumerate(banners())}
    home = {}
    for node in TREE.body:
        for name in defined_names(node):
            home.setdefault(name, section_at(node.lineno))
    wrong = []
    for node in TREE.body:
        section = section_at(node.lineno)
        if section in (None, "CLI"):
            continue
        own = local_names(node)
        for sub in ast.walk(node):
            if not (isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)):
                continue
            there = home.get(sub.id)
            if sub.id in own or there in (None, section):
                continue
            whole_step = SUBCOMMAND_SECTIONS.get(there) == sub.id and section in SUBCOMMAND_SECTIONS
            later = order[there] > order[section]
            other_step = there in SUBCOMMAND_SECTIONS and section in SUBCOMMAND_SECTIONS
            if (later or other_step) and not (whole_step and not later):
                wrong.append(f"{section}: {defined_names(node)[0]} uses {sub.id} ({there})")
    assert not sorted(set(wrong)), "\n".join(sorted(set(wrong)))


def test_every_default_and_table_lives_in_constants():
    outside = [f"{name} ({section_at(node.lineno)})" for node in TREE.body
               for name in defined_names(node)
               if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and section_at(node.lineno) != "CONSTANTS"]
    assert not outside, outside


def test_the_public_names_exist_and_are_few():
    assert all(hasattr(sort_faces, name) for name in sort_faces.__all__)
    assert len(sort_faces.__all__) == len(set(sort_faces.__all__))
