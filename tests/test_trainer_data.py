"""trainer.data: the split cannot leak, tokenizers round-trip, clear errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch

from ept_hw.config import ConfigError
from trainer.data import (
    BPETokenizer,
    CharTokenizer,
    DataConfig,
    embedded_works,
    load_corpus,
    load_tokenizer,
    prepare_data,
    sample_batch,
    unigram_entropy,
)

SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\u00e6sop \u2014 caf\u00e9 \u00fc\n"
) * 40


@pytest.fixture(scope="module")
def embedded_corpus():
    return load_corpus(DataConfig())


def test_every_folio_text_pairs_with_its_modern_text():
    works = embedded_works()
    paired = [stem for stem, paths in works.items() if len(paths) == 2]
    assert len(paired) == 35
    for stem, paths in works.items():
        assert paths[0].name == f"{stem}_gut.txt"
        if len(paths) == 2:
            assert paths[1].name.endswith("_gut_f.txt")
    folio_files = {p.name for paths in works.values() for p in paths[1:]}
    on_disk = {p.name for p in paths[0].parent.glob("*_gut_f.txt")}
    assert folio_files == on_disk  # no folio text left out of the grouping


def test_embedded_split_is_by_work_and_cannot_leak(embedded_corpus):
    c = embedded_corpus
    assert set(c.train_groups).isdisjoint(c.val_groups)
    assert len(c.val_groups) >= 2
    works = embedded_works()
    assert set(c.train_groups) | set(c.val_groups) == set(works)
    share = len(c.val_text) / (len(c.val_text) + len(c.train_text))
    assert 0.08 < share < 0.25
    # No line of a validation play (either spelling) appears in the training text. Measured: with
    # one validation play's folio text moved to the training side, 46 of these ~255 sampled lines
    # are found there; with the split as it is, none.
    lines = [ln for ln in c.val_text.splitlines() if len(ln) > 40][::50]
    assert len(lines) > 100
    leaked = [ln for ln in lines if ln in c.train_text]
    assert len(leaked) <= 3, leaked[:3]  # a stock line may recur across plays; a shared play may not


def test_split_is_deterministic(embedded_corpus):
    again = load_corpus(DataConfig())
    assert again.val_groups == embedded_corpus.val_groups


def test_user_file_split_is_a_contiguous_tail(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE)
    c = load_corpus(DataConfig(source=str(path), val_fraction=0.2))
    assert c.train_text + c.val_text == SAMPLE
    assert abs(len(c.val_text) - 0.2 * len(SAMPLE)) <= 1


def test_char_tokenizer_round_trip_and_reload(tmp_path):
    tok = CharTokenizer.train(SAMPLE)
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert tok.vocab_size == len(set(SAMPLE))
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(SAMPLE) == ids
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("Z\u4e2d")


def test_bpe_tokenizer_round_trip_and_reload(tmp_path):
    tok = BPETokenizer.train(SAMPLE, vocab_size=300)
    assert tok.vocab_size <= 300
    ids = tok.encode(SAMPLE)
    assert len(ids) < 0.7 * len(SAMPLE.encode())  # merges learned: fewer tokens than bytes
    unseen = "Unseen text \u00df\u4e2d\u6587 \U0001f600 with\ttabs\r\n"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.decode(ids) == SAMPLE
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(SAMPLE) == ids


def test_prepare_data_saves_and_reuses_tokenizer(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE)
    tok_path = tmp_path / "run" / "tokenizer.json"
    tok_path.parent.mkdir()
    cfg = DataConfig(source=str(path), tokenizer="bpe", vocab_size=300)
    first = prepare_data(cfg, tok_path)
    assert tok_path.is_file()
    # Change the file: a reloaded tokenizer keeps the old vocabulary instead of retraining.
    path.write_text(SAMPLE.replace("speak", "xylophone"))
    second = prepare_data(cfg, tok_path)
    assert second.vocab_size == first.vocab_size
    assert second.tokenizer.encode("Speak, speak.") == first.tokenizer.encode("Speak, speak.")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        prepare_data(DataConfig(source=str(path), tokenizer="char"), tok_path)


def test_missing_and_empty_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(DataConfig(source=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(DataConfig(source=str(empty)))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\xfa" * 10)
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(DataConfig(source=str(binary)))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        DataConfig(tokenizer="word")


def test_sample_batch_is_shifted_windows_from_the_generator():
    tokens = torch.arange(1000)
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    x, y = sample_batch(tokens, 8, 16, g1)
    x2, y2 = sample_batch(tokens, 8, 16, g2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (8, 16) and torch.equal(y, x + 1)
    assert int(y.max()) <= 999
    with pytest.raises(ValueError, match="too short"):
        sample_batch(torch.arange(10), 2, 16, g1)


def test_unigram_entropy():
    uniform = torch.arange(8).repeat(100)
    assert unigram_entropy(uniform) == pytest.approx(math.log(8), abs=1e-12)
    skewed = torch.tensor([0] * 90 + [1] * 10)
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert unigram_entropy(skewed) == pytest.approx(expected, abs=1e-12)


def test_bigram_loss_is_the_add_alpha_table_on_validation_pairs():
    import math
    from collections import Counter

    from trainer.data import bigram_loss

    train = torch.tensor([0, 1, 0, 1, 0, 2, 2, 1, 0])
    val = torch.tensor([0, 1, 2, 2, 0])
    v, alpha = 4, 0.05
    pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
    firsts = Counter(train[:-1].tolist())
    expected = -sum(math.log((pairs[(a, b)] + alpha) / (firsts[a] + alpha * v))
                    for a, b in zip(val[:-1].tolist(), val[1:].tolist())) / (len(val) - 1)
    assert bigram_loss(train, val, v, alpha) == pytest.approx(expected, rel=1e-12)
    # a stream that follows its table exactly costs almost nothing; the reversed order does not
    cyc = torch.arange(3).repeat(200)
    assert bigram_loss(cyc, cyc, 3) < 0.001
    assert bigram_loss(cyc, cyc.flip(0), 3) > 5.0


def test_fixed_windows_are_non_overlapping_spread_and_deterministic():
    from trainer.data import fixed_windows

    tokens = torch.arange(10_000)
    idx, tgt = fixed_windows(tokens, 16, 1000)
    assert idx.shape == tgt.shape == (63, 16)  # ceil(1000 / 16) windows
    assert torch.equal(tgt[:, :-1], idx[:, 1:]) and torch.equal(tgt[:, -1], idx[:, -1] + 1)
    starts = idx[:, 0]
    assert int(starts[0]) == 0 and int(tgt[-1, -1]) == 9_999  # first and last token of the stream used
    assert bool((starts.diff() >= 17).all())  # windows of 16 + 1 tokens never overlap
    assert float(starts.diff().float().std()) < 1.0  # evenly spread
    again, _ = fixed_windows(tokens, 16, 1000)
    assert torch.equal(again, idx)
    # a stream too short for the request gives every non-overlapping window it has
    short, _ = fixed_windows(torch.arange(100), 16, 1000)
    assert short.shape == (5, 16) and bool((short[:, 0].diff() >= 17).all())
    with pytest.raises(ValueError, match="too short"):
        fixed_windows(torch.arange(10), 16, 100)
