//! The RPCs of the Workload API, and the answers the specification asks for when there is
//! nothing to give: InvalidArgument for a call without the security header or with a
//! required field empty, PermissionDenied for a caller without an identity,
//! Unimplemented for what is not served (the WIT-SVID profile).

use std::{collections::HashMap, sync::Arc, time::Duration};

use prost::bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::{self, spiffe_workload_api_server::SpiffeWorkloadApi};
use crate::daemon::{Caller, Daemon, Entitled, Issue, WorkloadRefusal, X509Svid};

/// The metadata every call must carry (SPIFFE Workload Endpoint, section 6).
pub(crate) const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Refuses a call without the security header, exactly once and `true`; a server-side
/// request forgery cannot add it.
pub(crate) fn security_header(req: Request<()>) -> Result<Request<()>, Status> {
    let mut values = req.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v == "true" => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request: every call to the Workload API carries the \
             metadata workload.spiffe.io: true",
        )),
    }
}

/// The Workload API, answered from the daemon's state.
#[derive(Debug)]
pub(crate) struct WorkloadApi {
    pub(crate) daemon: Arc<Daemon>,
}

type Out<T> = ReceiverStream<Result<T, Status>>;

fn caller<T>(req: &Request<T>) -> Result<Arc<Caller>, Status> {
    req.extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or_else(|| Status::internal("the connection has no caller"))
}

fn status_of(why: &WorkloadRefusal) -> Status {
    match why {
        WorkloadRefusal::Gone(_) => Status::unauthenticated(why.to_string()),
        _ if why.is_denial() => Status::permission_denied(why.to_string()),
        _ => Status::unavailable(why.to_string()),
    }
}

/// Bundles keyed as the specification asks: `spiffe://<trust domain>`.
fn td_key(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}")
}

impl WorkloadApi {
    /// The caller's entitlement, or the refusal (recorded) as a status.
    async fn entitled(&self, rpc: &str, caller: &Arc<Caller>) -> Result<Entitled, Status> {
        let ent = self.daemon.workload_caller(caller).await.map_err(|why| {
            self.daemon.workload_refused(rpc, caller, &why);
            status_of(&why)
        })?;
        caller
            .entitled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(ent)
    }

    fn x509_response(&self, svid: &X509Svid) -> pb::X509svidResponse {
        let identity = self.daemon.identity_service();
        let local = identity.trust_domain();
        let bundles = identity.x509_bundles();
        pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: svid.spiffe_id.clone(),
                x509_svid: Bytes::from(svid.chain.clone()),
                x509_svid_key: Bytes::copy_from_slice(svid.key_der()),
                bundle: bundles
                    .get(local)
                    .cloned()
                    .map(Bytes::from)
                    .unwrap_or_default(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: bundles
                .iter()
                .filter(|(td, _)| td.as_str() != local)
                .map(|(td, der)| (td_key(td), Bytes::from(der.clone())))
                .collect(),
        }
    }

