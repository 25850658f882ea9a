"""Our own byte-level BPE tokenizer (HF ``tokenizers``): train, save, load, fingerprint.

No pretrained vocabulary can be fetched offline (no model hub is reachable), so every prepared corpus trains
its own.
The end-of-text token is id 0 and separates documents in the shards; nothing here touches shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from photon.config import MIN_VOCAB
from photon.digest import sha256_file
from photon.errors import UserError

EOT = "<|endoftext|>"


def train_tokenizer(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (at most); EOT is id 0."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first special token gets id 0
        # All 256 byte symbols up front, so any input encodes even if the sample lacked some bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    assert tok.token_to_id(EOT) == 0, "EOT must be id 0"
    assert tok.get_vocab_size() <= vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write the standard ``tokenizer.json`` (readable by ``transformers`` too)."""
    tok.save(str(path))


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer not found; run `photon prepare`")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse failure
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid tokenizer.json ({msg}); run `photon prepare` again") from None
    if tok.token_to_id(EOT) != 0:
        raise UserError(f"{path}: {EOT} is not token id 0, so this is not a Photon tokenizer; "
                        "run `photon prepare` again")
    return tok


def tokenizer_sha256(path: Path) -> str:
    return sha256_file(Path(path))


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of each token id's text (int64, indexed by id); 0 for special tokens such as EOT.

    A byte-level BPE token is written in an alphabet of one character per byte, so its length in characters
    is its length in bytes, even for a token that ends inside a multi-byte character (which decoding it alone
    would turn into a replacement character)."""
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, i in tok.get_vocab().items():
        lengths[i] = 0 if token in special else len(token)
    return lengths
