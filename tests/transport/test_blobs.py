"""The blob side channel: capabilities, transfers over TLS and plain sockets, and refusals (a bad token, a
corrupted or oversized upload, an upload that names a model blob)."""

import threading

import numpy as np
import pytest

from photon.federation.codec import Payload
from photon.launch.processes import free_port
from photon.transport import blobs
from photon.transport.blobs import BlobError, BlobServer, Channel, Endpoint

SECRET = b"s" * 32


@pytest.fixture(params=["plain", "tls"])
def server(request, tmp_path):
    cert = key = ca = None
    if request.param == "tls":
        from photon.launch.certs import make_certs

        make_certs(tmp_path / "certs", nodes=0)
        cert, key, ca = tmp_path / "certs/server.pem", tmp_path / "certs/server.key", str(tmp_path / "certs/ca.crt")
    port = free_port()
    srv = BlobServer(tmp_path / "blobs", SECRET, "127.0.0.1", port, cert, key)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, Endpoint("127.0.0.1", port, ca), Channel(tmp_path / "blobs", SECRET, port, threshold=1)
    srv.shutdown()
    srv.server_close()


def test_tokens_bind_operation_subject_and_expiry():
    token = blobs.mint(SECRET, "get", "a" * 64)
    blobs.check(SECRET, token, "get", "a" * 64)
    for op, subject, secret in (("put", "a" * 64, SECRET), ("get", "b" * 64, SECRET), ("get", "a" * 64, b"x" * 32)):
        with pytest.raises(BlobError):
            blobs.check(secret, token, op, subject)
    with pytest.raises(BlobError, match="expired"):
        blobs.check(SECRET, blobs.mint(SECRET, "get", "a" * 64, ttl_s=-1), "get", "a" * 64)


def test_a_model_goes_down_and_an_update_comes_up(server):
    _, endpoint, channel = server
    data = np.random.default_rng(0).integers(0, 255, 3_000_001, dtype=np.uint8)
    ref = channel.offload(Payload({"codec": "fp32", "tensors": []}, data))
    assert ref.nbytes == 0 and blobs.BLOB in ref.layout
    got = blobs.materialize(ref, "127.0.0.1", endpoint.ca)
    assert np.array_equal(got.data, data) and blobs.BLOB not in got.layout
    grant = channel.put_grant(10_000_000)
    up = blobs.upload(Payload({"codec": "int8", "tensors": []}, data[::2].copy()), grant, "127.0.0.1", endpoint.ca,
                      "update")
    back = channel.load(up, grant["slot"])
    assert np.array_equal(back.data, data[::2]) and back.layout == {"codec": "int8", "tensors": []}


def test_refusals(server):
    _, endpoint, channel = server
    data = np.arange(1000, dtype=np.uint8)
    ref = channel.offload(Payload({"codec": "fp32", "tensors": []}, data))
    digest = ref.layout[blobs.BLOB]["digest"]
    with pytest.raises(BlobError, match="does not allow"):
        blobs.fetch(endpoint, digest, blobs.mint(b"y" * 32, "get", digest), 1000)
    slot = "5" * 32
    with pytest.raises(BlobError, match="exceeds"):
        blobs.put(endpoint, bytes(2000), blobs.mint(SECRET, "put", blobs.put_subject(1000, slot)), 1000, slot, "u")
    with pytest.raises(BlobError, match="does not allow"):  # a grant for 1000 bytes cannot be stretched
        blobs.put(endpoint, bytes(2000), blobs.mint(SECRET, "put", blobs.put_subject(1000, slot)), 5000, slot, "u")
    with pytest.raises(BlobError, match="does not allow"):  # nor moved to another slot
        blobs.put(endpoint, bytes(10), blobs.mint(SECRET, "put", blobs.put_subject(1000, slot)), 1000, "6" * 32, "u")
    with pytest.raises(BlobError, match="bad put"):  # a name cannot leave the slot's folder
        blobs.put(endpoint, bytes(10), blobs.mint(SECRET, "put", blobs.put_subject(1000, slot)), 1000, slot, "../x")
    grant, other = channel.put_grant(5000), channel.put_grant(5000)
    up = blobs.upload(Payload({"codec": "fp32", "tensors": []}, data), grant, "127.0.0.1", endpoint.ca, "update")
    assert (channel.root / "up" / f"{grant['slot']}.update").exists()
    with pytest.raises(BlobError, match="already holds"):  # a slot takes one upload per name, the first
        blobs.upload(Payload({"codec": "fp32", "tensors": []}, data[::-1].copy()), grant, "127.0.0.1", endpoint.ca,
                     "update")
    # A reply can only claim an upload from the slot granted to its own task
    with pytest.raises(BlobError, match="not granted"):
        channel.load(up, other["slot"])
    ref = {"digest": "0" * 32, "size": 10, "slot": other["slot"], "name": "update"}
    forged = Payload({"codec": "fp32", "tensors": [], blobs.BLOB: ref}, np.zeros(0, np.uint8))
    with pytest.raises(BlobError, match="not uploaded"):
        channel.load(forged, other["slot"])
    (channel.root / "up" / f"{grant['slot']}.update").write_bytes(bytes(1000))  # damaged after the upload
    with pytest.raises(BlobError, match="checksum"):
        channel.load(up, grant["slot"])


