"""sha256 checksums of model files: recorded once, verified cheaply.

A folder's checksums live in its ``SHA256SUMS`` file, in the format of ``sha256sum``
(``<hex>  <name>`` per line), so ``cd data/tiny && sha256sum -c SHA256SUMS`` checks it
by hand too. A file is hashed the first time a process verifies it, and again only
when its size or modification time changes (or always, with ``rehash=True``).

A folder that has a ``SHA256SUMS`` must list every model file in it: a missing, empty or
partial list is an error for the models the course ships (``data/tiny``, ``data/tiny-mlm``,
whose expected sha256 also live in the package, in ``shipped_hashes.json``) and for the
converted SmolLM2 cache, so deleting or emptying the list cannot switch verification off.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from cyclelab.loading.atomic import write_atomic

SUMS = "SHA256SUMS"
# what ``from_pretrained`` reads: corruption in any of these changes the model
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked
SHIPPED = Path(__file__).with_name("shipped_hashes.json")  # model name -> {file: sha256} of data/<name>


class ModelFileError(RuntimeError):
    """A weight or config file is missing or corrupt; the message says how to repair it."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):  # hashlib.file_digest needs Python 3.11
            digest.update(block)
    return digest.hexdigest()


def model_files(folder: Path) -> list[str]:
    """Names of the files in ``folder`` that loading a model reads (weights, config, tokenizer)."""
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and (p.name in MODEL_FILES or p.suffix == ".safetensors")
    )


def read_sums(folder: Path, repair: str) -> dict[str, str] | None:
    """The checksums recorded in ``folder/SHA256SUMS`` by name, or None when it has none."""
    path = folder / SUMS
    if path.is_symlink() and not path.exists():  # dangling, or a loop: damage, not an absent list
        raise ModelFileError(f"{path} is a broken symbolic link. To repair: {repair}.")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a file. To repair: {repair}.")
    if not path.is_file():
        return None
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise ModelFileError(
            f"{path} cannot be read ({err.strerror or err}): fix its permissions (chmod u+r {path}) or: {repair}."
        ) from None
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.match(line)
        if not match:
            raise ModelFileError(f"{path} is corrupt (line {number} is not '<sha256>  <file>'). To repair: {repair}.")
        if match[2].startswith("/") or ".." in match[2].replace("\\", "/").split("/"):  # outside the folder
            raise ModelFileError(
                f"{path} is corrupt (line {number} names {match[2]!r}, not a file of this folder). To repair: {repair}."
            )
        sums[match[2]] = match[1]
    return sums


def shipped_hashes(name: str) -> dict[str, str]:
    """The sha256 of each file of the model the course ships as ``data/<name>`` ({} for other names)."""
    return json.loads(SHIPPED.read_text()).get(name, {})


def write_sums(folder: Path, names: list[str]) -> None:
    """Record the sha256 of ``names`` (relative to ``folder``) in ``folder/SHA256SUMS``, atomically."""
    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in names)
    write_atomic(folder / SUMS, lines)


def _stat(path: Path, repair: str) -> os.stat_result:
    """``path``'s stat; ModelFileError when it is missing, a directory or unreadable."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        dangling = " (a broken symbolic link)" if path.is_symlink() else ""
        raise ModelFileError(f"{path} is missing{dangling}, though {SUMS} lists it. To repair: {repair}.") from None
    except OSError as err:  # a symbolic-link loop, a folder that cannot be searched
        raise ModelFileError(f"{path} cannot be opened ({err.strerror or err}). To repair: {repair}.") from None
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a file. To repair: {repair}.")
    if not os.access(path, os.R_OK):
        raise ModelFileError(
            f"{path} cannot be read (permission denied): fix its permissions (chmod u+r {path}) or: {repair}."
        )
    return stat


def verify(folder: Path, expected: dict[str, str], repair: str, source: str = SUMS, rehash: bool = False) -> None:
    """Raise :class:`ModelFileError` unless each file in ``expected`` exists with that sha256.

    A file already verified in this process with the same size and mtime is not hashed again,
    unless ``rehash``.
    """
    for name, digest in expected.items():
        path = folder / name
        stat = _stat(path, repair)
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if not rehash and _VERIFIED.get(key) == digest:
            continue
        try:
            actual = sha256_file(path)
        except OSError as err:
            raise ModelFileError(f"{path} cannot be read ({err.strerror or err}). To repair: {repair}.") from None
        if actual != digest:
            raise ModelFileError(
                f"{path} is corrupt: its sha256 is {actual[:16]}…, {source} expects "
                f"{digest[:16]}… (a partial write or flipped bytes). To repair: {repair}."
            )
        _VERIFIED[key] = digest


def verify_folder(
    folder: Path, repair: str, required: bool = False, rehash: bool = False, shipped: dict[str, str] | None = None
) -> bool:
    """Verify ``folder`` against its ``SHA256SUMS``; False when it has none and none is ``required``.

    The list must name every model file in the folder (and every file of ``shipped``, the
    package's record of a shipped model): a missing (when ``required``), empty or partial list
    raises :class:`ModelFileError`, as does any file whose sha256 differs.
    """
    path = folder / SUMS
    sums = read_sums(folder, repair)
    if sums is None and not (required or shipped):
        return False
    if not sums:
        raise ModelFileError(
            f"{path} is {'missing' if sums is None else 'empty'}, so the model files in {folder} "
            f"cannot be verified. To repair: {repair}."
        )
    unlisted = sorted((set(model_files(folder)) | set(shipped or {})) - set(sums))
    if unlisted:
        raise ModelFileError(
            f"{path} is incomplete: it does not list {', '.join(unlisted)}, so those files cannot "
            f"be verified. To repair: {repair}."
        )
    verify(folder, sums, repair, source=str(path), rehash=rehash)
    return True
