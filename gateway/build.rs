//! Generates the Open Inference Protocol's `GRPCInferenceService` server and
//! client with tonic, against the messages that `quiver-protocol` compiles
//! (`extern_path`), so there is one set of message types. protoc comes from
//! the `protoc-bin-vendored` crate, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../protocol/proto";
    println!("cargo:rerun-if-changed={proto}/grpc_service.proto");
    let mut config = prost_build::Config::new();
    config
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        .extern_path(".inference", "::quiver_protocol::proto::inference");
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for the upstream pool, the end-to-end tests and the
        // bench harness.
        .build_client(true)
        .compile_with_config(
            config,
            &[format!("{proto}/grpc_service.proto")],
            &[proto.to_string()],
        )?;
    Ok(())
}