def test_a_download_lands_in_the_given_buffer_and_uploads_reuse_consumed_files(server):
    _, endpoint, channel = server
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, 40_000, dtype=np.uint8)
    ref = channel.offload(Payload({"codec": "fp32", "tensors": []}, data))
    into = np.zeros(40_000, np.uint8)
    got = blobs.materialize(ref, "127.0.0.1", endpoint.ca, into=into)
    assert got.data is into and np.array_equal(into, data)  # the bytes are in the caller's memory
    other = blobs.materialize(ref, "127.0.0.1", endpoint.ca, into=np.zeros(10, np.uint8))  # does not fit: anew
    assert np.array_equal(other.data, data)
    spare = channel.root / "up" / ".spare"
    for size in (30_000, 50_000, 7, 30_000, 20_000):  # each upload lands in a consumed one's file when there is one
        body = rng.integers(0, 255, size, dtype=np.uint8)
        grant = channel.put_grant(100_000)
        up = blobs.upload(Payload({"codec": "fp32", "tensors": []}, body), grant, "127.0.0.1", endpoint.ca, "u")
        assert np.array_equal(np.frombuffer(channel.load(up, grant["slot"]).data, np.uint8), body)
        assert 1 <= len(list(spare.iterdir())) <= blobs.SPARES
    assert not [f for f in (channel.root / "up").iterdir() if f.is_file()]  # nothing half-written or left over


@pytest.mark.parametrize("splice", ["kernel", "refused", "absent"])
def test_an_upload_lands_whole_however_the_server_moves_it(server, monkeypatch, splice):
    """On a plain socket the blob server splices an upload into its file inside the kernel; where the socket or
    file system refuses (EINVAL), or the platform has no splice, it copies through a buffer: the same bytes
    (several pipe loads and buffers' worth, and not a multiple of either)."""
    import errno
    import os

    calls = []
    if splice == "kernel":
        real = os.splice
        monkeypatch.setattr(os, "splice", lambda *a, **k: calls.append(1) or real(*a, **k))
    elif splice == "refused":
        monkeypatch.setattr(os, "splice", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EINVAL, "no")))
    elif splice == "absent":
        monkeypatch.delattr(os, "splice", raising=False)
    _, endpoint, channel = server
    body = np.random.default_rng(2).integers(0, 255, 3 * blobs.CHUNK + 12_345, dtype=np.uint8)
    grant = channel.put_grant(body.size)
    up = blobs.upload(Payload({"codec": "fp32", "tensors": []}, body), grant, "127.0.0.1", endpoint.ca, "u")
    assert np.array_equal(np.frombuffer(channel.load(up, grant["slot"]).data, np.uint8), body)
    assert bool(calls) == (splice == "kernel" and endpoint.ca is None)  # TLS bytes are decrypted in Python


def test_an_upload_cut_off_midway_leaves_nothing(server):
    import json

    srv, endpoint, channel = server
    grant = channel.put_grant(10_000_000)
    with endpoint.connect() as sock:
        sock.sendall((json.dumps({"op": "put", "size": 10_000_000, "limit": 10_000_000, "slot": grant["slot"],
                                  "name": "u", "token": grant["token"]}) + "\n").encode() + bytes(3_000_000))
    body = np.arange(10_000_000, dtype=np.uint8)  # the slot is still free: the cut-off upload stored nothing
    up = blobs.upload(Payload({"codec": "fp32", "tensors": []}, body), grant, "127.0.0.1", endpoint.ca, "u")
    assert np.array_equal(np.frombuffer(channel.load(up, grant["slot"]).data, np.uint8), body)
    for _ in range(100):  # and its half-written file is gone once the server has seen the socket close
        if not list((channel.root / "up").glob(".*.part")):
            break
        threading.Event().wait(0.05)
    assert not [f for f in (channel.root / "up").iterdir() if f.is_file()]


def test_a_silent_connection_does_not_stall_other_transfers(server):
    """A client that connects and sends nothing (a port scanner, a connection dropped halfway) waits in its
    own thread: the TLS handshake is not done in the accept loop, so other nodes' transfers go on."""
    import socket

    _, endpoint, channel = server
    silent = socket.create_connection(("127.0.0.1", endpoint.port))
    try:
        data = np.arange(1000, dtype=np.uint8)
        ref = channel.offload(Payload({"codec": "fp32", "tensors": []}, data))
        done = []
        worker = threading.Thread(target=lambda: done.append(blobs.materialize(ref, "127.0.0.1", endpoint.ca)))
        worker.start()
        worker.join(10)
        assert done and np.array_equal(done[0].data, data)
    finally:
        silent.close()
