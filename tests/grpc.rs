//! End to end over gRPC `GRPCInferenceService`: the real `quiver` binary,
//! driven with the tonic client generated from the same `.proto` (the one
//! the bench harness uses).
#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use quiver_gateway::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use quiver_gateway::proto::inference::{
    InferTensorContents, ModelConfigRequest, ModelInferRequest, ModelMetadataRequest,
    ModelReadyRequest, ModelStatisticsRequest, ServerLiveRequest, ServerMetadataRequest,
    ServerReadyRequest, model_config::SchedulingChoice, model_infer_request::InferInputTensor,
};
use quiver_gateway::tensor::int_param;
use support::{
    OIP_CONFIG, OIP_MAX_REQUEST_BYTES, Server, TOKEN, assert_close, f32_bytes, f32s_of, metric,
    mlp_expected, mlp_rows,
};
use tonic::Code;
use tonic::transport::Channel;

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        parameters: Default::default(),
        contents: None,
    }
}

fn raw_request(model: &str, shape: Vec<i64>, data: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![input("INPUT0", "FP32", shape)],
        raw_input_contents: vec![Bytes::from(f32_bytes(data))],
        ..Default::default()
    }
}

async fn connect(server: &Server) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(server.grpc_url())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metadata_config_statistics_and_infer() {
    let server = Server::start(OIP_CONFIG);
    let mut c = connect(&server).await;

    // Health is exempt from the token.
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = c
        .model_ready(ModelReadyRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);

    let meta = c
        .server_metadata(authed(ServerMetadataRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "quiver");
    assert!(meta.extensions.iter().any(|e| e == "model_configuration"));

    let m = c
        .model_metadata(authed(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.inputs[0].name, "INPUT0");
    assert_eq!(m.inputs[0].shape, vec![-1, 16]);
    assert_eq!(m.outputs[0].shape, vec![-1, 4]);

    let cfg = c
        .model_config(authed(ModelConfigRequest {
            name: "mlp".into(),
            version: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(cfg.max_batch_size, 32);
    assert_eq!(cfg.input[0].dims, vec![16]);
    assert!(matches!(
        cfg.scheduling_choice,
        Some(SchedulingChoice::DynamicBatching(_))
    ));
    let cfg = c
        .model_config(authed(ModelConfigRequest {
            name: "identity".into(),
            version: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(
        (cfg.max_batch_size, cfg.input[0].dims.clone()),
        (64, vec![-1])
    );

    // Raw tensors, with the schedule policy.
    let data = mlp_rows(4);
    let mut req = raw_request("mlp", vec![4, 16], &data);
    req.parameters.insert("priority".into(), int_param(1));
    req.parameters
        .insert("timeout".into(), int_param(5_000_000));
    req.id = "g1".into();
    let resp = c.model_infer(authed(req)).await.unwrap().into_inner();
    assert_eq!(resp.id, "g1");
    assert_eq!(resp.outputs[0].shape, vec![4, 4]);
    assert_close(&f32s_of(&resp.raw_output_contents[0]), &mlp_expected(&data));

    // Typed contents.
    let mut typed = input("INPUT0", "FP32", vec![1, 3]);
    typed.contents = Some(InferTensorContents {
        fp32_contents: vec![1.0, 2.0, 3.5],
        ..Default::default()
    });
    let resp = c
        .model_infer(authed(ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![typed],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32s_of(&resp.raw_output_contents[0]), vec![1.0, 2.0, 3.5]);

    let stats = c
        .model_statistics(authed(ModelStatisticsRequest {
            name: "mlp".into(),
            version: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.model_stats.len(), 1);
    assert!(stats.model_stats[0].inference_count >= 1);
    let success = stats.model_stats[0]
        .inference_stats
        .unwrap()
        .success
        .unwrap();
    assert!(success.count >= 1 && success.ns > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_code_and_the_server_keeps_serving() {
    let server = Server::start(OIP_CONFIG);
    let mut c = connect(&server).await;
    let data = mlp_rows(1);

    let mut wrong_type = raw_request("mlp", vec![1, 16], &data);
    wrong_type.inputs[0].datatype = "INT32".into();
    let mut unknown_input = raw_request("mlp", vec![1, 16], &data);
    unknown_input.inputs[0].name = "NOPE".into();
    let mut bad_datatype = raw_request("mlp", vec![1, 16], &data);
    bad_datatype.inputs[0].datatype = "FLOAT".into();
    let cases = [
        (wrong_type, Code::InvalidArgument),
        (
            raw_request("mlp", vec![1, 15], &data[..15]),
            Code::InvalidArgument,
        ),
        (
            raw_request("mlp", vec![2, 16], &data),
            Code::InvalidArgument,
        ),
        (unknown_input, Code::InvalidArgument),
        (bad_datatype, Code::InvalidArgument),
        (
            raw_request("no-such-model", vec![1, 16], &data),
            Code::NotFound,
        ),
    ];
    for (req, code) in cases {
        let err = c.model_infer(authed(req.clone())).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err}");
    }

    // Missing and wrong tokens.
    let err = c
        .model_infer(raw_request("mlp", vec![1, 16], &data))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(ModelMetadataRequest {
        name: "mlp".into(),
        version: String::new(),
    });
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        c.model_metadata(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Oversized message: refused by its length prefix.
    let big = vec![0.0f32; OIP_MAX_REQUEST_BYTES / 4 + 16];
    let err = c
        .model_infer(authed(raw_request(
            "identity",
            vec![1, big.len() as i64],
            &big,
        )))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err}"
    );

    // Still serving, on the same connection.
    let resp = c
        .model_infer(authed(raw_request("mlp", vec![1, 16], &data)))
        .await
        .unwrap()
        .into_inner();
    assert_close(&f32s_of(&resp.raw_output_contents[0]), &mlp_expected(&data));

    let text = server.scrape().await;
    assert!(
        metric(
            &text,
            "quiver_requests_total",
            &[("protocol", "grpc"), ("outcome", "invalid_argument")]
        ) >= 5.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "quiver_requests_total",
            &[("protocol", "grpc"), ("outcome", "unknown_model")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "quiver_requests_total",
            &[("model", "mlp"), ("protocol", "grpc"), ("outcome", "ok")]
        ) >= 1.0,
        "{text}"
    );
}
