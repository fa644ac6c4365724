//! The public contract of `quiver-config`: defaults, the examples, and every
//! error with its exact path and message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quiver_config::{
    Config, ConfigError, FieldError, MlpDemo, Model, ModelKind, OnnxEngine, Precision, Routing,
    Server, Tls, Upstream, UpstreamProtocol,
};

/// One identity model: the smallest valid file.
const MINIMAL: &str = "[[models]]\nname = \"echo\"\nkind = \"identity\"\n";

fn errors(text: &str) -> Vec<FieldError> {
    match Config::parse(text) {
        Ok(config) => panic!("expected errors, parsed {config:#?}"),
        Err(error) => error.errors,
    }
}

fn error(path: &str, message: &str) -> FieldError {
    FieldError::new(path, message)
}

/// A minimal file with `line` added to the `[server]` table.
fn with_server(line: &str) -> String {
    format!("[server]\n{line}\n{MINIMAL}")
}

/// A minimal file with `line` added to its model.
fn with_model(line: &str) -> String {
    format!("{MINIMAL}{line}\n")
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn embedded_default_parses() {
    let config = Config::parse(Config::EMBEDDED_DEFAULT_TOML).unwrap();
    assert_eq!(config, Config::embedded_default());
    assert_eq!(config.server, Server::default());
    assert_eq!(config.tls, Tls::default());

    let mut mlp = Model::new("mlp", ModelKind::Mlp);
    mlp.demo = Some(MlpDemo {
        inputs: 16,
        hidden: vec![64],
        outputs: 4,
        activation: "relu".to_owned(),
        seed: 42,
    });
    assert_eq!(
        config.models,
        vec![Model::new("identity", ModelKind::Identity), mlp]
    );
    assert_eq!(config.model("mlp").unwrap().cuda_ordinal(), None);
}

#[test]
fn defaults_of_every_knob() {
    let config = Config::parse(MINIMAL).unwrap();
    let server = &config.server;
    assert_eq!(server.quic_listen, addr("0.0.0.0:4433"));
    assert_eq!(server.metrics_listen, Some(addr("0.0.0.0:8002")));
    assert_eq!(server.http_listen, Some(addr("0.0.0.0:8000")));
    assert_eq!(server.grpc_listen, Some(addr("0.0.0.0:8001")));
    assert!(server.auth_tokens.is_empty());
    assert!(server.auth_exempt_health);
    assert_eq!(server.max_frame_bytes, 16 * 1024 * 1024);
    assert_eq!(server.max_concurrent_streams, 256);
    assert_eq!(server.max_connections, 1024);
    assert_eq!(server.idle_timeout, Duration::from_secs(30));
    assert_eq!(server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(
        config.tls,
        Tls {
            cert: None,
            key: None,
            client_ca: None,
        }
    );

    let [model] = config.models.as_slice() else {
        panic!("one model expected: {:?}", config.models)
    };
    assert_eq!(model.name, "echo");
    assert_eq!(model.kind, ModelKind::Identity);
    assert_eq!(model.path, None);
    assert_eq!(model.demo, None);
    assert_eq!(model.device, "cpu");
    assert!(model.cpu_kernels);
    assert_eq!(model.max_batch_size, 32);
    assert_eq!(model.max_batch_tokens, 16384);
    assert_eq!(model.max_queue_delay, Duration::from_micros(2000));
    assert_eq!(model.queue_capacity, 1024);
    assert_eq!(model.priority_levels, 2);
    assert_eq!(model.default_timeout, Duration::from_millis(1000));
    assert_eq!(model.max_in_flight, 1);
    assert_eq!(model.inline_below, Duration::from_micros(50));
    assert_eq!(model.idle_spin, Duration::ZERO);
    assert_eq!(
        model.worst_case_queued_bytes(server.max_frame_bytes),
        32 << 30
    );

    let demo = Config::parse("[[models]]\nname = \"m\"\nkind = \"mlp\"\n[models.demo]\n").unwrap();
    assert_eq!(demo.models[0].demo, Some(MlpDemo::default()));
    assert_eq!(
        MlpDemo::default(),
        MlpDemo {
            inputs: 16,
            hidden: vec![64],
            outputs: 4,
            activation: "relu".to_owned(),
            seed: 42
        }
    );
}

#[test]
fn full_example_parses_and_holds_only_defaults() {
    let text = include_str!("../examples/full.toml");
    let config = Config::parse(text).unwrap();
    let mut mlp = Model::new("mlp", ModelKind::Mlp);
    mlp.demo = Some(MlpDemo::default());
    assert_eq!(
        config,
        Config {
            server: Server::default(),
            tls: Tls::default(),
            models: vec![mlp],
        }
    );
    assert_eq!(
        config.models[0].demo.as_ref().unwrap().parameter_count(),
        1348
    );
}

#[test]
fn every_knob_is_read() {
    let text = r#"
[server]
quic_listen = "127.0.0.1:9000"
metrics_listen = "[::1]:9100"
http_listen = "127.0.0.1:9080"
grpc_listen = "off"
https_listen = "127.0.0.1:9443"
grpcs_listen = "[::1]:9444"
auth_tokens = ["t0k3n", "second"]
auth_token_identities = ["spiffe://quiver.test/a", ""]
auth_exempt_health = false
max_frame_bytes = 2048
max_inflight_bytes = 2097152
max_concurrent_streams = 7
max_connections = 9
max_connections_per_source = 3
quic_retry_above_per_sec = 0
rate_limit_per_sec = 100
rate_limit_burst = 7
request_read_timeout_ms = 700
header_read_timeout_ms = 800
min_body_bytes_per_sec = 0
idle_timeout_ms = 1500
shutdown_grace_ms = 0

[tls]
cert = "c.pem"
key = "k.pem"
client_ca = "ca.pem"

[[models]]
name = "m-1.v2_x"
kind = "mlp"
path = "/models/m"
device = "cuda:3"
max_batch_size = 8
max_batch_tokens = 512
max_queue_delay_us = 0
queue_capacity = 16
priority_levels = 4
default_timeout_ms = 250
max_in_flight = 2
inline_below_us = 20
idle_spin_us = 0
unhealthy_after_failures = 5
rate_limit_per_sec = 40

[[models]]
name = "d"
kind = "mlp"
device = "cuda"
[models.demo]
inputs = 3
hidden = []
outputs = 1
activation = "none"
seed = 7
"#;
    let config = Config::parse(text).unwrap();
    assert_eq!(
        config.server,
        Server {
            quic_listen: addr("127.0.0.1:9000"),
            metrics_listen: Some(addr("[::1]:9100")),
            http_listen: Some(addr("127.0.0.1:9080")),
            grpc_listen: None,
            https_listen: Some(addr("127.0.0.1:9443")),
            grpcs_listen: Some(addr("[::1]:9444")),
            auth_tokens: vec!["t0k3n".to_owned(), "second".to_owned()],
            auth_token_identities: vec!["spiffe://quiver.test/a".to_owned(), String::new()],
            auth_exempt_health: false,
            max_frame_bytes: 2048,
            max_inflight_bytes: 2 << 20,
            max_concurrent_streams: 7,
            max_connections: 9,
            max_connections_per_source: 3,
            quic_retry_above_per_sec: 0,
            idle_timeout: Duration::from_millis(1500),
            request_read_timeout: Duration::from_millis(700),
            header_read_timeout: Duration::from_millis(800),
            min_body_bytes_per_sec: 0,
            shutdown_grace: Duration::ZERO,
            rate_limit_per_sec: 100,
            rate_limit_burst: Some(7),
            model_repository: None,
            model_control: quiver_config::ModelControl::None,
            repository_poll: Server::DEFAULT_REPOSITORY_POLL,
        }
    );
    assert_eq!(
        config.tls,
        Tls {
            cert: Some(PathBuf::from("c.pem")),
            key: Some(PathBuf::from("k.pem")),
            client_ca: Some(PathBuf::from("ca.pem")),
        }
    );
    assert_eq!(
        config.models[0],
        Model {
            name: "m-1.v2_x".to_owned(),
            kind: ModelKind::Mlp,
            path: Some(PathBuf::from("/models/m")),
            demo: None,
            device: "cuda:3".to_owned(),
            cpu_kernels: true,
            precision: Precision::Fp32,
            auto_truncate: true,
            length_grouping: false,
            max_length_ratio: 2.0,
            output_margin: false,
            engine: OnnxEngine::Auto,
            max_batch_size: 8,
            max_batch_tokens: 512,
            max_queue_delay: Duration::ZERO,
            queue_capacity: 16,
            priority_levels: 4,
            default_timeout: Duration::from_millis(250),
            max_in_flight: 2,
            inline_below: Duration::from_micros(20),
            idle_spin: Duration::ZERO,
            unhealthy_after_failures: 5,
            rate_limit_per_sec: Some(40),
            rate_limit_burst: None,
            routing: Routing::LocalFirst,
            upstream: None,
            version_policy: quiver_config::VersionPolicy::Latest(1),
            devices: Vec::new(),
            placement: quiver_config::Placement::Earliest,
            sim: None,
        }
    );
    assert_eq!(config.models[0].cuda_ordinal(), Some(3));
    assert_eq!(config.models[1].cuda_ordinal(), Some(0));
    assert_eq!(
        config.models[1].demo,
        Some(MlpDemo {
            inputs: 3,
            hidden: vec![],
            outputs: 1,
            activation: "none".to_owned(),
            seed: 7,
        })
    );
    assert_eq!(ModelKind::Mlp.as_str(), "mlp");
    assert_eq!(ModelKind::Identity.to_string(), "identity");
}

#[test]
fn range_errors_name_their_exact_path() {
    // (file, path, message): both ends of each range, in the file's unit.
    let cases: Vec<(String, &str, &str)> = vec![
        (
            with_server("max_frame_bytes = 1023"),
            "server.max_frame_bytes",
            "must be between 1024 and 1073741824, got 1023",
        ),
        (
            with_server("max_frame_bytes = 1073741825"),
            "server.max_frame_bytes",
            "must be between 1024 and 1073741824, got 1073741825",
        ),
        (
            with_server("max_concurrent_streams = 0"),
            "server.max_concurrent_streams",
            "must be between 1 and 65535, got 0",
        ),
        (
            with_server("max_concurrent_streams = 65536"),
            "server.max_concurrent_streams",
            "must be between 1 and 65535, got 65536",
        ),
        (
            with_server("max_connections = 0"),
            "server.max_connections",
            "must be between 1 and 1048576, got 0",
        ),
        (
            with_server("max_connections = -5"),
            "server.max_connections",
            "must be between 1 and 1048576, got -5",
        ),
        (
            with_server("idle_timeout_ms = 0"),
            "server.idle_timeout_ms",
            "must be between 1 and 3600000, got 0",
        ),
        (
            with_server("header_read_timeout_ms = 0"),
            "server.header_read_timeout_ms",
            "must be between 1 and 3600000, got 0",
        ),
        (
            with_server("min_body_bytes_per_sec = 1073741825"),
            "server.min_body_bytes_per_sec",
            "must be between 0 and 1073741824, got 1073741825",
        ),
        (
            with_server("shutdown_grace_ms = 600001"),
            "server.shutdown_grace_ms",
            "must be between 0 and 600000, got 600001",
        ),
        (
            with_server("shutdown_grace_ms = -1"),
            "server.shutdown_grace_ms",
            "must be between 0 and 600000, got -1",
        ),
        (
            with_model("max_batch_size = 0"),
            "models[0].max_batch_size",
            "must be between 1 and 4096, got 0",
        ),
        (
            with_model("max_batch_size = 4097"),
            "models[0].max_batch_size",
            "must be between 1 and 4096, got 4097",
        ),
        (
            with_model("max_batch_tokens = 0"),
            "models[0].max_batch_tokens",
            "must be between 1 and 16777216, got 0",
        ),
        (
            with_model("max_batch_tokens = 16777217"),
            "models[0].max_batch_tokens",
            "must be between 1 and 16777216, got 16777217",
        ),
        (
            with_model("max_queue_delay_us = 10000001"),
            "models[0].max_queue_delay_us",
            "must be between 0 and 10000000, got 10000001",
        ),
        (
            with_model("max_queue_delay_us = -1"),
            "models[0].max_queue_delay_us",
            "must be between 0 and 10000000, got -1",
        ),
        (
            with_model("queue_capacity = 0"),
            "models[0].queue_capacity",
            "must be between 1 and 1048576, got 0",
        ),
        (
            with_model("queue_capacity = 1048577"),
            "models[0].queue_capacity",
            "must be between 1 and 1048576, got 1048577",
        ),
        (
            with_model("priority_levels = 0"),
            "models[0].priority_levels",
            "must be between 1 and 16, got 0",
        ),
        (
            with_model("priority_levels = 17"),
            "models[0].priority_levels",
            "must be between 1 and 16, got 17",
        ),
        (
            with_model("priority_levels = 256"),
            "models[0].priority_levels",
            "must be between 1 and 16, got 256",
        ),
        (
            with_model("default_timeout_ms = 0"),
            "models[0].default_timeout_ms",
            "must be between 1 and 3600000, got 0",
        ),
        (
            with_model("default_timeout_ms = 3600001"),
            "models[0].default_timeout_ms",
            "must be between 1 and 3600000, got 3600001",
        ),
        (
            with_model("max_in_flight = 0"),
            "models[0].max_in_flight",
            "must be between 1 and 8, got 0",
        ),
        (
            with_model("unhealthy_after_failures = 0"),
            "models[0].unhealthy_after_failures",
            "must be between 1 and 1000, got 0",
        ),
        (
            with_model("max_in_flight = 9"),
            "models[0].max_in_flight",
            "must be between 1 and 8, got 9",
        ),
        (
            with_model("inline_below_us = 1001"),
            "models[0].inline_below_us",
            "must be between 0 and 1000, got 1001",
        ),
        (
            with_model("idle_spin_us = -1"),
            "models[0].idle_spin_us",
            "must be between 0 and 1000, got -1",
        ),
    ];
    for (text, path, message) in cases {
        assert_eq!(errors(&text), vec![error(path, message)], "file:\n{text}");
    }
    // The ends themselves are accepted.
    for line in [
        "max_frame_bytes = 1024",
        "max_frame_bytes = 1073741824",
        "max_concurrent_streams = 65535",
        "shutdown_grace_ms = 0",
        "idle_timeout_ms = 3600000",
    ] {
        Config::parse(&with_server(line)).unwrap();
    }
    for line in [
        "max_batch_size = 1",
        "max_batch_size = 4096\nmax_batch_tokens = 16777216",
        "max_queue_delay_us = 0",
        "max_queue_delay_us = 10000000",
        "priority_levels = 16",
        "max_in_flight = 8",
        "inline_below_us = 0\nidle_spin_us = 1000",
        "default_timeout_ms = 3600000",
    ] {
        Config::parse(&with_model(line)).unwrap();
    }
}

#[test]
fn the_path_counts_models() {
    let text =
        format!("{MINIMAL}[[models]]\nname = \"b\"\nkind = \"identity\"\nmax_batch_size = 0\n");
    assert_eq!(
        errors(&text),
        vec![error(
            "models[1].max_batch_size",
            "must be between 1 and 4096, got 0"
        )]
    );
}

#[test]
fn several_errors_in_one_file_are_all_reported() {
    let text = r#"
[server]
quic_listen = "nowhere"
max_frame_bytes = 1

[tls]
cert = "cert.pem"

[[models]]
name = "a"
kind = "mlp"
device = "gpu"
max_batch_size = 0

[[models]]
name = "a"
kind = "identity"
priority_levels = 99
"#;
    let error = Config::parse(text).unwrap_err();
    assert_eq!(
        error.paths(),
        vec![
            "server.quic_listen",
            "server.max_frame_bytes",
            "tls.key",
            "models[0].max_batch_size",
            "models[0].device",
            "models[0]",
            "models[1].priority_levels",
            "models[1].name",
        ],
        "{error}"
    );
    // Display: one `path: message` per line.
    let shown = error.to_string();
    assert_eq!(shown.lines().count(), 8, "{shown}");
    assert!(
        shown.contains("models[0].max_batch_size: must be between 1 and 4096, got 0\n"),
        "{shown}"
    );
    assert!(
        shown.ends_with("models[1].name: duplicate of models[0].name \"a\""),
        "{shown}"
    );
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let cases = [
        (
            format!("[server]\nport = 1\n{MINIMAL}"),
            "server.port",
            "unknown field `port`",
            2,
        ),
        (
            with_model("batch = 4"),
            "models[0].batch",
            "unknown field `batch`",
            4,
        ),
        (
            format!(
                "{MINIMAL}[[models]]\nname = \"m\"\nkind = \"mlp\"\n[models.demo]\nlayers = 2\n"
            ),
            "models[1].demo.layers",
            "unknown field `layers`",
            8,
        ),
        (
            format!("title = \"x\"\n{MINIMAL}"),
            "title",
            "unknown field `title`",
            1,
        ),
        // The old spelling of a duration, without its unit, is unknown too.
        (
            with_model("max_queue_delay = 5"),
            "models[0].max_queue_delay",
            "unknown field `max_queue_delay`",
            4,
        ),
    ];
    for (text, path, message, line) in cases {
        let found = errors(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, path, "{found:?}");
        assert!(found[0].message.starts_with(message), "{found:?}");
        assert!(
            found[0]
                .message
                .ends_with(&format!("(line {line}, column 1)")),
            "{found:?}"
        );
    }
}

#[test]
fn type_errors_give_one_error_with_path_and_line() {
    let found = errors(&with_model("max_batch_size = \"big\""));
    assert_eq!(
        found,
        vec![error(
            "models[0].max_batch_size",
            "invalid type: string \"big\", expected i64 (line 4, column 18)"
        )]
    );
    let found =
        errors("[[models]]\nname = \"m\"\nkind = \"mlp\"\n[models.demo]\nhidden = [8, 1.5]\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "models[0].demo.hidden[1]", "{found:?}");
    assert!(
        found[0].message.ends_with("(line 5, column 14)"),
        "{found:?}"
    );
}

#[test]
fn syntax_error_is_reported_with_its_location() {
    let found = errors("[server]\nquic_listen = \n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "line 2, column 15", "{found:?}");
    assert!(!found[0].message.is_empty());

    let found = errors("[[models]\nname = \"x\"\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].path.starts_with("line 1, column "), "{found:?}");
}

#[test]
fn duplicate_model_names() {
    let text = format!("{MINIMAL}{MINIMAL}{MINIMAL}");
    assert_eq!(
        errors(&text),
        vec![
            error("models[1].name", "duplicate of models[0].name \"echo\""),
            error("models[2].name", "duplicate of models[0].name \"echo\""),
        ]
    );
}

#[test]
fn cert_and_key_come_together() {
    assert_eq!(
        errors(&format!("[tls]\ncert = \"c.pem\"\n{MINIMAL}")),
        vec![error("tls.key", "required when tls.cert is set")]
    );
    assert_eq!(
        errors(&format!("[tls]\nkey = \"k.pem\"\n{MINIMAL}")),
        vec![error("tls.cert", "required when tls.key is set")]
    );
    let found = errors(&format!("[tls]\ncert = \"\"\nkey = \"k.pem\"\n{MINIMAL}"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "tls.cert");
}

#[test]
fn model_kind_rules() {
    assert_eq!(
        errors("[[models]]\nname = \"m\"\nkind = \"mlp\"\n"),
        vec![error(
            "models[0]",
            "kind \"mlp\" needs `path` (a model directory) or `[models.demo]`"
        )]
    );
    assert_eq!(
        errors("[[models]]\nname = \"m\"\nkind = \"mlp\"\npath = \"/m\"\n[models.demo]\n"),
        vec![error(
            "models[0]",
            "`path` and `[models.demo]` exclude each other: give one"
        )]
    );
    assert_eq!(
        errors(&format!("{MINIMAL}[models.demo]\n")),
        vec![error("models[0].demo", "only for kind \"mlp\"")]
    );
    assert_eq!(
        errors(&with_model("path = \"/models/x\"")),
        vec![error(
            "models[0].path",
            "kind \"identity\" loads no model directory"
        )]
    );
    assert_eq!(
        errors("[[models]]\nname = \"m\"\nkind = \"bert\"\n"),
        vec![error(
            "models[0].kind",
            "must be \"identity\", \"mlp\", \"embedding\", \"trees\" or \"onnx\", got \"bert\""
        )]
    );
    assert_eq!(
        errors("[[models]]\n"),
        vec![
            error("models[0].name", "required"),
            error(
                "models[0].kind",
                "required: \"identity\", \"mlp\", \"embedding\", \"trees\" or \"onnx\""
            ),
        ]
    );
}

#[test]
fn trees_needs_a_path_and_alone_takes_output_margin() {
    let trees = "[[models]]\nname = \"fraud\"\nkind = \"trees\"\npath = \"/m/model.json\"\n";
    let config = Config::parse(trees).unwrap();
    assert_eq!(config.models[0].kind, ModelKind::Trees);
    assert_eq!(ModelKind::from_name("trees"), Some(ModelKind::Trees));
    assert!(!config.models[0].output_margin);
    let margin = Config::parse(&format!("{trees}output_margin = true\n")).unwrap();
    assert!(margin.models[0].output_margin);
    assert_eq!(
        errors("[[models]]\nname = \"fraud\"\nkind = \"trees\"\n"),
        vec![error(
            "models[0].path",
            "required for kind \"trees\" (an XGBoost JSON or LightGBM text model file)"
        )]
    );
    assert_eq!(
        errors(&with_model("output_margin = true")),
        vec![error("models[0].output_margin", "only for kind \"trees\"")]
    );
    let typed = errors(&format!("{trees}output_margin = 1\n"));
    assert_eq!(typed.len(), 1, "{typed:?}");
    assert_eq!(typed[0].path, "models[0].output_margin", "{typed:?}");
}

#[test]
fn onnx_needs_a_path_and_takes_no_other_kinds_knobs() {
    let onnx = "[[models]]\nname = \"classifier\"\nkind = \"onnx\"\npath = \"/m/model.onnx\"\n";
    let config = Config::parse(onnx).unwrap();
    assert_eq!(config.models[0].kind, ModelKind::Onnx);
    assert_eq!(ModelKind::from_name("onnx"), Some(ModelKind::Onnx));
    assert_eq!(ModelKind::Onnx.as_str(), "onnx");
    assert_eq!(config.models[0].path, Some(PathBuf::from("/m/model.onnx")));
    assert_eq!(
        errors("[[models]]\nname = \"classifier\"\nkind = \"onnx\"\n"),
        vec![error(
            "models[0].path",
            "required for kind \"onnx\" (a .onnx file, or a directory with model.onnx)"
        )]
    );
    assert_eq!(
        errors(&format!(
            "{onnx}output_margin = true\ncpu_kernels = false\n"
        )),
        vec![
            error("models[0].cpu_kernels", "only for kind \"embedding\""),
            error("models[0].output_margin", "only for kind \"trees\""),
        ]
    );
    assert_eq!(
        errors(&format!(
            "{onnx}[models.demo]\ninputs = 4\nhidden = []\noutputs = 2\n"
        )),
        vec![error("models[0].demo", "only for kind \"mlp\"")]
    );
}

#[test]
fn onnx_takes_an_engine_auto_by_default_onnxruntime_on_the_cpu_only() {
    let onnx = "[[models]]\nname = \"classifier\"\nkind = \"onnx\"\npath = \"/m/model.onnx\"\n";
    assert_eq!(
        Config::parse(onnx).unwrap().models[0].engine,
        OnnxEngine::Auto
    );
    for engine in [
        OnnxEngine::Auto,
        OnnxEngine::OnnxRuntime,
        OnnxEngine::Candle,
    ] {
        let config = Config::parse(&format!("{onnx}engine = \"{}\"\n", engine.as_str())).unwrap();
        assert_eq!(config.models[0].engine, engine);
        assert_eq!(OnnxEngine::from_name(engine.as_str()), Some(engine));
    }
    assert_eq!(
        errors(&format!("{onnx}engine = \"tract\"\n")),
        vec![error(
            "models[0].engine",
            "must be \"auto\", \"onnxruntime\" or \"candle\", got \"tract\""
        )]
    );
    assert_eq!(
        errors(&with_model("engine = \"candle\"")),
        vec![error("models[0].engine", "only for kind \"onnx\"")]
    );
    // candle-onnx runs the graph on a GPU; ONNX Runtime is served on the CPU only.
    assert!(Config::parse(&format!("{onnx}engine = \"candle\"\ndevice = \"cuda:1\"\n")).is_ok());
    assert!(Config::parse(&format!("{onnx}engine = \"auto\"\ndevice = \"cuda:1\"\n")).is_ok());
    assert_eq!(
        errors(&format!(
            "{onnx}engine = \"onnxruntime\"\ndevices = [\"cpu\", \"cuda:1\"]\n"
        )),
        vec![error(
            "models[0].engine",
            "\"onnxruntime\" runs on the cpu only, not on \"cuda:1\"; use \"auto\" or \"candle\""
        )]
    );
    let typed = errors(&format!("{onnx}engine = true\n"));
    assert_eq!(typed.len(), 1, "{typed:?}");
    assert_eq!(typed[0].path, "models[0].engine", "{typed:?}");
}

#[test]
fn auto_truncate_is_an_embedding_knob_on_by_default() {
    let embedding = "[[models]]\nname = \"e\"\nkind = \"embedding\"\npath = \"/m\"\n";
    assert!(Config::parse(embedding).unwrap().models[0].auto_truncate);
    let off = Config::parse(&format!("{embedding}auto_truncate = false\n")).unwrap();
    assert!(!off.models[0].auto_truncate);
    assert_eq!(
        errors(&with_model("auto_truncate = false")),
        vec![error(
            "models[0].auto_truncate",
            "only for kind \"embedding\""
        )]
    );
    let typed = errors(&format!("{embedding}auto_truncate = \"no\"\n"));
    assert_eq!(typed.len(), 1, "{typed:?}");
    assert_eq!(typed[0].path, "models[0].auto_truncate", "{typed:?}");
}

#[test]
fn length_grouping_is_an_embedding_knob_with_a_bounded_ratio() {
    let embedding = "[[models]]\nname = \"e\"\nkind = \"embedding\"\npath = \"/m\"\n";
    let default = &Config::parse(embedding).unwrap().models[0];
    assert!(!default.length_grouping);
    assert!((default.max_length_ratio - 2.0).abs() < f64::EPSILON);
    let set = Config::parse(&format!(
        "{embedding}length_grouping = true\nmax_length_ratio = 1.5\n"
    ))
    .unwrap();
    assert!(set.models[0].length_grouping);
    assert!((set.models[0].max_length_ratio - 1.5).abs() < f64::EPSILON);
    assert_eq!(
        errors(&with_model(
            "length_grouping = true\nmax_length_ratio = 3.0"
        )),
        vec![
            error("models[0].length_grouping", "only for kind \"embedding\""),
            error("models[0].max_length_ratio", "only for kind \"embedding\""),
        ]
    );
    for (bad, shown) in [("0.5", "0.5"), ("17.0", "17"), ("nan", "NaN")] {
        assert_eq!(
            errors(&format!("{embedding}max_length_ratio = {bad}\n")),
            vec![error(
                "models[0].max_length_ratio",
                &format!("must be in 1.0..=16.0, got {shown}"),
            )],
            "{bad}"
        );
    }
    let whole = Config::parse(&format!("{embedding}max_length_ratio = 3\n")).unwrap();
    assert!((whole.models[0].max_length_ratio - 3.0).abs() < f64::EPSILON);
    let typed = errors(&format!("{embedding}max_length_ratio = \"2\"\n"));
    assert_eq!(typed.len(), 1, "{typed:?}");
    assert_eq!(typed[0].path, "models[0].max_length_ratio", "{typed:?}");
}

#[test]
fn cpu_kernels_is_an_embedding_knob() {
    let embedding = "[[models]]\nname = \"e\"\nkind = \"embedding\"\npath = \"/m\"\n";
    assert!(Config::parse(embedding).unwrap().models[0].cpu_kernels);
    for (line, on) in [("cpu_kernels = false", false), ("cpu_kernels = true", true)] {
        let config = Config::parse(&format!("{embedding}{line}\n")).unwrap();
        assert_eq!(config.models[0].cpu_kernels, on, "{line}");
    }
    // Also read (and ignored by the model) on a cuda device, so one file can switch devices.
    let cuda = Config::parse(&format!(
        "{embedding}device = \"cuda\"\ncpu_kernels = false\n"
    ));
    assert!(!cuda.unwrap().models[0].cpu_kernels);
    assert_eq!(
        errors(&with_model("cpu_kernels = false")),
        vec![error(
            "models[0].cpu_kernels",
            "only for kind \"embedding\""
        )]
    );
    let typed = errors(&format!("{embedding}cpu_kernels = 1\n"));
    assert_eq!(typed.len(), 1, "{typed:?}");
    assert_eq!(typed[0].path, "models[0].cpu_kernels", "{typed:?}");
    assert!(typed[0].message.contains("expected a boolean"), "{typed:?}");
}

#[test]
fn precision_is_an_embedding_knob_and_int8_needs_the_cpu_kernels() {
    let embedding = "[[models]]\nname = \"e\"\nkind = \"embedding\"\npath = \"/m\"\n";
    assert_eq!(
        Config::parse(embedding).unwrap().models[0].precision,
        Precision::Fp32
    );
    for (line, want) in [
        ("precision = \"fp32\"", Precision::Fp32),
        ("precision = \"int8\"", Precision::Int8),
    ] {
        let config = Config::parse(&format!("{embedding}{line}\n")).unwrap();
        assert_eq!(config.models[0].precision, want, "{line}");
        assert_eq!(format!("precision = \"{}\"", want.as_str()), line);
    }
    let precision = "models[0].precision";
    assert_eq!(
        errors(&format!("{embedding}precision = \"int4\"\n")),
        vec![error(
            precision,
            "must be \"fp32\" or \"int8\", got \"int4\""
        )]
    );
    assert_eq!(
        errors(&with_model("precision = \"int8\"")),
        vec![error(precision, "only for kind \"embedding\"")]
    );
    // fp32 is fine anywhere an embedding runs; int8 only on the CPU kernels.
    for extra in ["device = \"cuda\"", "cpu_kernels = false"] {
        assert!(Config::parse(&format!("{embedding}{extra}\nprecision = \"fp32\"\n")).is_ok());
    }
    let int8 = format!("{embedding}precision = \"int8\"\n");
    assert_eq!(
        errors(&format!("{int8}cpu_kernels = false\n")),
        vec![error(
            precision,
            "\"int8\" runs on Quiver's CPU kernels: it needs cpu_kernels = true"
        )]
    );
    for devices in ["device = \"cuda:1\"", "devices = [\"cpu\", \"cuda:0\"]"] {
        assert_eq!(
            errors(&format!("{int8}{devices}\n")),
            vec![error(
                precision,
                "\"int8\" runs on the CPU kernels only, not on a cuda device"
            )],
            "{devices}"
        );
    }
    assert!(
        Config::parse(&format!(
            "{int8}devices = [\"cpu\", \"sim:0\"]\n[models.sim]\n"
        ))
        .is_ok()
    );
    let typed = errors(&format!("{embedding}precision = 8\n"));
    assert_eq!(typed.len(), 1, "{typed:?}");
    assert_eq!(typed[0].path, precision, "{typed:?}");
}

#[test]
fn embedding_models_need_a_path_and_no_demo() {
    let config = Config::parse(
        "[[models]]\nname = \"minilm\"\nkind = \"embedding\"\npath = \"models/all-MiniLM-L6-v2\"\n",
    )
    .unwrap();
    assert_eq!(config.models[0].kind, ModelKind::Embedding);
    assert_eq!(config.models[0].kind.as_str(), "embedding");
    assert_eq!(
        ModelKind::from_name("embedding"),
        Some(ModelKind::Embedding)
    );
    assert_eq!(
        config.models[0].path.as_deref(),
        Some(std::path::Path::new("models/all-MiniLM-L6-v2"))
    );
    assert_eq!(
        errors("[[models]]\nname = \"e\"\nkind = \"embedding\"\n"),
        vec![error(
            "models[0].path",
            "required for kind \"embedding\" (a model directory)"
        )]
    );
    assert_eq!(
        errors("[[models]]\nname = \"e\"\nkind = \"embedding\"\npath = \"/m\"\n[models.demo]\n"),
        vec![error("models[0].demo", "only for kind \"mlp\"")]
    );
}

#[test]
fn at_least_one_model() {
    let want = vec![error(
        "models",
        "at least one model is required (a [[models]] table, or server.model_repository)",
    )];
    assert_eq!(errors(""), want);
    assert_eq!(errors("[server]\n"), want);
    assert_eq!(errors("models = []\n"), want);
}

#[test]
fn model_names() {
    let long = "n".repeat(128);
    Config::parse(&format!(
        "[[models]]\nname = \"{long}\"\nkind = \"identity\"\n"
    ))
    .unwrap();
    for bad in ["", "a b", "a/b", "ü", ".."] {
        let found = errors(&format!(
            "[[models]]\nname = \"{bad}\"\nkind = \"identity\"\n"
        ));
        assert_eq!(found.len(), 1, "{bad:?}: {found:?}");
        assert_eq!(found[0].path, "models[0].name", "{bad:?}");
    }
    let too_long = "n".repeat(129);
    let found = errors(&format!(
        "[[models]]\nname = \"{too_long}\"\nkind = \"identity\"\n"
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].message.starts_with("must be 1 to 128 of"),
        "{found:?}"
    );
}

#[test]
fn device_strings() {
    for good in ["cpu", "cuda", "cuda:0", "cuda:12"] {
        Config::parse(&with_model(&format!("device = \"{good}\""))).unwrap();
    }
    for bad in [
        "gpu",
        "CPU",
        "cuda:",
        "cuda:x",
        "cuda:-1",
        "cuda:+1",
        "cuda:99999999999",
        "cuda0",
        " cpu",
    ] {
        assert_eq!(
            errors(&with_model(&format!("device = \"{bad}\""))),
            vec![error(
                "models[0].device",
                &format!("must be \"cpu\", \"cuda\", \"cuda:N\" or \"sim:N\", got \"{bad}\"")
            )],
            "{bad:?}"
        );
    }
}

#[test]
fn socket_addresses() {
    for bad in ["4433", "localhost:4433", "0.0.0.0", "0.0.0.0:99999", ""] {
        let found = errors(&with_server(&format!("quic_listen = \"{bad}\"")));
        assert_eq!(found.len(), 1, "{bad:?}: {found:?}");
        assert_eq!(found[0].path, "server.quic_listen", "{bad:?}");
        assert!(
            found[0].message.starts_with(&format!(
                "must be an IP address and port such as \"0.0.0.0:4433\", got \"{bad}\""
            )),
            "{found:?}"
        );
    }
    let found = errors(&with_server("metrics_listen = \"on\""));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "server.metrics_listen");
    let config = Config::parse(&with_server("quic_listen = \"[::]:443\"")).unwrap();
    assert_eq!(config.server.quic_listen, addr("[::]:443"));
}

#[test]
fn metrics_off_disables_the_endpoint() {
    for off in ["off", ""] {
        let config = Config::parse(&with_server(&format!("metrics_listen = \"{off}\""))).unwrap();
        assert_eq!(config.server.metrics_listen, None, "{off:?}");
    }
    let config = Config::parse(&with_server("metrics_listen = \"127.0.0.1:9102\"")).unwrap();
    assert_eq!(config.server.metrics_listen, Some(addr("127.0.0.1:9102")));
}

#[test]
fn http_and_grpc_listeners_parse_or_turn_off() {
    for key in ["http_listen", "grpc_listen"] {
        let config = Config::parse(&with_server(&format!("{key} = \"off\""))).unwrap();
        let listen = if key == "http_listen" {
            config.server.http_listen
        } else {
            config.server.grpc_listen
        };
        assert_eq!(listen, None, "{key}");
        let found = errors(&with_server(&format!("{key} = \"8000\"")));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, format!("server.{key}"));
        assert!(found[0].message.contains("or \"off\""), "{found:?}");
    }
}

#[test]
fn auth_tokens_must_be_visible_ascii() {
    let found = errors(&with_server(
        "auth_tokens = [\"good\", \"\", \"has space\"]",
    ));
    assert_eq!(
        found.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        vec!["server.auth_tokens[1]", "server.auth_tokens[2]"],
        "{found:?}"
    );
    let config = Config::parse(&with_server("auth_tokens = [\"good\"]")).unwrap();
    assert_eq!(config.server.auth_tokens, vec!["good".to_owned()]);
    assert!(config.validate().is_ok());
}

#[test]
fn batch_tokens_cover_the_batch_rows() {
    assert_eq!(
        errors(&with_model("max_batch_size = 64\nmax_batch_tokens = 63")),
        vec![error(
            "models[0].max_batch_tokens",
            "must be at least max_batch_size (64), got 63"
        )]
    );
    // A bad max_batch_size is reported alone, not compared with a stand-in.
    assert_eq!(
        errors(&with_model("max_batch_size = -1\nmax_batch_tokens = 8")),
        vec![error(
            "models[0].max_batch_size",
            "must be between 1 and 4096, got -1"
        )]
    );
}

#[test]
fn demo_weights_are_checked() {
    let demo =
        |body: &str| format!("[[models]]\nname = \"m\"\nkind = \"mlp\"\n[models.demo]\n{body}\n");
    assert_eq!(
        errors(&demo("activation = \"swish\"")),
        vec![error(
            "models[0].demo.activation",
            "must be one of relu, gelu, tanh, sigmoid, none, got \"swish\""
        )]
    );
    assert_eq!(
        errors(&demo("inputs = 0\nhidden = [8, 0, 70000]\nseed = -3")),
        vec![
            error(
                "models[0].demo.hidden[1]",
                "must be between 1 and 65536, got 0"
            ),
            error(
                "models[0].demo.hidden[2]",
                "must be between 1 and 65536, got 70000"
            ),
            error(
                "models[0].demo.inputs",
                "must be between 1 and 65536, got 0"
            ),
            error(
                "models[0].demo.seed",
                "must be between 0 and 9223372036854775807, got -3"
            ),
        ]
    );
    let found = errors(&demo(&format!("hidden = [{}]", ["1"; 17].join(", "))));
    assert_eq!(
        found,
        vec![error("models[0].demo.hidden", "at most 16 layers, got 17")]
    );
    let found = errors(&demo("inputs = 65536\nhidden = [65536]"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "models[0].demo");
    assert!(found[0].message.contains("parameters"), "{found:?}");
}

#[test]
fn validate_holds_a_changed_config_to_the_same_rules() {
    let mut config = Config::embedded_default();
    assert_eq!(config.validate(), Ok(()));
    config.server.max_frame_bytes = 10;
    config.models[1].max_batch_size = 0;
    config.models[1].max_queue_delay = Duration::from_secs(11);
    config.models[1].device = "tpu".to_owned();
    config.models[0].name = "mlp".to_owned();
    config.tls.key = Some(PathBuf::from("k.pem"));
    let error = config.validate().unwrap_err();
    assert_eq!(
        error.paths(),
        vec![
            "server.max_frame_bytes",
            "tls.cert",
            "models[1].device",
            "models[1].max_batch_size",
            "models[1].max_queue_delay_us",
            "models[1].name",
        ],
        "{error}"
    );
}

#[test]
fn from_file_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quiver.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    assert_eq!(
        Config::from_file(&path).unwrap(),
        Config::parse(MINIMAL).unwrap()
    );

    std::fs::write(&path, with_model("max_in_flight = 0")).unwrap();
    assert_eq!(
        Config::from_file(&path).unwrap_err().paths(),
        vec!["models[0].max_in_flight"]
    );
}

#[test]
fn from_file_on_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let ConfigError { errors } = Config::from_file(&path).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "<file>");
    assert!(errors[0].message.contains("absent.toml"), "{errors:?}");

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    Config::from_file(&examples.join("default.toml")).unwrap();
    Config::from_file(&examples.join("full.toml")).unwrap();
}

#[test]
fn routing_defaults_to_local_first_without_upstreams() {
    let config = Config::parse(MINIMAL).unwrap();
    assert_eq!(config.models[0].routing, Routing::LocalFirst);
    assert_eq!(config.models[0].upstream, None);
}

#[test]
fn the_overflow_examples_parse_into_their_pools() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let gateway = Config::from_file(&examples.join("overflow.toml")).unwrap();
    let mlp = gateway.model("mlp").unwrap();
    assert_eq!(mlp.routing, Routing::LocalFirst);
    let up = mlp.upstream.as_ref().unwrap();
    let names: Vec<String> = up.endpoints.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["grpc://127.0.0.1:9001", "grpc://127.0.0.1:9101"]);
    assert_eq!(up.eject_after, Upstream::DEFAULT_EJECT_AFTER);
    let identity = gateway.model("identity").unwrap();
    let up = identity.upstream.as_ref().unwrap();
    assert!(
        up.endpoints
            .iter()
            .all(|e| e.protocol == UpstreamProtocol::Http),
        "{up:?}"
    );
    let worker = Config::from_file(&examples.join("worker.toml")).unwrap();
    assert_eq!(worker.server.http_listen, Some(addr("0.0.0.0:9000")));
    assert_eq!(worker.server.grpc_listen, Some(addr("0.0.0.0:9001")));
    // The worker serves the gateway's models, under the same names.
    for m in &gateway.models {
        assert!(worker.model(&m.name).is_some(), "{}", m.name);
    }
}

