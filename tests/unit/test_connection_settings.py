"""Which setting a refused connection points at (settler.tls, settler.store.cql, settler.kafka),
and the TLS contexts built from settings. Real TLS handshakes run in memory between
certificates made like the secure dev stack's; no server needed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ssl
from pathlib import Path

import pytest
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    RequestTimedOutError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from cassandra import AuthenticationFailed, OperationTimedOut
from cassandra.cluster import NoHostAvailable

from settler import kafka, tls
from settler.config import ConfigError, ConnectionSettingError, Settings, help_table, load_settings
from settler.dev import secure as devstack_secure
from settler.dev.secure import Material, SecurePorts
from settler.store import cql

PASSWORD = "hunter2-never-printed"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    made, fresh = devstack_secure.ensure_material(tmp_path_factory.mktemp("secure"))
    assert fresh
    return made


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cert, _ = devstack_secure.make_ca(tmp_path_factory.mktemp("other"), "another CA")
    return cert


def _settings(**environ: str) -> Settings:
    return load_settings(environ=environ)


# --------------------------------------------------------------------------- handshakes


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str
               ) -> BaseException | None:
    """A TLS handshake over memory buffers, then one read by the client (TLS 1.3 servers
    refuse a missing client certificate only after the client thinks it is done)."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname=server_hostname)
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    pending = {client_side, server_side}
    for _ in range(20):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.discard(side)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if side is client_side:
                    return exc
                pending.discard(side)  # the alert it sent reaches the client next
        if not pending:
            break
    try:
        client_side.read(1)
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:
        return exc
    return None


