"""The command line: every subcommand documents its flags and defaults."""

import pytest

import sort_faces
from conftest import ROOT, run_cli

pytestmark = pytest.mark.fast  # no model: the quick tier

COMMANDS = ["embed", "cluster", "refine", "dedup", "extend", "enrich", "export-swap", "people",
            "review"]


def subparsers():
    parser = sort_faces.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_every_step_of_the_spec_is_a_subcommand():
    _parser, choices = subparsers()
    assert sorted(choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_flag_with_its_default(command):
    code, out, _err = run_cli(command, "--help")
    assert code == 0
    text = " ".join(out.split())
    _parser, choices = subparsers()
    for action in choices[command]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.option_strings[0] in text
        assert action.help
        if action.default not in (None, False):
            assert f"(default: {action.default})" in text, (command, action.dest)


def test_export_defaults_match_the_spec():
    args = sort_faces.build_parser().parse_args(["export-swap", "c.npz", "m.json", "out"])
    assert {k: getattr(args, k) for k in sort_faces.EXPORT_DEFAULTS} == {
        "top_n": 30, "outlier_threshold": 0.45, "pad_ratio": 0.5, "out_size": 512,
        "min_face_short": 100, "candidate_match_threshold": 0.55, "candidate_min_score": 0.40}
    assert args.candidates is False


@pytest.mark.parametrize("argv, message", [
    (["cluster", "/no/cache.npz", "/tmp/x"], "cache not found"),
    (["export-swap", "/no/cache.npz", "/no/m.json", "/tmp/x"], "not found"),
    (["dedup", "/no/cache.npz", "--hamming", "70"], "between 0 and 64"),
    (["extend", "/no/cache.npz", "/no/out"], "cache not found"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_end_with_one_line_and_exit_2(argv, message):
    code, _out, err = run_cli(*argv)
    assert code == 2 and message in err
    assert "Traceback" not in err


def readme_commands():
    """Every command line in the README's bash blocks (continuations joined)."""
    import re

    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not re.fullmatch(r"[A-Z_]+=\S+", line):
                lines.append(line)
    return lines


def test_readme_commands_run_as_written_after_the_setup():
    import shlex

    commands = readme_commands()
    tools = [c for c in commands if "sort_faces.py" in c]
    assert len(tools) >= 6
    for command in (part.strip() for line in commands for part in line.split("&&")):
        words = shlex.split(command)
        if words[0] == ".venv/bin/ray":  # Ray's own command, from requirements-ray.txt
            assert (ROOT / words[0]).exists() and words[1] in ("start", "stop"), command
            continue
        if "sort_faces.py" in command:
            # the venv's interpreter: a bare `python` has none of the packages
            assert words[:2] == [".venv/bin/python", "sort_faces.py"], command
            argv = [w.replace("$", "x") for w in words[2:]]
            sort_faces.build_parser().parse_args(argv)  # exits 2 on an unknown flag
        else:
            env = [w for w in words if "=" in w and w.split("=")[0].isupper()]
            words = words[len(env):]
            assert words[0] in (".venv/bin/python", "bash", "source"), command
            assert (ROOT / words[1]).exists() or words[1].startswith("/") or \
                words[0] == "source" or words[1:3] == ["-m", "pip"], command


def test_version():
    code, out, _err = run_cli("--version")
    assert code == 0 and out.strip() == f"face-sets {sort_faces.__version__}"
