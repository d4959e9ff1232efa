//! The decision API: HTTP/1.1 and JSON for callees and gateways, on a Unix socket
//! (`decision.socket`) and, when configured, on TCP with mutual TLS (`decision.listen`).
//!
//! - `POST /v1/decide`: may this caller do this action on this resource, with these
//!   attributes? The answer names the deciding rule (docs/policy.md).
//! - `POST /v1/validate`: is this certificate chain or JWT-SVID valid here now, revocation
//!   included?
//! - `POST /v1/secrets/fetch` and `POST /v1/secrets/renew` (TCP only): a secret for the mTLS
//!   client's own identity, under a lease, as its policy grants (docs/secrets.md).
//!
//! The asker is a process on the socket (by its peer credentials) or the holder of a valid
//! SVID of a trusted domain (TCP). Requests are bounded in size and time, and connections in
//! number; each decision is audited by the daemon.
//!
//! The wire types are here; the decisions are the daemon's (`Daemon::decide`).

mod places;
mod pool;

use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use self::pool::Pool;
use crate::{
    daemon::{CallerRef, Daemon},
    limits::Slots,
    policy::decide::Query,
    supervise::Supervisor,
};

/// Largest request body.
const MAX_BODY: usize = 64 * 1024;
/// Time to send a request's head, and then its body; the longest a connection is held.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections of one uid at once on the socket, of the [`crate::limits::DECISION_CONNECTIONS`].
const PER_UID: usize = 16;
/// TLS handshakes at once on TCP (a connection takes its place in the pool only once its
/// client proved a valid SVID); a newcomer ends the oldest.
const HANDSHAKES: usize = 16;
/// Connections of one SPIFFE ID at once on TCP, of the
/// [`crate::limits::DECISION_CONNECTIONS`].
const PER_IDENTITY: usize = 8;
/// What one query may carry.
const MAX_ATTRIBUTES: usize = 32;
const MAX_ATTRIBUTE_NAME: usize = 64;
const MAX_ATTRIBUTE_VALUE: usize = 1024;
const MAX_RESOURCE: usize = 256;
const MAX_ACTION: usize = 128;
/// Requests of one asker a second, in bursts of up to twice that; past them, 429.
const ASKER_RATE: u32 = 10_000;

/// `POST /v1/decide`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideRequest {
    caller: CallerJson,
    resource: String,
    action: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

/// The caller, one way of four.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerJson {
    spiffe_id: Option<String>,
    /// A PEM certificate chain, leaf first.
    certificate: Option<String>,
    jwt: Option<String>,
    /// The audience the JWT-SVID must name (with `jwt`).
    audience: Option<String>,
    pid: Option<i32>,
}

impl CallerJson {
    fn into_ref(self) -> Result<CallerRef, String> {
        let given = [
            self.spiffe_id.is_some(),
            self.certificate.is_some(),
            self.jwt.is_some(),
            self.pid.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(
                "name the caller one way: `spiffe_id`, `certificate` (PEM), `jwt` with `audience`, or `pid`".into(),
            );
        }
        if self.audience.is_some() && self.jwt.is_none() {
            return Err("`audience` goes with `jwt`".into());
        }
        Ok(
            match (self.spiffe_id, self.certificate, self.jwt, self.pid) {
                (Some(id), ..) => CallerRef::SpiffeId(id),
                (_, Some(pem), ..) => CallerRef::Certificate(pem),
                (_, _, Some(token), _) => CallerRef::Jwt {
                    token,
                    audience: self
                        .audience
                        .ok_or("a `jwt` needs the `audience` it must name")?,
                },
                (.., Some(pid)) if pid > 0 => CallerRef::Pid(pid),
                _ => return Err("`pid` must be a process id above 0".into()),
            },
        )
    }
}

/// `POST /v1/secrets/fetch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchRequest {
    path: String,
}

/// `POST /v1/secrets/renew`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewRequest {
    lease: String,
}

/// A secret handed out: its value (base64) and its lease.
#[derive(Serialize)]
struct SecretBody<'a> {
    path: &'a str,
    version: u32,
    created: &'a str,
    value: &'a str,
    lease: LeaseBody<'a>,
}

#[derive(Serialize)]
struct LeaseBody<'a> {
    id: &'a str,
    expires: String,
    ttl_seconds: u64,
}

