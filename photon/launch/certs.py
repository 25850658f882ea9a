"""Certificates for a trial deployment: a CA, a server certificate it signs (SANs for the server's
addresses), one ECDSA P-384 key pair per node in OpenSSH format, which is what
`flower-supernode --auth-supernode-private-key` and `flwr supernode register` read, and the operator token,
the credential that admits `photon submit` and node registration on the SuperLink's Control API (ca.crt only
lets a machine check it talks to the right server). Made with `cryptography` and `secrets`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from pathlib import Path

from photon.errors import UserError

OPERATOR_TOKEN = "operator.token"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, from the first byte (no window at the umask's mode)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_token(path: Path) -> Path:
    """A new operator token (256 random bits, hex) at `path`, mode 600."""
    write_private(path, secrets.token_hex(32).encode() + b"\n")
    return Path(path)


def read_token(path: Path) -> str:
    """The operator token in `path`; a missing or empty file is a UserError saying where tokens come from."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read the operator token {path} ({e.strerror}); `photon server` writes it (next "
                        f"to ca.crt with --certs, in --state with --insecure): copy it here, or pass --token") from None
    if not token:
        raise UserError(f"the operator token {path} is empty; make a new one with `photon certs --out DIR` "
                        "(or delete it and restart `photon server`)")
    if not re.fullmatch(r"[0-9A-Za-z._~+/=-]+", token):
        raise UserError(f"{path} is not an operator token (one line of letters and digits, as `photon certs` "
                        "writes it to operator.token)")
    return token


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def check_host(host: str) -> None:
    """A name or IP address a certificate can be valid for; a URL, a port or a typo is a one-line error (the
    certificate would never match, and nodes would fail later with CERTIFICATE_VERIFY_FAILED)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise UserError(f"--host {host!r}: not a host name or IP address; give the name or address alone, "
                        "without scheme or port (e.g. server.example.org or 10.0.0.5)")


def make_certs(out_dir: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), nodes: int = 2,
               force: bool = False, days: int = 365) -> list[Path]:
    """Write ca.crt, ca.key, server.pem, server.key, operator.token and node-<i>.key(.pub) for i < nodes;
    returns the paths. Private keys and the token are written with mode 600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir = Path(out_dir)
    names = ["ca.crt", "ca.key", "server.pem", "server.key", OPERATOR_TOKEN]
    names += [f"node-{i}.key{ext}" for i in range(nodes) for ext in ("", ".pub")]
    paths = [out_dir / n for n in names]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite "
                        "(nodes holding the old keys and CA will then be refused)")
    if not hosts:
        raise UserError("no --host for the server certificate: name the address nodes use to reach the server")
    for h in hosts:
        check_host(h)
    out_dir.mkdir(parents=True, exist_ok=True)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "photon CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(sans), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    files = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM), "ca.key": pem_key(ca_key),
             "server.pem": server.public_bytes(serialization.Encoding.PEM), "server.key": pem_key(server_key)}
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"node-{i}.key"] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption())
        files[f"node-{i}.key.pub"] = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                   serialization.PublicFormat.OpenSSH)
    for name, data in files.items():
        if name.endswith(".key"):
            write_private(out_dir / name, data)  # private keys: owner only
        else:
            (out_dir / name).write_bytes(data)
    make_token(out_dir / OPERATOR_TOKEN)
    return paths
