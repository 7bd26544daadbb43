"""The ``cyclelab`` command line and the doctor."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from cyclelab import doctor
from cyclelab.cli import main, parse_value
from cyclelab.loading.fetch import asset_path, is_fetched


def test_doctor_checks() -> None:
    checks = doctor.run_checks()
    names = [c.check for c in checks]
    assert {"python", "torch", "transformers", "device", "tiny model"} <= set(names)
    assert all(isinstance(c.ok, bool) and c.detail for c in checks)
    assert next(c for c in checks if c.check == "python").ok
    assert all("`" in c.detail for c in checks if not c.ok), "every failed check names its fix"


def test_the_report_writes_no_machine_paths() -> None:
    repo, home = Path(doctor.__file__).resolve().parent.parent, Path.home()
    detail = f"{repo / 'data' / 'tiny'} and {home / '.cache' / 'x'}"
    assert doctor.short_paths(detail) == "<repo>/data/tiny and ~/.cache/x"
    assert str(repo) not in doctor.report()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root: another uid's folder")
def test_an_unreadable_shared_cache_is_diagnosed_with_chmod(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache written by an admin under umask 027 (mode 0700, another owner): the doctor, run as
    nobody, names the one admin command that fixes it, not the developer's setup script."""
    import cyclelab.loading.checksums  # noqa: F401  (imported while root: nobody may not read the venv)

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    cache = base / "cyclelab"
    try:
        os.chmod(base, 0o755)
        (cache / "models").mkdir(parents=True)
        (cache / "models" / "weights.bin").write_bytes(b"x")
        os.chown(cache, 4242, 4242)
        os.chmod(cache, 0o700)
        monkeypatch.setenv("CYCLELAB_CACHE", str(cache))
        os.setegid(65534)
        os.seteuid(65534)
        try:
            checks = {c.check: c for c in doctor.run_checks()}
        finally:
            os.seteuid(0)
            os.setegid(0)
    finally:
        shutil.rmtree(base)
    assert not checks["cache"].ok and f"chmod -R a+rX {cache}`" in checks["cache"].detail
    cache_lines = [c for name, c in checks.items() if name == "cache" or "asset" in name or "smollm2" in name]
    assert all("dev.sh" not in c.detail for c in cache_lines), [c.detail for c in cache_lines]


def test_doctor_report_and_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = doctor.report([doctor.Check("a", True, "fine"), doctor.Check("bb", False, "run `x`")])
    assert text.splitlines() == ["a   ok   fine", "bb  FIX  run `x`", "1 problem(s): see FIX lines"]
    status = main(["doctor"])
    out = capsys.readouterr().out
    assert "torch" in out and status in (0, 1)


def test_fetch_is_idempotent_and_quick(capsys: pytest.CaptureFixture[str]) -> None:
    main(["fetch", "shakespeare"])  # fetches if this cache lacks it
    start = time.perf_counter()
    assert main(["fetch", "shakespeare"]) == 0
    assert time.perf_counter() - start < 5
    assert is_fetched("shakespeare")
    assert capsys.readouterr().out.splitlines()[-1] == f"shakespeare: {asset_path('shakespeare')}"


@pytest.mark.parametrize("argv", [["bogus"], [], ["fetch", "nope"], ["doctor", "--extra"]])
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_train_tiny_passes_its_arguments_through(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train-tiny", "--help"])
    assert exc.value.code == 0
    assert "--steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, value",
    [("3", 3), ("0.5", 0.5), ("True", True), ("None", None), ("'x'", "x"), ("smollm2", "smollm2"), ("[1, 2]", [1, 2])],
)
def test_parameter_values(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_doctor_names_a_cache_below_a_file_with_a_fix_that_works(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("CYCLELAB_CACHE", str(tmp_path / "afile" / "cache"))
    checks = {c.check: c for c in doctor.run_checks()}
    want = (
        f"{tmp_path}/afile/cache cannot exist: {tmp_path}/afile is a file, not a folder: move the file away, "
        "or `export CYCLELAB_CACHE=<a folder you can write>`"
    )
    assert not checks["cache"].ok and checks["cache"].detail == want
    assert not checks["smollm2 safetensors"].ok and checks["smollm2 safetensors"].detail.startswith(want)
    assert main(["fetch", "shakespeare"]) == 1
    assert capsys.readouterr().err.startswith(f"cyclelab fetch: {want}.")
