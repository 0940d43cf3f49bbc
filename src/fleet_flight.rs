//! Coalescing across replicas (SPEC §8 "Coalescing"), on top of each
//! replica's own flights (`cache::Flights`).
//!
//! A replica that leads a cacheable miss also claims the call in Redis
//! (`…:lead`, a key that lapses unless renewed) and mirrors its local
//! flight into a Redis stream (`…:log`): the head, each event, the end.
//! An identical request on another replica that finds the call claimed
//! leads a local flight of its own that is fed from that stream instead of
//! upstream, so its replica's other identical requests follow it locally as
//! usual. The reader waits on a connection of its own (`XREAD BLOCK`), so
//! events reach it as the leader publishes them.
//!
//! If the leading replica dies, its claim lapses within `CLAIM_TTL`: a
//! follower that has not received any event yet claims the call and goes
//! upstream itself (`miss`). Past that, the local flight ends as
//! `End::Lost`: a stream that relayed events ends with the SSE error event,
//! and a client sent nothing yet asks again (`proxy::coalesce`). A Redis
//! that is unavailable leaves every replica with its own flights. Every key
//! expires: the claim after `CLAIM_TTL` unless renewed, the log a minute
//! after its last write, and the log is bounded like a local flight's
//! (`FLIGHT_LOG_MAX`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use redis::streams::StreamReadReply;
use redis::Script;

use crate::cache::{End, Head, Key, Leader, Mark, Next, Reader as LogReader, FLIGHT_LOG_MAX};
use crate::cache_store;
use crate::error::GatewayError;
use crate::shared::{Op, Redis, Unavailable};

/// A claim not renewed for this long is the leader's death.
const CLAIM_TTL: Duration = Duration::from_secs(3);
/// How often a leader renews its claim.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How long a follower's read blocks before it checks the leader is alive.
const BLOCK: Duration = Duration::from_millis(500);
/// How long a log outlives its last write.
const LOG_TTL_MS: u64 = 60_000;

/// Claims a call: the claim, and a fresh log (an old flight's log for the
/// same key must not answer this one). KEYS: lead, log. ARGV: owner, ttl_ms,
/// fresh ("1": delete the log).
const CLAIM: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
  return 1
end
return 0
"#;

/// Renews (ARGV[2] > 0) or releases (ARGV[2] = 0) a claim, if still ours.
/// KEYS: lead. ARGV: owner, ttl_ms.
const HOLD: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"#;

/// A claimed call, to be mirrored into the fleet's log.
pub struct Publisher {
    fleet: Arc<FleetFlights>,
    n: Names,
    owner: String,
}

impl Publisher {
    /// Mirrors the local flight (through `reader`) into the log until it
    /// ends, renewing the claim meanwhile. The reader keeps the call going
    /// for followers elsewhere; once the leader's own client has left and
    /// no replica follows, it lets go, so the call is cancelled as a lone
    /// client's would be.
    pub fn start(self, reader: LogReader) {
        tokio::spawn(self.run(reader));
    }

    async fn run(self, mut reader: LogReader) {
        let Publisher { fleet, n, owner } = self;
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.tick().await;
        // The head first (or the end, for an answer that never began).
        let (head, mut end) = loop {
            tokio::select! {
                got = reader.changed(false) => break got,
                _ = renew.tick() => {
                    if !fleet.keep(&n, &owner, &reader).await {
                        return;
                    }
                }
            }
        };
        let mut pipe = redis::pipe();
        if let Some(head) = head {
            pipe.cmd("XADD")
                .arg(&n.log)
                .arg("*")
                .arg("h")
                .arg(head_code(head));
        }
        let mut bytes = 0usize;
        loop {
            // Everything the log has now, without waiting.
            while end.is_none() {
                let next = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(match reader.poll_next(cx) {
                        std::task::Poll::Ready(next) => Some(next),
                        std::task::Poll::Pending => None,
                    })
                })
                .await;
                match next {
                    Some(next) => end = add(&mut pipe, &n, next, &mut bytes),
                    None => break,
                }
            }
            if let Some(end) = &end {
                add_end(&mut pipe, &n, end);
            }
            pipe.cmd("PEXPIRE").arg(&n.log).arg(LOG_TTL_MS).ignore();
            if end.is_some() {
                // The end and the claim's release in one transaction: a
                // request that saw the end never finds the call still
                // claimed (and follows a finished flight).
                pipe.atomic();
                pipe.cmd("EVAL")
                    .arg(HOLD)
                    .arg(1)
                    .arg(&n.lead)
                    .arg(&owner)
                    .arg(0)
                    .ignore();
            }
            let sent: Result<(), _> = fleet.redis.pipe(Op::Coalesce, &pipe).await;
            if sent.is_err() || end.is_some() {
                // A log nobody elsewhere followed is dropped at once (the
                // answer is in the cache if it is worth keeping), so a
                // replica's misses cost Redis no memory beyond the cache.
                if end.is_some() && fleet.followers(&n).await == 0 {
                    let _: Result<(), _> = fleet
                        .redis
                        .query(Op::Coalesce, redis::cmd("DEL").arg(&n.log))
                        .await;
                }
                // Released, so a follower elsewhere is not left waiting
                // for a claim to lapse (or takes over at once if this
                // replica could not publish).
                fleet.release(&n, &owner).await;
                return;
            }
            pipe = redis::pipe();
            // Wait for the next entry, renewing the claim meanwhile.
            let next = loop {
                tokio::select! {
                    next = std::future::poll_fn(|cx| reader.poll_next(cx)) => break next,
                    _ = renew.tick() => {
                        if !fleet.keep(&n, &owner, &reader).await {
                            return;
                        }
                    }
                }
            };
            end = add(&mut pipe, &n, next, &mut bytes);
        }
    }
}

