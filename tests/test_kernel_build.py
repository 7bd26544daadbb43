"""The own kernels' private, verified build: every way it can fail falls back to torch with a reason, and
nothing another user could have written is ever loaded."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from cyclelab.kernels import build

CC = os.environ.get("CC", "cc")
needs_cc = pytest.mark.skipif(shutil.which(CC.split()[0]) is None, reason="no C compiler on this machine")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    private = tmp_path / "kernels"
    tmp_path.chmod(0o700)  # pytest's own folders are private; say so, since the check walks up
    return private


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@needs_cc
def test_a_build_lands_in_a_private_folder_and_loads_verified(folder):
    found = build.load_or_build(folder, CC)
    assert found.library is not None, found.reason
    assert found.reason == "built (verified)" and found.path.parent == folder
    info = os.lstat(folder)
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    assert not os.lstat(found.path).st_mode & 0o022
    again = build.load_or_build(folder, CC)
    assert again.reason == "loaded (verified)" and again.path == found.path
    assert sorted(p.suffix for p in folder.iterdir()) == [".current", ".so"]  # no scratch left


def test_the_default_folder_is_the_users_own_never_the_shared_temp_or_model_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("CYCLELAB_KERNELS_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("CYCLELAB_CACHE", str(tmp_path / "shared-models"))
    chosen = build.private_folder()
    assert chosen == Path.home() / ".cache" / "cyclelab-kernels"
    assert Path(tempfile.gettempdir()) not in chosen.parents and tmp_path not in chosen.parents


def test_no_compiler_is_a_reason_not_an_error(folder):
    found = build.load_or_build(folder, "no-such-compiler-here")
    assert found.library is None and found.reason.startswith("no C compiler")


def test_a_compiler_that_fails_is_a_reason_and_leaves_nothing_behind(folder, tmp_path):
    found = build.load_or_build(folder, _script(tmp_path, "echo 'error: broken compiler' >&2; exit 1\n"))
    assert found.library is None and "failed" in found.reason and "broken compiler" in found.reason
    assert list(folder.iterdir()) == []


def test_a_compiler_that_writes_garbage_is_caught_at_load_and_never_published(folder, tmp_path):
    garbage = _script(tmp_path, 'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then echo garbage > "$2"; fi; shift; done\n')
    found = build.load_or_build(folder, garbage)
    assert found.library is None and found.reason.startswith("OSError")
    assert not list(folder.glob("*.current"))


@needs_cc
def test_the_compiler_command_is_split_like_a_shell_does(folder):
    found = build.load_or_build(folder, f"env {CC}")  # as CC="ccache gcc"
    assert found.library is not None, found.reason


def test_a_folder_that_cannot_be_made_is_a_reason(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    found = build.load_or_build(blocker / "kernels", CC)
    assert found.library is None and found.reason.startswith(("NotADirectoryError", "FileExistsError", "no C"))


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_folder_others_can_write_is_refused(folder, mode):
    folder.mkdir(mode=0o700)
    folder.chmod(mode)
    found = build.load_or_build(folder, CC)
    assert found.library is None and found.reason.startswith("unsafe") and "written by other users" in found.reason


def test_a_folder_that_is_a_link_is_refused(folder, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_path / "elsewhere")
    found = build.load_or_build(folder, CC)
    assert found.library is None and "not a plain folder" in found.reason


def test_a_folder_under_a_folder_others_can_write_is_refused(tmp_path):
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)  # world-writable and not sticky: another user could rename ours away
    found = build.load_or_build(open_to_all / "kernels", CC)
    assert found.library is None and found.reason.startswith("unsafe") and "above the kernels' folder" in found.reason


def test_a_sticky_shared_folder_above_is_allowed_because_others_cannot_rename_ours(tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert build.verified_folder(sticky / "kernels", create=True) == sticky / "kernels"


@needs_cc
@needs_root
def test_a_library_planted_by_another_user_is_never_loaded(folder):
    built = build.load_or_build(folder, CC)
    os.chown(built.path, 12345, 12345)  # as if another user had put it there
    found = build.load_or_build(folder, CC)
    assert found.library is None and found.reason.startswith("unsafe") and "uid 12345" in found.reason


@needs_root
def test_a_folder_of_another_user_is_never_used(folder):
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, 12345)
    found = build.load_or_build(folder, CC)
    assert found.library is None and "belongs to uid 12345" in found.reason


@needs_cc
def test_a_truncated_or_changed_library_is_rebuilt_not_loaded(folder):
    built = _build_in_another_process(folder)  # truncating a library this process has mapped would kill it
    data = built.read_bytes()
    built.write_bytes(data[: len(data) // 2])  # a truncated library, mapped and called, dies of SIGBUS
    found = build.load_or_build(folder, CC)
    assert found.library is not None and found.reason == "built (verified)"
    assert found.path.read_bytes() != data[: len(data) // 2]


def _build_in_another_process(folder: Path) -> Path:
    code = "import sys; from cyclelab.kernels import build; print(build.load_or_build(sys.argv[1], sys.argv[2]).path)"
    out = subprocess.run([sys.executable, "-c", code, str(folder), CC], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@needs_cc
@needs_root
def test_a_noexec_folder_is_a_reason(tmp_path):
    mount = tmp_path / "noexec"
    mount.mkdir(mode=0o700)
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "noexec,mode=0700", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("this sandbox cannot mount a tmpfs")
    try:
        probe = mount / "probe"
        probe.write_text("#!/bin/sh\n")
        probe.chmod(0o700)
        try:
            subprocess.run([str(probe)], capture_output=True)
            pytest.skip("this sandbox does not enforce noexec")
        except PermissionError:
            pass
        found = build.load_or_build(mount / "kernels", CC)
        assert found.library is None and found.reason.startswith("OSError")
    finally:
        # lazy: glibc keeps a read-only mapping of the library whose dlopen failed, so a plain umount finds the
        # mount busy and each run would leave one behind; detached now, it is freed when this process ends
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


_C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float}


def test_the_python_signatures_agree_with_the_c_prototypes():
    prototypes = dict(re.findall(r"^void (\w+)\(([^)]*)\)", build.SOURCE, flags=re.MULTILINE))
    assert set(prototypes) == set(build.SIGNATURES)
    for name, arguments in prototypes.items():
        kinds = []
        for argument in (a.strip() for a in arguments.split(",")):
            kinds.append(ctypes.c_void_p if "*" in argument else _C_TYPES[argument.rsplit(" ", 1)[0].strip()])
        assert kinds == build.SIGNATURES[name], name


@pytest.mark.parametrize("choice, expected", [("torch", "CYCLELAB_KERNELS=torch"), ("own", "(verified)")])
def test_the_environment_switch_chooses_and_doctor_says_which(choice, expected, tmp_path):
    env = {**os.environ, "CYCLELAB_KERNELS": choice, "CYCLELAB_KERNELS_DIR": str(tmp_path / "k")}
    tmp_path.chmod(0o700)
    code = "from cyclelab.kernels import status; print(status().line())"
    line = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert expected in line, line


def test_a_failed_build_warns_once_and_the_engine_still_runs(tmp_path):
    env = {**os.environ, "CC": "false", "CYCLELAB_KERNELS_DIR": str(tmp_path / "k"), "PYTHONWARNINGS": "default"}
    tmp_path.chmod(0o700)
    code = (
        "import cyclelab; lm = cyclelab.load('tiny'); "
        "print(len(cyclelab.Engine(lm).generate('ROMEO:', max_new_tokens=3).token_ids))"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout) == 3
    assert run.stderr.count("KernelsWarning") == 1 and "failed" in run.stderr


def test_torch_reports_a_cpu_capability_the_build_understands():
    assert isinstance(torch.backends.cpu.get_cpu_capability(), str)


@needs_cc
@needs_root
def test_a_second_user_who_plants_a_library_in_a_shared_folder_never_gets_it_loaded():
    """The attack of a shared hub: another user pre-creates the kernels' folder (here under a sticky, world-writable
    folder such as /tmp) with a library and a pointer to it; ours refuses the folder and runs on torch."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv to act as another user")
    tmp_path = Path(tempfile.mkdtemp())  # pytest's folder is private: the other user could not reach it
    tmp_path.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    built = _build_in_another_process(tmp_path / "mine")
    planted = shared / "cyclelab-kernels"
    script = (
        f"mkdir -m 700 {planted} && cp {built} {planted}/ && "
        f"cp {built.parent}/*.current {planted}/ && chmod 700 {planted}/*"
    )
    (tmp_path / "mine").chmod(0o755)
    for p in (tmp_path / "mine").iterdir():
        p.chmod(0o755)
    subprocess.run(["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", "sh", "-c", script], check=True)
    assert os.lstat(planted).st_uid == 12345
    try:
        found = build.load_or_build(planted, CC)
        assert found.library is None and found.reason.startswith("unsafe") and "belongs to uid 12345" in found.reason
    finally:
        shutil.rmtree(tmp_path)
