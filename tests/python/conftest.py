"""Shared fixtures for the tests that talk to polyhead through other people's gRPC tools.

The server under test is the release binary (`make test` builds it) serving the generated `tiny`
demo model set on a free loopback port.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVER_BIN = ROOT / "target" / "release" / "polyhead-server"
MODELS = Path(os.environ.get("POLYHEAD_TEST_MODELS", ROOT / "models" / "generated" / "tiny"))
PHOTOS = ROOT / ".cache" / "testdata"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


class Server:
    """A running `polyhead-server` process."""

    def __init__(self, extra_args=(), env=None):
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        args = [str(SERVER_BIN), "--listen", self.address, "--models", str(MODELS)]
        args += ["--metrics-listen", self.metrics_address, *extra_args]
        self.process = subprocess.Popen(
            args, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True
        )

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"polyhead-server at {self.address} never became SERVING")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.process.stderr.close()
        return code


@pytest.fixture(scope="session")
def server():
    assert SERVER_BIN.exists(), f"{SERVER_BIN} is missing: run `make test`"
    running = Server()
    running.wait_serving()
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="session")
def astronaut() -> bytes:
    return (PHOTOS / "astronaut.png").read_bytes()
