"""The Shakespeare corpus: speaker tags and the train/valid split."""

import pytest

from cyclelab.loading import corpus as data


def test_speaker_tags_are_normalised():
    raw = "ACT I.\n\nRomeo.\nBut soft!\n\nMar.\n'Tis gone!\n\n1 Citizen.\nClubs!\n"
    out = data.normalize_speakers(raw)
    assert "ROMEO:\nBut soft!" in out
    assert "MAR.:" not in out and "MAR:\n'Tis gone!" in out
    assert "1 CITIZEN:\nClubs!" in out


def test_sentences_ending_in_a_full_stop_are_not_speakers():
    raw = "ROMEO:\nI will.\nGo home.\n\nThe end.\n"
    out = data.normalize_speakers(raw)
    assert "I will.\nGo home." in out  # inside a speech: not after a blank line
    assert "THE END:" not in out  # nothing follows it


def test_whole_plays_are_held_out():
    train, valid = data.plays("train"), data.plays("valid")
    assert set(valid) == set(data.VALID_PLAYS)
    assert not set(train) & set(valid)
    assert "sonnets" not in train and len(train) > 30


def test_bad_split_and_unknown_work():
    with pytest.raises(ValueError, match="split"):
        data.plays("test")
    with pytest.raises(ValueError, match="no work named"):
        data.read_work("cardenio")
