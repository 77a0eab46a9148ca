//! Generated gRPC types and the descriptor set served by reflection.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("dealsift.v1");

/// The KServe Open Inference Protocol v2 (`proto/inference/open_inference.proto`).
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dealsift_descriptor");