/// `POST /v1/validate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateRequest {
    certificate: Option<String>,
    jwt: Option<String>,
    audience: Option<String>,
}

/// The answer of `POST /v1/validate`.
#[derive(Debug, Serialize)]
struct Validity {
    valid: bool,
    spiffe_id: Option<String>,
    serial: Option<String>,
    not_after: Option<String>,
    /// `valid`, or why not (expired, revoked, not of a trusted domain…).
    message: String,
}

impl From<crate::daemon::Checked> for Validity {
    fn from(c: crate::daemon::Checked) -> Self {
        Self {
            valid: c.valid,
            spiffe_id: c.spiffe_id,
            serial: c.serial,
            not_after: c.not_after,
            message: c.message,
        }
    }
}

/// Who asks: a stable name (rate limits are the asker's) and the detail for the audit.
#[derive(Debug, Clone)]
struct Asker {
    id: String,
    detail: String,
    /// An mTLS client whose SVID the daemon verified: it may name callers by a bare ID it
    /// verified itself, and fetch the secrets of its own identity.
    verified_peer: bool,
    /// The serial of the client's certificate (hex), for an mTLS client.
    serial: String,
    /// When that certificate expires: past it, the connection fetches no secret.
    valid_until: Option<std::time::SystemTime>,
}

/// Requests per asker, a token bucket each (generic cell rate form).
#[derive(Debug, Default)]
struct AskerBudget(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl AskerBudget {
    fn allow(&self, asker: &str) -> bool {
        let rate = agentwall_common::budget::Rate::new(ASKER_RATE, 2 * ASKER_RATE);
        let now = crate::clock::boot_ns();
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= 4096 && !m.contains_key(asker) {
            // Askers back to a full budget hold nothing worth keeping.
            m.retain(|_, tat| *tat > now);
        }
        let tat = m.entry(asker.to_string()).or_insert(0);
        match rate.take(*tat, now) {
            Some(next) => {
                *tat = next;
                true
            }
            None => false,
        }
    }
}

/// Tells a client refused for lack of room why, without waiting on it.
fn refuse_busy<S: AsyncWrite + Unpin + Send + 'static>(mut stream: S, why: String) {
    use tokio::io::AsyncWriteExt as _;
    tokio::spawn(async move {
        let body = serde_json::json!({ "error": why }).to_string();
        let reply = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes())).await;
    });
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
}

/// Serves the decision API unless the configuration turns it off.
pub fn start(
    daemon: &Arc<Daemon>,
    supervisor: &Supervisor,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let c = &daemon.config().decision;
    if !c.enabled {
        return Ok(());
    }
    // Bound here, so that a bad address stops the start with its reason; served on the
    // pool's threads.
    let unix =
        crate::unixsock::bind_unix(&c.socket, c.mode, c.owner.as_deref(), c.group.as_deref())?
            .into_std()?;
    let tcp = match c.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("decision API address {addr}: {e}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let budget = Arc::new(AskerBudget::default());
    let d = Arc::clone(daemon);
    Pool::start(supervisor, move |pool| async move {
        let on_socket = accept_unix(unix, Arc::clone(&d), Arc::clone(&budget), Arc::clone(&pool));
        match tcp {
            // Either listener failing ends the thread: the daemon stops and says so.
            Some(tcp) => tokio::select! {
                () = on_socket => {}
                () = accept_tls(tcp, d, budget, pool) => {}
            },
            None => on_socket.await,
        }
    })?;
    tracing::info!(socket = %c.socket.display(), "decision API ready");
    if let Some(addr) = c.listen {
        tracing::info!(%addr, "decision API ready on TCP with mutual TLS");
    }
    Ok(())
}

/// Accepts on the decision socket; each connection is served on a thread of the pool.
/// Returns only if the socket cannot be served (its thread's end stops the daemon).
async fn accept_unix(
    listener: std::os::unix::net::UnixListener,
    d: Arc<Daemon>,
    budget: Arc<AskerBudget>,
    pool: Arc<Pool>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the decision socket cannot be served");
            return;
        }
    };
    let slots = Slots::new("decision API socket", crate::limits::DECISION_CONNECTIONS);
    let per_uid = places::PerKey::new(PER_UID);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        let uid = cred.uid();
        let Some(uid_slot) = per_uid.take(&uid) else {
            refuse_busy(
                stream,
                format!(
                    "uid {uid} holds {PER_UID} connections to the decision API, the most one uid may; reuse them (keep-alive)"
                ),
            );
            continue;
        };
        let Some(slot) = slots.take() else {
            refuse_busy(stream, slots.refusal());
            continue;
        };
        let pid = cred.pid().unwrap_or(0);
        let cgroup = crate::identity::attest::cgroup_of(pid).unwrap_or_else(|_| "?".into());
        let asker = Asker {
            id: format!("uid {uid} cgroup {cgroup}"),
            detail: format!("pid {pid} uid {uid} cgroup {cgroup}"),
            verified_peer: false,
            serial: String::new(),
            valid_until: None,
        };
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let (d, b) = (Arc::clone(&d), Arc::clone(&budget));
        pool.spawn(async move {
            let _places = (slot, uid_slot);
            if let Ok(stream) = tokio::net::UnixStream::from_std(stream) {
                serve(stream, d, asker, b).await;
            }
        });
    }
}

