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
use crate::proto::inference::repository_index_response::ModelIndex;
use crate::proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use crate::proto::inference::{
    RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest,
    RepositoryModelLoadResponse, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse,
    model_repository_parameter::ParameterChoice,
};
use crate::ratelimit::{ClientAddr, PeerIdentity};
use crate::router::Router;
use crate::tensor;

/// The protocol label of this front end in metrics.
pub const PROTOCOL: &str = "grpc";

/// The gRPC status of an error (the map is `ErrorKind::grpc`).
pub fn grpc_status(err: &GatewayError) -> Status {
    Status::new(
        tonic::Code::from_i32(err.kind().grpc() as i32),
        err.to_string(),
    )
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
    /// Loads and unloads (Triton's repository extension).
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
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
        self.auth.check(header, health).map(|_| ()).map_err(|e| {
            self.metrics
                .record_rejection("", PROTOCOL, "unauthenticated");
            grpc_status(&e)
        })
    }

    fn find(
        &self,
        name: &str,
        version: &str,
    ) -> Result<std::sync::Arc<crate::router::ModelEntry>, Status> {
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
        let token = self.auth.check(authorization.as_deref(), false)?;
        let source = req
            .extensions()
            .get::<ClientAddr>()
            .map(|a| a.0.ip())
            .or_else(|| req.remote_addr().map(|a| a.ip()));
        let req_identity = req.extensions().get::<PeerIdentity>().cloned();
        let req = req.into_inner();
        let client = self.auth.client(token, req_identity.as_ref(), source)?;
        self.router.check_rate(&req.model_name, client)?;
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
        // A model (or version) that does not serve is not ready, as Triton
        // answers for an unloaded one: not an error.
        let ready = match catalog::find(&self.router, &r.name, &r.version) {
            Ok(entry) => self.ready.load(Ordering::Acquire) && entry.healthy(),
            Err(GatewayError::UnknownModel(_) | GatewayError::UnknownVersion { .. }) => false,
            Err(e) => return Err(grpc_status(&e)),
        };
        Ok(Response::new(ModelReadyResponse { ready }))
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
        Ok(Response::new(catalog::metadata(&self.router, &entry)))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let mut record = self.metrics.start_request(PROTOCOL);
        // Bounded label values: only configured model names.
        let label = self
            .router
            .model(&req.get_ref().model_name)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        record.set_model(label.clone());
        let result = self.infer(req).await;
        if let Ok(resp) = &result
            && let Ok(v) = resp.model_version.parse()
        {
            record.set_version(v);
        }
        record.finish(match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        });
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
            config: Some(catalog::model_config(&entry)),
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
                .iter()
                .map(|m| catalog::statistics(m, &self.metrics))
                .collect()
        } else {
            vec![catalog::statistics(
                &*self.find(&r.name, &r.version)?,
                &self.metrics,
            )]
        };
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.authorize(&req, false)?;
        let models = self
            .lifecycle
            .index(req.get_ref().ready)
            .into_iter()
            .map(|e| ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.into(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.into_inner();
        let config = match r
            .parameters
            .get("config")
            .and_then(|p| p.parameter_choice.as_ref())
        {
            None => None,
            Some(ParameterChoice::StringParam(text)) => Some(
                serde_json::from_str::<serde_json::Value>(text).map_err(|e| {
                    grpc_status(&GatewayError::InvalidArgument(format!(
                        "parameter config is not JSON: {e}"
                    )))
                })?,
            ),
            Some(_) => {
                return Err(grpc_status(&GatewayError::InvalidArgument(
                    "parameter config must be a string of JSON".into(),
                )));
            }
        };
        if r.parameters.keys().any(|k| k.starts_with("file:")) {
            return Err(grpc_status(&GatewayError::InvalidArgument(
                "file: parameters are not supported: put the version directory in the repository"
                    .into(),
            )));
        }
        self.lifecycle
            .load(&r.model_name, config.as_ref())
            .await
            .map_err(|e| grpc_status(&e))?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.authorize(&req, false)?;
        self.lifecycle
            .unload(&req.get_ref().model_name)
            .await
            .map_err(|e| grpc_status(&e))?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
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
