//! Phase 5, the cache: how a request uses it (`CacheMode`), a hit, a
//! flight to follow on this replica or another, or the lead of a new one.
//! With the fleet's flights, the shared cache's lookup and the call's
//! claim are one round trip, made once this replica leads the local
//! flight. The budget and token check is made, once, only before this
//! request may go upstream.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Response};

use super::validate::ApiRequest;
use super::{Ctx, LOST_RETRIES};
use crate::api::CacheState;
use crate::app::Snapshot;
use crate::cache::tiered::Fill;
use crate::cache::{Entry, Key};
use crate::flight::fleet::{Lookup, Remote};
use crate::flight::{End, Head, Join, Leader, Reader, Until};
use crate::http::error::GatewayError;
use crate::http::headers::mark_no_retry;
use crate::response::body::Body;
use crate::response::hit::entry_response;
use crate::response::lead::hand_off;
use crate::response::log::{LogBody, LogOpts};
use crate::response::relay::Sink;
use crate::tenant::Tenant;

/// How this request uses the cache (docs/api.md, "Cache").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CacheMode {
    Lookup,
    Refresh,
    Bypass,
}

impl CacheMode {
    pub(super) fn of(snap: &Snapshot, tenant: &Tenant, headers: &HeaderMap) -> CacheMode {
        if !snap.config.cache.enabled || !tenant.cache {
            return CacheMode::Bypass;
        }
        let mut mode = CacheMode::Lookup;
        for v in headers.get_all(header::CACHE_CONTROL) {
            for directive in v.to_str().unwrap_or("").split(',') {
                match directive.trim().to_ascii_lowercase().as_str() {
                    "no-store" => return CacheMode::Bypass,
                    "no-cache" => mode = CacheMode::Refresh,
                    _ => {}
                }
            }
        }
        mode
    }

    /// The request's cache state before the lookup (a miss until found).
    pub(super) fn state(self) -> CacheState {
        match self {
            CacheMode::Lookup => CacheState::Miss,
            CacheMode::Refresh => CacheState::Refresh,
            CacheMode::Bypass => CacheState::Bypass,
        }
    }
}

/// What the cache phase came to.
pub(super) enum Cached {
    /// A hit, or a followed call's answer.
    Answer(Response<Body>),
    /// Upstream next; where its answer goes besides the client.
    Miss(Sink),
}

/// What one look at the cache and the flights came to.
enum Coalesced {
    /// A hit, or a followed call's answer.
    Answer(Response<Body>),
    /// This request leads the call (upstream next).
    Lead(Leader, Fill),
    /// It followed a call whose leader on another replica was lost before
    /// anything was sent to the client.
    Lost,
}

impl Ctx {
    /// 5. The cache: a hit, a flight to follow, or what this request's
    ///    answer fills.
    pub(super) async fn cached(
        &mut self,
        tenant: &Tenant,
        api: &ApiRequest,
        mode: CacheMode,
    ) -> Result<Cached, GatewayError> {
        let Some(key) = api.key else {
            return Ok(Cached::Miss(Sink::default()));
        };
        if mode == CacheMode::Refresh {
            return Ok(Cached::Miss(Sink {
                fill: Some(self.app.cache.fill(key)),
                leader: None,
            }));
        }
        let mut lost = 0;
        loop {
            let attempt = Box::pin(self.coalesce(tenant, &key, api));
            match attempt.await? {
                Coalesced::Answer(resp) => return Ok(Cached::Answer(resp)),
                Coalesced::Lead(leader, fill) => {
                    return Ok(Cached::Miss(Sink {
                        fill: Some(fill),
                        leader: Some(leader),
                    }))
                }
                // The leader on another replica was lost before this client
                // was sent anything: ask again (a hit, another flight, or
                // this replica's own call), a bounded number of times.
                Coalesced::Lost if lost < LOST_RETRIES => lost += 1,
                // Still lost: this request calls upstream on its own,
                // uncoalesced.
                Coalesced::Lost => {
                    return Ok(Cached::Miss(Sink {
                        fill: Some(self.app.cache.fill(key)),
                        leader: None,
                    }))
                }
            }
        }
    }