#[test]
fn upstream_knobs_parse_with_their_units() {
    let text = format!(
        "{MINIMAL}routing = \"upstream-only\"\n[models.upstream]\n\
         endpoints = [\"http://10.0.0.1:9000\"]\n\
         dns = \"grpc://workers.svc:9001\"\nresolve_interval_ms = 250\n\
         model = \"echo-v2\"\nprobe_interval_ms = 50\neject_after_failures = 5\n\
         base_ejection_ms = 200\nmax_ejection_ms = 800\nretry_budget_percent = 0\n\
         connect_timeout_ms = 30\nlocal_margin_us = 0\n"
    );
    let config = Config::parse(&text).unwrap();
    let m = &config.models[0];
    assert_eq!(m.routing, Routing::UpstreamOnly);
    let up = m.upstream.as_ref().unwrap();
    assert_eq!(up.dns.as_ref().unwrap().host, "workers.svc");
    assert_eq!(up.resolve_interval, Duration::from_millis(250));
    assert_eq!(up.model.as_deref(), Some("echo-v2"));
    assert_eq!(up.probe_interval, Duration::from_millis(50));
    assert_eq!(up.eject_after, 5);
    assert_eq!(up.base_ejection, Duration::from_millis(200));
    assert_eq!(up.max_ejection, Duration::from_millis(800));
    assert_eq!(up.retry_budget_percent, 0);
    assert_eq!(up.connect_timeout, Duration::from_millis(30));
    assert_eq!(up.local_margin, Duration::ZERO);
    assert!(config.validate().is_ok());
}

