//! Arbitrary bytes decoded as Detect, Analyze and RecognizeAction requests and validated as the
//! server validates them, against the demo model set's manifest and the server's default limits.
//! ONNX Runtime is not needed: validation uses the manifest's head parameters and class counts.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use polyhead_proto::v1;
use polyhead_server::Config;
use polyhead_server::grpc::validate::Validator;
use polyhead_server::manifest::Manifest;
use prost::Message;

/// The tiny demo set's manifest, as `models/build_models.py` writes it.
const MANIFEST: &str = include_str!("../manifest.toml");

static VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    let manifest: Manifest = toml::from_str(MANIFEST).expect("the fuzz manifest parses");
    let labels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/labels");
    // The server's defaults: no flags (the environment's POLYHEAD_* variables still apply).
    let limits = Config::try_parse_from(["polyhead-fuzz"])
        .expect("default flags parse")
        .limits;
    Validator::from_manifest(&manifest, &labels, limits).expect("the fuzz manifest is valid")
});

fuzz_target!(|data: &[u8]| {
    // The first byte picks the message type; the rest is the encoded message.
    let Some((&pick, message)) = data.split_first() else {
        return;
    };
    let _ = match pick % 3 {
        0 => v1::DetectRequest::decode(message).map(|r| VALIDATOR.detect(r)),
        1 => v1::AnalyzeRequest::decode(message).map(|r| VALIDATOR.analyze(r)),
        _ => v1::RecognizeActionRequest::decode(message).map(|r| VALIDATOR.recognize_action(r)),
    };
});
