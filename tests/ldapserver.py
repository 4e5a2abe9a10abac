"""A real OpenLDAP server (Debian's slapd) for the LDAP tests.

``running_slapd()`` builds a throw-away directory in a temporary folder, loads it
offline with ``slapadd``, starts ``slapd`` in the foreground on free loopback ports
(``ldap://`` with StartTLS, and ``ldaps://``), waits until it answers, and on exit kills
it and removes the folder. slapd is also told to die with the test process
(``PR_SET_PDEATHSIG``), so that not even a killed test run leaves it behind.

The directory (suffix ``dc=example,dc=org``):

- ``ou=people``: alice, bob and carol (``PASSWORDS``), as {SSHA} hashes;
- ``allow bind_anon_dn``: a DN with an empty password binds (anonymously), as on
  the permissive directories ldap_authenticate must not be fooled by;
- ``ou=groups``: groupOfNames ``support`` (alice), ``partners`` (bob), ``nobody-group``
  (carol), and posixGroup ``staff`` (memberUid alice), for the default group filter's
  memberUid branch.

``Slapd.modify()`` changes the directory as its root DN (``ADMIN_DN``), as an operator
would; ``Slapd.stop()`` and ``Slapd.start()`` take it away and bring it back on the same
ports with the same data.

Its TLS certificate is for ``localhost`` only (no IP address), signed by a CA made for
the run (``Slapd.ca_file``): ``ldaps://localhost:PORT`` verifies, ``ldaps://127.0.0.1:PORT``
fails the host name check.
"""

from __future__ import annotations

import base64
import ctypes
import datetime
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.procs import free_port, wait_for

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPSEARCH = "/usr/bin/ldapsearch"
LDAPMODIFY = "/usr/bin/ldapmodify"
BASE = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{BASE}"
ADMIN_PASSWORD = "Admin-Test-Passw0rd"
USER_DN = f"uid={{user}},ou=people,{BASE}"
GROUP_BASE = f"ou=groups,{BASE}"
PASSWORDS = {
    "alice": "Alice-Secret-Passw0rd!",
    "bob": "Bob-Secret-Passw0rd!",
    "carol": "Carol-Secret-Passw0rd!",
}
_GROUPS_OF_NAMES = {"support": "alice", "partners": "bob", "nobody-group": "carol"}
_PR_SET_PDEATHSIG = 1


