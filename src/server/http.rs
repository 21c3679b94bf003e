//! HTTP in, store calls out: routing, authentication, rate limits, input checks, metrics.

mod election;
mod lease_limits;
mod revoke;
mod session;

pub(crate) use session::UpgradeSlot;

use crate::protocol::{
    self, AcquireRequest, CancelRequest, CancelResponse, ErrorBody, Granted, LeaseRef, NextGrant,
    ReleaseResponse, RenewRequest, RenewResponse, RenewResult, StillWaiting, WireHolder, codes,
};
use crate::server::auth::{Auth, Caller, Refusal};
use crate::server::budget::{BodyBudget, Exhausted};
use crate::server::in_flight::{AcquiresInFlight, InFlight};
use crate::server::metrics::{Metrics, RequestLabels};
use crate::server::store::{
    AcquireOutcome, AcquireSpec, HolderView, LockStore, Quota, Release, Renewal, StoreError,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

/// Input bounds the server enforces.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub min_lease: Duration,
    pub max_lease: Duration,
    pub max_poll: Duration,
    /// Time a client has to send a request body once its header is in.
    pub body_read_timeout: Duration,
    /// Most bytes of request bodies held in memory at once (a quarter of it per project).
    pub body_budget: usize,
    /// Most locks (held or waited for) a project may have where its key file sets no
    /// `max_locks`, open mode included.
    pub max_locks_per_project: u64,
    /// Most acquire requests of one project in flight at once (each waiter is one).
    pub max_acquires_per_project: usize,
    /// Longest lock-delay an acquire may ask for.
    pub max_lock_delay: Duration,
}

/// Everything a request handler needs.
pub(crate) struct App {
    pub store: Arc<dyn LockStore>,
    pub auth: Auth,
    pub metrics: Metrics,
    pub limits: Limits,
    /// What request bodies being read may hold in memory.
    pub body_budget: BodyBudget,
    /// Acquires in flight per project.
    pub acquires: AcquiresInFlight,
    /// How long a session with nothing in flight stays open: the connections' idle time,
    /// so that an idle client's connection closes as it would without a session.
    pub session_idle: Duration,
    /// Flips to true when the server starts shutting down: long polls answer 503 at once.
    pub stopping: watch::Receiver<bool>,
    /// True while the server is paused (the test kit's `pause`): requests and answers wait.
    /// Only in builds with the test kit, so that other servers pay nothing for it.
    #[cfg(feature = "testing")]
    pub paused: watch::Sender<bool>,
    /// Recent store events, for the console's live view.
    pub events: Arc<crate::server::console::EventHub>,
}

pub(crate) type Reply = Response<Full<Bytes>>;

/// The routes, named as in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Session,
    Acquire,
    Renew,
    Release,
    Cancel,
    Revoke,
    Proclaim,
    Election,
    Inspect,
    List,
    Events,
    Console,
    Healthz,
    Metrics,
    Other,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            protocol::PATH_SESSION => Route::Session,
            protocol::PATH_ACQUIRE => Route::Acquire,
            protocol::PATH_RENEW => Route::Renew,
            protocol::PATH_RELEASE => Route::Release,
            protocol::PATH_CANCEL => Route::Cancel,
            protocol::PATH_REVOKE => Route::Revoke,
            protocol::PATH_PROCLAIM => Route::Proclaim,
            "/healthz" => Route::Healthz,
            "/metrics" => Route::Metrics,
            protocol::PATH_LOCKS => Route::List,
            crate::server::console::PATH_EVENTS => Route::Events,
            p if crate::server::console::is_asset(p) => Route::Console,
            p if p.starts_with(protocol::PATH_LOCKS_PREFIX) => Route::Inspect,
            p if p.starts_with(protocol::PATH_ELECTIONS_PREFIX) => Route::Election,
            _ => Route::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Session => "session",
            Route::Acquire => "acquire",
            Route::Renew => "renew",
            Route::Release => "release",
            Route::Cancel => "cancel",
            Route::Revoke => "revoke",
            Route::Proclaim => "proclaim",
            Route::Election => "election",
            Route::Inspect => "inspect",
            Route::List => "list",
            Route::Events => "events",
            Route::Console => "console",
            Route::Healthz => "healthz",
            Route::Metrics => "metrics",
            Route::Other => "other",
        }
    }

    fn method(self) -> Method {
        match self {
            Route::Acquire
            | Route::Renew
            | Route::Release
            | Route::Cancel
            | Route::Revoke
            | Route::Proclaim => Method::POST,
            _ => Method::GET,
        }
    }

    /// Renewals, releases, cancels and proclaims are never rate limited: a throttled client
    /// must not lose its leases, nor keep locks (or places in line) longer than it wants,
    /// nor be kept from saying where it leads. Revocations and observing elections are
    /// limited like inspection.
    fn rate_limited(self) -> bool {
        matches!(
            self,
            Route::Session
                | Route::Acquire
                | Route::Inspect
                | Route::Revoke
                | Route::List
                | Route::Events
                | Route::Election
        )
    }
}

