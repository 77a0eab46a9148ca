//! Generated gRPC types and the descriptor set served by reflection.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("dealsift.v1");

/// Encoded `FileDescriptorSet` of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dealsift_descriptor");
