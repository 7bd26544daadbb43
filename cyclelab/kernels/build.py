"""A private, verified build of the own kernels (``kernels.c``), and the switch that turns them off.

The shared library is compiled into a folder only this user can write (``$CYCLELAB_KERNELS_DIR``, else
``$XDG_CACHE_HOME/cyclelab-kernels``, else ``~/.cache/cyclelab-kernels``; never a shared temporary folder, never
the model cache, which a class may share). Before anything is loaded, :func:`verified_folder` proves the folder
and every folder above it cannot be changed by another user, and :func:`_open_verified` proves the library is a
regular file of this user's, not writable by others, whose bytes have the SHA-256 recorded when it was built.
Its name holds its hash, so two builds never share a name.

Writing the source, compiling, checking and loading sit in one ``try``: whatever fails (no compiler, a compiler
that fails or writes garbage, a read-only, full or ``noexec`` folder, a planted file), the engine runs on torch's
kernels and one warning names the reason. ``CYCLELAB_KERNELS=torch`` turns the own kernels off; ``own`` and
``auto`` (the default) build them (``auto`` then lets :mod:`cyclelab.kernels.choice` keep only those that are
faster on this machine).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

MODES = ("auto", "own", "torch")  #: the values of ``CYCLELAB_KERNELS``
SOURCE_FILE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-shared", "-fPIC"]

_PTR, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # each kernel's C arguments, in the order of kernels.c (a matrix kernel's "threads" is an int)
    "f32_linear": [_PTR] * 4 + [_I64, _PTR, _I64, _I64, _INT],  # x, w[], bias[], n[], total, y[], rows, k, threads
    "f32_conv1d": [_PTR] * 4 + [_I64] * 3 + [_INT],
    "f32_rms_norm": [_PTR] * 3 + [_I64] * 2 + [ctypes.c_float],
    "f32_rope": [_PTR] * 4 + [_I64] * 2,
    "int8_linear": [_PTR] * 5 + [_I64, _PTR, _I64, _I64, _INT],
    "f32_scores": [_PTR] * 3 + [_I64] * 7,
    "f32_softmax": [_PTR] * 2 + [_I64] * 2,
    "f32_mix": [_PTR] * 3 + [_I64] * 7,
}


class KernelsWarning(RuntimeWarning):
    """The own kernels could not be used here; the engine runs on torch's (the same numbers, more slowly)."""


class UnsafeKernels(RuntimeError):
    """A folder or file of the build could be changed by another user, so nothing in it is loaded."""


@dataclass(frozen=True)
class KernelStatus:
    """What :func:`status` found: the loaded library (None: torch's kernels run), its file, and why."""

    library: ctypes.CDLL | None
    path: Path | None
    reason: str

    def line(self) -> str:
        """One line for ``cyclelab doctor``."""
        if self.library is None:
            return f"own C kernels: not used ({self.reason}); the engine runs on torch's kernels"
        return f"own C kernels: {self.reason}: {self.path}"


SOURCE = SOURCE_FILE.read_text()


def mode() -> str:
    """``CYCLELAB_KERNELS``: ``auto`` (default), ``own`` or ``torch``."""
    value = os.environ.get("CYCLELAB_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        warnings.warn(
            f"CYCLELAB_KERNELS={value!r} is not one of {', '.join(MODES)}; using 'auto'", KernelsWarning, stacklevel=3
        )
        return "auto"
    return value


def private_folder() -> Path:
    """Where this user's build lives (see the module's docstring)."""
    chosen = os.environ.get("CYCLELAB_KERNELS_DIR")
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cyclelab-kernels"


def compiled() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot or must not be used (see :func:`status`)."""
    return status().library


@lru_cache(maxsize=1)
def status() -> KernelStatus:
    """Build (once per source version) and load the kernels for this process; warn once if they cannot be used."""
    if mode() == "torch":
        return KernelStatus(None, None, "CYCLELAB_KERNELS=torch")
    found = load_or_build(private_folder(), os.environ.get("CC", "cc"))
    if found.library is None:
        warnings.warn(
            f"cyclelab's own C kernels are not used: {found.reason}. The engine runs on torch's kernels "
            "(the same numbers, more slowly); `cyclelab doctor` shows this again.",
            KernelsWarning,
            stacklevel=2,
        )
    return found


def load_or_build(folder: Path, compiler: str) -> KernelStatus:
    """The kernels from ``folder``, built there first if need be, with the compiler command ``compiler`` (split
    like a shell would: ``"ccache gcc"``). Never raises: a failure is the status's reason."""
    if os.name != "posix" or not hasattr(os, "getuid"):
        return KernelStatus(None, None, "no build on this operating system (the kernels are built on Linux and macOS)")
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return KernelStatus(
            None, None, f"no AVX2 on this CPU (torch reports {torch.backends.cpu.get_cpu_capability()})"
        )
    command = shlex.split(compiler)
    if not command or shutil.which(command[0]) is None:
        return KernelStatus(None, None, f"no C compiler ({compiler!r} is not on the PATH; set CC)")
    try:
        folder = verified_folder(folder, create=True)
        pointer = folder / f"kernels-{source_digest()}.current"
        if pointer.exists():
            loaded = _load_published(folder, pointer)
            if loaded is not None:
                return KernelStatus(loaded[0], loaded[1], "loaded (verified)")
        library, path = _build(folder, command, pointer)
        return KernelStatus(library, path, "built (verified)")
    except UnsafeKernels as error:
        return KernelStatus(None, None, f"unsafe: {error}")
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError) as error:
        return KernelStatus(None, None, f"{type(error).__name__}: {error}")


