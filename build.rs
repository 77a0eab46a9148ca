//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and writes the
//! descriptor set that server reflection serves.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // dealsift's own API, and the KServe v2 protocol served beside it.
    let protos = ["proto/dealsift/v1/dealsift.proto", "proto/inference/open_inference.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("dealsift_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
