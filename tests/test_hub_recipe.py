"""The Littlest JupyterHub recipe of docs/workshop.md, its file steps run as written, then checked as a learner.

The test reads the recipe's shell block and runs, with every path moved under a throwaway prefix, the
commands that set up the course folder (``git clone``, from this repository instead of GitHub), the shared
cache's permissions, the student edition, its permissions, the instructor edition's closed folders and the
copy in ``/etc/skel``. The cache is seeded by hard links from this machine's (the recipe's ``fetch`` would
download it); ``pip install -e`` is stood in for by PYTHONPATH on the clone. Then, as ``nobody`` with a home
made from that skel (what a hub does for a new learner), one process reports what it can read and write,
loads ``tiny`` and runs the doctor. What only a real hub shows (the installer, the spawner's environment and
limits, tljh-config) is listed in docs/workshop.md. Root only: a learner's view needs another user.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOME_CACHE = Path.home() / ".cache" / "cyclelab"
NOBODY = 65534
RUN = ("git", "chmod", "cp")  # with `cyclelab edition student`: the recipe's file steps

as_root = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a learner's view needs another user: run as root"),
    pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv is needed to become the learner"),
    pytest.mark.skipif(not (HOME_CACHE / "models").is_dir(), reason=f"no fetched cache in {HOME_CACHE}"),
]

# Runs as the learner, in their home: what they can read and write, tiny loaded, the doctor; one JSON line.
LEARNER = r"""
import json, os, sys
from pathlib import Path

def can(action):
    try:
        action()
        return True
    except PermissionError:
        return False

course, cache = Path(sys.argv[1]), Path(os.environ["CYCLELAB_CACHE"])
mine = Path.home() / "cyclelab"
notebooks = {str(p.relative_to(mine)): [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
             for c in json.loads(p.read_text())["cells"]] for p in sorted(mine.rglob("*.ipynb"))}
some_file = next(p for p in sorted(cache.rglob("*")) if p.is_file())
report = {
    "notebooks": notebooks,
    "instructor_notebooks": can(lambda: os.listdir(course / "notebooks")),
    "instructor_git": can(lambda: os.listdir(course / ".git")),
    "cache_read": can(lambda: some_file.read_bytes()[:1]),
    "cache_write": can(lambda: (cache / "learner-was-here").write_text("x")),
    "cache_write_models": can(lambda: (cache / "models" / "learner-was-here").mkdir()),
    "own_copy_write": can(lambda: (mine / "notes.txt").write_text("mine")),
}
from cyclelab import load
from cyclelab.doctor import run_checks
tiny = load("tiny")
report["tiny"] = tiny.tokenizer.decode(tiny.tokenizer("ROMEO:")["input_ids"])
report["doctor"] = [[c.check, c.ok, c.detail] for c in run_checks()]
print(json.dumps(report))
"""


def recipe() -> list[str]:
    """The shell commands of the TLJH block in docs/workshop.md (comments and heredoc bodies left out)."""
    text = (ROOT / "docs" / "workshop.md").read_text()
    section = text.split("## The Littlest JupyterHub", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, heredoc = [], None
    for line in block.splitlines():
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        found = re.search(r"<<'(\w+)'", line)
        heredoc = found.group(1) if found else None
        command = line.split("  #", 1)[0].strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def moved(command: str, prefix: Path, python: str) -> str:
    """A recipe command with its paths under ``prefix``, this repository for GitHub, and this Python for
    the hub's environment (``/opt/tljh/user``); ``sudo`` dropped (this runs as root)."""
    command = command.removeprefix("sudo ").replace("sudo -E ", "")
    command = re.sub(r"https://github\.com/\S+", shlex.quote(str(ROOT)), command)
    command = command.replace("/opt/tljh/user/bin/cyclelab", f"{python} -m cyclelab.cli")
    command = command.replace("/opt/tljh/user/bin/python", python)
    for path in ("/opt/cyclelab-student", "/opt/cyclelab", "/srv/data/cyclelab", "/etc/skel"):
        command = re.sub(re.escape(path) + r"(?=[/\s]|$)", str(prefix) + path, command)
    return command


def _python_for_others(inner: list[str], work: Path) -> list[str]:
    """``inner`` wrapped so that another user reaches this Python: where a folder on its way is closed to
    others (e.g. a /root kept 0700 by a pyenv install), a private mount namespace shows an open folder there
    holding only the one entry needed. A hub's environment (/opt/tljh/user) is open to all: nothing to do."""
    needed = [Path(sys.executable).resolve(), Path(sys.prefix).resolve(), ROOT]
    closed = sorted({d for p in needed for d in p.parents if d != Path("/") and not d.stat().st_mode & 0o001})
    if not closed:
        return inner
    if not shutil.which("unshare"):
        pytest.skip(f"{closed[0]} is closed to other users and unshare is missing")
    steps = []
    for i, folder in enumerate(closed):
        view = work / f"view{i}"
        view.mkdir(mode=0o755)
        os.chmod(view, 0o755)
        for entry in {p.relative_to(folder).parts[0] for p in needed if folder in p.parents}:
            (view / entry).mkdir()
            steps.append(f"mount --bind {shlex.quote(str(folder / entry))} {shlex.quote(str(view / entry))}")
        steps.append(f"mount --rbind {shlex.quote(str(view))} {shlex.quote(str(folder))}")
    script = " && ".join(steps) + ' && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "view", *inner]


