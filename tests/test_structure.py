"""The file's map is true: its sections are the ones its docstring lists, in
order; each uses only the sections above it (a subcommand may run an earlier
subcommand whole); every default and table lives in CONSTANTS."""

import ast
import functools
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
                       "EXPORT-SWAP": "export_swap", "PEOPLE": "people",
                       "REVIEW APP": "review"}


@functools.cache  # section_at asks for them once a top-level definition
def banners() -> tuple[tuple[int, str], ...]:
    """(line, name) of each section banner: a '# NAME' line under a '# ====' line."""
    return tuple((number, line[2:].strip()) for number, line in enumerate(LINES, 1)
                 if re.fullmatch(r"# [A-Z][A-Z ,/&-]+", line)
                 and LINES[number - 2].startswith("# ===="))


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


# The private names a test reaches into, each the one seam for what it checks (the
# line that uses it says so too). Any other private name is a smell: go through a
# public function, or add it here with its reason.
PRIVATE_SEAMS = {
    "_hamming_mih_plan": "test_phash checks the plans hamming_pairs may pick",
    "_hamming_unique_pairs_mih": "test_phash runs the pair search under each such plan",
    "_npz_arrays": "test_crash_safety lands a writer's fold between two chunk reads",
    "_DOWNLOADS": "test_embed empties the process's memo of tried model downloads",
    "_HEIF_STATE": "test_embed makes pillow-heif absent without uninstalling it",
}


def sort_faces_names(path) -> list[tuple[str, int]]:
    """(name, line) of each sort_faces attribute the file uses: `sort_faces.NAME` (or
    through an alias: `import sort_faces as X`, `X = sort_faces`), `from sort_faces
    import NAME`, and NAME given as a string beside the module (monkeypatch.setattr)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"sort_faces"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "sort_faces"}
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) \
                and node.value.id == "sort_faces":
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "sort_faces":
            used += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases:
            used.append((node.attr, node.lineno))
        elif isinstance(node, ast.Call) and len(node.args) >= 2 \
                and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            used.append((node.args[1].value, node.lineno))
    return used


def test_the_tests_use_only_public_names():
    """Tests and benchmarks use what __all__ lists. Constants (ALL_CAPS, every one in
    CONSTANTS) are public as a group: tests read and patch some forty of them, and
    listing each in __all__ would say nothing more than their names do."""
    public = set(sort_faces.__all__)
    wrong, seams = [], set()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for name, line in sort_faces_names(path):
            where = f"{path.relative_to(ROOT)}:{line} uses sort_faces.{name}"
            if name in PRIVATE_SEAMS:
                seams.add(name)
            elif re.fullmatch(r"[A-Z][A-Z0-9_]*|__\w+__", name):
                if not hasattr(sort_faces, name):
                    wrong.append(where + ", which does not exist")
            elif name not in public:
                wrong.append(where + ", which __all__ does not list")
    assert not wrong, "\n".join(wrong)
    assert seams == set(PRIVATE_SEAMS), set(PRIVATE_SEAMS) - seams  # none kept once unused