/// An answer that is not a success.
pub(crate) struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Boxed: it is rare, and every `Result` of the handlers carries a `Failure`.
    holder: Option<Box<WireHolder>>,
    reason: Option<protocol::GoneReason>,
    retry_after: Option<Duration>,
}

/// A `410`: the lease is not held; why, when the store remembers.
pub(crate) fn gone(message: String, why: Option<crate::server::store::Ended>) -> Failure {
    Failure {
        reason: why.map(lease_limits::gone_reason),
        ..Failure::new(StatusCode::GONE, codes::GONE, message)
    }
}

impl Failure {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> Failure {
        Failure {
            status,
            code,
            message: message.into(),
            holder: None,
            reason: None,
            retry_after: None,
        }
    }

    fn into_reply(self, route: Route) -> Reply {
        let mut reply = json_reply(
            self.status,
            &ErrorBody {
                error: self.code.into(),
                message: self.message,
                holder: self.holder.map(|h| *h),
                reason: self.reason,
            },
        );
        let headers = reply.headers_mut();
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110: a 405 names the method the route accepts.
            let allow =
                HeaderValue::from_str(route.method().as_str()).expect("method names are valid");
            headers.insert(header::ALLOW, allow);
        }
        let retry_after = match self.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Some(self.retry_after.unwrap_or(Duration::from_secs(1)))
            }
            _ => None,
        };
        if let Some(after) = retry_after {
            // Whole seconds, rounded up (RFC 9110 delay-seconds).
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        reply
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        match error {
            StoreError::Full(message) => {
                Failure::new(StatusCode::TOO_MANY_REQUESTS, codes::TOO_MANY, message)
            }
            StoreError::Unavailable(message) => {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, message)
            }
            StoreError::Conflict(message) => {
                Failure::new(StatusCode::CONFLICT, codes::CONFLICT, message)
            }
        }
    }
}

/// A JSON body, parsed.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

pub(crate) fn bad(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, codes::INVALID_ARGUMENT, message)
}

