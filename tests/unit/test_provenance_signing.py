"""C2PA signing material: the development CA made once in the data directory, a
deployment's own chain and key, the settings that name them, and `imagegen provenance`."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from imagegen import cli
from imagegen.config import (
    DEFAULT_USAGE_NOTICE,
    MAX_USAGE_NOTICE_CHARS,
    ConfigError,
    ProvenanceSettings,
    Settings,
)
from imagegen.domain.models import ImageFormat
from imagegen.provenance import (
    DEV_CA_FILE,
    Origin,
    ProvenanceFacts,
    ProvenanceMarker,
    load_signing_material,
    open_marker,
    read_marks,
)
from imagegen.provenance.signing import (
    DEV_BUNDLE_FILE,
    load_or_create_dev_signing,
    make_dev_chain,
    signing_material_from_pem,
)

FACTS = ProvenanceFacts(
    origin=Origin.GENERATED,
    provider_id="local",
    model="m",
    created=datetime(2026, 11, 25, tzinfo=UTC),
    usage_notice="notice",
)


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def make_chain(
    leaf_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    *,
    eku: bool = True,
    authority_key_id: bool = True,
) -> tuple[str, str, str]:
    """(key PEM, leaf PEM, CA PEM) like a deployment's own CA would issue them."""
    now = datetime.now(UTC) - timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Org CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "Test Org signer"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Org"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
    )
    if authority_key_id:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    return key_pem(leaf_key), pem(builder.sign(ca_key, hashes.SHA384())), pem(ca)


# The development CA.


def test_the_development_ca_is_made_once_with_private_permissions(tmp_path: Path) -> None:
    first = load_or_create_dev_signing(tmp_path)
    second = load_or_create_dev_signing(tmp_path)

    assert first == second
    assert first.development
    assert first.algorithm == "es256"
    bundle = tmp_path / DEV_BUNDLE_FILE
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    assert (tmp_path / DEV_CA_FILE).read_text() == first.trust_anchors_pem
    # One private key only: the CA's was dropped after it signed the leaf.
    assert bundle.read_text().count("PRIVATE KEY-----") == 2  # BEGIN and END


def test_the_development_leaf_is_ca_issued_for_claim_signing(tmp_path: Path) -> None:
    material = load_or_create_dev_signing(tmp_path)
    leaf, ca = x509.load_pem_x509_certificates(material.certificate_chain_pem.encode())

    assert leaf.issuer == ca.subject != leaf.subject
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in list(usages)
    leaf.verify_directly_issued_by(ca)


def test_a_second_process_reuses_the_development_ca(tmp_path: Path) -> None:
    mine = load_or_create_dev_signing(tmp_path)
    assert mine.trust_anchors_pem is not None

    theirs = _ca_from_processes(tmp_path, count=1)

    assert theirs == [hashlib.sha256(mine.trust_anchors_pem.encode()).hexdigest()]


def test_two_processes_starting_at_once_agree_on_one_ca(tmp_path: Path) -> None:
    fingerprints = _ca_from_processes(tmp_path, count=2)

    assert len(set(fingerprints)) == 1
    material = load_or_create_dev_signing(tmp_path)
    assert material.trust_anchors_pem is not None
    assert fingerprints[0] == hashlib.sha256(material.trust_anchors_pem.encode()).hexdigest()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _ca_from_processes(data_dir: Path, *, count: int) -> list[str]:
    script = (
        "import hashlib, sys\n"
        "from pathlib import Path\n"
        "from imagegen.provenance.signing import load_or_create_dev_signing\n"
        "material = load_or_create_dev_signing(Path(sys.argv[1]))\n"
        "print(hashlib.sha256(material.trust_anchors_pem.encode()).hexdigest())\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    fingerprints = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        fingerprints.append(out.strip())
    return fingerprints


def test_loose_permissions_on_the_development_bundle_are_tightened(tmp_path: Path) -> None:
    load_or_create_dev_signing(tmp_path)
    bundle = tmp_path / DEV_BUNDLE_FILE
    bundle.chmod(0o644)

    load_or_create_dev_signing(tmp_path)

    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600


def test_a_damaged_development_bundle_says_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / DEV_BUNDLE_FILE).write_text("not a bundle\n")
    (tmp_path / DEV_BUNDLE_FILE).chmod(0o600)
    with pytest.raises(ConfigError, match="delete it"):
        load_or_create_dev_signing(tmp_path)