def _server_context(material: Material, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(material.server_cert, material.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(material.ca_file)
    return context


def _client_context(cafile: Path, *, cert: Path | None = None, key: Path | None = None
                    ) -> ssl.SSLContext:
    return tls.client_context(setting_prefix="SETTLER_KAFKA_SSL", cafile=str(cafile),
                              certfile=str(cert) if cert else None,
                              keyfile=str(key) if key else None)


def test_the_dev_ca_certificate_passes_for_127_0_0_1(material: Material) -> None:
    assert _handshake(_server_context(material), _client_context(material.ca_file),
                      "127.0.0.1") is None


def test_a_certificate_from_another_ca_is_untrusted(material: Material, other_ca: Path) -> None:
    error = _handshake(_server_context(material), _client_context(other_ca), "127.0.0.1")
    assert error is not None
    failure = tls.problem(error)
    assert failure is not None and failure.problem is tls.Problem.UNTRUSTED


@pytest.mark.parametrize("name", ["localhost", "127.0.0.2", "kafka.example"])
def test_a_certificate_for_another_name_is_a_name_mismatch(material: Material, name: str) -> None:
    error = _handshake(_server_context(material), _client_context(material.ca_file), name)
    assert error is not None
    failure = tls.problem(error)
    assert failure is not None and failure.problem is tls.Problem.NAME_MISMATCH
    assert name in failure.detail


def test_a_missing_client_certificate_is_the_certificate_settings_fault(
    material: Material
) -> None:
    server = _server_context(material, require_client_cert=True)
    assert _handshake(server, _client_context(material.ca_file, cert=material.client_cert,
                                              key=material.client_key), "127.0.0.1") is None
    error = _handshake(server, _client_context(material.ca_file), "127.0.0.1")
    assert error is not None
    # aiokafka reports it as a closed connection caused by the TLS alert.
    closed = KafkaConnectionError("Connection at 127.0.0.1:9095 closed")
    assert tls.problem(closed) is None
    closed.__cause__ = error
    failure = tls.problem(closed)
    assert failure is not None and failure.problem is tls.Problem.CLIENT_CERTIFICATE


@pytest.mark.parametrize(("text", "expected"), [
    ("Tried connecting to [('127.0.0.1', 9142)]. Last error: [SSL: CERTIFICATE_VERIFY_FAILED] "
     "certificate verify failed: self-signed certificate in certificate chain (_ssl.c:1006)",
     tls.Problem.UNTRUSTED),
    ("Tried connecting to [('127.0.0.2', 9142)]. Last error: [SSL: CERTIFICATE_VERIFY_FAILED] "
     "certificate verify failed: IP address mismatch, certificate is not valid for "
     "'127.0.0.2'. (_ssl.c:1006)", tls.Problem.NAME_MISMATCH),
    ("Tried connecting to [('127.0.0.1', 9042)]. Last error: [SSL: WRONG_VERSION_NUMBER] wrong "
     "version number (_ssl.c:1006)", tls.Problem.NOT_TLS),
    ("Tried connecting to [('127.0.0.1', 9142)]. Last error: Connection refused", None),
])
def test_the_cql_drivers_flattened_handshake_errors_are_read_from_their_text(
    text: str, expected: tls.Problem | None
) -> None:
    failure = tls.problem(PermissionError(1, text))
    assert (failure.problem if failure else None) is expected


# --------------------------------------------------------------------------- CQL


def _no_host(error: BaseException, server: str = "127.0.0.1:9142") -> NoHostAvailable:
    return NoHostAvailable("Unable to connect to any servers", {server: error})


CQL_SECURE = {"SETTLER_CQL_USERNAME": "settler", "SETTLER_CQL_PASSWORD": PASSWORD}


@pytest.mark.parametrize(("error", "setting"), [
    (AuthenticationFailed('Failed to authenticate to 127.0.0.1:9142: Error from server: '
                          'code=0100 [Bad credentials] message="Provided username settler '
                          'and/or password are incorrect"'),
     "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD"),
    (AuthenticationFailed('Failed to authenticate to 127.0.0.1:9142: Error from server: '
                          'code=0100 [Bad credentials] message="Username and/or password are '
                          'incorrect"'), "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD"),
    (AuthenticationFailed("Remote end requires authentication"),
     "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD"),
    (PermissionError(1, "Tried connecting to [('127.0.0.1', 9142)]. Last error: [SSL: "
                        "CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
                        "local issuer certificate (_ssl.c:1006)"), "SETTLER_CQL_SSL_CAFILE"),
    (PermissionError(1, "Tried connecting to [('127.0.0.1', 9142)]. Last error: [SSL: "
                        "CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address "
                        "mismatch, certificate is not valid for '127.0.0.1'. (_ssl.c:1006)"),
     "SETTLER_CQL_CONTACT_POINTS"),
])
def test_a_refused_cql_connection_names_the_setting_and_the_server(
    error: BaseException, setting: str
) -> None:
    problem = cql.setting_problem(_no_host(error), _settings(**CQL_SECURE))
    assert problem is not None
    assert problem.setting == setting
    assert problem.server == "127.0.0.1:9142"
    assert str(problem).startswith(f"{setting}: ") and "127.0.0.1:9142" in str(problem)
    assert "\n" not in str(problem)
    assert PASSWORD not in str(problem)


@pytest.mark.parametrize("error", [
    OperationTimedOut("timed out"),
    ConnectionRefusedError(111, "Connection refused"),
    AuthenticationFailed('Failed to authenticate to 127.0.0.1:9142: Error from server: '
                         'code=0100 [Bad credentials] message="org.apache.cassandra.exceptions'
                         '.UnavailableException: Cannot achieve consistency level QUORUM"'),
])
def test_an_unreachable_or_unready_cql_node_is_transient(error: BaseException) -> None:
    exc = _no_host(error)
    assert cql.setting_problem(exc, _settings(**CQL_SECURE)) is None
    assert cql.is_transient(exc)


def test_a_session_without_pools_is_not_mistaken_for_a_refusal() -> None:
    exc = NoHostAvailable("Unable to connect to any servers", ["127.0.0.1"])
    assert cql.setting_problem(exc, _settings()) is None


def test_a_refused_setting_is_never_transient() -> None:
    refused = ConnectionSettingError("SETTLER_CQL_PASSWORD", "127.0.0.1:9142", "refused")
    assert isinstance(refused, ConfigError)
    assert not cql.is_transient(refused)
    assert not kafka.is_transient(refused)


def test_cql_tls_and_credentials_settings_that_contradict_each_other_are_refused(
    material: Material
) -> None:
    with pytest.raises(ConfigError, match=r"^SETTLER_CQL_PASSWORD is set without"):
        cql.make_cluster(_settings(SETTLER_CQL_PASSWORD=PASSWORD))
    with pytest.raises(ConfigError, match="without SETTLER_CQL_SSL_CAFILE"):
        cql.make_cluster(_settings(SETTLER_CQL_SSL_CERTFILE=str(material.client_cert)))
    with pytest.raises(ConfigError, match=r"^SETTLER_CQL_SSL_CAFILE: cannot read"):
        cql.make_cluster(_settings(SETTLER_CQL_SSL_CAFILE="/nonexistent/ca.pem"))


def test_cql_hostname_checking_follows_its_setting(material: Material) -> None:
    on = cql.make_cluster(_settings(SETTLER_CQL_SSL_CAFILE=str(material.ca_file)))
    off = cql.make_cluster(_settings(SETTLER_CQL_SSL_CAFILE=str(material.ca_file),
                                     SETTLER_CQL_SSL_CHECK_HOSTNAME="false"))
    try:
        assert on.ssl_context.check_hostname is True
        assert off.ssl_context.check_hostname is False
        assert off.ssl_context.verify_mode == ssl.CERT_REQUIRED  # the CA chain still counts
    finally:
        on.shutdown()
        off.shutdown()


def test_the_hostname_check_setting_is_documented_and_parsed() -> None:
    assert "SETTLER_CQL_SSL_CHECK_HOSTNAME" in help_table()
    assert _settings().cql_ssl_check_hostname is True
    with pytest.raises(ConfigError, match="SETTLER_CQL_SSL_CHECK_HOSTNAME"):
        _settings(SETTLER_CQL_SSL_CHECK_HOSTNAME="maybe")


# --------------------------------------------------------------------------- Kafka


KAFKA_SECURE = {
    "SETTLER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "SETTLER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "SETTLER_KAFKA_SASL_USERNAME": "settler",
    "SETTLER_KAFKA_SASL_PASSWORD": PASSWORD,
}


@pytest.mark.parametrize(("error", "setting"), [
    (SaslAuthenticationFailed("Authentication failed during authentication due to invalid "
                              "credentials with SASL mechanism SCRAM-SHA-512"),
     "SETTLER_KAFKA_SASL_USERNAME/SETTLER_KAFKA_SASL_PASSWORD"),
    (UnsupportedSaslMechanismError("Kafka broker does not support SCRAM-SHA-512"),
     "SETTLER_KAFKA_SASL_MECHANISM"),
    (IllegalSaslStateError("no SASL here"), "SETTLER_KAFKA_SECURITY_PROTOCOL"),
])
def test_a_refused_kafka_login_names_the_setting_and_the_broker(
    error: BaseException, setting: str
) -> None:
    problem = kafka.setting_problem(error, _settings(**KAFKA_SECURE), "127.0.0.1:9094")
    assert problem is not None
    assert problem.setting == setting
    assert str(problem).startswith(f"{setting}: ") and "127.0.0.1:9094" in str(problem)
    assert PASSWORD not in str(problem)
    assert not kafka.is_transient(error)


def test_a_plaintext_client_reading_a_tls_record_is_told_to_use_tls() -> None:
    # 0x15 0x03 0x03 ...: a TLS alert record where a Kafka response size was expected.
    read = asyncio.IncompleteReadError(partial=b"\x15\x03\x03", expected=0x15030300)
    closed = KafkaConnectionError("Connection at 127.0.0.1:9095 closed")
    closed.__cause__ = read
    plain = kafka.setting_problem(closed, _settings(), "127.0.0.1:9095")
    assert plain is not None and plain.setting == "SETTLER_KAFKA_SECURITY_PROTOCOL"
    tls_client = _settings(SETTLER_KAFKA_SECURITY_PROTOCOL="SSL")
    assert kafka.setting_problem(closed, tls_client, "127.0.0.1:9095") is None


@pytest.mark.parametrize("error", [
    KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9094)]"),
    ConnectionRefusedError(111, "Connection refused"),
    RequestTimedOutError(),
    TimeoutError(),
])
def test_an_unreachable_broker_is_transient(error: BaseException) -> None:
    assert kafka.setting_problem(error, _settings(**KAFKA_SECURE), "127.0.0.1:9094") is None
    assert kafka.is_transient(error)


