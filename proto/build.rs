//! Compiles `polyhead/v1/*.proto` and the Open Inference Protocol's
//! `inference/grpc_predict_v2.proto` with the pure-Rust `protox` compiler (no `protoc` needed) and
//! writes the file descriptor set of both, which the server serves over reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "polyhead/v1/polyhead.proto",
    "inference/grpc_predict_v2.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("polyhead_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        // `bytes` fields as `Bytes`, not `Vec<u8>`: zero-copy decoding and cheap clones.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
