//! HTTP in, store calls out: routing, authentication, input checks, metrics.

use crate::protocol::{
    self, AcquireRequest, CancelRequest, CancelResponse, ErrorBody, Granted, HolderInfo, LeaseRef,
    LockInfo, ReleaseResponse, RenewRequest, RenewResponse, RenewResult, StillWaiting, codes,
};
use crate::server::auth::{Auth, Refusal};
use crate::server::metrics::{Metrics, RequestLabels};
use crate::server::store::{AcquireOutcome, AcquireSpec, LockStore, ProjectId, StoreError};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Input bounds the server enforces.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub min_lease: Duration,
    pub max_lease: Duration,
    pub max_poll: Duration,
}

/// Everything a request handler needs.
pub(crate) struct App {
    pub store: Arc<dyn LockStore>,
    pub auth: Auth,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Flips to true when the server starts shutting down: long polls answer 503 at once.
    pub stopping: watch::Receiver<bool>,
}

type Reply = Response<Full<Bytes>>;

/// An answer that is not a success.
struct Failure(StatusCode, &'static str, String);

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        match error {
            StoreError::Full(message) => {
                Failure(StatusCode::TOO_MANY_REQUESTS, codes::TOO_MANY, message)
            }
            StoreError::Unavailable(message) => {
                Failure(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, message)
            }
        }
    }
}

fn bad(message: impl Into<String>) -> Failure {
    Failure(
        StatusCode::BAD_REQUEST,
        codes::INVALID_ARGUMENT,
        message.into(),
    )
}

fn json_reply<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    let bytes = serde_json::to_vec(body).expect("wire types always serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes.into()))
        .expect("static headers are valid")
}

fn text_reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

impl Failure {
    fn into_reply(self) -> Reply {
        let Failure(status, code, message) = self;
        let mut reply = json_reply(
            status,
            &ErrorBody {
                error: code.into(),
                message,
            },
        );
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        reply
    }
}