    fn x509_bundles(&self) -> pb::X509BundlesResponse {
        let bundles = self.daemon.identity_service().x509_bundles();
        pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: bundles
                .iter()
                .map(|(td, der)| (td_key(td), Bytes::from(der.clone())))
                .collect(),
        }
    }

    /// The JWT keys of the local trust domain (the only one whose keys agentwall knows), each
    /// marked for JWT-SVIDs as the SPIFFE bundle format asks.
    fn jwt_bundles(&self) -> pb::JwtBundlesResponse {
        let identity = self.daemon.identity_service();
        let mut jwks = identity.jwks();
        if let Some(keys) = jwks.get_mut("keys").and_then(|k| k.as_array_mut()) {
            for k in keys {
                if let Some(o) = k.as_object_mut() {
                    o.insert("use".into(), "jwt-svid".into());
                }
            }
        }
        let json = serde_json::to_vec(&jwks).unwrap_or_default();
        pb::JwtBundlesResponse {
            bundles: HashMap::from([(td_key(identity.trust_domain()), Bytes::from(json))]),
        }
    }

    /// A stream that sends `first`, then waits until the cgroup's identity is withdrawn (and
    /// ends with PermissionDenied) or the client goes.
    fn until_withdrawn<T: Send + 'static>(
        &self,
        rpc: &'static str,
        caller: Arc<Caller>,
        mut issues: watch::Receiver<Issue>,
        first: T,
    ) -> Out<T> {
        let (tx, rx) = mpsc::channel(1);
        let daemon = Arc::clone(&self.daemon);
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = issues.changed() => {
                        let gone = changed.is_err()
                            || matches!(*issues.borrow_and_update(), Issue::Withdrawn);
                        if gone {
                            let why = daemon.workload_caller(&caller).await.err();
                            let status = why.as_ref().map_or_else(
                                || Status::permission_denied("no identity issued: the identity was withdrawn"),
                                status_of,
                            );
                            if let Some(why) = &why {
                                daemon.workload_refused(rpc, &caller, why);
                            }
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Out<pb::X509svidResponse>;
    type FetchX509BundlesStream = Out<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Out<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        const RPC: &str = "FetchX509SVID";
        let caller = caller(&req)?;
        let ent = self.entitled(RPC, &caller).await?;
        if !ent.key_held {
            let why = WorkloadRefusal::KeyNotHeld {
                cgroup: caller.peer.cgroup.clone(),
            };
            self.daemon.workload_refused(RPC, &caller, &why);
            return Err(status_of(&why));
        }
        let mut issues = self.daemon.svids().watch(ent.cgroup_id);
        let (tx, rx) = mpsc::channel(1);
        let api = Self {
            daemon: Arc::clone(&self.daemon),
        };
        tokio::spawn(async move {
            loop {
                let issue = issues.borrow_and_update().clone();
                match issue {
                    // Made at launch, or again by a restarted daemon within seconds.
                    Issue::Pending => {}
                    Issue::Issued(svid) => {
                        // Every message goes to the process that is entitled to it now.
                        if let Err(why) = api.daemon.workload_caller(&caller).await {
                            api.daemon.workload_refused(RPC, &caller, &why);
                            let _ = tx.send(Err(status_of(&why))).await;
                            return;
                        }
                        if tx.send(Ok(api.x509_response(&svid))).await.is_err() {
                            return;
                        }
                        api.daemon.workload_delivered(&caller, &svid);
                    }
                    Issue::Withdrawn => {
                        let why = api.daemon.workload_caller(&caller).await.err();
                        if let Some(why) = &why {
                            api.daemon.workload_refused(RPC, &caller, why);
                        }
                        let status = why.as_ref().map_or_else(
                            || Status::permission_denied("no identity issued: withdrawn"),
                            status_of,
                        );
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
                tokio::select! {
                    changed = issues.changed() => {
                        if changed.is_err() {
                            // The sender went with a withdrawal, seen on the next turn.
                            if !matches!(*issues.borrow(), Issue::Withdrawn) {
                                let _ = tx.send(Err(Status::permission_denied("no identity issued: withdrawn"))).await;
                                return;
                            }
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        const RPC: &str = "FetchX509Bundles";
        let caller = caller(&req)?;
        let ent = self.entitled(RPC, &caller).await?;
        let issues = self.daemon.svids().watch(ent.cgroup_id);
        let first = self.x509_bundles();
        Ok(Response::new(
            self.until_withdrawn(RPC, caller, issues, first),
        ))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        const RPC: &str = "FetchJWTBundles";
        let caller = caller(&req)?;
        let ent = self.entitled(RPC, &caller).await?;
        let issues = self.daemon.svids().watch(ent.cgroup_id);
        let first = self.jwt_bundles();
        Ok(Response::new(
            self.until_withdrawn(RPC, caller, issues, first),
        ))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const RPC: &str = "FetchJWTSVID";
        let caller = caller(&req)?;
        let pb::JwtsvidRequest {
            audience,
            spiffe_id,
        } = req.into_inner();
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument(
                "audience must be specified: one or more non-empty audiences",
            ));
        }
        let wanted =
            if spiffe_id.is_empty() {
                None
            } else {
                Some(crate::spiffe::SpiffeId::workload(&spiffe_id).map_err(|e| {
                    Status::invalid_argument(format!("spiffe_id {spiffe_id:?}: {e}"))
                })?)
            };
        let ent = self.entitled(RPC, &caller).await?;
        if let Some(w) = wanted
            && w != ent.id
        {
            return Err(Status::permission_denied(format!(
                "no identity issued: the caller is {}, not {w}",
                ent.id
            )));
        }
        let holder = crate::identity::token::Holder {
            id: &ent.id,
            serial: &ent.serial,
            not_after: ent.not_after,
        };
        let (token, claims) = self
            .daemon
            .identity_service()
            .issue_token(holder, &audience)
            .map_err(|e| Status::permission_denied(format!("no identity issued: {e}")))?;
        self.daemon.token_issued(&claims);
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: ent.id.to_string(),
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let pb::ValidateJwtsvidRequest { audience, svid } = req.into_inner();
        if audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // Anyone may ask: the keys are public; the answer says no more than they do.
        let claims = self
            .daemon
            .identity_service()
            .verify_token(&svid, &audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let value = serde_json::to_value(&claims)
            .map_err(|e| Status::internal(format!("the claims: {e}")))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: claims.sub.clone(),
            claims: Some(claims_struct(&value)),
        }))
    }
}

/// A JSON object as a protobuf `Struct` (numbers become doubles, as in protobuf's JSON
/// mapping).
fn claims_struct(value: &serde_json::Value) -> prost_types::Struct {
    let fields = value
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect())
        .unwrap_or_default();
    prost_types::Struct { fields }
}

fn to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        J::Object(_) => Kind::StructValue(claims_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The largest request message: requests carry a few audiences or one token.
const MAX_REQUEST: usize = 8 * 1024;
/// The HTTP/2 flow-control window of a stream (and four of them for a connection).
const WINDOW: u32 = 16 * 1024;

/// Serves the Workload API on `listener` (supervised tasks): one accepting and identifying
/// callers, one running the gRPC server on what it accepted.
pub(crate) fn serve(
    listener: tokio::net::UnixListener,
    daemon: Arc<Daemon>,
    supervisor: &crate::supervise::Supervisor,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let pools = super::conn::Pools::new(
        crate::limits::Slots::new(
            "Workload API socket (agents)",
            crate::limits::WORKLOAD_CONNECTIONS,
        ),
        crate::limits::Slots::new(
            "Workload API socket (callers without an identity)",
            crate::limits::WORKLOAD_UNBOUND_CONNECTIONS,
        ),
    );
    supervisor.spawn(
        "workload-accept",
        super::conn::accept(listener, Arc::clone(&daemon), pools, tx),
    );
    // Requests are a few bytes: a body is refused past 8 KiB, and the flow-control windows
    // let a client send little more than that before the server has read it.
    let svc = pb::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(WorkloadApi { daemon })
        .max_decoding_message_size(MAX_REQUEST);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, security_header);
    supervisor.spawn("workload", async move {
        let served = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(crate::limits::WORKLOAD_CALLS_PER_CONNECTION)
            .max_concurrent_streams(crate::limits::WORKLOAD_CALLS_PER_CONNECTION as u32)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .initial_stream_window_size(Some(WINDOW))
            .initial_connection_window_size(Some(4 * WINDOW))
            .http2_max_header_list_size(
                u32::try_from(crate::limits::WORKLOAD_HEADER_LIST).unwrap_or(u32::MAX),
            )
            .serve_with_incoming(svc, ReceiverStream::new(rx))
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the Workload API server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_security_header_is_required_once_and_true() {
        let with = |values: &[&str]| {
            let mut r = Request::new(());
            for v in values {
                r.metadata_mut().append(SECURITY_HEADER, v.parse().unwrap());
            }
            security_header(r).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(with(&["true"]), Ok(()));
        assert_eq!(with(&[]), Err(tonic::Code::InvalidArgument));
        assert_eq!(with(&["True"]), Err(tonic::Code::InvalidArgument));
        assert_eq!(with(&["true", "true"]), Err(tonic::Code::InvalidArgument));
        assert_eq!(with(&["false"]), Err(tonic::Code::InvalidArgument));
    }

    #[test]
    fn claims_become_a_struct() {
        let v = serde_json::json!({"sub": "spiffe://td/a", "aud": ["x", "y"], "exp": 5, "n": null});
        let s = claims_struct(&v);
        use prost_types::value::Kind;
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://td/a".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        let Some(Kind::ListValue(l)) = &s.fields["aud"].kind else {
            panic!("aud is a list");
        };
        assert_eq!(l.values.len(), 2);
        assert_eq!(s.fields["n"].kind, Some(Kind::NullValue(0)));
    }
}
