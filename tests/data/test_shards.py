import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from photon.config import DataConfig
from photon.data import shards
from photon.data.shards import TokenStream, eval_batches, open_prepared, prepare
from photon.data.tokenizer import load_tokenizer
from photon.errors import UserError
from tests.helpers import FIXTURE_CORPUS

FIXTURE = FIXTURE_CORPUS
VOCAB = 512


def _cfg(tmp: Path, **kw) -> DataConfig:
    return DataConfig(prep_dir=tmp / "prep", tokenizer_sample_mb=0.1, val_fraction=0.1, **kw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    prepare(_cfg(tmp), VOCAB, source=FIXTURE)
    return open_prepared(tmp / "prep")


def test_prepare_writes_shards_and_manifest(prepared):
    m = prepared.manifest
    assert prepared.domains == ["code_python", "literature", "speech_sotu"]
    assert m["vocab_size"] == VOCAB and m["dtype"] == "uint16" and m["eot_id"] == 0
    assert m["source"].startswith("user:") and m["seed"] == 0
    lit = m["domains"]["literature"]
    assert lit["train"]["documents"] + lit["val"]["documents"] == 6  # a document per .txt file
    assert min(lit["train"]["documents"], lit["val"]["documents"]) >= 1
    assert len(lit["text_sha256"]) == 64
    names = sorted(p.name for p in prepared.path.iterdir())
    assert names == sorted(["manifest.json", "tokenizer.json"] +
                           [f"{d}.{s}.bin" for d in prepared.domains for s in ("train", "val")])


def test_shards_decode_to_documents(prepared):
    tok = load_tokenizer(prepared.tokenizer_path)
    for d in prepared.domains:
        for split in ("train", "val"):
            arr = prepared.tokens(d, split)
            assert isinstance(arr, np.memmap) and not arr.flags.writeable
            assert arr[-1] == 0  # every document ends with EOT
            assert int((arr == 0).sum()) == prepared.manifest["domains"][d][split]["documents"]
    text = tok.decode(prepared.tokens("literature", "val").tolist())
    assert len(text) > 1000


def test_prepare_is_deterministic_and_reuses(prepared, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    prepare(cfg, VOCAB, source=FIXTURE)
    again = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert again == prepared.manifest  # same recipe, same bytes
    monkeypatch.setattr(shards, "_domains", lambda *a: pytest.fail("reuse must not reload the corpus"))
    assert prepare(cfg, VOCAB, source=FIXTURE) == tmp_path / "prep"


def test_a_finished_build_of_files_edited_since_is_rebuilt_not_reused(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURE, corpus)
    cfg = _cfg(tmp_path)
    prepare(cfg, VOCAB, source=corpus)
    before = _files(tmp_path / "prep")
    (corpus / "literature" / "sonnets.txt").write_text("Shall I compare thee to a summer's day?\n" * 50)
    prepare(cfg, VOCAB, source=corpus)
    fresh = tmp_path / "fresh"
    prepare(_cfg(fresh), VOCAB, source=corpus)
    assert _files(tmp_path / "prep") == _files(fresh / "prep") != before


def test_a_folder_prepared_from_other_text_is_never_replaced_without_being_asked(tmp_path):
    """`prepare --data MINE` without --out writes to the preset's folder: the built-in corpus (or other text)
    there stays, and the error says how to proceed."""
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    cfg = _cfg(tmp_path)
    prepare(cfg, VOCAB, source=FIXTURE)
    before = _files(tmp_path / "prep")
    with pytest.raises(UserError, match=rf"holds data prepared from {FIXTURE.resolve()}; preparing {other} there "
                                        r"would replace it .*pass --out NEW_FOLDER for it, or delete"):
        prepare(cfg, VOCAB, source=other)
    assert _files(tmp_path / "prep") == before


def test_unchanged_text_with_files_beside_domain_folders_is_reused(tmp_path, monkeypatch):
    """The folder's own files are a domain named after it, listed first by `user_domains`; the fingerprint
    compares domains by name, so a folder whose name sorts after a sub-folder's is reused, not rebuilt."""
    corpus = tmp_path / "zz"
    (corpus / "aa").mkdir(parents=True)
    shutil.copytree(FIXTURE / "literature", corpus / "aa", dirs_exist_ok=True)
    (corpus / "root.txt").write_text("Of the folder itself.\n\nA second document.\n" * 40)
    cfg = _cfg(tmp_path)
    prepare(cfg, VOCAB, source=corpus)
    monkeypatch.setattr(shards, "_build", lambda *a: pytest.fail("unchanged text must be reused"))
    assert prepare(cfg, VOCAB, source=corpus) == tmp_path / "prep"


def test_changed_recipe_rebuilds_in_place(tmp_path):
    prepare(_cfg(tmp_path), VOCAB, source=FIXTURE)
    prepare(_cfg(tmp_path, seed=1), 300, source=FIXTURE)
    p = open_prepared(tmp_path / "prep")
    assert p.manifest["vocab_size"] == 300 and p.manifest["seed"] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["prep"]  # no temp or old dirs left


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _stop_after(monkeypatch, n_batches: int) -> list[int]:
    """Make the n-th encode_batch call raise, as a Ctrl-C or a crash would; returns the call counter."""
    calls = [0]
    real = shards._encode_batch

    def encode(*a, **kw):
        calls[0] += 1
        if calls[0] == n_batches:
            raise RuntimeError("interrupted")
        return real(*a, **kw)
    monkeypatch.setattr(shards, "_encode_batch", encode)
    return calls


def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    # Small batches and buckets: the stop falls inside a domain, and domains have several shuffle buckets.
    monkeypatch.setattr(shards, "BATCH_BYTES", 4000)
    monkeypatch.setattr(shards, "BUCKET_BYTES", 20000)
    prepare(_cfg(tmp_path / "ref"), VOCAB, source=FIXTURE)
    _stop_after(monkeypatch, 8)  # code_python takes 5 batches, literature 6, speech_sotu 7
    with pytest.raises(RuntimeError):
        prepare(_cfg(tmp_path / "run"), VOCAB, source=FIXTURE)
    partial = tmp_path / "run" / ".prep.partial"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".prep.partial"]  # prep_dir never half-written
    assert list(json.loads((partial / "progress.json").read_text())["done"]) == ["code_python"]

    monkeypatch.setattr(shards, "train_tokenizer", lambda *a: pytest.fail("a resume must not retrain"))
    calls = _stop_after(monkeypatch, 0)
    prepare(_cfg(tmp_path / "run"), VOCAB, source=FIXTURE)
    assert calls[0] == 6 + 7  # literature again from its start, then speech_sotu; code_python kept
    assert _files(tmp_path / "run" / "prep") == _files(tmp_path / "ref" / "prep")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["prep"]


def test_a_stop_before_the_tokenizer_is_saved_restarts_cleanly(prepared, tmp_path, monkeypatch):
    def stop(*a):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(shards, "train_tokenizer", stop)
        with pytest.raises(KeyboardInterrupt):
            prepare(_cfg(tmp_path), VOCAB, source=FIXTURE)
    assert list(tmp_path.iterdir()) == []  # nothing worth resuming: nothing left
    prepare(_cfg(tmp_path), VOCAB, source=FIXTURE)
    assert _files(tmp_path / "prep") == _files(prepared.path)


def test_a_stopped_build_of_another_recipe_or_edited_files_is_restarted(prepared, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURE, corpus)
    cfg = _cfg(tmp_path)
    _stop_after(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        prepare(cfg, VOCAB, source=corpus)
    monkeypatch.undo()
    (corpus / "literature" / "sonnets.txt").write_text("Shall I compare thee to a summer's day?\n")
    prepare(cfg, VOCAB, source=corpus)  # same recipe, but a file changed: must not reuse the old tokenizer
    fresh = tmp_path / "fresh"
    shutil.copytree(corpus, fresh / "corpus")
    prepare(_cfg(fresh), VOCAB, source=corpus)
    assert _files(tmp_path / "prep") == _files(fresh / "prep")
    assert _files(tmp_path / "prep") != _files(prepared.path)


def test_bad_input_found_while_streaming_leaves_nothing(tmp_path):
    d = tmp_path / "c" / "dom"
    d.mkdir(parents=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)) + "{oops\n")
    (tmp_path / "c" / "other").mkdir()
    (tmp_path / "c" / "other" / "b.txt").write_text("one\n\ntwo\n")
    with pytest.raises(UserError, match=r"a\.jsonl: line 51"):
        prepare(_cfg(tmp_path / "out"), VOCAB, source=tmp_path / "c")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_second_prepare_into_the_same_place_is_refused(tmp_path):
    with shards._claim(tmp_path / ".prep.partial"):
        with pytest.raises(UserError, match="another `photon prepare` is building"):
            prepare(_cfg(tmp_path), VOCAB, source=FIXTURE)
    assert (tmp_path / ".prep.partial").exists()  # the other build's folder is left alone


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "precious.txt").write_text("mine")
    with pytest.raises(UserError, match="not a Photon prepared folder"):
        prepare(_cfg(tmp_path), VOCAB, source=FIXTURE)
    assert (tmp_path / "prep" / "precious.txt").exists()