impl App {
    /// `200 ok`, or `503` once the server is shutting down (so load balancers move on).
    fn health(&self) -> Reply {
        if *self.stopping.borrow() {
            text_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "shutting down\n".into(),
            )
        } else {
            text_reply(StatusCode::OK, "text/plain", "ok\n".into())
        }
    }

    /// Serves one request; never fails (every problem becomes a status).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Reply, std::convert::Infallible> {
        let (route, result) = self.route(request).await;
        let mut reply = result.unwrap_or_else(Failure::into_reply);
        if reply.status() == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110: a 405 names the methods the route does accept.
            let allow = if route == "healthz" || route == "metrics" || route == "inspect" {
                "GET"
            } else {
                "POST"
            };
            reply
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route,
                status: reply.status().as_u16(),
            })
            .inc();
        Ok(reply)
    }

    async fn route(&self, request: Request<Incoming>) -> (&'static str, Result<Reply, Failure>) {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        let post = |route: &'static str| -> Result<&'static str, (&'static str, Failure)> {
            if method == Method::POST {
                Ok(route)
            } else {
                Err((route, not_allowed("POST")))
            }
        };
        let route = match path.as_str() {
            "/healthz" if method != Method::GET => return ("healthz", Err(not_allowed("GET"))),
            "/metrics" if method != Method::GET => return ("metrics", Err(not_allowed("GET"))),
            "/healthz" => return ("healthz", Ok(self.health())),
            "/metrics" => {
                return (
                    "metrics",
                    Ok(text_reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        self.metrics.render(),
                    )),
                );
            }
            protocol::PATH_ACQUIRE => post("acquire"),
            protocol::PATH_RENEW => post("renew"),
            protocol::PATH_RELEASE => post("release"),
            protocol::PATH_CANCEL => post("cancel"),
            p if p.starts_with(protocol::PATH_LOCKS_PREFIX) => {
                if method == Method::GET {
                    Ok("inspect")
                } else {
                    Err(("inspect", not_allowed("GET")))
                }
            }
            _ => Err((
                "other",
                Failure(
                    StatusCode::NOT_FOUND,
                    codes::NOT_FOUND,
                    format!("no route {path}"),
                ),
            )),
        };
        let route = match route {
            Ok(route) => route,
            Err((route, failure)) => return (route, Err(failure)),
        };
        let result = async {
            let project = self.project(request.headers())?;
            match route {
                "acquire" => self.acquire(project, self.body(request).await?).await,
                "renew" => self.renew(project, self.body(request).await?).await,
                "release" => self.release(project, self.body(request).await?).await,
                "cancel" => self.cancel(project, self.body(request).await?).await,
                _ => {
                    let encoded = &path[protocol::PATH_LOCKS_PREFIX.len()..];
                    self.inspect(project, encoded).await
                }
            }
        }
        .await;
        (route, result)
    }

    fn project(&self, headers: &HeaderMap) -> Result<ProjectId, Failure> {
        self.auth.project(headers).map_err(|refusal| match refusal {
            Refusal::BadKey => Failure(
                StatusCode::UNAUTHORIZED,
                codes::UNAUTHORIZED,
                "missing or unknown API key (expected `Authorization: Bearer <key>`)".into(),
            ),
            Refusal::TooManyProjects => Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                "open development mode has reached its project limit".into(),
            ),
        })
    }

    /// Reads and parses a JSON body, within the size limit.
    async fn body<T: DeserializeOwned>(&self, request: Request<Incoming>) -> Result<T, Failure> {
        let limit = self.limits.max_body_bytes;
        let too_large = || {
            Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::TOO_LARGE,
                format!("request body exceeds {limit} bytes"),
            )
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let bytes = Limited::new(request.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    bad(format!("could not read the request body: {e}"))
                }
            })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON body: {e}")))
    }

    fn check_name(name: &str) -> Result<(), Failure> {
        protocol::validate_name(name).map_err(bad)
    }

    fn check_lease(&self, lease_ms: u64) -> Result<Duration, Failure> {
        let lease = Duration::from_millis(lease_ms);
        if lease < self.limits.min_lease || lease > self.limits.max_lease {
            return Err(bad(format!(
                "lease_ms is {lease_ms}; this server accepts {} to {}",
                self.limits.min_lease.as_millis(),
                self.limits.max_lease.as_millis()
            )));
        }
        Ok(lease)
    }

    async fn acquire(&self, project: ProjectId, req: AcquireRequest) -> Result<Reply, Failure> {
        Self::check_name(&req.name)?;
        let lease = self.check_lease(req.lease_ms)?;
        let poll = req.poll_ms.map_or(self.limits.max_poll, |ms| {
            Duration::from_millis(ms).min(self.limits.max_poll)
        });
        let spec = AcquireSpec {
            project,
            name: req.name,
            lease,
            wait: req.wait_ms.map(Duration::from_millis),
            poll,
            request_id: req.request_id,
        };
        self.metrics.acquires.inc();
        let arrived = Instant::now();
        let mut stopping = self.stopping.clone();
        let outcome = tokio::select! {
            outcome = self.store.acquire(spec) => outcome?,
            // Dropping the store's future detaches the waiter: a store shared by several
            // servers keeps its place for the client's retry elsewhere.
            _ = crate::server::stopped(&mut stopping) => {
                return Err(Failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::UNAVAILABLE,
                    "server is shutting down; retry".into(),
                ));
            }
        };
        Ok(match outcome {
            AcquireOutcome::Granted(grant) => {
                self.metrics.grants.inc();
                self.metrics
                    .wait_seconds
                    .observe(arrived.elapsed().as_secs_f64());
                json_reply(
                    StatusCode::OK,
                    &Granted {
                        lease_id: grant.lease_id,
                        fencing_token: grant.fencing_token,
                        lease_ms: grant.lease.as_millis() as u64,
                    },
                )
            }
            AcquireOutcome::StillWaiting { position } => {
                json_reply(StatusCode::ACCEPTED, &StillWaiting { position })
            }
            AcquireOutcome::TimedOut => {
                self.metrics.timeouts.inc();
                Failure(
                    StatusCode::CONFLICT,
                    codes::TIMEOUT,
                    "the wait ended without the lock".into(),
                )
                .into_reply()
            }
        })
    }

    async fn renew(&self, project: ProjectId, req: RenewRequest) -> Result<Reply, Failure> {
        if req.leases.len() > protocol::MAX_RENEW_BATCH {
            return Err(bad(format!(
                "{} leases in one renew; the limit is {}",
                req.leases.len(),
                protocol::MAX_RENEW_BATCH
            )));
        }
        for lease in &req.leases {
            Self::check_name(&lease.name)?;
        }
        let leases = req
            .leases
            .into_iter()
            .map(|l| (l.name, l.lease_id))
            .collect();
        let results: Vec<RenewResult> = self
            .store
            .renew(project, leases)
            .await?
            .into_iter()
            .map(|renewed| match renewed {
                Some(lease) => RenewResult::Renewed {
                    lease_ms: lease.as_millis() as u64,
                },
                None => RenewResult::Gone,
            })
            .collect();
        let renewed = results.iter().filter(|r| **r != RenewResult::Gone).count();
        self.metrics.renewals.inc_by(renewed as u64);
        Ok(json_reply(StatusCode::OK, &RenewResponse { results }))
    }

    async fn release(&self, project: ProjectId, req: LeaseRef) -> Result<Reply, Failure> {
        Self::check_name(&req.name)?;
        if self.store.release(project, &req.name, req.lease_id).await? {
            self.metrics.releases.inc();
            Ok(json_reply(
                StatusCode::OK,
                &ReleaseResponse { released: true },
            ))
        } else {
            Err(Failure(
                StatusCode::GONE,
                codes::GONE,
                format!("no lease with that id holds lock {:?}", req.name),
            ))
        }
    }

    async fn cancel(&self, project: ProjectId, req: CancelRequest) -> Result<Reply, Failure> {
        Self::check_name(&req.name)?;
        let cancelled = self
            .store
            .cancel(project, &req.name, req.request_id)
            .await?;
        Ok(json_reply(StatusCode::OK, &CancelResponse { cancelled }))
    }

    async fn inspect(&self, project: ProjectId, encoded: &str) -> Result<Reply, Failure> {
        let name = percent_decode(encoded)
            .ok_or_else(|| bad("lock name is not valid percent-encoded UTF-8"))?;
        Self::check_name(&name)?;
        let view = self.store.inspect(project, &name).await?;
        Ok(json_reply(
            StatusCode::OK,
            &LockInfo {
                name,
                holder: view.holder.map(|(fencing_token, left)| HolderInfo {
                    fencing_token,
                    expires_in_ms: left.as_millis() as u64,
                }),
                waiters: view.waiters,
            },
        ))
    }
}

fn not_allowed(allowed: &'static str) -> Failure {
    Failure(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::METHOD_NOT_ALLOWED,
        format!("use {allowed}"),
    )
}

/// Decodes `%XX` escapes; `None` for a malformed escape or invalid UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let digit = |b: u8| (b as char).to_digit(16);
            out.push((digit(hex[0])? * 16 + digit(hex[1])?) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%E2%9C%93").as_deref(), Some("✓"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode("%+1"), None);
    }
}
