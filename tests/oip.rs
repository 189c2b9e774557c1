//! The Open Inference Protocol (KServe v2) service through its generated client: health and
//! metadata, ModelInfer on the backbone against the backbone worker and on every head against
//! the monolithic reference models, and the statuses of bad requests.

use ndarray::{ArrayD, IxDyn};
use polyhead_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use polyhead_proto::inference::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use polyhead_proto::inference::{
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelReadyRequest, ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
};
use polyhead_server::engine::{NamedTensors, Tensor};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::server;
use crate::equivalence::{assert_close, batch, reference};

type Client = GrpcInferenceServiceClient<Channel>;

async fn client() -> Client {
    GrpcInferenceServiceClient::connect(format!("http://{}", server().addr))
        .await
        .expect("connect to the test server")
        .max_decoding_message_size(256 << 20)
}

/// A request for `model` carrying `input` as raw little-endian bytes.
pub(crate) fn request(model: &str, input: &Tensor) -> ModelInferRequest {
    let input = input.array().expect("a host array");
    let raw = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    ModelInferRequest {
        model_name: model.into(),
        id: format!("{model}-1"),
        inputs: vec![input_tensor("FP32", input.shape())],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

fn input_tensor(datatype: &str, shape: &[usize]) -> InferInputTensor {
    InferInputTensor {
        name: "pixel_values".into(),
        datatype: datatype.into(),
        shape: shape.iter().map(|&d| d as i64).collect(),
        ..Default::default()
    }
}

/// The response's outputs as tensors, checking each header on the way.
pub(crate) fn tensors(response: &ModelInferResponse) -> NamedTensors {
    assert_eq!(response.outputs.len(), response.raw_output_contents.len());
    response
        .outputs
        .iter()
        .zip(&response.raw_output_contents)
        .map(|(output, raw)| {
            assert_eq!(output.datatype, "FP32", "{}", output.name);
            let shape: Vec<usize> = output.shape.iter().map(|&d| d as usize).collect();
            let values = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let array = ArrayD::from_shape_vec(IxDyn(&shape), values).expect("shape and bytes");
            (output.name.clone(), Tensor::from(array))
        })
        .collect()
}

async fn infer(request: ModelInferRequest) -> ModelInferResponse {
    client()
        .await
        .model_infer(request)
        .await
        .expect("ModelInfer")
        .into_inner()
}

/// `model`'s outputs over OIP and `reference`'s on the same input.
async fn infer_and_reference(model: &str, input: Tensor) -> (NamedTensors, NamedTensors) {
    let response = infer(request(model, &input)).await;
    assert_eq!(response.model_name, model);
    assert_eq!(response.model_version, "1");
    assert_eq!(response.id, format!("{model}-1"));
    let name = server().pipeline.models().backbone.spec.input.clone();
    let (expected, _) = reference(model)
        .run(vec![(name, input)])
        .await
        .expect("reference");
    (tensors(&response), expected)
}

#[tokio::test]
async fn oip_server_is_live_ready_and_describes_itself() {
    let mut client = client().await;
    let live = client
        .server_live(ServerLiveRequest {})
        .await
        .expect("live");
    assert!(live.into_inner().live);
    let ready = client
        .server_ready(ServerReadyRequest {})
        .await
        .expect("ready");
    assert!(ready.into_inner().ready);
    let metadata = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(metadata.name, "polyhead");
    assert_eq!(metadata.version, env!("CARGO_PKG_VERSION"));
    assert!(metadata.extensions.is_empty());
    for (name, version, ready) in [
        ("detection", "", true),
        ("backbone", "1", true),
        ("detection", "2", false),
        ("no-such-model", "", false),
    ] {
        let request = ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        };
        let answer = client.model_ready(request).await.expect("model ready");
        assert_eq!(answer.into_inner().ready, ready, "{name} {version}");
    }
}

fn metadata(name: &str, version: &str) -> ModelMetadataRequest {
    ModelMetadataRequest {
        name: name.into(),
        version: version.into(),
    }
}

#[tokio::test]
async fn oip_model_metadata_describes_the_backbone_and_the_heads() {
    let mut client = client().await;
    let models = server().pipeline.models();
    let backbone = client
        .model_metadata(metadata("backbone", ""))
        .await
        .expect("backbone metadata")
        .into_inner();
    assert_eq!(backbone.platform, "onnxruntime_onnx");
    assert_eq!(backbone.versions, ["1"]);
    assert_eq!(backbone.inputs.len(), 1);
    let input = &backbone.inputs[0];
    assert_eq!(input.name, "pixel_values");
    assert_eq!(input.datatype, "FP32");
    assert_eq!(input.shape, [-1, 3, 224, 224]);
    let features: Vec<_> = backbone.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(features, ["stage1", "stage2", "stage3", "stage4"]);
    assert_eq!(backbone.outputs[0].shape, [-1, 32, 56, 56]);
    assert_eq!(backbone.properties["kind"], "backbone");
    let detection = client
        .model_metadata(metadata("detection", "1"))
        .await
        .expect("detection metadata")
        .into_inner();
    assert_eq!(
        detection.inputs, backbone.inputs,
        "a head takes the backbone's input"
    );
    let outputs: Vec<_> = detection.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(outputs, ["scores", "boxes", "mask_coeffs", "mask_protos"]);
    assert!(detection.outputs.iter().all(|t| t.datatype == "FP32"));
    assert_eq!(detection.properties["kind"], "detection");
    assert_eq!(detection.properties["labels"], "coco80.txt");
    let classes = models.head("detection").expect("head").labels.len();
    assert_eq!(detection.properties["classes"], classes.to_string());
}

#[tokio::test]
async fn oip_model_metadata_of_unknown_models_and_versions_is_not_found() {
    let mut client = client().await;
    for (name, version) in [("no-such-model", ""), ("segmentation", "7")] {
        let status = client
            .model_metadata(metadata(name, version))
            .await
            .expect_err("unknown");
        assert_eq!(status.code(), Code::NotFound, "{}", status.message());
        assert!(status.message().contains(name), "{}", status.message());
    }
}

#[tokio::test]
async fn oip_backbone_infer_equals_the_backbone_worker() {
    let input = batch(&["astronaut.png", "coffee.png"]);
    let response = infer(request("backbone", &input)).await;
    assert_eq!(response.model_name, "backbone");
    let backbone = &server().pipeline.models().backbone;
    let (expected, _) = backbone
        .worker
        .run(vec![(backbone.spec.input.clone(), input)])
        .await
        .expect("backbone");
    let served = tensors(&response);
    assert_eq!(served[0].1.shape()[0], 2, "one feature map per image");
    assert_close(&served, &expected);
}

#[tokio::test]
async fn oip_detection_infer_equals_its_reference() {
    let (served, expected) = infer_and_reference("detection", batch(&["chelsea.png"])).await;
    assert_close(&served, &expected);
}

#[tokio::test]
async fn oip_segmentation_infer_equals_its_reference() {
    let (served, expected) = infer_and_reference("segmentation", batch(&["coffee.png"])).await;
    assert_close(&served, &expected);
}

#[tokio::test]
async fn oip_action_infer_on_frames_equals_its_reference() {
    let frames = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"];
    let (served, expected) = infer_and_reference("action", batch(&frames)).await;
    assert_close(&served, &expected);
}

#[tokio::test]
async fn oip_fp32_contents_and_requested_outputs_are_honoured() {
    let input = batch(&["rocket.jpg"]);
    let mut request = request("detection", &input);
    request.raw_input_contents.clear();
    request.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: input.array().expect("host").iter().copied().collect(),
        ..Default::default()
    });
    request.outputs = vec![InferRequestedOutputTensor {
        name: "boxes".into(),
        ..Default::default()
    }];
    let served = tensors(&infer(request).await);
    let (expected, _) = reference("detection")
        .run(vec![("pixel_values".into(), input)])
        .await
        .expect("reference");
    let boxes: NamedTensors = expected.into_iter().filter(|(n, _)| n == "boxes").collect();
    assert_close(&served, &boxes);
}