def test_open_prepared_detects_problems(prepared, tmp_path):
    with pytest.raises(UserError, match="photon prepare"):
        open_prepared(tmp_path / "nothing")
    copy = tmp_path / "copy"
    shutil.copytree(prepared.path, copy)
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|eot|>"', 1))
    with pytest.raises(UserError, match="tokenizer does not match the shards"):
        open_prepared(copy)
    shutil.copy(prepared.tokenizer_path, tok)
    open_prepared(copy)
    shard = copy / "literature.train.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="literature.train.bin"):
        open_prepared(copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="manifest is corrupt"):
        open_prepared(copy)


def test_unknown_domain(prepared):
    with pytest.raises(UserError, match="prepared domains"):
        prepared.tokens("klingon", "train")


def test_one_document_domain_is_refused(tmp_path):
    (tmp_path / "c" / "a").mkdir(parents=True)
    (tmp_path / "c" / "a" / "x.txt").write_text("only one")
    with pytest.raises(UserError, match="at least 2"):
        prepare(_cfg(tmp_path), VOCAB, source=tmp_path / "c")


def test_water_fill_is_balanced():
    quota = shards.water_fill({"big": 100_000, "small": 200, "mid": 450}, 1000)
    assert quota == {"small": 200, "mid": 400, "big": 400}  # small gives all it has, the rest share equally
    assert shards.water_fill({"a": 10, "b": 20}, 1000) == {"a": 10, "b": 20}


