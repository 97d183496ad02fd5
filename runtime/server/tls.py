"""Server TLS and mutual TLS from PEM files, and the matching client credentials."""

from __future__ import annotations

from pathlib import Path

import grpc

from runtime.server.config import ConfigError, TlsConfig


def _read(path: Path, field: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{field}: {path} is not PEM")
    return data


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the server port, or None for plaintext.

    With ``client_ca`` the server requires a client certificate chaining to it (mutual TLS).
    """
    if tls.cert is None or tls.key is None:
        return None
    pair = (_read(tls.key, "tls.key"), _read(tls.cert, "tls.cert"))
    if tls.client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(tls.client_ca, "tls.client_ca"), require_client_auth=True
    )


def channel_credentials(
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> grpc.ChannelCredentials:
    """Client TLS credentials: the CA to trust (None: system roots) and an optional client certificate."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("a client certificate needs both certificate_chain and private_key")
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