def test_a_deleted_ca_file_is_written_again_from_the_bundle(tmp_path: Path) -> None:
    material = load_or_create_dev_signing(tmp_path)
    (tmp_path / DEV_CA_FILE).unlink()

    assert load_or_create_dev_signing(tmp_path) == material
    assert (tmp_path / DEV_CA_FILE).read_text() == material.trust_anchors_pem


# A deployment's own chain and key.


@pytest.mark.parametrize(
    ("leaf_key", "algorithm"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "es256"),
        (ec.generate_private_key(ec.SECP384R1()), "es384"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "ps256"),
        (ed25519.Ed25519PrivateKey.generate(), "ed25519"),
    ],
    ids=["p256", "p384", "rsa", "ed25519"],
)
def test_a_configured_chain_signs_and_reads_back_trusted_with_its_ca(
    tmp_path: Path,
    leaf_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    algorithm: str,
) -> None:
    key, leaf, ca = make_chain(leaf_key)
    (tmp_path / "chain.pem").write_text(leaf + ca)
    (tmp_path / "key.pem").write_text(key)
    settings = ProvenanceSettings(
        cert=str(tmp_path / "chain.pem"), key=str(tmp_path / "key.pem"), usage_notice="n"
    )

    marker = open_marker(settings, tmp_path / "data")

    assert marker.material.algorithm == algorithm
    assert not marker.material.development
    assert not (tmp_path / "data" / DEV_BUNDLE_FILE).exists()
    marked = marker.mark(png(), ImageFormat.PNG, FACTS)
    report = read_marks(marked, trust_anchors_pem=ca)
    assert report.validation_state == "Trusted", report.failures
    assert report.signer == "Test Org signer / Test Org"


def test_pem_text_in_the_environment_works_with_escaped_newlines(tmp_path: Path) -> None:
    key, leaf, ca = make_chain(ec.generate_private_key(ec.SECP256R1()))
    settings = Settings.from_env(
        {
            "IMAGEGEN_C2PA_CERT": (leaf + ca).replace("\n", "\\n"),
            "IMAGEGEN_C2PA_KEY": key,
        }
    )

    material = load_signing_material(settings.provenance, tmp_path)

    # Settings strip surrounding whitespace; PEM does not need the final newline.
    assert material.certificate_chain_pem.strip() == (leaf + ca).strip()
    assert material.private_key_pem == key.strip()
    marked = ProvenanceMarker(material).mark(png(), ImageFormat.PNG, FACTS)
    assert read_marks(marked, trust_anchors_pem=ca).validation_state == "Trusted"


def test_a_key_that_is_not_the_leafs_is_refused() -> None:
    _, leaf, ca = make_chain(ec.generate_private_key(ec.SECP256R1()))
    other_key = key_pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="not the key of"):
        signing_material_from_pem(leaf + ca, other_key)


def test_a_lone_self_signed_certificate_is_refused() -> None:
    key, _, ca = make_chain(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="self-signed"):
        signing_material_from_pem(ca, key)


@pytest.mark.parametrize(
    "missing", ["eku", "authority_key_id"], ids=["no-eku", "no-authority-key-id"]
)
def test_a_leaf_c2pa_refuses_fails_at_start_up(tmp_path: Path, missing: str) -> None:
    key, leaf, ca = make_chain(ec.generate_private_key(ec.SECP256R1()), **{missing: False})
    settings = ProvenanceSettings(cert=leaf + ca, key=key, usage_notice="n")
    with pytest.raises(ConfigError, match=r"do not sign.*certificate is invalid"):
        open_marker(settings, tmp_path)


