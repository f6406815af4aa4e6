"""Certificates and keys for a devft federation on Flower 1.42 (needs only `cryptography`).

    python deploy/pki.py certs --out pki --host superlink.example.org --host 10.0.0.5
        ca.crt, server.pem, server.key: the SuperLink's TLS (give ca.crt to everyone)
    python deploy/pki.py node supernode-0 --out pki
        supernode-0, supernode-0.pub: a SuperNode's auth key, ECDSA P-384 in OpenSSH format
        (Flower refuses ed25519 node keys: "Not an EC public key"); run it on the data
        owner's machine and send only the .pub to the coordinator
    python deploy/pki.py signer app-signer --out pki
        app-signer, app-signer.pub, trusted-entities.yaml: an Ed25519 key for app bundles
        and the `flower-supernode --trusted-entities` file that trusts it

The same files with OpenSSL/OpenSSH are in deploy/README.md. tests/deployment uses this file.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerCerts:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_server_certs(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> ServerCerts:
    """A self-signed CA and a server certificate it signs, valid for every name in `hosts`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devft federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       False)
        .sign(ca_key, hashes.SHA256())
    )
    certs = ServerCerts(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(certs.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return certs


def _write_openssh_pair(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
                        directory: Path, name: str) -> NodeKeys:
    directory.mkdir(parents=True, exist_ok=True)
    keys = NodeKeys(directory / name, directory / f"{name}.pub")
    _write_private(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    keys.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


def make_node_keys(directory: Path, name: str) -> NodeKeys:
    """A SuperNode auth key pair: ECDSA P-384, OpenSSH format (`ssh-keygen -t ecdsa -b 384`)."""
    return _write_openssh_pair(ec.generate_private_key(ec.SECP384R1()), directory, name)


def make_signer(directory: Path, name: str, entity_id: str | None = None) -> Path:
    """An Ed25519 app-signing key pair and `trusted-entities.yaml` ({entity id: public key})
    for `flower-supernode --trusted-entities`; returns the YAML's path."""
    keys = _write_openssh_pair(ed25519.Ed25519PrivateKey.generate(), directory, name)
    trusted = directory / "trusted-entities.yaml"
    public = keys.public_key.read_text().strip()
    trusted.write_text(f'"{entity_id or name}": "{public}"\n')
    return trusted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="CA + SuperLink TLS certificate")
    certs.add_argument("--host", action="append", required=True,
                       help="DNS name or IP that SuperNodes and flwr use (repeat)")
    certs.add_argument("--days", type=int, default=365)
    for name, help_ in (("node", "a SuperNode auth key (ECDSA P-384)"),
                        ("signer", "an Ed25519 app-signing key + trusted-entities.yaml")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("name", help="file name of the private key (.pub is added)")
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=Path("pki"), help="output directory")
    args = parser.parse_args(argv)
    if args.command == "certs":
        made = make_server_certs(args.out, tuple(args.host), args.days)
        print(f"wrote {made.ca_cert}, {made.server_cert}, {made.server_key}")
    elif args.command == "node":
        made_keys = make_node_keys(args.out, args.name)
        print(f"wrote {made_keys.private_key} (keep) and {made_keys.public_key} (register it)")
    else:
        print(f"wrote {args.out / args.name}, {args.out / args.name}.pub and "
              f"{make_signer(args.out, args.name)}")


if __name__ == "__main__":
    main()