/// Adds one entry of the local log to a publishing pipeline; the end it
/// brings, if any (past the bound, the flight ends as interrupted).
fn add(pipe: &mut redis::Pipeline, n: &Names, next: Next, bytes: &mut usize) -> Option<End> {
    match next {
        Next::Event(ev, mark) => {
            *bytes += ev.len();
            if *bytes > FLIGHT_LOG_MAX {
                return Some(End::Error(GatewayError::StreamInterrupted));
            }
            pipe.cmd("XADD")
                .arg(&n.log)
                .arg("*")
                .arg("e")
                .arg(ev.as_ref())
                .arg("m")
                .arg(mark_code(mark));
            None
        }
        Next::End(end) => Some(end),
        Next::Behind => Some(End::Error(GatewayError::StreamInterrupted)),
    }
}

fn add_end(pipe: &mut redis::Pipeline, n: &Names, end: &End) {
    let cmd = pipe.cmd("XADD").arg(&n.log).arg("*");
    match end {
        End::Done(entry) => {
            cmd.arg("d").arg(cache_store::encode(entry).as_ref());
        }
        End::Response {
            status,
            content_type,
            body,
        } => {
            cmd.arg("r")
                .arg(status.as_str())
                .arg("c")
                .arg(content_type.as_ref().map_or(&b""[..], |c| c.as_bytes()))
                .arg("b")
                .arg(body.as_ref());
        }
        End::Error(e) => {
            cmd.arg("x").arg(e.code());
        }
        End::Lost => {
            cmd.arg("o").arg("");
        }
    }
}

/// Flights shared by the fleet.
pub struct FleetFlights {
    redis: Arc<Redis>,
    claim: Script,
    hold: Script,
}

/// What a request that found the call claimed elsewhere does.
pub enum Remote {
    /// Follows the local flight fed from the fleet leader's log.
    Following(LogReader),
    /// The leader died before any event: this replica took the call over
    /// and leads it (upstream, then published).
    TakeOver(Leader),
    /// Redis is unavailable: this replica goes upstream on its own.
    Alone(Leader),
}

struct Names {
    lead: String,
    log: String,
    /// How many followers on other replicas joined.
    followers: String,
}

impl FleetFlights {
    pub fn new(redis: Arc<Redis>) -> FleetFlights {
        FleetFlights {
            redis,
            claim: Script::new(CLAIM),
            hold: Script::new(HOLD),
        }
    }

    fn names(&self, key: &Key) -> Names {
        // The hash tag keeps a flight's keys in one cluster slot.
        let tag = format!("{}:{{f:{}}}", self.redis.key_prefix(), hex::encode(key));
        Names {
            lead: format!("{tag}:lead"),
            log: format!("{tag}:log"),
            followers: format!("{tag}:n"),
        }
    }

    fn owner(&self) -> String {
        format!("{}:{:x}", self.redis.replica(), rand::random::<u64>())
    }

