"""cyclelab.load: the three offline models, local paths, hub ids, and every way loading can fail."""

import shutil

import pytest
import torch

from cyclelab import ModelFileError, load
from cyclelab.lab.embedding import sentence_embeddings
from cyclelab.loading.fetch import CACHE_ENV, cache_dir
from cyclelab.loading.loader import REPO_DATA, smollm2_folder


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        load("gpt-17")
    for name in ("tiny", "smollm2", "minilm"):
        assert name in str(err.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_or_non_string_name_is_rejected(bad):
    with pytest.raises(ValueError, match="non-empty"):
        load(bad)


def test_smollm2_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = smollm2.model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_minilm_puts_a_paraphrase_closer_than_an_unrelated_sentence(minilm):
    a, para, other = sentence_embeddings(
        minilm,
        ["The king was murdered in his sleep.", "Someone killed the sleeping king.", "Bananas are rich in potassium."],
    )
    assert torch.dot(a, para) > torch.dot(a, other) + 0.2


def test_minilm_tokenizer_is_wordpiece(minilm):
    pieces = minilm.tokenizer.tokenize("unbelievably")
    assert len(pieces) > 1 and any(p.startswith("##") for p in pieces)


def test_models_are_in_eval_mode_and_cached(tiny):
    assert not tiny.model.training
    assert load("tiny") is tiny


def test_local_folder_loads_like_the_name(tiny, tmp_path):
    folder = tmp_path / "tiny-copy"
    shutil.copytree(REPO_DATA / "tiny", folder)
    copy = load(str(folder))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(copy.model(ids).logits, tiny.model(ids).logits)


def test_smollm2_cache_folder_loads_as_a_path(smollm2):
    copy = load(str(smollm2_folder()), cache=False)
    assert type(copy.model).__name__ == "LlamaForCausalLM"
    assert copy.model.config.num_key_value_heads == 3


def test_hub_id_is_tried_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFileError, match="hub id"):
        load("HuggingFaceTB/no-such-model-xyz", cache=False)


def test_truncated_weights_name_the_file_and_the_repair(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(REPO_DATA / "tiny", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelFileError) as err:
        load(str(folder), cache=False)
    assert "model.safetensors" in str(err.value) and "repair" in str(err.value)


def test_garbage_weights_are_reported_as_corrupt(tmp_path):
    folder = tmp_path / "garbage"
    shutil.copytree(REPO_DATA / "tiny", folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="corrupt"):
        load(str(folder), cache=False)


def test_missing_weights_are_reported(tmp_path):
    folder = tmp_path / "empty"
    shutil.copytree(REPO_DATA / "tiny", folder)
    (folder / "model.safetensors").unlink()
    (folder / "SHA256SUMS").unlink()  # a plain folder: with checksums the message names the listed file
    with pytest.raises(ModelFileError, match="no weights"):
        load(str(folder), cache=False)


def test_weights_load_without_pickle(monkeypatch):
    """Loading must never unpickle: make every pickle entry point fail and load anyway."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used to load weights")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load("tiny", cache=False)
    load("smollm2", cache=False)
    load("minilm", cache=False)
    assert not list(REPO_DATA.glob("**/*.bin")) and not list(REPO_DATA.glob("**/*.pt"))


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path


def test_device_choice_rejects_unknown_devices():
    from cyclelab.loading.device import pick_device

    assert pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("abacus")


def test_load_leaves_transformers_logging_as_the_user_set_it() -> None:
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_info()
    logging.enable_progress_bar()
    try:
        load("tiny", cache=False)
        assert logging.get_verbosity() == logging.INFO and logging.is_progress_bar_enabled()
    finally:
        logging.set_verbosity(level)
        if not bars:
            logging.disable_progress_bar()
