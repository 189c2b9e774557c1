//! The polyhead gRPC API (`polyhead.v1`), generated from `proto/polyhead/v1/*.proto`, and the
//! Open Inference Protocol (KServe v2, `inference`) that Triton and KServe clients speak.
//!
//! Every `bytes` field is a [`Bytes`]: a server decodes a request's image or video as a view of
//! the received message, without copying it, and a client can send the same bytes in many
//! requests without copying them for each.

pub use bytes::Bytes;

/// Messages and services of `polyhead.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("polyhead.v1");
}

/// Messages and services of the Open Inference Protocol (`inference.GRPCInferenceService`).
pub mod inference {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of every proto here (`polyhead.v1` and `inference`), for gRPC
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/polyhead_descriptor.bin"));
