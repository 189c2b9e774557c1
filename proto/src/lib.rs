//! The polyhead gRPC API (`polyhead.v1`), generated from `proto/polyhead/v1/*.proto`.

/// Messages and services of `polyhead.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("polyhead.v1");
}

/// Encoded `FileDescriptorSet` of every polyhead proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/polyhead_descriptor.bin"));
