"""A side channel for large payloads: the model down and the updates up move as checksummed blobs over one TLS
socket each, while the Flower message carries only a reference (checksum, size, a short-lived capability).

Why: Flower 1.41 moves a message as 5 MB chunks over HTTP, each hashed, framed and stored by the SuperLink;
on loopback that reached a few percent of what a plain socket copies (docs/RESULTS.md, `photon bench wire`).
This channel streams the bytes once, with the kernel's `sendfile` (down) and `splice` (up, socket to file) when
TLS is off, checksummed on the fly with XXH3-128 (`xxhash`, ≈8 GB/s on one core here; SHA-256 ran at ≈0.7 GB/s
and bounded the transfer).

Trust: the blob server runs beside the SuperLink (`photon server`) and serves one folder. Every request names a
capability the ServerApp minted with a secret only the server machine holds (HMAC-SHA256 over the operation,
its subject and an expiry). A GET serves exactly the model blob the token names. A PUT token names a size limit
and an upload slot: a random id minted for one task, so an upload can only land in its own task's slot (never
another node's, never a model blob), once. The checksum guards against corruption, not forgery (the capability
does that), which is why a fast non-cryptographic one is enough. Each side hashes in a thread beside the one
moving the bytes. A node checks a download against the digest its task named. An upload's checksum travels in
the node's reply, and the ServerApp checks it when it reads the upload: the blob server only stores the bytes
(hashing them there too would be a second pass over every upload on the server, to no gain). Tokens travel
inside the Flower message, so only a node that received the task can use them. The ServerApp reads and writes
the folder directly (same machine), and accepts a reply's upload only from the slot it granted that task,
checking its size and checksum.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import socket
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from photon.federation.codec import Payload

log = logging.getLogger(__name__)
BLOB = "blob"                 # layout key of a payload that travels as a blob
CHUNK = 4 << 20
MAX_LINE = 4096
IDLE_S = 60.0  # seconds a blob connection may stay silent before its handshake and request are in
TOKEN_TTL_S = 3 * 3600.0
SPARES = 2                    # consumed upload files kept to receive the next uploads into (see `_take_spare`)
PIPE_BYTES = 1 << 20          # the pipe an upload is spliced through (Linux's default pipe-max-size)


class BlobError(RuntimeError):
    """A transfer that failed or was refused (the reason says why)."""


HEX32 = re.compile(r"[0-9a-f]{32}")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def checksum(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """XXH3-128 of the bytes, as 32 hex digits."""
    return xxhash.xxh3_128(memoryview(data).cast("B")).hexdigest()


def _valid_digest(digest: Any) -> bool:
    return isinstance(digest, str) and HEX32.fullmatch(digest) is not None


def put_subject(limit: int, slot: str) -> str:
    return f"{limit}|{slot}"


# ---------------------------------------------------------------------------------------------------------
# Capabilities


def mint(secret: bytes, op: str, subject: str, ttl_s: float = TOKEN_TTL_S) -> str:
    """A token allowing `op` ("get" of a checksum, or "put" of `put_subject`) until now + ttl."""
    expires = int(time.time() + ttl_s)
    mac = hmac.new(secret, f"{op}|{subject}|{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def check(secret: bytes, token: str, op: str, subject: str) -> None:
    try:
        expires_text, mac = str(token).split(".", 1)
        expires = int(expires_text)
    except ValueError:
        raise BlobError("malformed token") from None
    want = hmac.new(secret, f"{op}|{subject}|{expires}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        raise BlobError("token does not allow this request")
    if time.time() > expires:
        raise BlobError("token expired")


# ---------------------------------------------------------------------------------------------------------
# The server (beside the SuperLink)


class _Handler(socketserver.StreamRequestHandler):
    def setup(self) -> None:
        """The TLS handshake, here in the connection's own thread (in the accept loop, one client that
        connects and stays silent would stall every transfer), within `IDLE_S`."""
        self.handshake_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(IDLE_S)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.handshake_failed = True
        super().setup()

    def handle(self) -> None:
        if self.handshake_failed:
            return
        server: BlobServer = self.server  # type: ignore[assignment]
        try:
            self.connection.settimeout(IDLE_S)  # the request line; the transfer itself blocks (it splices)
            line = self.rfile.readline(MAX_LINE)
            self.connection.settimeout(None)
            req = json.loads(line)
            if not isinstance(req, dict):
                raise BlobError("bad request")
            if req.get("op") == "get":
                self._get(server, req)
            elif req.get("op") == "put":
                self._put(server, req)
            else:
                raise BlobError("unknown operation")
        except (BlobError, ValueError, OSError) as e:
            self._answer({"ok": False, "error": str(e)[:200]})

    def _answer(self, obj: dict) -> None:
        try:
            self.wfile.write((json.dumps(obj) + "\n").encode())
            self.wfile.flush()
        except OSError:
            pass

    def _get(self, server: BlobServer, req: dict) -> None:
        digest = req.get("digest")
        if not _valid_digest(digest):
            raise BlobError("bad digest")
        check(server.secret, req.get("token", ""), "get", digest)
        path = server.root / "down" / digest
        if not path.is_file():
            raise BlobError("no such blob")
        size = path.stat().st_size
        self._answer({"ok": True, "size": size})
        with open(path, "rb") as f:
            if isinstance(self.connection, ssl.SSLSocket):
                while chunk := f.read(CHUNK):
                    self.connection.sendall(chunk)
            else:
                self.connection.sendfile(f)

    def _put(self, server: BlobServer, req: dict) -> None:
        size, limit, slot, name = req.get("size"), req.get("limit"), req.get("slot"), req.get("name")
        if not isinstance(size, int) or not isinstance(limit, int) or \
                not _valid_digest(slot) or not isinstance(name, str) or NAME.fullmatch(name) is None:
            raise BlobError("bad put request")
        check(server.secret, req.get("token", ""), "put", put_subject(limit, slot))
        if not 0 <= size <= limit:
            raise BlobError(f"size {size} exceeds the token's limit {limit}")
        final = server.root / "up" / f"{slot}.{name}"
        if final.exists():
            raise BlobError("this slot already holds an upload")
        tmp = server.root / "up" / f".{slot}.{name}.{threading.get_ident()}.part"
        got = 0
        try:
            with open(tmp, "r+b" if _take_spare(server.root / "up", tmp) else "wb+") as f:
                f.truncate(size)
                if size:
                    self._receive_into(f.fileno(), size)
            try:  # exclusive: the first complete upload of a slot stays
                os.link(tmp, final)
            except FileExistsError:
                raise BlobError("this slot already holds an upload") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._answer({"ok": True})

    def _receive_into(self, fd: int, size: int) -> None:
        """The request's next `size` bytes written into file `fd` from offset 0: first what the request line's
        reader already buffered, then, on a plain socket, moved from the socket to the file's pages inside the
        kernel (`os.splice` through a pipe), else (TLS, or no splice here) through one reused buffer. Whole
        pages written this way are never read back from disk, as a memory-mapped file's are when its pages
        have left the page cache: an upload into an evicted file ran at disk speed that way."""
        got = len(head := self.rfile.read1(min(size, CHUNK)))  # read1: the buffered bytes, else one read
        if not head:
            raise BlobError("upload ended early")
        _pwrite_all(fd, memoryview(head), 0)
        if got < size and not isinstance(self.connection, ssl.SSLSocket):
            got = _splice_into(self.connection.fileno(), fd, got, size)
        buf = memoryview(bytearray(min(CHUNK, size - got)))
        while got < size:
            n = self.connection.recv_into(buf, min(len(buf), size - got))
            if not n:
                raise BlobError("upload ended early")
            _pwrite_all(fd, buf[:n], got)
            got += n


def _splice_into(sock: int, fd: int, got: int, size: int) -> int:
    """Move bytes `got`..`size` from socket `sock` to file `fd` at the same offsets with `os.splice` (Linux),
    through a pipe; returns how far it got: `got` unchanged where splice is not available for these two."""
    if not hasattr(os, "splice"):
        return got
    import fcntl  # Linux, as splice

    start = got
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError, AttributeError):  # a bigger pipe: fewer calls (≤ pipe-max-size)
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        while got < size:
            try:
                n = os.splice(sock, w, min(PIPE_BYTES, size - got))
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) and got == start:
                    return got  # this socket or file system cannot splice: the caller copies instead
                raise
            if not n:
                raise BlobError("upload ended early")
            end = got + n
            while got < end:
                if not (moved := os.splice(r, fd, end - got, offset_dst=got)):
                    raise BlobError("the upload file took no bytes")
                got += moved
        return got
    finally:
        os.close(r)
        os.close(w)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _spare_dir(up: Path) -> Path:
    """Where consumed upload files wait to be received into again (beside the uploads, never a slot name)."""
    return up / ".spare"


def _take_spare(up: Path, tmp: Path) -> bool:
    """Move a consumed upload file (`Channel.load` keeps a few) to `tmp`, to receive into: its pages are still
    in the page cache, and overwriting them was faster here than filling new ones (the kernel allocates each
    new page, and on a VM the host faults it in). False if none is left."""
    spare = _spare_dir(up)
    for f in sorted(spare.glob("*")) if spare.is_dir() else []:
        try:
            os.rename(f, tmp)  # atomic: of two uploads racing for one spare, one gets it
            return True
        except OSError:
            continue
    return False


class _SideChecksum:
    """XXH3-128 of the spans of `view` named by `add`, in order, computed in a thread beside the one moving the
    bytes (xxhash releases the GIL), so a span is hashed while the next one is sent or received."""

    def __init__(self, view: memoryview):
        self._h, self._spans = xxhash.xxh3_128(), queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(view,), daemon=True)
        self._thread.start()

    def _run(self, view: memoryview) -> None:
        while (span := self._spans.get()) is not None:
            self._h.update(view[span[0]:span[1]])

    def add(self, start: int, end: int) -> None:
        self._spans.put((start, end))

    def hexdigest(self) -> str:
        """The checksum of the spans added so far; the thread ends (add nothing after it)."""
        self._spans.put(None)
        self._thread.join()
        return self._h.hexdigest()


class BlobServer(socketserver.ThreadingTCPServer):
    """Serves `root/down` (GET) and takes uploads into `root/up` (PUT) on host:port; TLS when given a
    certificate (the SuperLink's). Two folders, so an upload can never replace or name a model blob."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, secret: bytes, host: str, port: int, certfile: Path | None = None,
                 keyfile: Path | None = None):
        self.root, self.secret = Path(root), secret
        for sub in ("down", "up"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.tls = None
        if certfile is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(str(certfile), str(keyfile))
        super().__init__((host, port), _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:  # the handshake runs in the connection's thread (`_Handler.setup`)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


# ---------------------------------------------------------------------------------------------------------
# The client (a node, or a test)


@dataclass(frozen=True)
class Endpoint:
    """Where the blob server listens and how to reach it (`ca` set: TLS, checked against our CA). A node uses
    the host it reaches the SuperLink by, and the port the server's references name."""

    host: str
    port: int
    ca: str | None = None

    def connect(self, timeout: float = 60.0) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.ca is not None:
            ctx = ssl.create_default_context(cafile=self.ca)
            ctx.check_hostname = False  # the server certificate is issued for the SuperLink's names; the CA pins it
            sock = ctx.wrap_socket(sock)
        return sock


def _read_line(sock: socket.socket) -> dict:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk or len(data) > MAX_LINE:
            raise BlobError("the blob server closed the connection")
        data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise BlobError(f"the blob server refused: {reply.get('error')}")
    return reply


def fetch(endpoint: Endpoint, digest: str, token: str, size: int,
          into: memoryview | None = None) -> bytearray | memoryview:
    """The blob `digest` (exactly `size` bytes, checksummed as they arrive), in one buffer: `into` when given
    (memory that is already the process's, e.g. the model's own parameters: nothing to allocate and fault in,
    which on a VM cost more than the copy itself), else a new one."""
    with endpoint.connect() as sock:
        sock.sendall((json.dumps({"op": "get", "digest": digest, "token": token}) + "\n").encode())
        head = _read_line(sock)
        if head.get("size") != size:
            raise BlobError(f"blob {digest[:12]} has {head.get('size')} bytes, expected {size}")
        buf: bytearray | memoryview = bytearray(size) if into is None else into
        view, got = memoryview(buf).cast("B"), 0
        if len(view) != size:
            raise ValueError(f"a {len(view)}-byte buffer cannot take a {size}-byte blob")
        hasher = _SideChecksum(view)
        try:
            while got < size:
                n = sock.recv_into(view[got:], min(CHUNK, size - got))
                if not n:
                    raise BlobError("the blob download ended early")
                hasher.add(got, got + n)  # hashed beside the receive
                got += n
        finally:
            received = hasher.hexdigest()
    if received != digest:
        raise BlobError(f"blob {digest[:12]} does not match its checksum")
    return buf


def put(endpoint: Endpoint, data: memoryview | bytes, token: str, limit: int, slot: str, name: str) -> str:
    """Upload `data` as `name` into the granted `slot`; returns its checksum, computed as it is sent, for the
    reply to name (the ServerApp checks it when it reads the upload)."""
    view = memoryview(data).cast("B")
    with endpoint.connect() as sock:
        sock.sendall((json.dumps({"op": "put", "size": len(view), "limit": limit, "slot": slot, "name": name,
                                  "token": token}) + "\n").encode())
        hasher = _SideChecksum(view)
        try:
            for start in range(0, len(view), CHUNK):
                hasher.add(start, min(len(view), start + CHUNK))  # hashed beside the send
                sock.sendall(view[start:start + CHUNK])
            digest = hasher.hexdigest()
        except OSError as e:  # the server refused mid-upload and closed: its answer says why
            hasher.hexdigest()  # ends the thread
            try:
                _read_line(sock)
            except OSError:
                pass
            raise BlobError(f"the upload was cut off ({e})") from None
        _read_line(sock)
    return digest


# ---------------------------------------------------------------------------------------------------------
# Payloads as blobs


@dataclass
class Channel:
    """The server side: large payloads go out as references to files in `root/down`; references that come back
    name uploads in `root/up`, read back and checked. `threshold`: smaller payloads stay in the message."""

    root: Path
    secret: bytes
    port: int
    threshold: int = 1 << 20

    @classmethod
    def from_env(cls, text: str) -> Channel:
        """The channel `photon server` describes to its ServerApps (`PHOTON_BLOBS`, JSON)."""
        conf = json.loads(text)
        secret = Path(conf["secret_file"]).read_bytes().strip()
        return cls(Path(conf["root"]), secret, int(conf["port"]))

    def offload(self, payload: Payload) -> Payload:
        if payload.nbytes < self.threshold or BLOB in payload.layout:
            return payload
        digest = checksum(payload.data)
        path = self.root / "down" / digest
        if not path.exists():
            tmp = path.with_name(f".{digest}.part")
            with open(tmp, "wb") as f:
                f.write(memoryview(payload.data).cast("B"))
            os.replace(tmp, path)
        ref = {"digest": digest, "size": payload.nbytes, "token": mint(self.secret, "get", digest), "port": self.port}
        return Payload({**payload.layout, BLOB: ref}, np.zeros(0, np.uint8))

    def put_grant(self, limit: int) -> dict[str, Any]:
        """What a node needs to upload the payloads of one reply, each of up to `limit` bytes, into a fresh slot
        (`slot`: what `load` must be told to accept them from)."""
        slot = secrets.token_hex(16)
        return {"token": mint(self.secret, "put", put_subject(limit, slot)), "limit": limit, "port": self.port,
                "slot": slot}

    def load(self, payload: Payload, slot: str | None) -> Payload:
        """A reply's payload whose bytes a node uploaded into `slot` (the one granted to its task): read back
        from the folder and checked."""
        ref = payload.layout.get(BLOB)
        if ref is None:
            return payload
        digest, size, name = ref.get("digest"), ref.get("size"), ref.get("name")
        if not _valid_digest(digest) or not isinstance(size, int) or payload.nbytes or not isinstance(name, str) \
                or NAME.fullmatch(name) is None:
            raise BlobError("malformed blob reference")
        if slot is None or ref.get("slot") != slot:
            raise BlobError("the reference names an upload slot this task was not granted")
        path = self.root / "up" / f"{slot}.{name}"
        if not path.is_file() or path.stat().st_size != size:
            raise BlobError(f"blob {name} was not uploaded (or has another size)")
        data = path.read_bytes()
        self._recycle(path)  # an update is read once
        if checksum(data) != digest:
            raise BlobError(f"blob {name} does not match its checksum")
        layout = {k: v for k, v in payload.layout.items() if k != BLOB}
        return Payload.over(layout, data)

    def _recycle(self, path: Path) -> None:
        """Keep a consumed upload file (up to `SPARES`) for the blob server to receive the next one into."""
        spare = _spare_dir(self.root / "up")
        spare.mkdir(exist_ok=True)
        if sum(1 for _ in spare.iterdir()) < SPARES:
            os.replace(path, spare / secrets.token_hex(8))
        else:
            path.unlink(missing_ok=True)

    def forget(self, keep: set[str]) -> None:
        """Delete model blobs no task will fetch any more, and uploads nobody claimed within a token's life."""
        for f in (self.root / "down").iterdir():
            if f.is_file() and f.name not in keep and not f.name.startswith("."):
                f.unlink(missing_ok=True)
        stale = time.time() - TOKEN_TTL_S
        for f in (self.root / "up").iterdir():
            if f.is_file() and f.stat().st_mtime < stale:
                f.unlink(missing_ok=True)


def materialize(payload: Payload, host: str, ca: str | None, log_as: str = "",
                into: np.ndarray | None = None) -> Payload:
    """A node's view of a payload: fetched from the blob server (at the SuperLink's `host`) when it travels as a
    reference, into `into` (1-D uint8) when that is exactly its size."""
    ref = payload.layout.get(BLOB)
    if ref is None:
        return payload
    start = time.perf_counter()
    size = int(ref["size"])
    target = memoryview(into) if into is not None and into.nbytes == size else None
    data = fetch(Endpoint(host, int(ref["port"]), ca), str(ref["digest"]), str(ref["token"]), size, target)
    log.info("fetched %s blob: %.1f MB in %.2f s%s", log_as, size / 2**20, time.perf_counter() - start,
             " (into the model)" if target is not None else "")
    array = into if target is not None else np.frombuffer(data, np.uint8)
    return Payload({k: v for k, v in payload.layout.items() if k != BLOB}, array)


def upload(payload: Payload, grant: dict[str, Any], host: str, ca: str | None, name: str) -> Payload:
    """A node's reply payload `name` uploaded under a grant; the reference that replaces it in the message."""
    if payload.nbytes > int(grant["limit"]):
        return payload  # larger than the server expects: send it in the message, the server will judge it
    start = time.perf_counter()
    slot = str(grant["slot"])
    digest = put(Endpoint(host, int(grant["port"]), ca), memoryview(payload.data), str(grant["token"]),
                 int(grant["limit"]), slot, name)
    log.info("uploaded reply blob: %.1f MB in %.2f s", payload.nbytes / 2**20, time.perf_counter() - start)
    ref = {"digest": digest, "size": payload.nbytes, "slot": slot, "name": name}
    return Payload({**payload.layout, BLOB: ref}, np.zeros(0, np.uint8))


def serve_command(root: str | Path, host: str, port: int, secret_file: str | Path, cert: str | Path | None = None,
                  key: str | Path | None = None) -> list[str]:
    """The command line that runs a blob server (`serve_main`) in a process of its own: `photon server` beside
    the SuperLink, and a simulation on loopback (`launch.loopback_blobs`)."""
    tls = [str(cert), str(key)] if cert is not None else []
    return [sys.executable, "-m", "photon.transport.blobs", str(root), host, str(port), str(secret_file), *tls]


def serve_main(argv: list[str]) -> None:
    """`python -m photon.transport.blobs ROOT HOST PORT SECRET_FILE [CERT KEY]`: run the blob server (started
    by `photon server` beside the SuperLink; it dies with its parent)."""
    import ctypes
    import signal

    try:  # die with the process that started us (photon server)
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass
    root, host, port, secret_file = argv[:4]
    cert, key = (Path(argv[4]), Path(argv[5])) if len(argv) >= 6 else (None, None)
    server = BlobServer(Path(root), Path(secret_file).read_bytes().strip(), host, int(port), cert, key)
    server.serve_forever()


if __name__ == "__main__":
    serve_main(sys.argv[1:])
