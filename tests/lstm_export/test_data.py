"""Corpus loading, vocabulary and the TBPTT stream order."""
import pytest
import torch

from lstm_export import UserError
from lstm_export.data import Corpus, StreamBatcher, Vocab, default_corpus, read_text


def test_vocab_round_trip_and_unknown_characters():
    v = Vocab.from_text("hello world")
    assert v.decode(v.encode("low hello")) == "low hello"
    with pytest.raises(UserError, match=r"3 character\(s\) not in the model's vocabulary: 'ayz'"):
        v.encode("lazy")


def test_read_text_rejects_empty_missing_and_non_utf8(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin1"))
    with pytest.raises(UserError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="not UTF-8.*offset 3"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(UserError, match="does not exist"):
        read_text(tmp_path / "nope.txt")


def test_default_corpus_is_python_source_and_deterministic():
    a, b = default_corpus(200_000), default_corpus(200_000)
    assert a == b and len(a) == 200_000
    assert "def " in a and "import " in a


def test_streams_are_contiguous_and_windows_carry_over():
    ids = torch.arange(1000)
    sb = StreamBatcher(ids, batch=4, bptt=10)
    assert sb.streams.shape == (4, 250)
    assert torch.equal(sb.streams[1], torch.arange(250, 500))  # stream b is one contiguous slice
    x0, y0, new0 = sb.window(0)
    x1, y1, new1 = sb.window(1)
    assert new0 and not new1
    assert torch.equal(y0, x0 + 1)  # targets are the next character
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # window k+1 starts where window k ended
    assert sb.window(sb.windows)[2]  # wrapping around starts a new pass


def test_corpus_holds_out_the_tail():
    text = "abcdefghij" * 50
    c = Corpus.from_text(text, 0.1)
    assert len(c.val) == 50 and c.vocab.decode(c.val) == text[-50:]
    with pytest.raises(UserError, match="too short"):
        StreamBatcher(c.train, batch=500, bptt=8)