#[test]
fn upstream_errors_are_all_reported_with_their_paths() {
    let text = format!(
        "{MINIMAL}routing = \"upstream-first\"\n[models.upstream]\n\
         endpoints = [\"127.0.0.1:9001\", \"grpc://ok:1\", \"grpc://x:0\"]\n\
         probe_interval_ms = 0\nbase_ejection_ms = 500\nmax_ejection_ms = 100\n\
         retry_budget_percent = 101\n"
    );
    assert_eq!(
        errors(&text),
        vec![
            error(
                "models[0].routing",
                "must be \"local-first\", \"local-only\" or \"upstream-only\", got \"upstream-first\""
            ),
            error(
                "models[0].upstream.endpoints[0]",
                "must start with grpc:// or http://, got \"127.0.0.1:9001\""
            ),
            error(
                "models[0].upstream.endpoints[2]",
                "port must be 1..=65535, got \"0\", got \"grpc://x:0\""
            ),
            error(
                "models[0].upstream.probe_interval_ms",
                "must be between 10 and 600000, got 0"
            ),
            error(
                "models[0].upstream.retry_budget_percent",
                "must be between 0 and 100, got 101"
            ),
            error(
                "models[0].upstream.max_ejection_ms",
                "must be at least base_ejection_ms (500), got 100"
            ),
        ]
    );
}

