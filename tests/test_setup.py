"""Set-up as a newcomer meets it: sort_faces.py run by a Python without its
packages, and scripts/setup_venv.sh's checks of the interpreter (with a fake
Python in tmp_path: nothing is installed)."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_pasted

pytestmark = pytest.mark.fast  # no model: the quick tier

# sort_faces.py as a script, by this venv's Python with one package made unimportable
WITHOUT = ("import runpy, sys; sys.modules[{module!r}] = None; "
           "sys.argv = ['sort_faces.py', *sys.argv[1:]]; "
           "runpy.run_path('sort_faces.py', run_name='__main__')")


def one_line_error(result) -> str:
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("module", ["numpy", "cv2", "psutil", "scipy"])
def test_a_script_without_a_package_says_how_to_set_up_in_one_line(module):
    result = subprocess.run([sys.executable, "-c", WITHOUT.format(module=module),
                             "cluster", "my cache.npz", "out"],
                            cwd=ROOT, capture_output=True, text=True)
    line = one_line_error(result)
    assert line.startswith("error: ") and f"cannot import {module}" in line
    assert "set up once with `bash scripts/setup_venv.sh`" in line
    assert "then run `.venv/bin/python sort_faces.py cluster 'my cache.npz' out`" in line


def test_a_python_with_no_packages_says_how_to_set_up_and_the_commands_run_as_pasted(tmp_path):
    """A bare venv (no packages at all), run from another folder: the commands it
    prints name the project's files by their full paths, and the run command works."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    result = subprocess.run([str(bare / "bin" / "python"), str(ROOT / "sort_faces.py"), "--help"],
                            cwd=tmp_path, capture_output=True, text=True)
    line = one_line_error(result)
    setup, run = re.findall(r"`([^`]*)`", line)
    assert setup == shlex.join(["bash", str(ROOT / "scripts" / "setup_venv.sh")])  # (it installs)
    code, out, err = run_pasted(run, cwd=tmp_path)
    assert code == 0 and "usage:" in out, err