    async fn try_claim(&self, n: &Names, owner: &str, fresh: bool) -> Result<bool, Unavailable> {
        let mut inv = self.claim.prepare_invoke();
        inv.key(&n.lead)
            .key(&n.log)
            .arg(owner)
            .arg(CLAIM_TTL.as_millis() as u64)
            .arg(if fresh { "1" } else { "0" });
        self.redis
            .invoke::<i64>(Op::Coalesce, &inv)
            .await
            .map(|won| won == 1)
    }

    /// Leads the call for the fleet if nobody does: `Ok(Some(publisher))`,
    /// to be started with a reader of the local flight; `Ok(None)`: another
    /// replica leads it.
    pub async fn claim(self: &Arc<Self>, key: &Key) -> Result<Option<Publisher>, Unavailable> {
        let n = self.names(key);
        let owner = self.owner();
        let won = self.try_claim(&n, &owner, true).await?;
        Ok(won.then(|| Publisher {
            fleet: Arc::clone(self),
            n,
            owner,
        }))
    }

    /// Renews the claim while someone reads: the leader's own client, or a
    /// follower on another replica. False once nobody does: the claim is
    /// released and the publisher lets go of the flight.
    /// Followers on other replicas so far (1 when Redis does not say: the
    /// safe answer).
    async fn followers(&self, n: &Names) -> i64 {
        self.redis
            .query::<Option<i64>>(Op::Coalesce, redis::cmd("GET").arg(&n.followers))
            .await
            .map_or(1, |v| v.unwrap_or(0))
    }

    async fn keep(&self, n: &Names, owner: &str, reader: &LogReader) -> bool {
        if reader.flight().readers() <= 1 && self.followers(n).await == 0 {
            self.release(n, owner).await;
            return false;
        }
        let mut inv = self.hold.prepare_invoke();
        inv.key(&n.lead)
            .arg(owner)
            .arg(CLAIM_TTL.as_millis() as u64);
        let _: Result<i64, _> = self.redis.invoke(Op::Coalesce, &inv).await;
        true
    }

    async fn release(&self, n: &Names, owner: &str) {
        let mut inv = self.hold.prepare_invoke();
        inv.key(&n.lead).arg(owner).arg(0);
        let _: Result<i64, _> = self.redis.invoke(Op::Coalesce, &inv).await;
    }

    /// Follows the call another replica leads, feeding `leader`'s local
    /// flight from its log. Waits here until the head arrives (so a leader
    /// that dies first can be taken over), then reads the rest in a task.
    pub async fn follow(
        self: &Arc<Self>,
        key: &Key,
        leader: Leader,
        first_byte: Instant,
        idle: Duration,
    ) -> Remote {
        let n = self.names(key);
        let Ok(conn) = self.redis.dedicated().await else {
            return Remote::Alone(leader);
        };
        let mut join = redis::pipe();
        join.cmd("INCR").arg(&n.followers).ignore();
        join.cmd("PEXPIRE")
            .arg(&n.followers)
            .arg(LOG_TTL_MS)
            .ignore();
        let _: Result<(), _> = self.redis.pipe(Op::Coalesce, &join).await;
        let mut reader = Reader {
            fleet: Arc::clone(self),
            conn,
            n,
            last: "0-0".to_string(),
            head: false,
            events: 0,
            last_data: Instant::now(),
            first_byte,
            idle,
        };
        // Until the head: inline, so a takeover can still go upstream.
        loop {
            match reader.step(&leader).await {
                Step::More if reader.head => break,
                Step::More => {}
                Step::Ended(end) => {
                    let reader = leader.flight.attach_leader(0);
                    leader.end(end);
                    return Remote::Following(reader);
                }
                Step::LeaderGone if reader.events == 0 => {
                    let owner = self.owner();
                    match self.try_claim(&reader.n, &owner, false).await {
                        Ok(true) => {
                            Publisher {
                                fleet: Arc::clone(self),
                                n: reader.n,
                                owner,
                            }
                            .start(leader.flight.attach_leader(0));
                            return Remote::TakeOver(leader);
                        }
                        // Someone else took it over: follow them.
                        Ok(false) => {}
                        Err(_) => return Remote::Alone(leader),
                    }
                }
                // Nothing relayed yet: this replica can still go alone.
                Step::Unavailable if reader.events == 0 => return Remote::Alone(leader),
                Step::LeaderGone | Step::Unavailable => {
                    let reader = leader.flight.attach_leader(0);
                    leader.end(End::Lost);
                    return Remote::Following(reader);
                }
            }
        }
        let local = leader.flight.attach_leader(0);
        tokio::spawn(async move {
            loop {
                match reader.step(&leader).await {
                    Step::More => {}
                    Step::Ended(end) => return leader.end(end),
                    Step::LeaderGone | Step::Unavailable => return leader.end(End::Lost),
                }
            }
        });
        Remote::Following(local)
    }
}