#[test]
fn upstream_only_needs_a_pool_and_a_pool_needs_endpoints() {
    assert_eq!(
        errors(&with_model("routing = \"upstream-only\"")),
        vec![error(
            "models[0].routing",
            "\"upstream-only\" needs a [models.upstream] table"
        )]
    );
    assert_eq!(
        errors(&with_model("[models.upstream]\nmodel = \"x\"")),
        vec![error(
            "models[0].upstream",
            "needs `endpoints` (grpc://HOST:PORT or http://HOST:PORT) or `dns`"
        )]
    );
    // The same rules hold for a configuration built in code.
    let mut config = Config::parse(MINIMAL).unwrap();
    config.models[0].routing = Routing::UpstreamOnly;
    assert_eq!(
        config.validate().unwrap_err().paths(),
        vec!["models[0].routing"]
    );
}

#[test]
fn a_model_rate_limit_overrides_the_servers() {
    use quiver_config::RateLimit;
    let text = r#"
[server]
rate_limit_per_sec = 100
rate_limit_burst = 10

[[models]]
name = "inherits"
kind = "identity"

[[models]]
name = "own_rate"
kind = "identity"
rate_limit_per_sec = 5

[[models]]
name = "own_burst"
kind = "identity"
rate_limit_burst = 3

[[models]]
name = "off"
kind = "identity"
rate_limit_per_sec = 0
"#;
    let config = Config::parse(text).unwrap();
    let limit = |i: usize| config.rate_limit(&config.models[i]);
    assert_eq!(
        limit(0),
        Some(RateLimit {
            per_sec: 100,
            burst: 10
        })
    );
    assert_eq!(
        limit(1),
        Some(RateLimit {
            per_sec: 5,
            burst: 5
        })
    );
    assert_eq!(
        limit(2),
        Some(RateLimit {
            per_sec: 100,
            burst: 3
        })
    );
    assert_eq!(limit(3), None);
    let default = Config::parse("[[models]]\nname = \"m\"\nkind = \"identity\"\n").unwrap();
    assert_eq!(
        default.rate_limit(&default.models[0]),
        None,
        "off by default"
    );
    let err = Config::parse(&with_server("rate_limit_burst = 0")).unwrap_err();
    assert_eq!(err.paths(), vec!["server.rate_limit_burst"]);
}