@dataclass
class Slapd:
    """A running slapd: its URLs, its data and how to stop it."""

    url: str  # ldap://127.0.0.1:PORT (StartTLS offered)
    ldaps_url: str  # ldaps://localhost:PORT
    base: str
    ca_file: str  # the CA that signed the server's certificate
    root: Path
    popen: subprocess.Popen[bytes]
    listen: str  # slapd's -h: both URLs

    @property
    def log(self) -> str:
        return (self.root / "slapd.log").read_text(errors="replace")

    def start(self) -> None:
        """Start it again after ``stop()``: same ports, same data."""
        assert self.popen.poll() is not None, "slapd is running"
        self.popen = _spawn(self.root, self.listen)
        wait_ready(self)

    def modify(self, ldif: str) -> None:
        """Apply LDIF changes as the root DN: entries without a ``changetype`` are added."""
        result = subprocess.run(
            [LDAPMODIFY, "-a", "-x", "-H", self.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD],
            input=ldif.encode(),
            capture_output=True,
            env={**os.environ, "LDAPNOINIT": "1"},
            timeout=10,
        )
        if result.returncode != 0:
            raise AssertionError(f"ldapmodify failed ({result.returncode}):\n{result.stderr!r}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@contextmanager
def running_slapd() -> Iterator[Slapd]:
    """Start a slapd with the test directory; stop it and delete its files on exit."""
    for tool in (SLAPD, SLAPADD, LDAPSEARCH, LDAPMODIFY):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is missing (apt-get install slapd ldap-utils)")
    root = Path(tempfile.mkdtemp(prefix="hatchway-slapd-"))
    server: Slapd | None = None
    try:
        ca_file = write_tls_files(root)
        conf = write_config(root)
        (root / "data.ldif").write_text(directory_ldif())
        run([SLAPADD, "-q", "-f", str(conf), "-l", str(root / "data.ldif")])
        port, tls_port = free_port(), free_port()
        url, ldaps_url = f"ldap://127.0.0.1:{port}", f"ldaps://localhost:{tls_port}"
        listen = f"{url}/ ldaps://127.0.0.1:{tls_port}/"
        server = Slapd(url, ldaps_url, BASE, str(ca_file), root, _spawn(root, listen), listen)
        wait_ready(server)
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    with running_slapd() as server:
        yield server


def _spawn(root: Path, listen: str) -> subprocess.Popen[bytes]:
    assert (root / "slapd.conf").is_file()
    with (root / "slapd.log").open("ab") as log:
        return subprocess.Popen(
            [SLAPD, "-d", "0", "-f", str(root / "slapd.conf"), "-h", listen],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def wait_ready(server: Slapd, timeout: float = 15.0) -> None:
    """Wait until slapd answers a search as the admin (so the data is there too)."""

    def answers() -> bool:
        if server.popen.poll() is not None:
            raise AssertionError(f"slapd exited ({server.popen.returncode}):\n{server.log}")
        search = [LDAPSEARCH, "-x", "-H", server.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD]
        result = subprocess.run(
            [*search, "-b", server.base, "-s", "base", "-o", "nettimeout=2", "1.1"],
            capture_output=True,
            env={**os.environ, "LDAPNOINIT": "1"},  # ignore /etc/ldap/ldap.conf and ~/.ldaprc
            timeout=5,
        )
        return result.returncode == 0

    try:
        wait_for(answers, timeout, "slapd to answer", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nslapd's output:\n{server.log}") from None


def write_config(root: Path) -> Path:
    (root / "data").mkdir()
    conf = root / "slapd.conf"
    conf.write_text(
        f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {root}/ca.pem
TLSCertificateFile {root}/server.pem
TLSCertificateKeyFile {root}/server.key
# Like directories that accept a DN with an empty password as an anonymous bind ("success"),
# the classic way to log in as anyone: ldap_authenticate must refuse it before binding.
allow bind_anon_dn

database mdb
maxsize 10485760
suffix "{BASE}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PASSWORD}
directory {root}/data
"""
    )
    return conf


def directory_ldif() -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {GROUP_BASE}\nobjectClass: organizationalUnit\nou: groups",
    ]
    entries.extend(user_ldif(user, password) for user, password in PASSWORDS.items())
    for group, member in _GROUPS_OF_NAMES.items():
        entries.append(
            f"dn: cn={group},{GROUP_BASE}\nobjectClass: groupOfNames\ncn: {group}\n"
            f"member: {USER_DN.format(user=member)}"
        )
    entries.append(
        f"dn: cn=staff,{GROUP_BASE}\nobjectClass: posixGroup\ncn: staff\ngidNumber: 5000\n"
        "memberUid: alice"
    )
    return "\n\n".join(entries) + "\n"


def user_ldif(user: str, password: str) -> str:
    """The entry of a person in ``ou=people`` (for ``slapadd``, or ``changetype: add``)."""
    return (
        f"dn: {USER_DN.format(user=user)}\nobjectClass: inetOrgPerson\nuid: {user}\n"
        f"cn: {user.title()}\nsn: {user.title()}\nuserPassword: {ssha(password)}"
    )


def ssha(password: str) -> str:
    """An RFC 2307 {SSHA} userPassword value, as slappasswd makes it."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def make_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def write_tls_files(root: Path) -> Path:
    """A CA and a server certificate for ``localhost``; return the CA's file."""
    ca_cert, ca_key = make_ca("Hatchway test LDAP CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_pem(root / "ca.pem", ca_cert)
    write_pem(root / "server.pem", cert)
    (root / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (root / "server.key").chmod(0o600)
    return root / "ca.pem"


def write_pem(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr.decode()}")


def _die_with_parent() -> None:
    """In the child before exec: have the kernel kill slapd if the test process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