def file_steps() -> list[str]:
    """The recipe's commands this test runs: the clone, the chmods, the student edition, the copy to skel."""
    return [c for c in recipe() if c.removeprefix("sudo ").split()[0] in RUN or "cyclelab edition student" in c]


def test_the_file_steps_are_found_and_moved(tmp_path: Path) -> None:
    steps = [moved(c, tmp_path, "/py") for c in file_steps()]
    assert [s.split()[0] for s in steps] == ["git", "chmod", "/py", "chmod", "chmod", "cp"]
    assert steps[0] == f"git clone {shlex.quote(str(ROOT))} {tmp_path}/opt/cyclelab"
    assert steps[2] == f"/py -m cyclelab.cli edition student {tmp_path}/opt/cyclelab-student"
    assert steps[-1] == f"cp -r {tmp_path}/opt/cyclelab-student {tmp_path}/etc/skel/cyclelab"
    outside = [re.sub(re.escape(str(tmp_path)) + r"/\S*", "", s) for s in steps]  # what is not under the prefix
    assert not [s for s in outside if re.search(r"/(opt|srv|etc)/|sudo", s)], outside


@pytest.mark.slow  # about a minute: a clone, the student edition, a learner's process loading tiny
@as_root[0]
@as_root[1]
@as_root[2]
def test_the_tljh_file_steps_as_written_then_as_a_learner() -> None:
    from cyclelab.workshop.edition import annotate, classify, read_notebook

    commands = file_steps()
    work = Path(tempfile.mkdtemp(prefix="cyclelab-hub-"))  # under /tmp, open to the learner
    try:
        os.chmod(work, 0o755)
        prefix = work / "root"
        (prefix / "srv" / "data").mkdir(parents=True)
        (prefix / "etc" / "skel").mkdir(parents=True)
        shutil.copytree(HOME_CACHE, prefix / "srv/data/cyclelab", copy_function=os.link)  # what fetch writes
        for command in commands:
            line = moved(command, prefix, sys.executable)
            env = {**os.environ, "PYTHONPATH": str(prefix / "opt/cyclelab"), "HF_HUB_OFFLINE": "1"}
            done = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
        home = prefix / "home" / "jupyter-learner"  # a new learner: useradd -m copies /etc/skel
        shutil.copytree(prefix / "etc/skel", home, symlinks=True)
        for path in [home, *home.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        learner = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        inner = [*learner, sys.executable, "-c", LEARNER, str(prefix / "opt/cyclelab")]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "CYCLELAB_CACHE": str(prefix / "srv/data/cyclelab"),
            "PYTHONPATH": str(prefix / "opt/cyclelab"),  # pip install -e /opt/cyclelab
            "HF_HUB_OFFLINE": "1",
            "MPLCONFIGDIR": str(home / ".mpl"),
        }
        done = subprocess.run(
            _python_for_others(inner, work), cwd=home, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])

        course = prefix / "opt/cyclelab/notebooks"
        solutions = set()
        for path in [*course.glob("[0-9]*.ipynb"), *course.glob("workshop/*.ipynb")]:
            nb = read_notebook(path)
            annotate(nb)
            solutions |= {c.source for c, kind in zip(nb.cells, classify(nb)) if kind == "solution" and c.source}
        mine = report["notebooks"]
        assert len([n for n in mine if re.match(r"\d\d_", n)]) == len(list(course.glob("[0-9]*.ipynb")))
        assert "workshop/bug_hunt.ipynb" in mine, "the bug hunt is in the learner's copy"
        sources = {s for cells in mine.values() for s in cells}
        assert solutions and not solutions & sources, "no solution cell in the learner's copy"
        assert not any("### BEGIN SOLUTION" in s for s in sources)
        assert report["instructor_notebooks"] is False and report["instructor_git"] is False
        assert report["cache_read"] is True
        assert report["cache_write"] is False and report["cache_write_models"] is False
        assert report["own_copy_write"] is True
        assert report["tiny"] == "ROMEO:"
        failed = [c for c in report["doctor"] if not c[1]]
        assert not failed, failed
        assert next(c for c in report["doctor"] if c[0] == "cache")[2].endswith("(read-only for you)")
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
