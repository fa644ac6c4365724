//! Compiles the Open Inference Protocol schema (messages, and the
//! `GRPCInferenceService` server and client with tonic) and Quiver's native
//! envelope with prost. protoc comes from the `protoc-bin-vendored` crate, so
//! no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut config = prost_build::Config::new();
    config
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        // Tensor payloads decode into `Bytes` that share the frame's buffer.
        .bytes(["."]);
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for the end-to-end tests and the bench harness.
        .build_client(true)
        .compile_with_config(
            config,
            &["proto/grpc_service.proto", "proto/native.proto"],
            &["proto"],
        )?;
    Ok(())
}
