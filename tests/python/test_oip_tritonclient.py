"""Triton's own client (`tritonclient[grpc]`) against polyhead's Open Inference Protocol service.

Through the shared `server` fixture (the release binary on a free port, already SERVING on the
health protocol, see conftest.py): checks liveness, readiness and model metadata, and checks that the
`segmentation` model's raw `logits` equal those of the monolithic reference model run by
onnxruntime on the same input.
"""

import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import MODELS

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def client(server):
    triton = grpcclient.InferenceServerClient(url=server.address)
    yield triton
    triton.close()


def test_server_is_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("segmentation")
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata()
    assert metadata.name == "polyhead"
    assert list(metadata.extensions) == []


def test_model_metadata(client):
    metadata = client.get_model_metadata("segmentation")
    assert metadata.name == "segmentation"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    [tensor] = metadata.inputs
    assert (tensor.name, tensor.datatype) == ("pixel_values", "FP32")
    assert list(tensor.shape) == [-1, 3, 224, 224]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("logits", "FP32")]
    # Triton's own proto has no `properties` (field 6): its client skips the field unharmed.
    assert not hasattr(metadata, "properties")


def test_segmentation_logits_equal_the_reference_model(client):
    pixels = np.random.default_rng(7).standard_normal((1, 3, 224, 224), dtype=np.float32)
    tensor = grpcclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    wanted = [grpcclient.InferRequestedOutput("logits")]
    result = client.infer("segmentation", [tensor], outputs=wanted, request_id="seg-1")
    response = result.get_response()
    echoed = (response.model_name, response.model_version, response.id)
    assert echoed == ("segmentation", "1", "seg-1")
    served = result.as_numpy("logits")

    reference = onnxruntime.InferenceSession(
        str(MODELS / "reference_segmentation.onnx"), providers=["CPUExecutionProvider"]
    )
    [expected] = reference.run(["logits"], {"pixel_values": pixels})
    assert served.dtype == np.float32
    assert served.shape == expected.shape
    assert np.abs(served - expected).max() <= TOLERANCE
    assert expected.std() > 0, "the reference logits are constant"


def test_unknown_models_and_bad_shapes_are_refused(client):
    pixels = np.zeros((1, 3, 224, 224), dtype=np.float32)
    tensor = grpcclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", [tensor])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    small = np.zeros((1, 3, 112, 112), dtype=np.float32)
    wrong = grpcclient.InferInput("pixel_values", list(small.shape), "FP32")
    wrong.set_data_from_numpy(small)
    with pytest.raises(InferenceServerException) as shape:
        client.infer("segmentation", [wrong])
    assert shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "axis 2" in shape.value.message()