def source_digest() -> str:
    """Names a build: the source and the flags."""
    return hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]


def verified_folder(folder: Path, *, create: bool = False) -> Path:
    """``folder``, absolute, once it and every folder above it are proven safe: the folder itself is a real
    folder (no link) of this user's that nobody else can write, and each folder above belongs to this user or
    root and is either writable by nobody else or sticky (as ``/tmp`` is: others cannot rename what is ours)."""
    folder = Path(os.path.abspath(folder))
    if create and not os.path.lexists(folder):
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
    uid = os.getuid()
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeKernels(f"{folder} is not a plain folder (a link or a file)")
    _check_owned(folder, info, uid, "folder")
    for above in folder.parents:
        info = os.stat(above)
        if info.st_uid not in (uid, 0):
            raise UnsafeKernels(
                f"{above}, above the kernels' folder, belongs to uid {info.st_uid}, not to you "
                f"(uid {uid}) or root; set CYCLELAB_KERNELS_DIR to a folder of your own"
            )
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise UnsafeKernels(
                f"{above}, above the kernels' folder, can be written by other users "
                f"(mode {stat.filemode(info.st_mode)}); set CYCLELAB_KERNELS_DIR to a private folder"
            )
    return folder


def _check_owned(path: Path, info: os.stat_result, uid: int, what: str) -> None:
    if info.st_uid != uid:
        raise UnsafeKernels(f"the {what} {path} belongs to uid {info.st_uid}, not to you (uid {uid})")
    if info.st_mode & 0o022:
        raise UnsafeKernels(f"the {what} {path} can be written by other users (mode {stat.filemode(info.st_mode)})")


def open_private_file(path: Path) -> int:
    """An open descriptor of ``path`` once it is proven a regular file (not a link) of this user's that others
    cannot write; :class:`UnsafeKernels` otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeKernels(f"{path} is not a regular file")
        _check_owned(path, info, os.getuid(), "file")
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in a verified private folder: a scratch file beside it, then a rename, so a reader
    sees the old file or the whole new one."""
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _open_verified(path: Path, sha256: str) -> int:
    """:func:`open_private_file` of ``path`` once its bytes are proven to have the SHA-256 ``sha256``."""
    fd = open_private_file(path)
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"{path} is not the library that was built (its SHA-256 differs)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _dlopen(path: Path, sha256: str) -> ctypes.CDLL:
    """Load the verified file. Its folder is proven private, so only this user could swap it between the check and
    the load; the name holds the bytes' hash, so the loader's memo of loaded names cannot hand back another file."""
    fd = _open_verified(path, sha256)
    try:
        library = ctypes.CDLL(str(path))
        checked, loaded = os.fstat(fd), os.stat(path)
        if (checked.st_dev, checked.st_ino) != (loaded.st_dev, loaded.st_ino):
            raise UnsafeKernels(f"{path} changed while it was being loaded")
    finally:
        os.close(fd)
    for name, arguments in SIGNATURES.items():
        kernel = getattr(library, name)  # AttributeError: a library without this kernel
        kernel.argtypes, kernel.restype = arguments, None
    return library


def _load_published(folder: Path, pointer: Path) -> tuple[ctypes.CDLL, Path] | None:
    """The library the pointer file names, or None (and the pointer removed) if it is damaged or gone."""
    fd = open_private_file(pointer)
    try:
        name, sha256 = os.read(fd, 4096).decode("ascii").split()
    except (UnicodeDecodeError, ValueError):
        name, sha256 = "", ""
    finally:
        os.close(fd)
    path = folder / name
    if name != Path(name).name or not name.endswith(".so"):
        pointer.unlink(missing_ok=True)
        return None
    try:
        return _dlopen(path, sha256), path
    except (OSError, ValueError):
        pointer.unlink(missing_ok=True)  # damaged or truncated (a truncated library would crash on use): rebuild
        return None


def _build(folder: Path, command: list[str], pointer: Path) -> tuple[ctypes.CDLL, Path]:
    """Compile in a private scratch folder, load and check the result, then publish it under a name of its own
    bytes (two processes building at once each publish a complete library)."""
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    try:
        source, output = scratch / "kernels.c", scratch / "kernels.so"
        source.write_text(SOURCE)
        error = ""
        for openmp in (["-fopenmp"], []):  # Apple clang has no -fopenmp: one thread, the same sums
            run = subprocess.run(
                [*command, *FLAGS, *openmp, str(source), "-lm", "-o", str(output)],
                capture_output=True,
                text=True,
                timeout=180,
            )
            if run.returncode == 0 and output.exists():
                break
            error = ((run.stderr or run.stdout or f"exit {run.returncode}").strip().splitlines() or [""])[-1]
        else:
            raise ValueError(f"the C compiler {' '.join(command)!r} failed: {error}")
        sha256 = hashlib.sha256(output.read_bytes()).hexdigest()
        final = folder / f"kernels-{source_digest()}-{sha256[:16]}.so"
        os.chmod(output, 0o700)
        os.replace(output, final)
        library = _dlopen(final, sha256)  # garbage from a broken compiler fails here, before it is published
        write_private(pointer, f"{final.name} {sha256}\n")
        return library, final
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
