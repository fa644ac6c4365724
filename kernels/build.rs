//! Build script of `quiver-kernels`: with the `cuda` feature, compiles every
//! `cuda/*.cu` to PTX with nvcc into `$OUT_DIR/<name>.ptx`, which `src/pool.rs` (and any
//! later custom kernel) embeds with `include_str!`. Without the feature it does nothing,
//! so the CPU build needs no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc` (or `$CUDA_ROOT`, `$CUDA_PATH`), else
//! `nvcc` on `PATH` (`scripts/install-cuda` provides one). The PTX targets
//! `compute_$CUDA_COMPUTE_CAP` (default 90, the H100/H200); a driver JIT-compiles it for
//! that architecture and newer, and loads it only if the driver's CUDA version is at least
//! nvcc's (see `docs/cuda.md`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

type BoxError = Box<dyn std::error::Error>;

fn main() -> Result<(), BoxError> {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_COMPUTE_CAP",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=cuda");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let nvcc = find_nvcc();
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_owned());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    if cap.is_empty() {
        return Err("CUDA_COMPUTE_CAP must be a compute capability such as 90".into());
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("a .cu file name that is not UTF-8")?;
        let ptx = out_dir.join(format!("{stem}.ptx"));
        compile(&nvcc, src, &ptx, &cap)?;
    }
    Ok(())
}

fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return nvcc.into();
    }
    for var in ["CUDA_HOME", "CUDA_ROOT", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let nvcc = Path::new(&root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, src: &Path, ptx: &Path, cap: &str) -> Result<(), BoxError> {
    let output = Command::new(nvcc)
        .arg("--ptx")
        .arg(format!("-arch=compute_{cap}"))
        .args(["-O3", "-std=c++17", "-o"])
        .arg(ptx)
        .arg(src)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} ({e}); the `cuda` feature needs the CUDA toolkit: \
                 run scripts/install-cuda and source .cuda/env.sh",
                nvcc.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(())
}