def test_kafka_security_settings_that_contradict_each_other_are_refused(
    material: Material, other_ca: Path
) -> None:
    with pytest.raises(ConfigError, match=r"^SETTLER_KAFKA_SASL_USERNAME and "):
        kafka.security_options(_settings(SETTLER_KAFKA_SECURITY_PROTOCOL="SASL_SSL"))
    with pytest.raises(ConfigError, match=r"^SETTLER_KAFKA_SSL_CAFILE is set but "):
        kafka.security_options(_settings(SETTLER_KAFKA_SSL_CAFILE=str(material.ca_file)))
    with pytest.raises(ConfigError, match=r"^SETTLER_KAFKA_SSL_CAFILE: cannot read"):
        kafka.security_options(_settings(SETTLER_KAFKA_SECURITY_PROTOCOL="SSL",
                                         SETTLER_KAFKA_SSL_CAFILE="/nonexistent/ca.pem"))
    with pytest.raises(ConfigError, match=r"^SETTLER_KAFKA_SSL_CERTFILE/SETTLER_KAFKA_SSL_KEYFILE"):
        kafka.security_options(_settings(  # a certificate with another certificate's key
            SETTLER_KAFKA_SECURITY_PROTOCOL="SSL", SETTLER_KAFKA_SSL_CERTFILE=str(other_ca),
            SETTLER_KAFKA_SSL_KEYFILE=str(material.client_key)))