/// The decision API on TCP: mutual TLS with the daemon's server certificate; the client's
/// SVID must be valid here. Each connection's handshake and requests are served on a
/// thread of the pool.
async fn accept_tls(
    listener: std::net::TcpListener,
    d: Arc<Daemon>,
    budget: Arc<AskerBudget>,
    pool: Arc<Pool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the decision API's address cannot be served");
            return;
        }
    };
    let handshakes = places::Displacing::new(HANDSHAKES);
    let connections = places::Displacing::new(crate::limits::DECISION_CONNECTIONS);
    let per_identity = places::PerKey::new(PER_IDENTITY);
    // Without sock_diag, every client is known by its address.
    let mut peers = crate::sockdiag::PeerCgroups::open()
        .inspect_err(|e| {
            tracing::warn!(error = %e, "the decision API cannot tell which cgroup a local client is in (sock_diag); it tells them apart by address only");
        })
        .ok();
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Nothing is said to a client before it proves who it is: one whose handshake is
        // ended (by its time, or by a newcomer) is just closed.
        let (mut handshake, evicted) = handshakes.take(source_of(&tcp, peer, peers.as_mut()));
        if evicted {
            d.count_error("decision_handshake_displaced");
        }
        let Ok(tcp) = tcp.into_std() else {
            continue;
        };
        let (d, b, connections, per_identity) = (
            Arc::clone(&d),
            Arc::clone(&budget),
            Arc::clone(&connections),
            Arc::clone(&per_identity),
        );
        pool.spawn(async move {
            let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) else {
                return;
            };
            let Ok(config) = d.tls_server_config() else {
                return;
            };
            let accepted = tokio::select! {
                a = tokio::time::timeout(
                    HEADER_TIMEOUT,
                    tokio_rustls::TlsAcceptor::from(config).accept(tcp),
                ) => a,
                _ = &mut handshake.ended => return,
            };
            drop(handshake);
            let Ok(Ok(tls)) = accepted else {
                return;
            };
            // The client's chain must be a valid SVID here (trust bundle, revocation).
            let checked = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| d.check_chain(chain));
            let (id, serial, valid_until) = match checked {
                Some(c) if c.valid => (
                    c.spiffe_id.unwrap_or_default(),
                    c.serial.unwrap_or_default(),
                    c.not_after.and_then(|t| humantime::parse_rfc3339(&t).ok()),
                ),
                _ => return,
            };
            let Some(id_slot) = per_identity.take(&id) else {
                refuse_busy(
                    tls,
                    format!(
                        "{id} holds {} connections to the decision API, the most one identity may; reuse them (keep-alive)",
                        per_identity.max()
                    ),
                );
                return;
            };
            let (mut place, displaced) = connections.take(id.clone());
            if displaced {
                d.count_error("decision_connection_displaced");
            }
            let _id_slot = id_slot;
            let asker = Asker {
                detail: id.clone(),
                id,
                verified_peer: true,
                serial,
                valid_until,
            };
            tokio::select! {
                () = serve(tls, d, asker, b) => {}
                _ = &mut place.ended => {}
            }
        });
    }
}

