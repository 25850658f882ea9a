
import pytest

from photon.data.corpora import load_user_corpus
from photon.data.tokenizer import (
    EOT,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)
from photon.errors import UserError
from tests.helpers import FIXTURE_CORPUS

FIXTURE = FIXTURE_CORPUS


@pytest.fixture(scope="module")
def docs():
    return [d for docs in load_user_corpus(FIXTURE).values() for d in docs]


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer(docs, 400)


def test_eot_is_id_0_and_vocab_bounded(tok):
    assert tok.token_to_id(EOT) == 0
    assert 257 < tok.get_vocab_size() <= 400
    assert tok.encode(EOT).ids == [0]



def test_training_is_deterministic(docs, tok, tmp_path):
    save_tokenizer(tok, tmp_path / "a.json")
    save_tokenizer(train_tokenizer(docs, 400), tmp_path / "b.json")
    assert tokenizer_sha256(tmp_path / "a.json") == tokenizer_sha256(tmp_path / "b.json")


def test_save_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    again = load_tokenizer(path)
    assert again.encode("Hamlet, Prince of Denmark").ids == tok.encode("Hamlet, Prince of Denmark").ids


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found.*photon prepare"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json") as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)


def test_too_small_vocab():
    with pytest.raises(UserError, match="at least 257"):
        train_tokenizer(["abc"], 100)