def _paragraph_corpus(root: Path, n: int) -> list[str]:
    docs = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(5 + i % 40)) for i in range(n)]
    (root / "big").mkdir(parents=True)
    (root / "big" / "all.txt").write_text("\n\n\n".join(docs) + "\n")  # one .txt: documents at blank lines
    (root / "small").mkdir()
    (root / "small" / "two.jsonl").write_text('{"text": "first small document"}\n{"text": "second one"}\n')
    return docs


def test_split_rule_and_shuffled_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_BYTES", 3000)
    monkeypatch.setattr(shards, "BUCKET_BYTES", 10000)  # several buckets per split
    docs = _paragraph_corpus(tmp_path / "c", 2000)
    p = open_prepared(prepare(_cfg(tmp_path), VOCAB, source=tmp_path / "c"))
    big = p.manifest["domains"]["big"]
    u = shards._unit(shards._hash_key(0, "big", "split"), np.arange(len(docs)))
    assert big["val"]["documents"] == int((u < 0.1).sum()) and 150 < big["val"]["documents"] < 250
    assert big["train"]["documents"] + big["val"]["documents"] == len(docs)
    small = p.manifest["domains"]["small"]
    assert small["train"]["documents"] == small["val"]["documents"] == 1  # the fallback: one of each
    tok = load_tokenizer(p.tokenizer_path)
    for split, want in (("train", u >= 0.1), ("val", u < 0.1)):
        arr = np.asarray(p.tokens("big", split))
        ends = np.flatnonzero(arr == 0)
        got = [tok.decode(arr[a + 1:b].tolist()) for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]
        expected = [d for d, w in zip(docs, want) if w]
        assert sorted(got) == sorted(expected)  # every document once, whole
        assert got != expected  # in a shuffled order
    # The split is a function of (seed, domain, index): the same documents split the same way elsewhere.
    assert _files(prepare(_cfg(tmp_path / "again"), VOCAB, source=tmp_path / "c")) == \
        _files(p.path)