/// The status of a refused ModelInfer.
async fn refused(request: ModelInferRequest) -> (Code, String) {
    let status = client()
        .await
        .model_infer(request)
        .await
        .expect_err("bad request is refused");
    (status.code(), status.message().to_string())
}

pub(crate) fn assert_status((code, message): (Code, String), want: Code, words: &[&str]) {
    assert_eq!(code, want, "{message}");
    for word in words {
        assert!(
            message.contains(word),
            "'{message}' should mention '{word}'"
        );
    }
}

#[tokio::test]
async fn oip_bad_infer_requests_get_the_right_status() {
    let input = batch(&["coffee.png"]);
    let unknown = request("no-such-model", &input);
    assert_status(refused(unknown).await, Code::NotFound, &["no-such-model"]);
    let mut version = request("segmentation", &input);
    version.model_version = "3".into();
    assert_status(refused(version).await, Code::NotFound, &["version '3'"]);
    let mut shape = request("segmentation", &input);
    shape.inputs[0].shape = vec![1, 3, 112, 448];
    assert_status(
        refused(shape).await,
        Code::InvalidArgument,
        &["112 on axis 2"],
    );
    let mut datatype = request("segmentation", &input);
    datatype.inputs[0].datatype = "FP64".into();
    assert_status(refused(datatype).await, Code::InvalidArgument, &["'FP64'"]);
    let mut bytes = request("segmentation", &input);
    bytes.raw_input_contents[0].truncate(1000);
    let words = ["602112 bytes", "holds 1000 bytes"];
    assert_status(refused(bytes).await, Code::InvalidArgument, &words);
    let mut output = request("segmentation", &input);
    output.outputs = vec![InferRequestedOutputTensor {
        name: "masks".into(),
        ..Default::default()
    }];
    assert_status(
        refused(output).await,
        Code::InvalidArgument,
        &["'masks'", "logits"],
    );
    // One call runs as one batch, held to --max-batch (8 here) as the request path is.
    let most = server().pipeline.models().backbone.max_batch();
    let nine = batch(&["coffee.png"; 9]);
    assert_eq!(most, 8);
    assert_status(
        refused(request("backbone", &nine)).await,
        Code::InvalidArgument,
        &["9 images on axis 0", "at most 8", "--max-batch"],
    );
}

#[tokio::test]
async fn oip_outputs_over_the_response_limit_are_invalid_argument() {
    let mut config = polyhead_server::Config::for_models(crate::common::models_dir());
    config.limits.max_response_bytes = 64 << 10;
    let own = crate::common::start_server(config);
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", own.addr))
        .await
        .expect("connect");
    let status = client
        .model_infer(request("backbone", &batch(&["coffee.png"])))
        .await
        .expect_err("the features are larger than 64 KiB");
    let refusal = (status.code(), status.message().to_string());
    assert_status(
        refusal,
        Code::InvalidArgument,
        &["65536", "--max-response-bytes"],
    );
}