fn head_code(head: Head) -> &'static [u8] {
    match head {
        Head::Stream => b"s",
        Head::Other => b"o",
    }
}

fn mark_code(mark: Mark) -> &'static [u8] {
    match mark {
        Mark::Event => b"e",
        Mark::UsageOnly => b"u",
        Mark::Done => b"d",
    }
}

enum Step {
    More,
    Ended(End),
    LeaderGone,
    Unavailable,
}

/// One follower's read of a fleet leader's log.
struct Reader {
    fleet: Arc<FleetFlights>,
    conn: crate::shared::Dedicated,
    n: Names,
    last: String,
    head: bool,
    events: usize,
    last_data: Instant,
    first_byte: Instant,
    idle: Duration,
}

impl Reader {
    /// Reads what the log has (blocking up to `BLOCK`) into the flight.
    async fn step(&mut self, leader: &Leader) -> Step {
        let now = Instant::now();
        let deadline = if self.events == 0 {
            self.first_byte
        } else {
            self.last_data + self.idle
        };
        if now >= deadline {
            return Step::Ended(End::Error(if self.events == 0 {
                GatewayError::UpstreamTimeout
            } else {
                GatewayError::StreamInterrupted
            }));
        }
        let block = BLOCK.min(deadline - now);
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.n.log)
            .arg(&self.last);
        let reply: Option<StreamReadReply> = match self
            .conn
            .query(&self.fleet.redis, Op::Coalesce, &cmd, block)
            .await
        {
            Ok(r) => r,
            Err(_) => return Step::Unavailable,
        };
        let entries = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect::<Vec<_>>();
        if entries.is_empty() {
            // Nothing for a while: is the leader still there?
            let mut exists = redis::cmd("EXISTS");
            exists.arg(&self.n.lead);
            return match self.fleet.redis.query::<i64>(Op::Coalesce, &exists).await {
                Ok(0) => Step::LeaderGone,
                Ok(_) => Step::More,
                Err(_) => Step::Unavailable,
            };
        }
        for entry in entries {
            self.last = entry.id.clone();
            let field = |name: &str| -> Option<Vec<u8>> {
                match entry.map.get(name)? {
                    redis::Value::BulkString(b) => Some(b.clone()),
                    redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
                    _ => None,
                }
            };
            if let Some(h) = field("h") {
                if self.head {
                    // A second head: the leader died and another replica
                    // took the call over in a fresh log. Its answer is not
                    // the continuation of what was relayed.
                    return Step::LeaderGone;
                }
                self.head = true;
                leader
                    .flight
                    .set_head(if h == b"s" { Head::Stream } else { Head::Other });
            } else if let Some(ev) = field("e") {
                self.events += 1;
                self.last_data = Instant::now();
                let mark = match field("m").as_deref() {
                    Some(b"u") => Mark::UsageOnly,
                    Some(b"d") => Mark::Done,
                    _ => Mark::Event,
                };
                leader.flight.push_event(Bytes::from(ev), mark);
            } else if let Some(d) = field("d") {
                return Step::Ended(match cache_store::decode(&d) {
                    Some(e) => End::Done(Arc::new(e)),
                    None => End::Error(GatewayError::StreamInterrupted),
                });
            } else if let Some(status) = field("r") {
                let status = std::str::from_utf8(&status)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let content_type = field("c")
                    .filter(|c| !c.is_empty())
                    .and_then(|c| HeaderValue::from_bytes(&c).ok());
                return Step::Ended(End::Response {
                    status,
                    content_type,
                    body: Bytes::from(field("b").unwrap_or_default()),
                });
            } else if let Some(code) = field("x") {
                return Step::Ended(End::Error(error_of(&code)));
            } else if field("o").is_some() {
                return Step::Ended(End::Error(GatewayError::StreamInterrupted));
            }
        }
        Step::More
    }
}

/// The error a leader ended with, from its code.
fn error_of(code: &[u8]) -> GatewayError {
    match code {
        b"upstream_unreachable" => GatewayError::UpstreamUnreachable,
        b"upstream_timeout" => GatewayError::UpstreamTimeout,
        _ => GatewayError::StreamInterrupted,
    }
}
