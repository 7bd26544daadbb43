"""sha256 checksums of model files: recorded once, verified cheaply.

A folder's checksums live in its ``SHA256SUMS`` file, in the format of ``sha256sum``
(``<hex>  <name>`` per line), so ``cd data/tiny && sha256sum -c SHA256SUMS`` checks it
by hand too. A file is hashed the first time a process verifies it, and again only
when its size or modification time changes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

SUMS = "SHA256SUMS"
# what ``from_pretrained`` reads: corruption in any of these changes the model
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.txt",
               "vocab.json", "merges.txt", "tokenizer.model")
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked


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
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and (p.name in MODEL_FILES or p.suffix == ".safetensors"))


def read_sums(folder: Path, repair: str) -> dict[str, str] | None:
    """The checksums recorded in ``folder/SHA256SUMS`` by name, or None when it has none."""
    path = folder / SUMS
    if not path.is_file():
        return None
    sums = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        match = _LINE.match(line)
        if not match:
            raise ModelFileError(f"{path} is corrupt (line {number} is not '<sha256>  <file>'). To repair: {repair}.")
        sums[match[2]] = match[1]
    return sums


def write_sums(folder: Path, names: list[str]) -> None:
    """Record the sha256 of ``names`` (relative to ``folder``) in ``folder/SHA256SUMS``, atomically."""
    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in names)
    tmp = folder / (SUMS + ".tmp")
    tmp.write_text(lines)
    os.replace(tmp, folder / SUMS)


def verify(folder: Path, expected: dict[str, str], repair: str, source: str = SUMS) -> None:
    """Raise :class:`ModelFileError` unless each file in ``expected`` exists with that sha256."""
    for name, digest in expected.items():
        path = folder / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ModelFileError(f"{path} is missing. To repair: {repair}.") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if _VERIFIED.get(key) == digest:
            continue
        actual = sha256_file(path)
        if actual != digest:
            raise ModelFileError(f"{path} is corrupt: its sha256 is {actual[:16]}…, {source} expects "
                                 f"{digest[:16]}… (a partial write or flipped bytes). To repair: {repair}.")
        _VERIFIED[key] = digest


def verify_folder(folder: Path, repair: str) -> bool:
    """Verify ``folder`` against its ``SHA256SUMS``; False when it has none to verify against."""
    sums = read_sums(folder, repair)
    if sums is None:
        return False
    verify(folder, sums, repair, source=str(folder / SUMS))
    return True
