"""Certificates for a trial deployment: a CA, a server certificate it signs (SANs for the server's
addresses) and one ECDSA P-384 key pair per node in OpenSSH format, which is what
`flower-supernode --auth-supernode-private-key` and `flwr supernode register` read. Made with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from photon.errors import UserError



def make_certs(out_dir: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), nodes: int = 2,
               force: bool = False, days: int = 365) -> list[Path]:
    """Write ca.crt, ca.key, server.pem, server.key and node-<i>.key(.pub) for i < nodes; returns the paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir = Path(out_dir)
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [f"node-{i}.key{ext}" for i in range(nodes) for ext in ("", ".pub")]
    paths = [out_dir / n for n in names]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite "
                        "(nodes holding the old keys and CA will then be refused)")
    if not hosts:
        raise UserError("no --host for the server certificate: name the address nodes use to reach the server")
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
        path = out_dir / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)  # private keys: owner only
    return paths