    /// One look: a hit, a flight to follow (on this replica or, with
    /// `[redis] coalesce`, another), or the lead of a new one.
    async fn coalesce(
        &mut self,
        tenant: &Tenant,
        key: &Key,
        api: &ApiRequest,
    ) -> Result<Coalesced, GatewayError> {
        self.record.cache = Some(CacheState::Miss);
        let app = Arc::clone(&self.app);
        if let Some(resp) = app.cache.get(key).await.and_then(|e| self.hit(&e, api)) {
            return Ok(Coalesced::Answer(resp));
        }
        if let Some(reader) = app.flights.follow(key) {
            return self.follow(tenant, reader, api).await;
        }
        let leader = match app.flights.join(*key) {
            Join::Follow(reader) => return self.follow(tenant, reader, api).await,
            Join::Lead(l) => l,
        };
        let mut fill = app.cache.fill(*key);
        let Some(fleet) = app.fleet_flights.as_ref() else {
            return self.may_lead(leader, tenant, fill);
        };
        match fleet.lookup(key).await {
            Err(_) | Ok(Lookup::Unclaimed) => self.may_lead(leader, tenant, fill),
            Ok(Lookup::Cached(entry)) if !api.stream || entry.replay().is_some() => {
                leader.end(End::Done(Arc::clone(&entry)));
                let resp = self
                    .hit(&entry, api)
                    .ok_or(GatewayError::StreamInterrupted)?;
                Ok(Coalesced::Answer(resp))
            }
            Ok(Lookup::Cached(_)) => self.may_lead(leader, tenant, fill),
            Ok(Lookup::Lead(publisher)) => {
                if let Some(check) = self.upstream_check.take() {
                    if let Err(refused) = check.check(&tenant.limits, &mut self.standings) {
                        // The claim first, so those who ask again find it
                        // free.
                        publisher.abandon().await;
                        leader.end(End::Lost);
                        return Err(refused.into());
                    }
                }
                // Mirrored for the fleet from the local flight; the
                // publisher takes the Redis half of the fill and writes
                // the answer with its end.
                if let Some(mut reader) = app.flights.follow(key) {
                    hand_off(&mut reader);
                    publisher.start(reader, &mut fill);
                }
                Ok(Coalesced::Lead(leader, fill))
            }
            Ok(Lookup::Claimed(owner)) => {
                // One deadline from the request's arrival, however often
                // it asks again.
                let upstream = &self.snap.config.upstream;
                let deadline = self.record.start + upstream.first_byte_timeout;
                match fleet
                    .follow(key, owner, leader, deadline, upstream.idle_timeout)
                    .await
                {
                    Remote::Following(reader) => self.follow(tenant, reader, api).await,
                    Remote::TakeOver(leader) | Remote::Alone(leader) => {
                        self.may_lead(leader, tenant, fill)
                    }
                }
            }
        }
    }

    /// Makes the budget and token check (once) before `leader` may go
    /// upstream. Refused, its flight ends as lost, so identical requests
    /// that joined meanwhile ask again (one of them may be allowed).
    fn may_lead(
        &mut self,
        leader: Leader,
        tenant: &Tenant,
        fill: Fill,
    ) -> Result<Coalesced, GatewayError> {
        match self
            .upstream_check
            .take()
            .map(|c| c.check(&tenant.limits, &mut self.standings))
        {
            Some(Err(refused)) => {
                leader.end(End::Lost);
                Err(refused.into())
            }
            Some(Ok(())) | None => Ok(Coalesced::Lead(leader, fill)),
        }
    }

    /// A hit's response; `None` (a miss) for a stream of an answer that has
    /// no replay.
    fn hit(&mut self, entry: &Entry, api: &ApiRequest) -> Option<Response<Body>> {
        let mut resp = entry_response(entry, api.delivery())?;
        self.record.cache = Some(CacheState::Hit);
        self.record.saved = entry.usage;
        resp.headers_mut()
            .insert(header::AGE, HeaderValue::from(entry.age().as_secs()));
        Some(resp)
    }

    /// Serves a coalesced follower from the leader's flight: a streaming
    /// follower of a streaming leader reads its log from the first event
    /// on, at its own pace; everyone else gets the finished answer.
    async fn follow(
        &mut self,
        tenant: &Tenant,
        mut reader: Reader,
        api: &ApiRequest,
    ) -> Result<Coalesced, GatewayError> {
        // The first follower moves the leader's relay off its client's
        // connection, so no reader's pace holds back another's.
        hand_off(&mut reader);
        self.record.cache = Some(CacheState::Coalesced);
        let mut until = Until::HeadOrEnd;
        loop {
            let (head, end) = reader.changed(until).await;
            self.record.upstream = reader.flight().upstream();
            if api.stream && head == Some(Head::Stream) {
                let model = self
                    .record
                    .model
                    .as_deref()
                    .unwrap_or(crate::metrics::OTHER);
                let saved = tenant.usage(model).saved.clone();
                let opts = LogOpts {
                    format: self.format,
                    raw: false,
                    include_usage: api.include_usage,
                };
                return Ok(Coalesced::Answer(stream_follower(saved, reader, opts)));
            }
            if let Some(end) = end {
                if matches!(end, End::Lost) {
                    return Ok(Coalesced::Lost);
                }
                return self.end_response(end, api).map(Coalesced::Answer);
            }
            if head.is_some() {
                until = Until::End;
            }
        }
    }

    /// A non-streaming follower's answer: the flight's end.
    fn end_response(&mut self, end: End, api: &ApiRequest) -> Result<Response<Body>, GatewayError> {
        match end {
            End::Done(entry) => {
                self.record.saved = entry.usage;
                entry_response(&entry, api.delivery()).ok_or(GatewayError::StreamInterrupted)
            }
            End::Response {
                status,
                content_type,
                body,
            } => {
                let mut resp = Response::new(Body::full(body));
                *resp.status_mut() = status;
                if let Some(ct) = content_type {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                mark_no_retry(status, resp.headers_mut());
                Ok(resp)
            }
            End::Error(e) => Err(e),
            End::Lost => Err(GatewayError::StreamInterrupted),
        }
    }
}

/// A streaming follower's response: the flight's log, read at the
/// follower's pace; the log is shared, so a slow follower costs no more
/// memory than the log already holds.
fn stream_follower(saved: prometheus::IntCounter, reader: Reader, opts: LogOpts) -> Response<Body> {
    let mut resp = Response::new(Body::log(LogBody::new(reader, opts, Some(saved))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
