"""The key and certificate chain that sign C2PA manifests.

A deployment configures its own (IMAGEGEN_C2PA_CERT / IMAGEGEN_C2PA_KEY: PEM text or paths
to PEM files). Without them a development CA and a leaf certificate are made in the data
directory on first use, like the development JWT key: the C2PA library refuses a
self-signed leaf, and wants a leaf whose extended key usage names a signing purpose
(emailProtection here). Readers trust the development CA only when told to (it is a user
trust anchor, `dev-c2pa-ca.pem`), so its marks read back as Trusted in our tests and as
merely Valid anywhere else.

No timestamp authority is used: signing stays offline and fast. The signing time is then
not attested by a third party, so a reader checks the leaf's validity period against the
time it reads, not the time it was signed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imagegen.config import ConfigError, ProvenanceSettings
from imagegen.private_files import read_or_create_private

log = logging.getLogger(__name__)

#: Key, leaf and CA in one file (mode 0600), so two processes starting at once can never
#: pair one's key with the other's certificate.
DEV_BUNDLE_FILE = "dev-c2pa-signer.pem"
#: The development CA alone (public): the trust anchor for `imagegen provenance` and
#: other C2PA readers (e.g. `c2patool --trust_anchors`).
DEV_CA_FILE = "dev-c2pa-ca.pem"
DEV_CA_NAME = "imagegen development C2PA CA (not for production)"
DEV_LEAF_NAME = "imagegen development C2PA signer (not for production)"
DEV_ORGANISATION = "imagegen development"
DEV_VALIDITY = timedelta(days=3650)
# Generous backdating: a reader whose clock lags must not find the certificate not yet valid.
_BACKDATE = timedelta(days=1)

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?\r?\n-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class SigningMaterial:
    """A private key and the certificate chain (leaf first) that signs with it."""

    certificate_chain_pem: str
    private_key_pem: str
    #: The C2PA name of the signature algorithm: es256, es384, es512, ps256 or ed25519.
    algorithm: str
    #: Roots that readers of our own marks should trust (the development CA), if any.
    trust_anchors_pem: str | None
    development: bool

    @property
    def leaf(self) -> x509.Certificate:
        """The signing certificate."""
        return x509.load_pem_x509_certificates(self.certificate_chain_pem.encode())[0]


def load_signing_material(settings: ProvenanceSettings, data_dir: Path) -> SigningMaterial:
    """The configured chain and key, or the development ones in `data_dir`; raises
    ConfigError naming the setting to fix."""
    if settings.cert is None or settings.key is None:
        return load_or_create_dev_signing(data_dir)
    chain_pem = _pem_setting(settings.cert, "IMAGEGEN_C2PA_CERT")
    key_pem = _pem_setting(settings.key, "IMAGEGEN_C2PA_KEY")
    return signing_material_from_pem(chain_pem, key_pem)


def signing_material_from_pem(
    chain_pem: str, key_pem: str, *, trust_anchors_pem: str | None = None
) -> SigningMaterial:
    """Check that the key signs for the chain's leaf and pick the algorithm."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError as exc:
        raise ConfigError(f"IMAGEGEN_C2PA_CERT is not a PEM certificate chain: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"IMAGEGEN_C2PA_KEY is not an unencrypted PEM private key: {exc}"
        ) from None
    leaf = chain[0]
    if len(chain) == 1 and leaf.issuer == leaf.subject:
        raise ConfigError(
            "IMAGEGEN_C2PA_CERT is a single self-signed certificate, which C2PA refuses: "
            "use a leaf issued by a CA (chain: leaf first, then intermediates)"
        )
    public_der = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public_der
    ) != leaf.public_key().public_bytes(serialization.Encoding.DER, public_der):
        raise ConfigError(
            "IMAGEGEN_C2PA_KEY is not the key of IMAGEGEN_C2PA_CERT's first certificate"
        )
    return SigningMaterial(
        certificate_chain_pem=chain_pem,
        private_key_pem=key_pem,
        algorithm=_algorithm_for(key),
        trust_anchors_pem=trust_anchors_pem,
        development=False,
    )


def load_or_create_dev_signing(data_dir: Path) -> SigningMaterial:
    """The development CA, leaf and key in `data_dir`: made once, then reused."""
    bundle_path = data_dir / DEV_BUNDLE_FILE
    bundle = read_or_create_private(
        bundle_path, lambda: "".join(make_dev_chain()), what="a development C2PA CA and signer"
    )
    key_pem, leaf_pem, ca_pem = _parse_dev_bundle(bundle_path, bundle)
    _publish_ca(data_dir / DEV_CA_FILE, ca_pem)
    material = signing_material_from_pem(leaf_pem + ca_pem, key_pem, trust_anchors_pem=ca_pem)
    return replace(material, development=True)


def make_dev_chain(now: datetime | None = None) -> tuple[str, str, str]:
    """A fresh (private key PEM, leaf PEM, CA PEM): an EC P-256 CA that signs one leaf
    for C2PA claims. The CA's own key is dropped, so it can never sign another leaf."""
    issued_at = (now or datetime.now(UTC)) - _BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, DEV_CA_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANISATION),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued_at)
        .not_valid_after(issued_at + DEV_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, DEV_LEAF_NAME),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANISATION),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued_at)
        .not_valid_after(issued_at + DEV_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # C2PA accepts a claim signer whose EKU names one of a few purposes;
        # emailProtection is the one every C2PA validator knows.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return (
        key_pem,
        leaf.public_bytes(serialization.Encoding.PEM).decode(),
        ca.public_bytes(serialization.Encoding.PEM).decode(),
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _parse_dev_bundle(path: Path, text: str) -> tuple[str, str, str]:
    blocks = [(match.group(1), match.group(0) + "\n") for match in _PEM_BLOCK.finditer(text)]
    kinds = [kind for kind, _ in blocks]
    if kinds != ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]:
        raise ConfigError(
            f"{path} does not hold a development C2PA key, leaf and CA; delete it (and "
            f"{DEV_CA_FILE}) to make new ones (marks signed with the old ones then "
            "verify only against the old CA)"
        )
    return blocks[0][1], blocks[1][1], blocks[2][1]


def _publish_ca(path: Path, ca_pem: str) -> None:
    if path.exists() and path.read_text() == ca_pem:
        return
    # Every process writes the same text (read from the one bundle), so a replace that
    # races another is harmless; readers never see a partial file.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".dev-c2pa-ca-", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(ca_pem)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _pem_setting(value: str, name: str) -> str:
    if value.lstrip().startswith("-----BEGIN "):
        # Environment variables often carry PEM with literal `\n`s.
        return value.replace("\\n", "\n")
    path = Path(value).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"{name} is neither PEM text nor a readable file ({path}: {exc.strerror})"
        ) from None


def _algorithm_for(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        algorithm = by_curve.get(key.curve.name)
        if algorithm is None:
            raise ConfigError(
                f"IMAGEGEN_C2PA_KEY uses the curve {key.curve.name}; C2PA signs with "
                "P-256, P-384 or P-521"
            )
        return algorithm
    if isinstance(key, rsa.RSAPrivateKey):
        # C2PA allows RSA only with PSS padding.
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ConfigError("IMAGEGEN_C2PA_KEY must be an EC (P-256/384/521), RSA or Ed25519 private key")