def test_survey_samples_the_lowest_hash_training_documents(tmp_path):
    from photon.data.corpora import Domain
    rng = np.random.default_rng(0)
    docs = [str(i % 10) * int(n) for i, n in enumerate(rng.integers(1, 400, size=500))]
    cfg = DataConfig(tokenizer_sample_mb=0.01, val_fraction=0.2)

    class Quiet:
        def advance(self, *a):
            pass
    survey, kept = shards._survey(Domain("d", (), lambda: iter(docs)), cfg, tmp_path / "d.txt", Quiet(), None)
    u = shards._unit(shards._hash_key(0, "d", "split"), np.arange(len(docs)))
    order = [i for i in np.argsort(u, kind="stable") if u[i] >= 0.2]
    sizes = np.cumsum([len(docs[i]) for i in order])
    n = int(np.searchsorted(sizes, 10_000)) + 1  # the fewest lowest-u train documents that reach 10 kB
    assert list(shards._sample(tmp_path, {"d": kept}, {"d": 1e9})) == [docs[i] for i in order[:n]]
    cut = list(shards._sample(tmp_path, {"d": kept}, {"d": 5000}))  # a quota cuts the last document
    assert sum(map(len, cut)) == 5000 and cut[:-1] == [docs[i] for i in order[:len(cut) - 1]]
    assert survey["documents"] == 500 and survey["text_bytes"] == sum(map(len, docs))


def test_large_vocabulary_uses_uint32(tmp_path):
    p = open_prepared(prepare(_cfg(tmp_path), 70_000, source=FIXTURE))
    assert p.manifest["dtype"] == "uint32" and p.tokens("literature", "val").dtype == np.uint32
    tok = load_tokenizer(p.tokenizer_path)
    assert "Hamlet" in tok.decode(np.asarray(p.tokens("literature", "train")).tolist()) or \
        "Hamlet" in tok.decode(np.asarray(p.tokens("literature", "val")).tolist())