# --------------------------------------------------------------------------- dev stack


def _scram_client_proof(salted: bytes, auth_message: str) -> str:
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    signature = hmac.new(stored_key, auth_message.encode(), hashlib.sha256).digest()
    return base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature,
                                                        strict=True))).decode()


def test_scram_salted_password_matches_rfc_7677() -> None:
    # RFC 7677 section 3: user "user", password "pencil", SCRAM-SHA-256, 4096 iterations.
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    auth_message = (f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,"
                    f"i=4096,c=biws,r={nonce}")
    salted = devstack_secure.salted_password("sha256", "pencil", salt, 4096)
    assert _scram_client_proof(salted, auth_message) == (
        "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")


def test_the_secure_cassandra_config_replaces_authentication_and_encryption(
    material: Material
) -> None:
    yaml = devstack_secure.cassandra_yaml(material)
    assert yaml.count("\nauthenticator:") == 1
    assert "authenticator: PasswordAuthenticator" in yaml
    assert "AllowAllAuthenticator" not in yaml
    assert yaml.count("client_encryption_options:") == 1
    assert f"keystore: {material.keystore}" in yaml
    assert "materialized_views_enabled: false" in yaml  # the rest of the plain config stays


def test_the_secure_kafka_listeners_offer_scram_plain_and_mutual_tls(
    material: Material
) -> None:
    properties = devstack_secure.kafka_properties(material)
    assert "sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN" in properties
    assert "listener.name.ssl.ssl.client.auth=required" in properties
    settings_lines = [line for line in properties.splitlines() if not line.startswith("#")]
    assert not [line for line in settings_lines if "$" in line], "a placeholder left unfilled"


@pytest.mark.parametrize("mode", devstack_secure.KAFKA_MODES)
def test_the_secure_stacks_settings_are_valid_settler_settings(
    material: Material, mode: str
) -> None:
    environ = material.settler_environ(SecurePorts(9094, 9095, 9142), kafka=mode)
    settings = load_settings(environ=environ)
    assert settings.cql_contact_points == ("127.0.0.1:9142",)
    options = kafka.security_options(settings)
    assert options["security_protocol"] == ("SSL" if mode == "mtls" else "SASL_SSL")
    cluster = cql.make_cluster(settings)
    cluster.shutdown()


def test_secrets_never_appear_in_the_redacted_settings(material: Material) -> None:
    settings = load_settings(environ=material.settler_environ(SecurePorts(9094, 9095, 9142)))
    shown = repr(settings.redacted()) + repr(settings) + help_table()
    assert not [name for name, value in material.secrets().items() if value in shown]


def test_material_is_made_once_and_kept_private(material: Material) -> None:
    assert devstack_secure.load_material(material.directory) == material
    again, fresh = devstack_secure.ensure_material(material.directory)
    assert not fresh and again == material
    for path in (material.ca_key, material.server_key, material.client_key, material.keystore,
                 material.directory / "credentials.json"):
        assert path.stat().st_mode & 0o077 == 0, f"{path.name} is readable by others"