def test_an_unusable_curve_is_refused() -> None:
    key, leaf, ca = make_chain(ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(ConfigError, match="curve secp256k1"):
        signing_material_from_pem(leaf + ca, key)


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("/nonexistent/chain.pem", "/nonexistent/key.pem", "IMAGEGEN_C2PA_CERT is neither"),
        (
            "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
            "IMAGEGEN_C2PA_CERT is not a PEM",
        ),
    ],
    ids=["missing-file", "garbage"],
)
def test_unreadable_material_names_the_setting(
    tmp_path: Path, cert: str, key: str, message: str
) -> None:
    settings = ProvenanceSettings(cert=cert, key=key, usage_notice="n")
    with pytest.raises(ConfigError, match=message):
        load_signing_material(settings, tmp_path)


def test_a_key_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    _, leaf, ca = make_chain(ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "key.pem").write_text("not a key")
    settings = ProvenanceSettings(cert=leaf + ca, key=str(tmp_path / "key.pem"), usage_notice="n")
    with pytest.raises(ConfigError, match="IMAGEGEN_C2PA_KEY is not"):
        load_signing_material(settings, tmp_path)


# Settings.


def test_settings_default_to_the_development_ca_and_the_default_notice() -> None:
    settings = Settings.from_env({})
    assert settings.provenance == ProvenanceSettings(
        cert=None, key=None, usage_notice=DEFAULT_USAGE_NOTICE
    )
    assert "AI" in DEFAULT_USAGE_NOTICE


def test_a_deployment_sets_its_own_notice() -> None:
    notice = "Synthetic image. © Example Corp; licensed for internal use only."
    settings = Settings.from_env({"IMAGEGEN_USAGE_NOTICE": notice})
    assert settings.provenance.usage_notice == notice


def test_a_notice_at_the_limit_is_accepted_and_one_longer_refused() -> None:
    at_limit = "n" * MAX_USAGE_NOTICE_CHARS
    assert (
        Settings.from_env({"IMAGEGEN_USAGE_NOTICE": at_limit}).provenance.usage_notice == at_limit
    )
    with pytest.raises(ConfigError, match="IMAGEGEN_USAGE_NOTICE"):
        Settings.from_env({"IMAGEGEN_USAGE_NOTICE": at_limit + "n"})


@pytest.mark.parametrize("only", ["IMAGEGEN_C2PA_CERT", "IMAGEGEN_C2PA_KEY"])
def test_half_a_signing_configuration_is_refused(only: str) -> None:
    with pytest.raises(ConfigError, match="both IMAGEGEN_C2PA_CERT and IMAGEGEN_C2PA_KEY"):
        Settings.from_env({only: "/some/file.pem"})


# `imagegen provenance FILE`.


@pytest.fixture
def marked_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("IMAGEGEN_DATA_DIR", str(data_dir))
    marker = ProvenanceMarker(load_or_create_dev_signing(data_dir))
    path = tmp_path / "image.png"
    path.write_bytes(marker.mark(png(), ImageFormat.PNG, FACTS))
    return path


def test_the_cli_prints_a_trusted_report(
    marked_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["provenance", str(marked_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("C2PA manifest: Trusted (urn:c2pa:")
    assert "trainedAlgorithmicMedia" in out
    assert "xmpRights:UsageTerms: notice" in out


def test_the_cli_prints_json(marked_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["provenance", "--json", str(marked_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["validation_state"] == "Trusted"
    assert report["xmp"]["rights"] == "notice"


def test_the_cli_uses_the_anchors_it_is_given(
    marked_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, other_ca = make_dev_chain()
    (tmp_path / "other-ca.pem").write_text(other_ca)
    assert (
        cli.main(["provenance", "--anchors", str(tmp_path / "other-ca.pem"), str(marked_file)]) == 0
    )
    assert capsys.readouterr().out.startswith("C2PA manifest: Valid")


def test_the_cli_exits_1_for_an_unmarked_image_and_2_for_a_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEGEN_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "plain.png").write_bytes(png())
    assert cli.main(["provenance", str(tmp_path / "plain.png")]) == 1
    assert capsys.readouterr().out.startswith("C2PA manifest: none")
    assert cli.main(["provenance", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