/// Where the connection from `peer` comes from: the cgroup of the process that opened it,
/// when it is on this host and its socket is still open; else its address.
fn source_of(
    tcp: &tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    peers: Option<&mut crate::sockdiag::PeerCgroups>,
) -> places::Source {
    let cgroup = match (peers, tcp.local_addr()) {
        (Some(p), Ok(local)) => p.of(local, peer).ok().flatten(),
        _ => None,
    };
    cgroup.map_or(places::Source::Address(peer.ip()), places::Source::Cgroup)
}

/// Serves one connection: HTTP/1.1, keep-alive, until the client ends it or its time is up.
async fn serve<S>(stream: S, daemon: Arc<Daemon>, asker: Asker, budget: Arc<AskerBudget>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let asker = Arc::new(asker);
    let svc = service_fn(move |req| {
        let (d, asker, budget) = (Arc::clone(&daemon), Arc::clone(&asker), Arc::clone(&budget));
        async move { Ok::<_, Infallible>(route(req, &d, &asker, &budget).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
}

/// What is wrong with the size of a query, if anything.
fn oversized(r: &DecideRequest) -> Option<String> {
    if r.resource.len() > MAX_RESOURCE {
        return Some(format!("`resource` is over {MAX_RESOURCE} bytes"));
    }
    if r.action.len() > MAX_ACTION {
        return Some(format!("`action` is over {MAX_ACTION} bytes"));
    }
    if r.attributes.len() > MAX_ATTRIBUTES {
        return Some(format!("more than {MAX_ATTRIBUTES} attributes"));
    }
    r.attributes.iter().find_map(|(k, v)| {
        (k.len() > MAX_ATTRIBUTE_NAME || v.len() > MAX_ATTRIBUTE_VALUE).then(|| {
            format!(
                "attribute names are at most {MAX_ATTRIBUTE_NAME} bytes and values {MAX_ATTRIBUTE_VALUE}"
            )
        })
    })
}

async fn route(
    req: Request<Incoming>,
    daemon: &Daemon,
    asker: &Asker,
    budget: &AskerBudget,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, ROUTES);
    }
    if !budget.allow(&asker.id) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("over {ASKER_RATE} requests a second from this asker; slow down"),
        );
    }
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(BODY_TIMEOUT, body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is over {MAX_BODY} bytes, or broke off"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the request body did not come within {BODY_TIMEOUT:?}"),
            );
        }
    };
    match path.as_str() {
        "/v1/decide" => {
            let r: DecideRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request: {e}")),
            };
            if let Some(why) = oversized(&r) {
                return error(StatusCode::BAD_REQUEST, &why);
            }
            // Which identity may read which secret would tell any asker the paths and grants
            // of others' secrets: not answered here.
            if r.resource.trim_start().starts_with("secret:") {
                return error(
                    StatusCode::BAD_REQUEST,
                    "`resource`: secrets are not decided for others; an agent fetches its own secrets with POST /v1/secrets/fetch",
                );
            }
            let caller = match r.caller.into_ref() {
                Ok(c) => c,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("`caller`: {e}")),
            };
            if matches!(caller, CallerRef::SpiffeId(_)) && !asker.verified_peer {
                return error(
                    StatusCode::BAD_REQUEST,
                    "`caller`: on the socket, name the caller by its `certificate` (as it presented it), `jwt` or `pid`; a bare `spiffe_id` is taken only from an mTLS client of the TCP address",
                );
            }
            let q = Query {
                resource: r.resource,
                action: r.action,
                attributes: r.attributes,
            };
            let decided = daemon.decide(&caller, &q, &asker.id, &asker.detail).await;
            json(StatusCode::OK, &decided)
        }
        "/v1/validate" => {
            let r: ValidateRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request: {e}")),
            };
            let checked = match (r.certificate, r.jwt, r.audience) {
                (Some(pem), None, None) => match daemon.check(&pem) {
                    Ok(c) => c,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
                },
                (None, Some(token), Some(audience)) => daemon.check_token(&token, &audience),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "give `certificate` (PEM), or `jwt` with `audience`",
                    );
                }
            };
            json(StatusCode::OK, &Validity::from(checked))
        }
        "/v1/secrets/fetch" | "/v1/secrets/renew" => secrets(&path, &body, daemon, asker).await,
        _ => error(StatusCode::NOT_FOUND, ROUTES),
    }
}

