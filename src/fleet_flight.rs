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
//! upstream itself (`miss`); one that already relayed events ends them with
//! the SSE error event. A Redis that is unavailable leaves every replica
//! with its own flights. Every key expires: the claim after `CLAIM_TTL`
//! unless renewed, the log a minute after its last write, and the log is
//! bounded like a local flight's (`FLIGHT_LOG_MAX`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use redis::streams::StreamReadReply;
use redis::Script;

use crate::cache::{End, Flight, Head, Key, Leader, FLIGHT_LOG_MAX};
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

/// Flights shared by the fleet.
pub struct FleetFlights {
    redis: Arc<Redis>,
    claim: Script,
    hold: Script,
}

/// What a request that found the call claimed elsewhere does.
pub enum Remote {
    /// Follows this flight, fed from the fleet leader's log.
    Following(Arc<Flight>),
    /// The leader died before any event: this replica took the call over
    /// and leads it (upstream, then published).
    TakeOver(Leader),
    /// Redis is unavailable: this replica goes upstream on its own.
    Alone(Leader),
}

struct Names {
    lead: String,
    log: String,
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

    /// Leads the call for the fleet if nobody does: `Ok(true)` and the
    /// local flight is published from now on; `Ok(false)`: another replica
    /// leads it.
    pub async fn claim(
        self: &Arc<Self>,
        key: &Key,
        flight: &Arc<Flight>,
    ) -> Result<bool, Unavailable> {
        let n = self.names(key);
        let owner = self.owner();
        let won = self.try_claim(&n, &owner, true).await?;
        if won {
            tokio::spawn(Arc::clone(self).publish(n, owner, Arc::clone(flight)));
        }
        Ok(won)
    }

    /// Mirrors a local flight into the log until it ends, renewing the
    /// claim meanwhile. It reads the flight like a follower (so the leader's
    /// call is finished even if its own client leaves: followers elsewhere
    /// may be reading).
    async fn publish(self: Arc<Self>, n: Names, owner: String, flight: Arc<Flight>) {
        let mut seen = 0;
        let mut head_seen = false;
        let mut bytes = 0usize;
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.tick().await;
        loop {
            let p = tokio::select! {
                p = flight.progress(seen, head_seen) => p,
                _ = renew.tick() => {
                    let mut inv = self.hold.prepare_invoke();
                    inv.key(&n.lead).arg(&owner).arg(CLAIM_TTL.as_millis() as u64);
                    let _: Result<i64, _> = self.redis.invoke(Op::Coalesce, &inv).await;
                    continue;
                }
            };
            let mut pipe = redis::pipe();
            let mut xadd = |fields: &[(&str, &[u8])]| {
                let cmd = pipe.cmd("XADD").arg(&n.log).arg("*");
                for (k, v) in fields {
                    cmd.arg(*k).arg(*v);
                }
            };
            if !head_seen {
                if let Some(head) = p.head {
                    head_seen = true;
                    xadd(&[("h", head_code(head))]);
                }
            }
            seen += p.events.len();
            let mut done = false;
            for (ev, usage_only) in &p.events {
                bytes += ev.len();
                if bytes > FLIGHT_LOG_MAX {
                    break;
                }
                xadd(&[("e", ev), ("u", if *usage_only { b"1" } else { b"0" })]);
            }
            if p.overflow || bytes > FLIGHT_LOG_MAX {
                xadd(&[("o", b"1")]);
                done = true;
            } else if let Some(end) = &p.end {
                match end {
                    End::Done(entry) => xadd(&[("d", &cache_store::encode(entry))]),
                    End::Response {
                        status,
                        content_type,
                        body,
                    } => xadd(&[
                        ("r", status.as_str().as_bytes()),
                        (
                            "c",
                            content_type.as_ref().map_or(&b""[..], |c| c.as_bytes()),
                        ),
                        ("b", body),
                    ]),
                    End::Error(e) => xadd(&[("x", e.code().as_bytes())]),
                }
                done = true;
            }
            pipe.cmd("PEXPIRE").arg(&n.log).arg(LOG_TTL_MS).ignore();
            let sent: Result<(), _> = self.redis.pipe(Op::Coalesce, &pipe).await;
            if sent.is_err() || done {
                // Released, so a follower elsewhere is not left waiting
                // for a claim to lapse (or takes over at once if this
                // replica could not publish).
                let mut inv = self.hold.prepare_invoke();
                inv.key(&n.lead).arg(&owner).arg(0);
                let _: Result<i64, _> = self.redis.invoke(Op::Coalesce, &inv).await;
                return;
            }
        }
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
                    let flight = Arc::clone(&leader.flight);
                    leader.end(end);
                    return Remote::Following(flight);
                }
                Step::LeaderGone if reader.events == 0 => {
                    let owner = self.owner();
                    match self.try_claim(&reader.n, &owner, false).await {
                        Ok(true) => {
                            tokio::spawn(Arc::clone(self).publish(
                                reader.n,
                                owner,
                                Arc::clone(&leader.flight),
                            ));
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
                    let flight = Arc::clone(&leader.flight);
                    leader.end(End::Error(GatewayError::StreamInterrupted));
                    return Remote::Following(flight);
                }
            }
        }
        let flight = Arc::clone(&leader.flight);
        tokio::spawn(async move {
            loop {
                match reader.step(&leader).await {
                    Step::More => {}
                    Step::Ended(end) => return leader.end(end),
                    Step::LeaderGone | Step::Unavailable => {
                        return leader.end(End::Error(GatewayError::StreamInterrupted))
                    }
                }
            }
        });
        Remote::Following(flight)
    }
}

fn head_code(head: Head) -> &'static [u8] {
    match head {
        Head::Stream => b"s",
        Head::Other => b"o",
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
                self.head = true;
                leader
                    .flight
                    .set_head(if h == b"s" { Head::Stream } else { Head::Other });
            } else if let Some(ev) = field("e") {
                self.events += 1;
                self.last_data = Instant::now();
                let usage_only = field("u").is_some_and(|u| u == b"1");
                leader.flight.push_event(Bytes::from(ev), usage_only);
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
