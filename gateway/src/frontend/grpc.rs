//! The gRPC front end: the Open Inference Protocol's `GRPCInferenceService`
//! on TCP (8001 by default), with Triton's `ModelConfig` and
//! `ModelStatistics`, served by tonic over HTTP/2.
//!
//! `ModelInfer` takes `raw_input_contents` or typed `contents`, decodes into
//! [`crate::request::InferRequest`] and goes through [`Router::infer`] like
//! every protocol; a client that cancels the call cancels the request.
//! [`grpc_status`] is the one mapping of errors to gRPC status. A message
//! over the size limit is refused by tonic from its length prefix, before
//! it is read (status `OUT_OF_RANGE`, tonic's choice).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use quiver_batching::CancelToken;
use tonic::{Request, Response, Status};

use crate::error::GatewayError;
use crate::frontend::auth::Auth;
use crate::frontend::catalog;
use crate::frontend::http::CancelOnDrop;
use crate::metrics::Metrics;
use crate::proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use crate::proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use crate::router::Router;
use crate::tensor;

/// The protocol label of this front end in metrics.
pub const PROTOCOL: &str = "grpc";

/// The one mapping of gateway errors to gRPC status (DESIGN.md table).
pub fn grpc_status(err: &GatewayError) -> Status {
    let message = err.to_string();
    match err {
        GatewayError::InvalidArgument(_) | GatewayError::Input(_) => {
            Status::invalid_argument(message)
        }
        GatewayError::Unauthenticated(_) => Status::unauthenticated(message),
        GatewayError::UnknownModel(_) => Status::not_found(message),
        GatewayError::TooLarge { .. } | GatewayError::Overloaded { .. } => {
            Status::resource_exhausted(message)
        }
        GatewayError::DeadlineUnreachable { .. }
        | GatewayError::MemoryBudget { .. }
        | GatewayError::ShuttingDown
        | GatewayError::UpstreamUnavailable { .. }
        | GatewayError::Upstream { .. } => Status::unavailable(message),
        GatewayError::DeadlineExceeded | GatewayError::RequestTimeout(_) => {
            Status::deadline_exceeded(message)
        }
        GatewayError::Model { .. } => Status::internal(message),
        GatewayError::Cancelled => Status::cancelled(message),
    }
}

/// The `GRPCInferenceService` implementation.
#[derive(Clone, Debug)]
pub struct InferenceService {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    /// Cleared when shutdown starts: readiness then says false.
    pub ready: Arc<AtomicBool>,
    /// The request-memory budget shared with the other front ends.
    pub budget: Arc<crate::budget::MemoryBudget>,
}

impl InferenceService {
    /// The tonic service, refusing messages over `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> GrpcInferenceServiceServer<Self> {
        GrpcInferenceServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(usize::MAX)
    }

    fn authorize<T>(&self, req: &Request<T>, health: bool) -> Result<(), Status> {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        self.auth.check(header, health).map_err(|e| {
            self.metrics
                .record_rejection("", PROTOCOL, "unauthenticated");
            grpc_status(&e)
        })
    }

    fn find(&self, name: &str, version: &str) -> Result<&crate::router::ModelEntry, Status> {
        catalog::find(&self.router, name, version).map_err(|e| grpc_status(&e))
    }

    async fn infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<ModelInferResponse, GatewayError> {
        let authorization = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        self.auth.check(authorization.as_deref(), false)?;
        let req = req.into_inner();
        // tonic has read the message whole (at most max_frame_bytes): it is
        // counted from here until its answer is returned.
        let _reservation = self
            .budget
            .reserve(prost::Message::encoded_len(&req) as u64)?;
        catalog::find(&self.router, &req.model_name, &req.model_version)?;
        let req = tensor::request_from_proto(req)?;
        let cancel = CancelToken::new();
        let mut guard = CancelOnDrop(Some(cancel.clone()));
        let result = self.router.infer(req, cancel).await;
        guard.disarm();
        Ok(tensor::response_to_proto(result?))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        req: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        self.authorize(&req, true)?;
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        req: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        self.authorize(&req, true)?;
        Ok(Response::new(ServerReadyResponse {
            ready: self.ready.load(Ordering::Acquire),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.authorize(&req, true)?;
        let r = req.get_ref();
        self.find(&r.name, &r.version)?;
        Ok(Response::new(ModelReadyResponse {
            ready: self.ready.load(Ordering::Acquire),
        }))
    }

    async fn server_metadata(
        &self,
        req: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.authorize(&req, false)?;
        Ok(Response::new(ServerMetadataResponse {
            name: catalog::SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: catalog::EXTENSIONS.iter().map(|e| (*e).into()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.get_ref();
        let entry = self.find(&r.name, &r.version)?;
        Ok(Response::new(catalog::metadata(entry)))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        // Bounded label values: only configured model names.
        let label = self
            .router
            .model(&req.get_ref().model_name)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let result = self.infer(req).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics
            .record_request(&label, PROTOCOL, outcome, started.elapsed());
        result.map(Response::new).map_err(|e| {
            tracing::debug!(model = %label, error = %e, "request failed");
            grpc_status(&e)
        })
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.get_ref();
        let entry = self.find(&r.name, &r.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(catalog::model_config(entry)),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.get_ref();
        let model_stats = if r.name.is_empty() {
            self.router
                .models()
                .map(|m| catalog::statistics(m, &self.metrics))
                .collect()
        } else {
            vec![catalog::statistics(
                self.find(&r.name, &r.version)?,
                &self.metrics,
            )]
        };
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::Code;

    #[test]
    fn every_error_maps_to_the_design_table() {
        let cases: Vec<(GatewayError, Code)> = vec![
            (
                GatewayError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                GatewayError::Unauthenticated("x".into()),
                Code::Unauthenticated,
            ),
            (GatewayError::UnknownModel("m".into()), Code::NotFound),
            (
                GatewayError::Overloaded {
                    model: "m".into(),
                    reason: quiver_batching::RejectReason::Overloaded,
                },
                Code::ResourceExhausted,
            ),
            (
                GatewayError::DeadlineUnreachable {
                    timeout: Duration::from_millis(1),
                    predicted: Duration::from_millis(2),
                },
                Code::Unavailable,
            ),
            (GatewayError::DeadlineExceeded, Code::DeadlineExceeded),
            (
                GatewayError::MemoryBudget {
                    need: 2,
                    held: 1,
                    limit: 2,
                },
                Code::Unavailable,
            ),
            (
                GatewayError::RequestTimeout(std::time::Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (
                GatewayError::Model {
                    model: "m".into(),
                    message: "boom".into(),
                },
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(grpc_status(&err).code(), code, "{err}");
        }
    }
}