const ROUTES: &str = "use POST /v1/decide, /v1/validate, /v1/secrets/fetch or /v1/secrets/renew";

/// A secret for the mTLS client's own identity: a first fetch, or the renewal of a lease.
async fn secrets(
    route: &str,
    body: &[u8],
    daemon: &Daemon,
    asker: &Asker,
) -> Response<Full<Bytes>> {
    use crate::daemon::FetchRefused;
    if !asker.verified_peer {
        return error(
            StatusCode::FORBIDDEN,
            "secrets are handed out over mutual TLS only: connect to the decision API's TCP address (decision.listen) with the agent's own SVID",
        );
    }
    if asker
        .valid_until
        .is_none_or(|t| t <= std::time::SystemTime::now())
    {
        return error(
            StatusCode::FORBIDDEN,
            "the certificate this connection proved has expired: connect again with a renewed SVID",
        );
    }
    let who = crate::daemon::SecretAsker {
        spiffe_id: asker.id.clone(),
        serial: asker.serial.clone(),
        detail: asker.detail.clone(),
    };
    let leased = if route == "/v1/secrets/fetch" {
        match serde_json::from_slice::<FetchRequest>(body) {
            Ok(r) => daemon.secret_fetch(&who, &r.path).await,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request: {e}")),
        }
    } else {
        match serde_json::from_slice::<RenewRequest>(body) {
            Ok(r) => daemon.secret_renew(&who, &r.lease).await,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request: {e}")),
        }
    };
    let leased = match leased {
        Ok(l) => l,
        Err(e) => {
            let status = match e {
                FetchRefused::Denied(_) => StatusCode::FORBIDDEN,
                FetchRefused::BadRequest(_) => StatusCode::BAD_REQUEST,
                FetchRefused::NotFound(_) => StatusCode::NOT_FOUND,
                FetchRefused::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
                FetchRefused::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            return error(status, &e.to_string());
        }
    };
    secret_response(&leased)
}

/// The answer that carries a secret: built in buffers that are wiped when dropped, the
/// body's included (sized up front, so that it is never moved while it grows).
fn secret_response(leased: &crate::daemon::Leased) -> Response<Full<Bytes>> {
    use base64::Engine as _;
    let (secret, lease) = (&leased.secret, &leased.lease);
    let mut value = zeroize::Zeroizing::new(String::with_capacity(
        secret.value.expose().len().div_ceil(3) * 4,
    ));
    base64::engine::general_purpose::STANDARD.encode_string(secret.value.expose(), &mut value);
    let mut body = zeroize::Zeroizing::new(Vec::with_capacity(value.len() + 1024));
    let written = serde_json::to_writer(
        &mut *body,
        &SecretBody {
            path: secret.path.as_str(),
            version: secret.version,
            created: &secret.created,
            value: &value,
            lease: LeaseBody {
                id: &lease.id,
                expires: lease.expires_text(),
                ttl_seconds: lease.ttl_seconds,
            },
        },
    );
    if written.is_err() {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the answer could not be written",
        );
    }
    let mut r = Response::new(Full::new(Bytes::from_owner(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: message.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_named_exactly_one_way() {
        let c = |j: &str| serde_json::from_str::<CallerJson>(j).unwrap().into_ref();
        assert_eq!(
            c(r#"{"spiffe_id":"spiffe://d/a"}"#),
            Ok(CallerRef::SpiffeId("spiffe://d/a".into()))
        );
        assert_eq!(c(r#"{"pid":7}"#), Ok(CallerRef::Pid(7)));
        assert_eq!(
            c(r#"{"jwt":"t","audience":"b"}"#),
            Ok(CallerRef::Jwt {
                token: "t".into(),
                audience: "b".into()
            })
        );
        assert!(c(r#"{}"#).is_err());
        assert!(c(r#"{"pid":7,"spiffe_id":"spiffe://d/a"}"#).is_err());
        assert!(c(r#"{"jwt":"t"}"#).unwrap_err().contains("audience"));
        assert!(c(r#"{"pid":0}"#).is_err());
        assert!(c(r#"{"pid":7,"audience":"b"}"#).is_err());
        assert!(serde_json::from_str::<CallerJson>(r#"{"uid":1}"#).is_err());
    }
}
