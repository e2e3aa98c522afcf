"""TLS client contexts built from settings, and what a failed handshake says about them.

Kafka (settler.kafka) and CQL (settler.store.cql) both build their contexts here, so a missing CA
file or a key that does not fit its certificate is reported once, naming the setting. After
a failed handshake, `problem()` tells a certificate the client cannot trust (the CA file's
fault), a certificate for another name (the address's fault) and a client certificate the
server refused from anything transient.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from enum import StrEnum

from settler.config import ConfigError

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_EMAIL_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH_CODES = frozenset({62, 63, 64})

# Alerts a server sends when it refuses (or never got) the client's certificate.
_CLIENT_CERT_ALERTS = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "TLSV1_ALERT_ACCESS_DENIED",
})

# What OpenSSL says when the bytes that came back are not TLS at all (a plaintext port).
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                              "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})


class Problem(StrEnum):
    """Which setting a failed handshake points at."""

    UNTRUSTED = "untrusted"  # the server's chain does not lead to the configured CA
    NAME_MISMATCH = "name_mismatch"  # a trusted certificate, for another host name
    CLIENT_CERTIFICATE = "client_certificate"  # the server refused (or missed) ours
    NOT_TLS = "not_tls"  # the server does not speak TLS on that port


@dataclass(frozen=True)
class HandshakeFailure:
    problem: Problem
    detail: str


def client_context(*, setting_prefix: str, cafile: str | None, certfile: str | None,
                   keyfile: str | None, check_hostname: bool = True) -> ssl.SSLContext:
    """A verifying client context: the CA file (or the system's CAs when None), the client
    certificate and key when given. `setting_prefix` (e.g. `SETTLER_KAFKA_SSL`) names the
    settings in errors."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except OSError as exc:
        raise ConfigError(f"{setting_prefix}_CAFILE: cannot read {cafile}: "
                          f"{_reason(exc)}") from None
    context.check_hostname = check_hostname
    if keyfile and not certfile:
        raise ConfigError(f"{setting_prefix}_KEYFILE is set without {setting_prefix}_CERTFILE")
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{setting_prefix}_CERTFILE/{setting_prefix}_KEYFILE: {certfile} and "
                f"{keyfile or '(the key in the same file)'} are not a certificate and its "
                f"key: {_reason(exc)}") from None
        except OSError as exc:
            raise ConfigError(f"{setting_prefix}_CERTFILE/{setting_prefix}_KEYFILE: cannot "
                              f"read {certfile} or {keyfile}: {_reason(exc)}") from None
    return context


def problem(exc: BaseException) -> HandshakeFailure | None:
    """The certificate or protocol problem behind `exc` (looking through its causes), or
    None when nothing in it is about TLS settings."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            detail = str(error.verify_message or _reason(error))
            if error.verify_code in _NAME_MISMATCH_CODES:
                return HandshakeFailure(Problem.NAME_MISMATCH, detail)
            return HandshakeFailure(Problem.UNTRUSTED, detail)
        if isinstance(error, ssl.SSLError):
            found = _classify(str(error.reason or ""), _reason(error))
        else:
            # The CQL driver re-raises a failed handshake as a plain OSError whose text is
            # the ssl error's ("... Last error: [SSL: REASON] detail (_ssl.c:1006)").
            found = _from_text(str(error))
        if found is not None:
            return found
    return None


_SSL_TEXT = re.compile(r"\[SSL: (?P<reason>[A-Z0-9_]+)\] (?P<detail>.*?)(?: \(_ssl\.c:\d+\))?$")
_VERIFY_DETAIL = re.compile(r"certificate verify failed: (?P<detail>.*)")


def _from_text(text: str) -> HandshakeFailure | None:
    match = _SSL_TEXT.search(text)
    if match is None:
        return None
    reason, detail = match.group("reason"), match.group("detail")
    if reason == "CERTIFICATE_VERIFY_FAILED":
        verify = _VERIFY_DETAIL.search(detail)
        detail = verify.group("detail") if verify else detail
        kind = Problem.NAME_MISMATCH if "mismatch" in detail.lower() else Problem.UNTRUSTED
        return HandshakeFailure(kind, detail)
    return _classify(reason, detail)


def _classify(reason: str, detail: str) -> HandshakeFailure | None:
    if reason in _CLIENT_CERT_ALERTS:
        return HandshakeFailure(Problem.CLIENT_CERTIFICATE, detail)
    if reason in _NOT_TLS_REASONS:
        return HandshakeFailure(Problem.NOT_TLS, detail)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason.lower().replace('_', ' ')}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