def test_format_1_folders_still_open(prepared, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(prepared.path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(m | {"format": 1}))
    assert open_prepared(copy).manifest["format"] == 1
    assert not shards._reusable(shards._old_manifest(copy), m["recipe"], None, None)  # but `photon prepare` rebuilds it
    assert "by another Photon version (data format 1" in shards._why_rebuilt(shards._old_manifest(copy), m["recipe"])
    assert shards._why_rebuilt(m, m["recipe"] | {"seed": -1}) == "it was prepared with another seed"
    (copy / "manifest.json").write_text(json.dumps(m | {"format": 99}))
    with pytest.raises(UserError, match="format 99"):
        open_prepared(copy)


# ---------------------------------------------------------------------------------------------------------
# TokenStream


def _arrays():
    # Distinct values per array so a gathered row can be traced back to its source.
    return [np.arange(0, 1000, dtype=np.uint16), np.arange(5000, 5037, dtype=np.uint16),
            np.arange(9000, 9003, dtype=np.uint16), np.arange(20000, 20500, dtype=np.uint16)]


def test_shapes_and_shift():
    s = TokenStream(_arrays(), seq_len=16, batch_size=4, seed=0)
    assert s.rows == 999 // 16 + 36 // 16 + 0 + 499 // 16
    x, y, c = s.next_batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long and c == 4
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # arange arrays: targets are the next token
    y.view(-1)  # contiguous


def test_deterministic_and_seeded():
    a = TokenStream(_arrays(), 16, 4, seed=1)
    b = TokenStream(_arrays(), 16, 4, seed=1)
    c = TokenStream(_arrays(), 16, 4, seed=2)
    assert torch.equal(a.next_batch(8)[0], b.next_batch(8)[0])
    assert not torch.equal(a.next_batch(8)[0], c.next_batch(8)[0])


def _iterate(stream, cursor, n):
    out = []
    for _ in range(n):
        x, y, cursor = stream.next_batch(cursor)
        out.append((cursor, x, y))
    return out


def test_resume_is_exact():
    full = _iterate(TokenStream(_arrays(), 16, 5, seed=3), 0, 40)  # past several epochs (rows = 65)
    for stop in (1, 13, 14, 27):
        # a restarted process: a new stream (empty permutation cache) from the saved cursor
        resumed = _iterate(TokenStream(_arrays(), 16, 5, seed=3), full[stop - 1][0], 40 - stop)
        for (c, x, y), (c2, x2, y2) in zip(full[stop:], resumed, strict=True):
            assert c == c2 and torch.equal(x, x2) and torch.equal(y, y2)


def test_epoch_visits_every_row_once():
    s = TokenStream(_arrays(), 16, 7, seed=0)
    R = s.rows
    assert s.epoch(R - 1) == 0 and s.epoch(R) == 1
    first = s.rows_at(0, R)
    assert sorted(first.tolist()) == list(range(R))
    second = s.rows_at(R, R)
    assert sorted(second.tolist()) == list(range(R)) and not np.array_equal(first, second)
    # a batch that straddles the epoch boundary takes the tail of epoch 0 and the head of epoch 1
    assert np.array_equal(s.rows_at(R - 3, 7), np.concatenate([first[-3:], second[:4]]))


def test_too_short_spans():
    with pytest.raises(UserError, match=r"seq_len\+1=17.*lower train.seq_len"):
        TokenStream([np.zeros(16, np.uint16), np.zeros(10, np.uint16)], 16, 2, 0)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=5), seq_len=st.integers(1, 40),
       batch=st.integers(1, 9), cursor=st.integers(0, 10_000), seed=st.integers(0, 2**32 - 1))
def test_batches_are_real_consecutive_tokens(lengths, seq_len, batch, cursor, seed):
    arrays = [np.arange(i * 1000, i * 1000 + n, dtype=np.int64) for i, n in enumerate(lengths)]
    if sum(max(0, (n - 1) // seq_len) for n in lengths) < 1:
        with pytest.raises(UserError):
            TokenStream(arrays, seq_len, batch, seed)
        return
    x, y, c = TokenStream(arrays, seq_len, batch, seed).next_batch(cursor)
    assert c == cursor + batch
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    for row in rows:
        src = row[0] // 1000
        assert np.array_equal(row, np.arange(row[0], row[0] + seq_len + 1))  # consecutive
        assert row[-1] < src * 1000 + lengths[src]  # inside its array
        assert (row[0] - src * 1000) % seq_len == 0  # on the row grid


def test_eval_batches():
    arr = np.arange(1000, dtype=np.uint16)
    bs = eval_batches(arr, 16, 4, 3)
    assert len(bs) == 3 and all(x.shape == (4, 16) for x, _ in bs)
    assert bs[0][0][0, 0] == 0 and bs[0][0][1, 0] == 16 and bs[1][0][0, 0] == 64
    assert torch.equal(bs[2][1], bs[2][0] + 1)
    short = eval_batches(arr[:40], 16, 4, 3)  # 2 rows only: one smaller batch
    assert len(short) == 1 and short[0][0].shape == (2, 16)
    assert eval_batches(arr[:16], 16, 4, 3) == []
    assert len(eval_batches(arr[:17], 16, 4, 3)) == 1
    assert len(eval_batches(arr, 16, 4, 100)) == 15  # 62 rows -> 15 full batches