pub(crate) fn json_reply<T: Serialize>(status: StatusCode, body: &T) -> Reply {
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

pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

pub(crate) fn holder_info(view: HolderView) -> WireHolder {
    WireHolder {
        fencing_token: view.fencing_token,
        acquired_at_ms: unix_ms(view.acquired_at),
        expires_at_ms: unix_ms(std::time::SystemTime::now() + view.expires_in),
        expires_in_ms: view.expires_in.as_millis() as u64,
        metadata: view.label,
        value: view.value,
    }
}

impl App {
    /// Serves one request; never fails (every problem becomes a status).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Reply, std::convert::Infallible> {
        let route = Route::of(request.uri().path());
        let started = Instant::now();
        self.unpaused().await;
        let reply = if route == Route::Session {
            self.clone().open_session(request).await
        } else {
            self.route(route, request).await
        }
        .unwrap_or_else(|failure| failure.into_reply(route));
        // A paused server answers nothing, not even what it had started on.
        self.unpaused().await;
        self.count(route, reply.status(), started);
        Ok(reply)
    }

    /// Logs and counts one answered request (or session operation).
    fn count(&self, route: Route, status: StatusCode, started: Instant) {
        tracing::debug!(
            route = route.label(),
            status = status.as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request"
        );
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: route.label(),
                status: status.as_u16(),
            })
            .inc();
    }

    /// Returns once the server is not paused (at once, unless a test paused it).
    async fn unpaused(&self) {
        #[cfg(feature = "testing")]
        if *self.paused.borrow() {
            let _ = self.paused.subscribe().wait_for(|paused| !paused).await;
        }
    }

    async fn route(&self, route: Route, request: Request<Incoming>) -> Result<Reply, Failure> {
        if route == Route::Other {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                format!("no route {}", request.uri().path()),
            ));
        }
        if request.method() != route.method() {
            return Err(Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                codes::METHOD_NOT_ALLOWED,
                format!("use {}", route.method()),
            ));
        }
        match route {
            Route::Healthz => return Ok(self.health().await),
            Route::Console => return Ok(crate::server::console::asset(request.uri().path())),
            Route::Metrics => {
                return Ok(text_reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.render(),
                ));
            }
            _ => {}
        }
        let caller = self.caller(request.headers())?;
        if route.rate_limited() {
            self.rate_limit(&caller)?;
        }
        match route {
            Route::Acquire
            | Route::Renew
            | Route::Release
            | Route::Cancel
            | Route::Revoke
            | Route::Proclaim => {
                // Counted before the body is read: a project at its limit costs nothing more.
                let _in_flight = self.enter(route, &caller)?;
                let body = self.read_body(&caller, request).await?;
                self.operate(&caller, route, &body).await
            }
            Route::Election => {
                let encoded = &request.uri().path()[protocol::PATH_ELECTIONS_PREFIX.len()..];
                self.election(&caller, encoded, request.uri().query()).await
            }
            Route::List => self.list(&caller, request.uri().query()).await,
            Route::Events => self.events(&caller, request.uri().query()).await,
            _ => {
                let encoded = &request.uri().path()[protocol::PATH_LOCKS_PREFIX.len()..];
                self.inspect(&caller, encoded).await
            }
        }
    }

    /// `200 ok`; `503` once the server is shutting down or while its store cannot serve
    /// (etcd out of reach), so that load balancers move on.
    async fn health(&self) -> Reply {
        let unavailable =
            |why: String| text_reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why);
        if *self.stopping.borrow() {
            return unavailable("shutting down\n".into());
        }
        match self.store.check().await {
            Ok(()) => text_reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(e) => unavailable(format!("{e}\n")),
        }
    }

    fn caller(&self, headers: &HeaderMap) -> Result<Caller, Failure> {
        self.auth.caller(headers).map_err(|refusal| match refusal {
            Refusal::BadKey => {
                tracing::debug!("refused a request: missing or unknown API key");
                Failure::new(
                    StatusCode::UNAUTHORIZED,
                    codes::UNAUTHORIZED,
                    "missing or unknown API key (expected `Authorization: Bearer <key>`)",
                )
            }
            Refusal::TooManyProjects => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                "open development mode has reached its project limit",
            ),
        })
    }

    fn rate_limit(&self, caller: &Caller) -> Result<(), Failure> {
        let Some(bucket) = &caller.bucket else {
            return Ok(());
        };
        let taken = bucket.lock().unwrap_or_else(|p| p.into_inner()).take();
        taken.map_err(|wait| {
            tracing::debug!(
                key_id = caller.key_id.as_deref().unwrap_or("-"),
                "rate limited"
            );
            Failure {
                retry_after: Some(wait),
                ..Failure::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    codes::TOO_MANY,
                    "this key's request rate limit is reached",
                )
            }
        })
    }

    /// Runs one lock operation on its JSON body: what a plain request to the route and a
    /// session frame of the same op both come to.
    async fn operate(&self, caller: &Caller, route: Route, body: &[u8]) -> Result<Reply, Failure> {
        match route {
            Route::Acquire => self.acquire(caller, parse(body)?).await,
            Route::Renew => self.renew(caller, parse(body)?).await,
            Route::Release => self.release(caller, parse(body)?).await,
            Route::Cancel => self.cancel(caller, parse(body)?).await,
            Route::Revoke => self.revoke(caller, parse(body)?).await,
            Route::Proclaim => self.proclaim(caller, parse(body)?).await,
            other => Err(bad(format!("{} is not a lock operation", other.label()))),
        }
    }

    /// For an acquire, counts it in flight for the caller's project, or refuses it with
    /// `429` when the project has as many as it may. Other routes are not counted.
    fn enter(&self, route: Route, caller: &Caller) -> Result<Option<InFlight<'_>>, Failure> {
        if route != Route::Acquire {
            return Ok(None);
        }
        self.acquires
            .enter(caller.project.id)
            .ok_or_else(|| Failure {
                retry_after: Some(Duration::from_secs(1)),
                ..Failure::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    codes::TOO_MANY,
                    format!(
                        "this project has {} acquires in flight (waiting or being answered), the \
                     most allowed",
                        self.acquires.max()
                    ),
                )
            })
            .map(Some)
    }

    /// Reads a request body, within the size limit and the budget for bodies held in
    /// memory (see `budget.rs`).
    async fn read_body(
        &self,
        caller: &Caller,
        request: Request<Incoming>,
    ) -> Result<Vec<u8>, Failure> {
        let limit = self.limits.max_body_bytes;
        let too_large = || {
            Failure::new(
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
        let mut reservation = self.body_budget.reserve(caller.project.id);
        if let Some(declared) = declared {
            // Refused before a byte is read: the body may not fit even when complete.
            reservation
                .grow_to(declared as usize)
                .map_err(over_budget)?;
        }
        let read = async {
            let mut body = Limited::new(request.into_body(), limit);
            let mut bytes = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    reservation
                        .grow_to(bytes.len() + data.len())
                        .map_err(|e| Box::new(BudgetRefusal(e)) as BoxError)?;
                    bytes.extend_from_slice(&data);
                }
            }
            Ok::<_, BoxError>(bytes)
        };
        let bytes = tokio::time::timeout(self.limits.body_read_timeout, read)
            .await
            .map_err(|_| {
                Failure::new(
                    StatusCode::REQUEST_TIMEOUT,
                    codes::INVALID_ARGUMENT,
                    "the request body did not arrive in time",
                )
            })?
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else if let Some(refusal) = e.downcast_ref::<BudgetRefusal>() {
                    over_budget(refusal.0)
                } else {
                    bad(format!("could not read the request body: {e}"))
                }
            })?;
        Ok(bytes)
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

    async fn acquire(&self, caller: &Caller, req: AcquireRequest) -> Result<Reply, Failure> {
        Self::check_name(&req.name)?;
        let lease = self.check_lease(req.lease_ms)?;
        if let Some(label) = &req.metadata {
            protocol::validate_name(label).map_err(|e| bad(format!("metadata: {e}")))?;
        }
        let (max_hold, lock_delay) = self.lease_limits(&req)?;
        let mode = election::mode(&req)?;
        if let Some(value) = &req.value {
            protocol::validate_value(value).map_err(bad)?;
        }
        let poll = req.poll_ms.map_or(self.limits.max_poll, |ms| {
            Duration::from_millis(ms).min(self.limits.max_poll)
        });
        let spec = AcquireSpec {
            project: caller.project.clone(),
            name: req.name,
            lease,
            wait: req.wait_ms.map(Duration::from_millis),
            poll,
            request_id: req.request_id,
            first: req.first,
            label: req.metadata,
            quota: Quota {
                max_locks: caller
                    .quota
                    .max_locks
                    .or(Some(self.limits.max_locks_per_project)),
                ..caller.quota
            },
            max_hold,
            lock_delay,
            mode,
            value: req.value,
            client: req.client_id,
        };
        self.metrics.acquires.inc();
        let arrived = Instant::now();
        let mut stopping = self.stopping.clone();
        let outcome = tokio::select! {
            outcome = self.store.acquire(spec) => outcome?,
            // Dropping the store's future detaches the waiter: a store shared by several
            // servers keeps its place for the client's retry elsewhere.
            _ = crate::server::stopped(&mut stopping) => {
                return Err(Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::UNAVAILABLE,
                    "server is shutting down; retry",
                ));
            }
        };
        match outcome {
            AcquireOutcome::Granted(grant) => {
                self.metrics.grants.inc();
                self.metrics
                    .wait_seconds
                    .observe(arrived.elapsed().as_secs_f64());
                Ok(json_reply(
                    StatusCode::OK,
                    &Granted {
                        lease_id: grant.lease_id,
                        fencing_token: grant.fencing_token,
                        lease_ms: grant.lease.as_millis() as u64,
                        waited_ms: grant.waited.as_millis() as u64,
                    },
                ))
            }
            AcquireOutcome::StillWaiting { position, next } => Ok(json_reply(
                StatusCode::ACCEPTED,
                &StillWaiting {
                    position,
                    next: next.map(|next| NextGrant {
                        lease_id: next.lease_id,
                        fencing_token: next.fencing_token,
                        lease_ms: next.lease.as_millis() as u64,
                        after: next.after,
                    }),
                },
            )),
            AcquireOutcome::Ended => Err(Failure::new(
                StatusCode::CONFLICT,
                codes::TIMEOUT,
                "this request id's acquire has already ended (cancelled, timed out or \
                 released); a new acquire needs a new request id",
            )),
            AcquireOutcome::TimedOut { holder } => {
                self.metrics.timeouts.inc();
                Err(Failure {
                    holder: holder.map(|h| Box::new(holder_info(h))),
                    ..Failure::new(
                        StatusCode::CONFLICT,
                        codes::TIMEOUT,
                        "the wait ended without the lock",
                    )
                })
            }
        }
    }

    async fn renew(&self, caller: &Caller, req: RenewRequest) -> Result<Reply, Failure> {
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
            .renew(&caller.project, leases)
            .await?
            .into_iter()
            .map(|renewed| match renewed {
                Renewal::Renewed(lease) => RenewResult::Renewed {
                    lease_ms: lease.as_millis() as u64,
                },
                Renewal::Gone(why) => RenewResult::Gone {
                    reason: why.map(lease_limits::gone_reason),
                },
            })
            .collect();
        let renewed = results
            .iter()
            .filter(|r| matches!(r, RenewResult::Renewed { .. }))
            .count();
        self.metrics.renewals.inc_by(renewed as u64);
        Ok(json_reply(StatusCode::OK, &RenewResponse { results }))
    }

    async fn release(&self, caller: &Caller, req: LeaseRef) -> Result<Reply, Failure> {
        Self::check_name(&req.name)?;
        match self
            .store
            .release(&caller.project, &req.name, req.lease_id)
            .await?
        {
            Release::Released => {
                self.metrics.releases.inc();
                Ok(json_reply(
                    StatusCode::OK,
                    &ReleaseResponse { released: true },
                ))
            }
            Release::Gone => Err(Failure::new(
                StatusCode::GONE,
                codes::GONE,
                format!("no lease with that id holds lock {:?}", req.name),
            )),
            Release::NoSuchLock => Err(no_such_lock(&req.name)),
        }
    }

    async fn cancel(&self, caller: &Caller, req: CancelRequest) -> Result<Reply, Failure> {
        Self::check_name(&req.name)?;
        let cancelled = self
            .store
            .cancel(&caller.project, &req.name, req.request_id)
            .await?;
        Ok(json_reply(StatusCode::OK, &CancelResponse { cancelled }))
    }

    async fn inspect(&self, caller: &Caller, encoded: &str) -> Result<Reply, Failure> {
        let name = percent_decode(encoded)
            .ok_or_else(|| bad("lock name is not valid percent-encoded UTF-8"))?;
        Self::check_name(&name)?;
        let view = self
            .store
            .inspect(&caller.project, &name)
            .await?
            .ok_or_else(|| no_such_lock(&name))?;
        Ok(json_reply(
            StatusCode::OK,
            &crate::server::listing::lock_info(name, view),
        ))
    }
}

fn no_such_lock(name: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        codes::NOT_FOUND,
        format!("nobody holds or waits for lock {name:?} in this project"),
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that did not fit in the budget, as an error of the body stream.
#[derive(Debug)]
struct BudgetRefusal(Exhausted);

impl std::fmt::Display for BudgetRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for BudgetRefusal {}

/// `503` with `Retry-After`: the bodies being read use up a budget; retrying soon works once
/// they are in.
fn over_budget(exhausted: Exhausted) -> Failure {
    let message = match exhausted {
        Exhausted::Project(bytes) => format!(
            "this project's requests being read already hold its share of the server's \
             memory for request bodies; {bytes} more bytes do not fit, retry shortly"
        ),
        Exhausted::Server(bytes) => format!(
            "the requests being read already hold the server's memory for request bodies; \
             {bytes} more bytes do not fit, retry shortly"
        ),
    };
    Failure {
        retry_after: Some(Duration::from_secs(1)),
        ..Failure::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, message)
    }
}