#[test]
fn token_identities_need_one_per_token_and_a_client_ca() {
    let text = |ids: &str, ca: bool| {
        format!(
            "[server]\nauth_tokens = [\"a-token\", \"b-token\"]\nauth_token_identities = {ids}\n{}\
             [[models]]\nname = \"m\"\nkind = \"identity\"\n",
            if ca {
                "[tls]\nclient_ca = \"ca.pem\"\n"
            } else {
                ""
            }
        )
    };
    let ok = Config::parse(&text(r#"["spiffe://a", ""]"#, true)).unwrap();
    assert_eq!(ok.server.auth_token_identities, vec!["spiffe://a", ""]);
    let short = Config::parse(&text(r#"["spiffe://a"]"#, true)).unwrap_err();
    assert_eq!(short.paths(), vec!["server.auth_token_identities"]);
    let no_ca = Config::parse(&text(r#"["spiffe://a", ""]"#, false)).unwrap_err();
    assert_eq!(no_ca.paths(), vec!["server.auth_token_identities"]);
}

#[test]
fn a_repository_stands_in_for_inline_models_and_its_knobs_are_checked() {
    let config = Config::parse(
        "[server]\nmodel_repository = \"/models\"\nmodel_control = \"poll\"\nrepository_poll_ms = 250\n",
    )
    .unwrap();
    assert!(config.models.is_empty());
    assert_eq!(
        config.server.model_repository.as_deref(),
        Some(Path::new("/models"))
    );
    assert_eq!(
        config.server.model_control,
        quiver_config::ModelControl::Poll
    );
    assert_eq!(config.server.repository_poll, Duration::from_millis(250));

    assert_eq!(
        errors("[server]\nmodel_control = \"sometimes\"\nrepository_poll_ms = 5\n"),
        vec![
            error(
                "server.model_control",
                "must be \"none\", \"poll\" or \"explicit\", got \"sometimes\""
            ),
            error(
                "server.repository_poll_ms",
                "must be between 100 and 3600000, got 5"
            ),
            error(
                "models",
                "at least one model is required (a [[models]] table, or server.model_repository)"
            ),
        ]
    );
    assert_eq!(
        errors(&with_server("model_control = \"explicit\"")),
        vec![error(
            "server.model_control",
            "\"explicit\" needs server.model_repository"
        )]
    );
}

#[test]
fn version_policies_parse_select_and_report_their_path() {
    use quiver_config::VersionPolicy;
    let policy = |line: &str| {
        Config::parse(&with_model(line)).unwrap().models[0]
            .version_policy
            .clone()
    };
    assert_eq!(policy(""), VersionPolicy::Latest(1));
    assert_eq!(policy("version_policy = \"all\""), VersionPolicy::All);
    assert_eq!(
        policy("version_policy = { latest = 2 }"),
        VersionPolicy::Latest(2)
    );
    assert_eq!(
        policy("version_policy = { specific = [3, 1] }"),
        VersionPolicy::Specific(vec![3, 1])
    );
    assert_eq!(VersionPolicy::Latest(2).select(&[1, 7, 3]), vec![3, 7]);
    assert_eq!(VersionPolicy::Latest(5).select(&[2, 1]), vec![1, 2]);
    assert_eq!(VersionPolicy::All.select(&[2, 1, 2]), vec![1, 2]);
    assert_eq!(
        VersionPolicy::Specific(vec![3, 9]).select(&[1, 3, 4]),
        vec![3]
    );

    assert_eq!(
        errors(&with_model("version_policy = { latest = 0 }")),
        vec![error(
            "models[0].version_policy.latest",
            "must be between 1 and 64, got 0"
        )]
    );
    assert_eq!(
        errors(&with_model("version_policy = { specific = [1, -2] }")),
        vec![error(
            "models[0].version_policy.specific[1]",
            "must be between 1 and 9223372036854775807, got -2"
        )]
    );
    assert_eq!(
        errors(&with_model("version_policy = \"newest\"")).len(),
        1,
        "a misspelt policy is one error"
    );
}

#[test]
fn a_repository_model_toml_is_a_models_table_without_name_or_path() {
    let model = Config::repository_model(
        "mlp",
        "mlp/model.toml",
        "kind = \"mlp\"\nmax_batch_size = 8\nversion_policy = \"all\"\n",
    )
    .unwrap();
    assert_eq!(model.name, "mlp");
    assert_eq!(model.path, None, "the gateway sets a path per version");
    assert_eq!(model.max_batch_size, 8);
    assert_eq!(model.version_policy, quiver_config::VersionPolicy::All);

    let err = Config::repository_model(
        "mlp",
        "mlp/model.toml",
        "name = \"other\"\npath = \"/w\"\nkind = \"mlp\"\nmax_batch_size = 0\n",
    )
    .unwrap_err();
    assert_eq!(
        err.paths(),
        vec![
            "mlp/model.toml.name",
            "mlp/model.toml.path",
            "mlp/model.toml.max_batch_size"
        ]
    );
    let err = Config::repository_model("mlp", "mlp/model.toml", "kind = \"mlp\"\nbatch = 3\n")
        .unwrap_err();
    assert!(err.paths()[0].starts_with("mlp/model.toml"), "{err}");
}

#[test]
fn several_devices_and_simulated_ones_are_checked() {
    let config = Config::parse(&with_model(
        "devices = [\"sim:0\", \"sim:1\"]\n[models.sim]\nfixed_us = 2000\nper_row_us = 50\njitter_pct = 5\nslowdown_pct = [100, 300]\n",
    ))
    .unwrap();
    let m = &config.models[0];
    assert_eq!(m.device_list(), vec!["sim:0", "sim:1"]);
    assert_eq!(m.device, "sim:0");
    assert_eq!(m.cuda_ordinal(), None, "a simulated device is not a GPU");
    let sim = m.sim.as_ref().unwrap();
    assert_eq!(
        (sim.fixed_us, sim.per_row_us, sim.per_token_ns),
        (2000, 50, 0)
    );
    assert_eq!(sim.jitter_pct, 5);
    assert_eq!(sim.slowdown_pct, vec![100, 300]);
    assert_eq!(
        Config::parse(&with_model("device = \"cuda:1\""))
            .unwrap()
            .models[0]
            .device_list(),
        vec!["cuda:1"]
    );

    assert_eq!(
        errors(&with_model(
            "device = \"cpu\"\ndevices = [\"cpu\", \"gpu\", \"cpu\"]"
        )),
        vec![
            error("models[0].devices", "give `device` or `devices`, not both"),
            error(
                "models[0].devices[1]",
                "must be \"cpu\", \"cuda\", \"cuda:N\" or \"sim:N\", got \"gpu\""
            ),
            error("models[0].devices[2]", "duplicate device \"cpu\""),
        ]
    );
    assert_eq!(
        Config::parse(&with_model("placement = \"round-robin\""))
            .unwrap()
            .models[0]
            .placement,
        quiver_config::Placement::RoundRobin
    );
    assert_eq!(
        errors(&with_model("placement = \"random\"")),
        vec![error(
            "models[0].placement",
            "must be \"earliest\" or \"round-robin\", got \"random\""
        )]
    );
    assert_eq!(
        errors(&with_model("device = \"sim:0\"")),
        vec![error(
            "models[0].sim",
            "a sim:N device needs [models.sim] (its service time)"
        )]
    );
    assert_eq!(
        errors(&with_model(
            "[models.sim]\njitter_pct = 101\nslowdown_pct = [0]"
        )),
        vec![
            error(
                "models[0].sim.jitter_pct",
                "must be between 0 and 100, got 101"
            ),
            error(
                "models[0].sim.slowdown_pct[0]",
                "must be between 1 and 100000, got 0"
            ),
            error("models[0].sim", "only with a sim:N device"),
        ]
    );
}

#[test]
fn fraud_example_serves_one_trees_model_from_the_demo_path() {
    let config = Config::parse(include_str!("../examples/fraud.toml")).unwrap();
    let [model] = config.models.as_slice() else {
        panic!("one model, got {:?}", config.models);
    };
    assert_eq!(
        (model.name.as_str(), model.kind),
        ("fraud", ModelKind::Trees)
    );
    // Where `scripts/fraud-demo train` writes it.
    assert_eq!(model.path, Some(PathBuf::from("models/fraud/model.json")));
    assert!(!model.output_margin);
    assert_eq!(model.max_batch_size, 64);
}
