//! Compiles the Open Inference Protocol's messages and Quiver's native
//! envelope with prost (messages only: the tonic service is generated in the
//! gateway, against these types). protoc comes from the `protoc-bin-vendored`
//! crate, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        // Tensor payloads decode into `Bytes` that share the frame's buffer.
        .bytes(["."])
        .compile_protos(
            &["proto/grpc_service.proto", "proto/native.proto"],
            &["proto"],
        )?;
    Ok(())
}
