"""The client over TLS, as when the fleet sits behind a TLS-terminating proxy (README, Security)."""

import datetime
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protos.reward.v1 import reward_pb2, reward_pb2_grpc
from services.client import RewardClient, RewardServiceError
from tests.conftest import free_port


def self_signed() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class DescribeOnly(reward_pb2_grpc.RewardServiceServicer):
    def Describe(self, request, context):  # noqa: N802
        return reward_pb2.DescribeResponse(name="tls_test", max_samples_per_request=7)


@pytest.fixture
def tls_server():
    cert, key = self_signed()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(DescribeOnly(), server)
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    yield f"localhost:{port}", cert
    server.stop(None)


def test_client_speaks_tls_with_credentials_and_fails_without(tls_server):
    target, cert = tls_server
    with RewardClient(target, "tls_test", credentials=grpc.ssl_channel_credentials(root_certificates=cert)) as c:
        assert c.describe().name == "tls_test"
    with RewardClient(target, "tls_test", max_retries=0, timeout_s=5) as plain:
        with pytest.raises(RewardServiceError, match="UNAVAILABLE"):
            plain.describe()
