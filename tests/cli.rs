//! End to end through the `quiver` command line: `infer`, `config check`,
//! and a graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::{Server, quiver_bin};

const IDENTITY: &str = r#"
[[models]]
name = "identity"
kind = "identity"
"#;

/// Runs `quiver infer --model MODEL` against `server`, trusting `pin`, with
/// `body` on stdin.
fn run_infer(server: &Server, model: &str, pin: &str, body: &[u8]) -> std::process::Output {
    run_infer_with(server, model, pin, body, &[], None)
}

/// [`run_infer`] with `extra` arguments and `QUIVER_TOKEN` set to `env_token`
/// (unset when `None`, whatever the test's own environment holds).
fn run_infer_with(
    server: &Server,
    model: &str,
    pin: &str,
    body: &[u8],
    extra: &[&str],
    env_token: Option<&str>,
) -> std::process::Output {
    let mut command = Command::new(quiver_bin());
    command.env_remove("QUIVER_TOKEN");
    if let Some(token) = env_token {
        command.env("QUIVER_TOKEN", token);
    }
    let mut child = command
        .args(["infer", "--model", model, "--addr"])
        .arg(server.quic.to_string())
        .args(["--pin", pin])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn infer_reads_kserve_json_and_prints_the_json_response() {
    let server = Server::start(IDENTITY);
    let out = run_infer(
        &server,
        "identity",
        &server.fingerprint,
        br#"{"id": "42", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"], "42");
    assert_eq!(v["model_name"], "identity");
    assert_eq!(v["outputs"][0]["name"], "OUTPUT0");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([2, 2]));
    assert_eq!(
        v["outputs"][0]["data"],
        serde_json::json!([1.0, 2.0, 3.0, 4.0])
    );
    assert_eq!(v["parameters"]["quiver_path"], "local");
}

#[test]
fn infer_reports_an_error_status_on_stderr_and_exits_non_zero() {
    let server = Server::start(IDENTITY);
    let out = run_infer(
        &server,
        "missing",
        &server.fingerprint,
        br#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1]}]}"#,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn infer_with_a_wrong_pin_refuses_the_server() {
    let server = Server::start(IDENTITY);
    let wrong = vec!["00"; 32].join(":");
    let out = run_infer(
        &server,
        "identity",
        &wrong,
        br#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1]}]}"#,
    );
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn infer_sends_the_token_of_the_flag_or_of_quiver_token() {
    let server = Server::start(&format!(
        "[server]\nauth_tokens = [\"{}\"]\n{IDENTITY}",
        support::TOKEN
    ));
    let body =
        br#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [5]}]}"#;
    let pin = &server.fingerprint;

    let out = run_infer_with(&server, "identity", pin, body, &[], None);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let out = run_infer_with(&server, "identity", pin, body, &["--token", "wrong"], None);
    assert_eq!(out.status.code(), Some(3));

    for (extra, env) in [
        (&["--token", support::TOKEN][..], None),
        (&[][..], Some(support::TOKEN)),
        // The flag wins over the environment.
        (&["--token", support::TOKEN][..], Some("wrong")),
    ] {
        let out = run_infer_with(&server, "identity", pin, body, extra, env);
        assert!(
            out.status.success(),
            "{extra:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["outputs"][0]["data"], serde_json::json!([5.0]));
    }
}

#[test]
fn config_check_exits_0_on_valid_and_2_listing_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, IDENTITY).unwrap();
    let out = Command::new(quiver_bin())
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[models]]\nname = \"a\"\nkind = \"identity\"\nmax_batch_size = 0\n\n[[models]]\nname = \"b\"\nkind = \"identity\"\npriority_levels = 0\n",
    )
    .unwrap();
    let out = Command::new(quiver_bin())
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("models[0].max_batch_size"), "{stderr}");
    assert!(stderr.contains("models[1].priority_levels"), "{stderr}");

    // `serve` refuses the same file with the same exit code.
    let out = Command::new(quiver_bin())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn embedded_default_serves_identity_and_mlp_and_stops_on_sigterm() {
    let mut child = Command::new(quiver_bin())
        .args([
            "serve",
            "--quic-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--http-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines: Vec<String> = {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let ready = line == "quiver: ready";
            lines.push(line);
            if ready {
                break;
            }
        }
        lines
    };
    assert!(
        lines.iter().any(|l| l.contains("model 'identity'")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("model 'mlp'")), "{lines:?}");
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
