//! What the kernels' integration tests share.

use std::path::{Path, PathBuf};

/// `$QUIVER_MODELS_DIR/<family>` (else `<workspace>/models/<family>`), where a
/// script wrote test models and their `manifest.json`; a missing manifest
/// fails the test with the script to run.
pub fn generated_models(family: &str, what: &str, script: &str) -> PathBuf {
    let root = match std::env::var_os("QUIVER_MODELS_DIR") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"),
    };
    let dir = root.join(family);
    assert!(
        dir.join("manifest.json").is_file(),
        "no {what} in {}: run {script} (or set QUIVER_MODELS_DIR)",
        dir.display()
    );
    dir
}