def test_importing_without_a_package_raises_the_import_error():
    """A library caller gets the exception itself, not an exit."""
    code = ("import sys; sys.modules['numpy'] = None\n"
            "try:\n    import sort_faces\n"
            "except ImportError as error:\n    print(type(error).__name__, error.name)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "ModuleNotFoundError numpy\n", result.stderr
    assert result.stderr == ""


# A Python that only says its version (FAKE_VERSION) and makes a "venv" whose
# python logs what pip would install, so setup_venv.sh runs without installing;
# asked `pip list`, that python lists FAKE_FREEZE (the packages a venv would hold).
FAKE_PYTHON = """#!/bin/sh
case "$1" in
    --version) echo "Python $FAKE_VERSION" ;;
    -m) mkdir -p "$3/bin"
        cat > "$3/bin/python" <<EOF
#!/bin/sh
[ "\\$1" = --version ] && { echo "Python $FAKE_VERSION"; exit 0; }
echo "\\$*" >> "$(cd "$3" && pwd)/pip.log"
[ "\\$3" = list ] && [ -n "\\${FAKE_FREEZE:-}" ] && printf '%s\\\\n' "\\$FAKE_FREEZE"
exit 0
EOF
        chmod +x "$3/bin/python" ;;
esac
"""


def pip_commands(log) -> list[str]:
    """The pip commands a fake venv's python was given, but its `pip list`s."""
    return [line for line in log.read_text().splitlines() if not line.startswith("-m pip list")]


@pytest.fixture
def project(tmp_path):
    """A copy of setup_venv.sh with its requirements files, and the fake Python."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup_venv.sh", project / "scripts")
    (project / "requirements.txt").write_text("numpy\n")
    (project / "requirements-test.txt").write_text("-r requirements.txt\npytest\n")
    (project / "requirements-gpu.txt").write_text("numpy\nonnxruntime-gpu[cuda,cudnn]==1.31.1\n")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return project


def setup_venv(project, *args, version="3.11.9", python=None, freeze=""):
    env = dict(os.environ, FAKE_VERSION=version, FAKE_FREEZE=freeze,
               PYTHON=str(python or project.parent / "fake-python"))
    return subprocess.run(["bash", "scripts/setup_venv.sh", *args], cwd=project,
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("version", ["3.9.2", "3.10.12"])
def test_setup_refuses_a_python_older_than_3_11_in_one_line(project, version):
    line = one_line_error(setup_venv(project, version=version))
    assert f"is Python {version}; face-sets needs Python 3.11" in line
    assert line.endswith("PYTHON=python3.11 bash scripts/setup_venv.sh")
    assert not (project / ".venv").exists()


def test_setup_refuses_a_missing_interpreter_in_one_line(project):
    line = one_line_error(setup_venv(project, python=project / "no-such-python"))
    assert "no Python 3 at PYTHON=" in line and "(not found)" in line


@pytest.mark.parametrize("version, warned", [("3.11.9", False), ("3.12.1", True)])
def test_setup_says_what_it_installs_and_what_changed(project, version, warned):
    first = setup_venv(project, version=version)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    if warned:
        assert lines.pop(0).startswith(f"warning: {project.parent / 'fake-python'} is "
                                       f"Python {version}; face-sets is tested on Python 3.11")
    assert lines == [f"setting up .venv with Python {version} "
                     "(first run only, about 1 GB to download)"]
    log = project / ".venv" / "pip.log"
    assert pip_commands(log)[-1] == "-m pip install --quiet -r requirements.txt"
    # again: nothing to do, nothing said (PYTHON matters only while .venv is missing)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    again = subprocess.run(["bash", "scripts/setup_venv.sh"], cwd=project,
                           capture_output=True, text=True, env=plain)
    assert (again.returncode, again.stderr) == (0, "")
    installs = log.read_text()
    test = setup_venv(project, "requirements-test.txt")
    assert test.stderr.splitlines()[-1] == ("installing requirements-test.txt into .venv "
                                            "(first time; up to 1 GB to download)")
    assert test.stderr.startswith(f"note: .venv exists (Python {version}); PYTHON is used only")
    assert pip_commands(log)[-1] == "-m pip install --quiet -r requirements-test.txt"
    later = os.stat(project / ".venv" / ".installed-requirements-test.txt").st_mtime + 10
    os.utime(project / "requirements.txt", (later, later))
    changed = subprocess.run(["bash", "scripts/setup_venv.sh", "requirements-test.txt"],
                             cwd=project, capture_output=True, text=True, env=plain)
    assert changed.returncode == 0 and changed.stderr == (
        "updating .venv: requirements.txt changed since requirements-test.txt was last installed\n")
    assert log.read_text().count("-r requirements-test.txt") == 2
    assert log.read_text().startswith(installs)


def test_the_gpu_install_has_a_venv_of_its_own_and_never_both_builds(project):
    """--gpu: .venv-gpu with requirements-gpu.txt, .venv untouched; the CPU build a
    dependency brought along is removed and the GPU build reinstalled whole."""
    first = setup_venv(project, "--gpu", freeze="numpy==2.4.6\nonnxruntime==1.32.0\n"
                                                 "onnxruntime-gpu==1.31.1")
    assert first.returncode == 0, first.stderr
    assert not (project / ".venv").exists()
    assert first.stderr.splitlines() == [
        "setting up .venv-gpu with Python 3.11.9 (first run only, about 3 GB with CUDA and cuDNN "
        "to download)",
        ".venv-gpu: removing onnxruntime (a dependency brought it) and reinstalling "
        "onnxruntime-gpu==1.31.1 whole: the two builds never share a venv"]
    assert pip_commands(project / ".venv-gpu" / "pip.log")[-3:] == [
        "-m pip install --quiet -r requirements-gpu.txt",
        "-m pip uninstall --quiet --yes onnxruntime",
        "-m pip install --quiet --no-deps --force-reinstall onnxruntime-gpu==1.31.1"]
    assert (project / ".venv-gpu" / ".installed-requirements-gpu.txt").exists()
    cpu = setup_venv(project, freeze="numpy==2.4.6\nonnxruntime==1.32.0")  # the CPU venv beside it
    assert cpu.returncode == 0 and "removing" not in cpu.stderr, cpu.stderr
    assert pip_commands(project / ".venv" / "pip.log")[-1] == "-m pip install --quiet -r requirements.txt"


@pytest.mark.parametrize("args, words", [
    (["requirements-gpu.txt"], "requirements-gpu.txt is the GPU build: it goes into its own venv, "
                               "bash scripts/setup_venv.sh --gpu"),
    (["--gpu", "requirements.txt"], "--gpu installs a GPU requirements file")])
def test_a_build_in_the_wrong_venv_is_refused_in_one_line(project, args, words):
    line = one_line_error(setup_venv(project, *args))
    assert words in line
    assert not (project / ".venv").exists() and not (project / ".venv-gpu").exists()
