"""Graceful shutdown seen from Python's grpcio: after SIGTERM the server stops taking
connections (health reports NOT_SERVING to a check that still gets in), in-flight calls are
still answered, and the process exits 0."""

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2

from conftest import ROOT, Server, health_status


@pytest.fixture(scope="module")
def polyhead_pb(tmp_path_factory):
    """Python stubs for polyhead.v1, generated from the repository's proto with grpcio-tools."""
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
         f"--grpc_python_out={out}", "polyhead/v1/polyhead.proto"],
        check=True,
    )
    sys.path.insert(0, str(out))
    from polyhead.v1 import polyhead_pb2, polyhead_pb2_grpc

    return polyhead_pb2, polyhead_pb2_grpc


def inflight(server, rpc):
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=5) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(f'polyhead_inflight_requests{{rpc="{rpc}"}}'):
                return float(line.split()[-1])
    return 0.0


def wait_for(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def turns_new_calls_away(address):
    """Whether a new caller is turned away: its connection is refused or reset (the listener
    has closed, perhaps with the connection still in its backlog), or the health protocol
    answers NOT_SERVING (it got in just before)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    try:
        return health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_drains_in_flight_calls(polyhead_pb):
    pb, pb_grpc = polyhead_pb
    server = Server(["--drain-timeout-seconds", "60", "--cache-bytes", "0"])
    try:
        server.wait_serving()
        width, height = 4000, 3000
        pixels = bytes(i % 251 for i in range(width * height * 3))
        image = pb.Image(raw=pb.RawImage(width=width, height=height, rgb=pixels))
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = pb_grpc.PolyheadStub(channel)
            call = stub.Segment.future(pb.SegmentRequest(image=image), timeout=120)
            # Admitted before the signal: a call arriving after it would be refused.
            wait_for(lambda: inflight(server, "Segment") == 1, "the Segment call in flight")
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: turns_new_calls_away(server.address), "new calls turned away")
            assert server.process.poll() is None, "the server waits for the call in flight"
            assert call.result().segmentation.width == width
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
