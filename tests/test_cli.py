"""The command line: every subcommand documents its flags and defaults."""

import subprocess
import sys

import pytest

import sort_faces
from conftest import ROOT

COMMANDS = ["embed", "cluster", "refine", "dedup", "extend", "enrich", "export-swap"]


def subparsers():
    parser = sort_faces.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_every_step_of_the_spec_is_a_subcommand():
    _parser, choices = subparsers()
    assert sorted(choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_flag_with_its_default(command):
    result = subprocess.run([sys.executable, str(ROOT / "sort_faces.py"), command, "--help"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
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
    result = subprocess.run([sys.executable, str(ROOT / "sort_faces.py"), *argv],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
