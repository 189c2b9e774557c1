"""polyhead through standard gRPC tooling: the health protocol via grpcio-health-checking,
reflection via a real grpcurl, and COCO RLE masks decoded by pycocotools itself."""

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from pycocotools import mask as coco_mask

from conftest import health_status

GRPCURL = shutil.which("grpcurl") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "grpcurl")


def grpcurl(address: str, *args: str, data: str | None = None) -> str:
    command = [GRPCURL, "-plaintext", "-max-msg-sz", str(64 << 20)]
    if data is not None:
        command += ["-d", "@"]
    result = subprocess.run(
        [*command, address, *args], input=data, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("service", ["", "polyhead.v1.Polyhead"])
def test_health_serving_once_ready(server, service):
    assert health_status(server.address, service) == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_is_not_found(server):
    import grpc

    with pytest.raises(grpc.RpcError) as error:
        health_status(server.address, "no.such.Service")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpcurl_lists_and_describes_through_reflection(server):
    services = grpcurl(server.address, "list").split()
    assert "polyhead.v1.Polyhead" in services
    assert "grpc.health.v1.Health" in services
    described = grpcurl(server.address, "describe", "polyhead.v1.Polyhead.Detect")
    assert "rpc Detect ( .polyhead.v1.DetectRequest ) returns ( .polyhead.v1.DetectResponse )" in described


def test_grpcurl_calls_list_models(server):
    models = json.loads(grpcurl(server.address, "polyhead.v1.Polyhead/ListModels", data="{}"))
    assert models["modelSet"] == "demo-tiny"
    assert [h["name"] for h in models["heads"]] == ["detection", "segmentation", "action"]


def test_detect_masks_are_coco_rle_that_pycocotools_reads(server, astronaut):
    request = {
        "image": {"encoded": base64.b64encode(astronaut).decode()},
        "options": {"masks": True, "scoreThreshold": 0.05},
    }
    response = json.loads(grpcurl(server.address, "polyhead.v1.Polyhead/Detect", data=json.dumps(request)))
    detections = response["detections"]["detections"]
    assert detections, "a low threshold finds something"
    for d in detections:
        rle = {"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}
        pixels = coco_mask.decode(rle)
        assert pixels.shape == (512, 512)
        # pycocotools writes back exactly the string polyhead sent.
        again = coco_mask.encode(np.asfortranarray(pixels))
        assert again["counts"].decode() == d["mask"]["counts"]
        if pixels.any():
            x, y, w, h = coco_mask.toBbox(rle)
            box = d["box"]
            assert box.get("x1", 0) - 1 <= x and x + w <= box["x2"] + 1
            assert box.get("y1", 0) - 1 <= y and y + h <= box["y2"] + 1
