"""The tiny model: its card tells the truth and it writes recognisable Shakespeare (that it beats the
n-gram baselines on unseen plays is tests/test_decoding_chapter.py's)."""

import json
import re

import pytest

from cyclelab.loading import corpus as data
from cyclelab.loading.loader import REPO_DATA
from cyclelab.train.metrics import perplexity_of_model
from cyclelab.train.tiny import encode_plays


@pytest.fixture(scope="module")
def token_ids(tiny):
    return encode_plays(tiny.tokenizer, data.plays("train")), encode_plays(tiny.tokenizer, data.plays("valid"))


@pytest.mark.slow  # the whole validation split through the model: a minute on 2 cores; the weights are checksummed
def test_the_card_reports_the_measured_perplexity(tiny, token_ids):
    metrics = json.loads((REPO_DATA / "tiny" / "metrics.json").read_text())
    ppl = perplexity_of_model(tiny.model, token_ids[1].tolist(), context=tiny.model.config.n_positions)
    assert ppl == pytest.approx(metrics["valid_perplexity"], rel=0.05)
    assert str(metrics["valid_perplexity"]) in (REPO_DATA / "tiny" / "README.md").read_text()


def test_romeo_speaks_in_shakespearean_style(tiny_engine):
    text = tiny_engine.generate("ROMEO:", max_new_tokens=80, do_sample=True, temperature=0.8, seed=0).text
    archaic = re.findall(r"\b(thou|thee|thy|thine|hath|doth|art|lord|sir|shall|love)\b", text, re.I)
    assert len(archaic) >= 2, text
    assert text.startswith("\n"), text  # ROMEO's speech begins on the line after his name
    assert re.search(r"^[A-Z][A-Z ]+:$", text, re.M), text  # and another speaker follows, named in capitals


def test_tokenizer_is_byte_level_bpe_of_a_few_thousand_tokens(tiny):
    assert 1000 <= len(tiny.tokenizer) <= 8192
    text = "Wherefore art thou Romeo? — ça va, 東京 🎭"
    assert tiny.tokenizer.decode(tiny.tokenizer(text)["input_ids"]) == text
