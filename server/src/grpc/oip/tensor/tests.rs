//! Input parsing and validation, requested outputs and output encoding, against hand-made
//! tensors.

use crate::engine::Tensor;

use ndarray::{Array, ShapeBuilder};

use super::*;

fn declared() -> TensorInfo {
    TensorInfo {
        name: "pixel_values".into(),
        shape: vec![-1, 3, 2, 2],
        datatype: "Float32".into(),
    }
}

fn input(shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: "pixel_values".into(),
        datatype: FP32.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()
}

fn raw(n: usize) -> Bytes {
    f32_to_le(values(n).into_iter(), n).into()
}

/// The input as the model will get it, checked and read.
fn read_input(
    inputs: Vec<InferInputTensor>,
    raw: Vec<Bytes>,
    declared: &TensorInfo,
) -> Result<ArrayD<f32>, Error> {
    check_input(inputs, raw, declared)?.read()
}

/// The INVALID_ARGUMENT message of a refused input.
fn refusal(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> String {
    match read_input(inputs, raw, &declared()) {
        Err(Error::InvalidArgument(message)) => message,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

fn assert_mentions(message: &str, words: &[&str]) {
    for word in words {
        assert!(
            message.contains(word),
            "'{message}' should mention '{word}'"
        );
    }
}

#[test]
fn f32_bytes_are_little_endian_and_round_trip() {
    assert_eq!(f32_to_le([1.0f32].into_iter(), 1), [0, 0, 0x80, 0x3f]);
    let original = vec![0.0, -1.5, f32::MAX, 1e-7, f32::MIN_POSITIVE];
    let bytes = f32_to_le(original.iter().copied(), original.len());
    assert_eq!(bytes.len(), 20);
    check_raw_len("x", &bytes, original.len()).expect("exact length");
    assert_eq!(f32_from_le(&bytes), original);
}

#[test]
fn a_raw_input_is_read_with_its_shape() {
    let tensor =
        read_input(vec![input(&[2, 3, 2, 2])], vec![raw(24)], &declared()).expect("valid input");
    assert_eq!(tensor.shape(), [2, 3, 2, 2]);
    assert_eq!(tensor.iter().copied().collect::<Vec<_>>(), values(24));
}

#[test]
fn fp32_contents_are_read_too() {
    let mut tensor = input(&[1, 3, 2, 2]);
    tensor.contents = Some(InferTensorContents {
        fp32_contents: values(12),
        ..Default::default()
    });
    let array = read_input(vec![tensor], Vec::new(), &declared()).expect("valid input");
    assert_eq!(array.shape(), [1, 3, 2, 2]);
    assert_eq!(array.iter().copied().collect::<Vec<_>>(), values(12));
}

#[test]
fn the_name_datatype_and_input_count_are_checked() {
    let mut named = input(&[1, 3, 2, 2]);
    named.name = "images".into();
    assert_mentions(
        &refusal(vec![named], vec![raw(12)]),
        &["'images'", "'pixel_values'"],
    );
    let mut typed = input(&[1, 3, 2, 2]);
    typed.datatype = "FP16".into();
    assert_mentions(&refusal(vec![typed], vec![raw(12)]), &["'FP16'", "FP32"]);
    assert_mentions(&refusal(Vec::new(), Vec::new()), &["one input", "has 0"]);
    let two = vec![input(&[1, 3, 2, 2]), input(&[1, 3, 2, 2])];
    assert_mentions(&refusal(two, vec![raw(12), raw(12)]), &["has 2"]);
}

#[test]
fn the_shape_is_checked_against_the_declared_one() {
    let cases: [(&[i64], &[&str]); 5] = [
        (&[3, 2, 2], &["rank 3", "rank 4"]),
        (&[1, 4, 2, 2], &["4 on axis 1", "takes 3"]),
        (&[-1, 3, 2, 2], &["-1 on axis 0", "positive"]),
        (&[0, 3, 2, 2], &["0 on axis 0", "positive"]),
        (&[1, 3, 2, 3], &["3 on axis 3", "takes 2"]),
    ];
    for (shape, words) in cases {
        assert_mentions(&refusal(vec![input(shape)], vec![raw(12)]), words);
    }
}

#[test]
fn an_overflowing_shape_is_refused_without_panicking() {
    let declared = TensorInfo {
        shape: vec![-1, -1, -1, -1],
        ..declared()
    };
    // The last has 2^62 elements, which fit a usize, but not their 2^64 bytes.
    let shapes = [
        [i64::MAX, i64::MAX, 2, 2],
        [1 << 20, 1 << 20, 1 << 20, 1 << 4],
        [1 << 20, 1 << 20, 1 << 20, 1 << 2],
    ];
    for shape in shapes {
        match read_input(vec![input(&shape)], vec![raw(12)], &declared) {
            Err(Error::InvalidArgument(message)) => assert_mentions(&message, &["too large"]),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
}

#[test]
fn the_data_must_match_the_element_count() {
    let short = refusal(vec![input(&[1, 3, 2, 2])], vec![raw(11)]);
    assert_mentions(&short, &["12 FP32 elements", "48 bytes", "holds 44 bytes"]);
    let odd = refusal(vec![input(&[1, 3, 2, 2])], vec![vec![0; 49].into()]);
    assert_mentions(&odd, &["holds 49 bytes"]);
    let mut tensor = input(&[1, 3, 2, 2]);
    tensor.contents = Some(InferTensorContents {
        fp32_contents: values(5),
        ..Default::default()
    });
    assert_mentions(
        &refusal(vec![tensor], Vec::new()),
        &["12 elements", "holds 5"],
    );
}

#[test]
fn missing_doubled_or_misplaced_data_is_refused() {
    let none = refusal(vec![input(&[1, 3, 2, 2])], Vec::new());
    assert_mentions(&none, &["no FP32 data", "raw_input_contents"]);
    let mut both = input(&[1, 3, 2, 2]);
    both.contents = Some(InferTensorContents {
        fp32_contents: values(12),
        ..Default::default()
    });
    assert_mentions(&refusal(vec![both], vec![raw(12)]), &["both"]);
    let extra = refusal(vec![input(&[1, 3, 2, 2])], vec![raw(12), raw(12)]);
    assert_mentions(&extra, &["2 raw_input_contents"]);
    let mut ints = input(&[1, 3, 2, 2]);
    ints.contents = Some(InferTensorContents {
        int_contents: vec![1; 12],
        ..Default::default()
    });
    assert_mentions(&refusal(vec![ints], Vec::new()), &["no FP32 data"]);
}

#[test]
fn shared_memory_inputs_are_refused() {
    let mut tensor = input(&[1, 3, 2, 2]);
    tensor
        .parameters
        .insert("shared_memory_region".into(), InferParameter::default());
    let message = refusal(vec![tensor], vec![raw(12)]);
    assert_mentions(&message, &["shared_memory_region", "not supported"]);
}

fn outputs() -> Vec<TensorInfo> {
    ["scores", "boxes"]
        .into_iter()
        .map(|name| TensorInfo {
            name: name.into(),
            shape: vec![-1, 4],
            datatype: "Float32".into(),
        })
        .collect()
}

fn request(names: &[&str]) -> Vec<InferRequestedOutputTensor> {
    names
        .iter()
        .map(|name| InferRequestedOutputTensor {
            name: (*name).into(),
            ..Default::default()
        })
        .collect()
}

#[test]
fn requested_outputs_default_to_all_and_keep_their_order() {
    assert_eq!(
        requested_outputs(&[], &outputs()).expect("all"),
        ["scores", "boxes"]
    );
    assert_eq!(
        requested_outputs(&request(&["boxes"]), &outputs()).expect("one"),
        ["boxes"]
    );
}

#[test]
fn unknown_doubled_or_classification_outputs_are_refused() {
    let refused = |requested: Vec<InferRequestedOutputTensor>| match requested_outputs(
        &requested,
        &outputs(),
    ) {
        Err(Error::InvalidArgument(message)) => message,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    };
    assert_mentions(&refused(request(&["masks"])), &["'masks'", "scores, boxes"]);
    assert_mentions(&refused(request(&["boxes", "boxes"])), &["twice"]);
    let mut classified = request(&["scores"]);
    classified[0]
        .parameters
        .insert("classification".into(), InferParameter::default());
    assert_mentions(&refused(classified), &["classification"]);
}

#[test]
fn outputs_are_encoded_row_major_whatever_their_memory_layout() {
    // A column-major array: its logical (row-major) order differs from its memory order.
    let column_major = Array::from_shape_vec((2, 3).f(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0])
        .expect("shape")
        .into_dyn();
    let outputs: NamedTensors = vec![
        ("scores".into(), Tensor::from(column_major)),
        ("boxes".into(), Tensor::from(ArrayD::zeros(IxDyn(&[1, 4])))),
    ];
    let (headers, raw) = encode_outputs(&outputs, &["scores".into()]).expect("encoded");
    assert_eq!(headers.len(), 1);
    assert_eq!(headers[0].name, "scores");
    assert_eq!(headers[0].datatype, "FP32");
    assert_eq!(headers[0].shape, [2, 3]);
    check_raw_len("scores", &raw[0], 6).expect("6 values");
    let back = f32_from_le(&raw[0]);
    assert_eq!(back, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}
