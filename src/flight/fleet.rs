//! Coalescing across replicas (docs/redis.md, "Coalescing across
//! replicas"), on top of each replica's own flights (`flight::Flights`).
//!
//! A replica that leads a cacheable miss looks it up in the shared cache
//! and, if it is not there, claims the call in Redis (`…:lead`, a key that
//! lapses unless renewed), in one script (`LOOKUP`). It mirrors its local
//! flight into a Redis stream (`…:log`): a stream's head and events as they
//! arrive; a non-streaming answer that ends quickly only by its end. The
//! end, the release of the claim and the answer's store into the shared
//! cache are one more script (`FINISH`), which writes the log only if a
//! follower registered (`…:n`). An uncontested miss is so two round trips.
//! An answer and its flight share a hash tag (`prefix:{<key>}:…`), so both
//! scripts work on a Redis Cluster; each leader writes a log of its own
//! (`…:log:<leader>`), so a follower never reads a later leader's entries
//! as the rest of the one it followed.
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
//! and a client sent nothing yet asks again (`request::cache`). A Redis
//! that is unavailable leaves every replica with its own flights. Every key
//! expires: the claim after `CLAIM_TTL` unless renewed, the log a minute
//! after its last write, and the log is bounded like a local flight's
//! (`FLIGHT_LOG_MAX`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use redis::streams::StreamReadReply;
use redis::RedisWrite;

use crate::cache::tiered::Fill;
use crate::cache::tiered::{self, CacheStore, SharedFill};
use crate::cache::Entry;
use crate::cache::Key;
use crate::flight::{
    End, Head, IfDropped, Leader, Mark, Next, Reader as LogReader, Until, FLIGHT_LOG_MAX,
};
use crate::http::error::GatewayError;
use crate::shared::{Lua, Op, Redis, Unavailable};

/// A claim not renewed for this long is the leader's death.
const CLAIM_TTL: Duration = Duration::from_secs(3);
/// How often a leader renews its claim.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How long a follower's read blocks before it checks the leader is alive.
const BLOCK: Duration = Duration::from_millis(500);
/// A non-streaming answer that ends within this is published with its end
/// alone.
const QUICK: Duration = Duration::from_millis(200);
/// How long a log outlives its last write.
const LOG_TTL_MS: u64 = 60_000;

/// A claimed call, to be mirrored into the fleet's log.
pub(crate) struct Publisher {
    fleet: Arc<FleetFlights>,
    n: Names,
    owner: String,
}

impl Publisher {
    /// Mirrors the local flight (through `reader`) into the log until it
    /// ends, renewing the claim meanwhile; `store`: the answer goes into
    /// the shared cache with the end. The reader keeps the call going for
    /// followers elsewhere; once the leader's own client has left and no
    /// replica follows, it lets go, so the call is cancelled as a lone
    /// client's would be.
    ///
    /// A stream's head and events are published as they arrive, so a
    /// follower elsewhere relays them live. Any other answer (a
    /// non-streaming one, an error) is only of use whole: one that ends
    /// within `QUICK` is written with its end alone, in one round trip with
    /// the release and the cache's store; a slower one is published as it
    /// comes, like a stream.
    pub(crate) fn start(self, reader: LogReader, fill: &mut Fill) {
        tokio::spawn(self.run(reader, fill.hand_over()));
    }

    /// Mirrors a flight taken over from a lost leader; its answer reaches
    /// the shared cache through the relay of the request that took over.
    fn run_for_takeover(self, reader: LogReader) {
        tokio::spawn(self.run(reader, None));
    }

    /// Gives the claim up unused (the request that won it was refused).
    pub(crate) async fn abandon(self) {
        self.fleet.release(&self.n, &self.owner).await;
    }

    async fn run(self, mut reader: LogReader, store: Option<SharedFill>) {
        let Publisher { fleet, n, owner } = self;
        // The first `QUICK`: the head and, for an answer that is not a
        // stream (of use to followers only whole), its end. A quick one is
        // published with its end alone: one round trip with the release and
        // the store, and no timer beyond this one.
        let first = tokio::time::timeout(QUICK, async {
            let (mut head, mut end) = reader.changed(Until::HeadOrEnd).await;
            while head != Some(Head::Stream) && end.is_none() {
                (head, end) = reader.changed(Until::End).await;
            }
            (head, end)
        });
        let first = first.await;
        if let Ok((head, Some(end))) = &first {
            if *head != Some(Head::Stream) {
                fleet
                    .finish(&n, &owner, end, store, reader.flight().upstream())
                    .await;
                return;
            }
        }
        // The rest in a future of its own, allocated only for a stream or
        // a slow answer: a quick one's task stays small.
        let known = first.ok().and_then(|(head, _)| head);
        Box::pin(Self::publish(fleet, n, owner, reader, store, known)).await;
    }

    /// Publishes a stream, or a slow answer, as it comes: `known`, its head
    /// if already seen.
    async fn publish(
        fleet: Arc<FleetFlights>,
        n: Names,
        owner: String,
        mut reader: LogReader,
        store: Option<SharedFill>,
        known: Option<Head>,
    ) {
        let start = tokio::time::Instant::now();
        let mut renew = tokio::time::interval_at(start + RENEW_EVERY, RENEW_EVERY);
        let head = match known {
            Some(head) => Some(head),
            // A slow answer: published as it comes, so a follower elsewhere
            // sees it alive; the claim renewed meanwhile.
            None => {
                let (head, end) = loop {
                    tokio::select! {
                        got = reader.changed(Until::HeadOrEnd) => break got,
                        _ = renew.tick() => {
                            if !fleet.keep(&n, &owner, &reader, Stage::BeforeHead).await {
                                return;
                            }
                        }
                    }
                };
                if let (None, Some(end)) = (head, &end) {
                    // An answer that never began: its end is all there is.
                    fleet
                        .finish(&n, &owner, end, store, reader.flight().upstream())
                        .await;
                    return;
                }
                head
            }
        };
        let Some(head) = head else { return };
        // The log from its start, its end included (even if the flight has
        // ended already: its events go out before the end).
        let mut end = None;
        let mut batch = Batch::new(&fleet, &n);
        let upstream = reader.flight().upstream();
        batch
            .inv
            .arg("h")
            .arg(head_code(head))
            .arg(upstream.as_ref().map_or(&b""[..], HeaderValue::as_bytes));
        batch.entries += 1;
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
                    Some(next) => end = batch.add(next, &mut bytes),
                    None => break,
                }
            }
            let sent: Result<i64, _> = if batch.entries > 0 {
                fleet
                    .redis
                    .invoke_in_background(Op::Coalesce, &fleet.append, &batch.inv)
                    .await
            } else {
                Ok(0)
            };
            if sent.is_err() {
                // Entries may be missing from the log: the flight is not
                // finished there (a follower would take the rest for the
                // whole), it is released, so a follower elsewhere that was
                // sent events ends with the error event and one that was
                // sent nothing takes the call over at once.
                fleet.release(&n, &owner).await;
                return;
            }
            if let Some(end) = &end {
                fleet
                    .finish(&n, &owner, end, store, reader.flight().upstream())
                    .await;
                return;
            }
            batch = Batch::new(&fleet, &n);
            // Wait for the next entry, renewing the claim meanwhile.
            let next = loop {
                tokio::select! {
                    next = std::future::poll_fn(|cx| reader.poll_next(cx)) => break next,
                    _ = renew.tick() => {
                        if !fleet.keep(&n, &owner, &reader, Stage::Headed).await {
                            return;
                        }
                    }
                }
            };
            end = batch.add(next, &mut bytes);
        }
    }
}

/// A batch of a leader's entries for its log: one APPEND.
struct Batch {
    inv: redis::Cmd,
    entries: usize,
}

impl Batch {
    fn new(fleet: &FleetFlights, n: &Names) -> Batch {
        let mut inv = fleet.append.call(&[&n.log], 256);
        inv.arg(LOG_TTL_MS);
        Batch { inv, entries: 0 }
    }

    /// Adds one entry of the local log; the end it brings, if any (past
    /// the bound, the flight ends as interrupted).
    fn add(&mut self, next: Next, bytes: &mut usize) -> Option<End> {
        match next {
            Next::Event(ev, mark) => {
                *bytes += ev.len();
                if *bytes > FLIGHT_LOG_MAX {
                    return Some(End::Error(GatewayError::StreamInterrupted));
                }
                self.inv.arg("e").arg(ev.as_ref()).arg(mark_code(mark));
                self.entries += 1;
                None
            }
            Next::End(end) => Some(end),
            Next::Behind => Some(End::Error(GatewayError::StreamInterrupted)),
        }
    }
}

/// An end's fields in the log, after FINISH's first three arguments; a
/// done end's answer is the first value (the cache's store reuses it), and
/// the upstream that answered follows it.
fn end_fields(inv: &mut redis::Cmd, end: &End, upstream: Option<&[u8]>) {
    match end {
        End::Done(entry) => {
            inv.arg("d");
            tiered::encode_into(entry, &mut inv.writer_for_next_arg());
            inv.arg("u").arg(upstream.unwrap_or(b""));
        }
        End::Response {
            status,
            content_type,
            body,
        } => {
            inv.arg("r")
                .arg(status.as_str())
                .arg("c")
                .arg(content_type.as_ref().map_or(&b""[..], |c| c.as_bytes()))
                .arg("b")
                .arg(body.as_ref())
                .arg("u")
                .arg(upstream.unwrap_or(b""));
        }
        End::Error(e) => {
            inv.arg("x").arg(e.code());
        }
        End::Lost => {
            inv.arg("o").arg("");
        }
    }
}

/// Flights shared by the fleet.
pub(crate) struct FleetFlights {
    redis: Arc<Redis>,
    /// The cache whose shared tier a lookup reads (when it has one).
    cache: Arc<CacheStore>,
    /// Whether a lookup reads the shared cache (`[redis] cache` on).
    read_cache: bool,
    lookup: Lua,
    keep: Lua,
    finish: Lua,
    release: Lua,
    append: Lua,
}

/// What the fleet said of a cacheable miss.
pub(crate) enum Lookup {
    /// The shared cache had the answer (now in memory too).
    Cached(Arc<Entry>),
    /// The shared cache had something that is not an answer: this replica
    /// goes upstream without claiming the call.
    Unclaimed,
    /// This replica leads the call for the fleet.
    Lead(Publisher),
    /// Another replica leads it (this owner, if Redis said).
    Claimed(Option<String>),
}

/// What a request that found the call claimed elsewhere does.
pub(crate) enum Remote {
    /// Follows the local flight fed from the fleet leader's log.
    Following(LogReader),
    /// The leader died before any event: this replica took the call over
    /// and leads it (upstream, then published).
    TakeOver(Leader),
    /// Redis is unavailable: this replica goes upstream on its own.
    Alone(Leader),
}

/// A flight's names: the answer's and the claim's, shared by every leader
/// of the key; the log's and the followers' count, the leader's own.
struct Names {
    cache: String,
    lead: String,
    log: String,
    /// How many followers on other replicas joined each leader (a hash,
    /// by leader).
    followers: String,
}

impl FleetFlights {
    pub(crate) fn new(redis: Arc<Redis>, cache: Arc<CacheStore>) -> FleetFlights {
        FleetFlights {
            read_cache: cache.read_by_fleet(),
            cache,
            lookup: redis.lua("lookup", include_str!("lua/lookup.lua")),
            keep: redis.lua("keep", include_str!("lua/keep.lua")),
            finish: redis.lua("finish", include_str!("lua/finish.lua")),
            release: redis.lua("release", include_str!("lua/release.lua")),
            append: redis.lua("append", include_str!("lua/append.lua")),
            redis,
        }
    }

    /// The names of `key`'s answer and claim, and of `owner`'s flight.
    fn names(&self, key: &Key, owner: &str) -> Names {
        // Four names from one formatted base (on every miss).
        let base = tiered::redis_key(self.redis.key_prefix(), key, "");
        let name = |part: &str, of: &str| {
            let mut s = String::with_capacity(base.len() + part.len() + of.len());
            s.push_str(&base);
            s.push_str(part);
            s.push_str(of);
            s
        };
        Names {
            cache: name("cache", ""),
            lead: name("lead", ""),
            log: name("log:", owner),
            followers: name("n", ""),
        }
    }

    fn owner(&self) -> String {
        format!("{}:{:x}", self.redis.replica(), rand::random::<u64>())
    }

    async fn look_up(&self, key: &Key, owner: &str) -> Result<LookedUp, Unavailable> {
        let n = self.names(key, owner);
        let mut inv = self
            .lookup
            .call(&[&n.cache, &n.lead, &n.followers], owner.len() + 32);
        inv.arg(if self.read_cache { "1" } else { "0" })
            .arg(owner)
            .arg(CLAIM_TTL.as_millis() as u64)
            .arg(LOG_TTL_MS);
        let op = if self.read_cache {
            Op::CacheGet
        } else {
            Op::Coalesce
        };
        let reply: LookupReply = self.redis.invoke(op, &self.lookup, &inv).await?;
        Ok(match reply {
            LookupReply::Cached(answer) => LookedUp::Cached(answer),
            LookupReply::Claimed => LookedUp::Claimed(n),
            LookupReply::Taken(holder) => LookedUp::Taken(holder),
        })
    }

    /// Looks a cacheable miss up in the shared cache (with `[redis] cache`)
    /// and, if it is not there, claims its call for this replica unless
    /// another one leads it: one round trip.
    pub(crate) async fn lookup(self: &Arc<Self>, key: &Key) -> Result<Lookup, Unavailable> {
        let owner = self.owner();
        let looked = match self.look_up(key, &owner).await {
            Ok(looked) => looked,
            Err(e) => {
                // The script may have run and claimed the call for a
                // request that now goes on alone: let it go, so followers
                // elsewhere are not held by a claim nobody publishes.
                let (fleet, n) = (Arc::clone(self), self.names(key, &owner));
                tokio::spawn(async move { fleet.release(&n, &owner).await });
                return Err(e);
            }
        };
        if self.read_cache && !matches!(looked, LookedUp::Cached(_)) {
            self.cache.shared_missed();
        }
        Ok(match looked {
            LookedUp::Cached(answer) => match self.cache.adopt(key, &answer) {
                Some(entry) => Lookup::Cached(entry),
                None => Lookup::Unclaimed,
            },
            LookedUp::Claimed(n) => Lookup::Lead(Publisher {
                fleet: Arc::clone(self),
                n,
                owner,
            }),
            LookedUp::Taken(leader) => Lookup::Claimed(leader),
        })
    }

    /// Renews the claim while someone reads: the leader's own client, or a
    /// follower on another replica. False once nobody does (the claim is
    /// released) or the claim is no longer ours: the publisher lets go of
    /// the flight.
    async fn keep(&self, n: &Names, owner: &str, reader: &LogReader, stage: Stage) -> bool {
        // Before upstream's head the leader's own client is not a reader of
        // the flight yet: never lone then.
        let lone = stage == Stage::Headed && reader.flight().readers() <= 1;
        let mut inv = self.keep.call(&[&n.lead, &n.followers], owner.len());
        inv.arg(owner)
            .arg(CLAIM_TTL.as_millis() as u64)
            .arg(if lone { "1" } else { "0" });
        // Redis unavailable: keep going, as a lone replica would.
        self.redis
            .invoke::<i64>(Op::Coalesce, &self.keep, &inv)
            .await
            .map_or(true, |kept| kept == 1)
    }

    /// The end of a led flight: FINISH.
    async fn finish(
        &self,
        n: &Names,
        owner: &str,
        end: &End,
        store: Option<SharedFill>,
        upstream: Option<HeaderValue>,
    ) {
        let answer_len = match end {
            End::Done(entry) => Some(tiered::encoded_len(entry)),
            _ => None,
        };
        // Whether and for how long the answer goes into the shared cache is
        // the cache's decision (`SharedFill`); it rides this script so a
        // request that finds the call released finds the answer stored.
        let cache_ttl = match (store, end) {
            (Some(fill), End::Done(entry)) => fill.ttl_ms(entry).unwrap_or(0),
            _ => 0,
        };
        let mut inv = self.finish.call(
            &[&n.lead, &n.log, &n.followers, &n.cache],
            owner.len() + answer_len.unwrap_or(0) + 64,
        );
        inv.arg(owner).arg(LOG_TTL_MS).arg(cache_ttl);
        end_fields(&mut inv, end, upstream.as_ref().map(HeaderValue::as_bytes));
        let op = if cache_ttl > 0 {
            Op::CachePut
        } else {
            Op::Coalesce
        };
        if self
            .redis
            .invoke_in_background::<i64>(op, &self.finish, &inv)
            .await
            .is_err()
        {
            // Not finished: at least not left claimed.
            self.release(n, owner).await;
        }
    }

    async fn release(&self, n: &Names, owner: &str) {
        let mut inv = self.release.call(&[&n.lead], owner.len());
        inv.arg(owner);
        let _: Result<i64, _> = self.redis.invoke(Op::Coalesce, &self.release, &inv).await;
    }

    /// Follows the call another replica leads, feeding `leader`'s local
    /// flight from its log. Waits here until the head arrives (so a leader
    /// that dies first can be taken over), then reads the rest in a task.
    pub(crate) async fn follow(
        self: &Arc<Self>,
        key: &Key,
        owner: Option<String>,
        leader: Leader,
        first_byte: Instant,
        idle: Duration,
    ) -> Remote {
        // If this request goes away while it waits here (its client left),
        // the replica's other followers of this flight ask again; once it
        // leads upstream itself, a drop is an interruption again.
        let mut leader = leader;
        leader.if_dropped(IfDropped::Lost);
        match self.feed(key, owner, leader, first_byte, idle).await {
            Remote::TakeOver(mut l) => {
                l.if_dropped(IfDropped::Interrupted);
                Remote::TakeOver(l)
            }
            Remote::Alone(mut l) => {
                l.if_dropped(IfDropped::Interrupted);
                Remote::Alone(l)
            }
            following => following,
        }
    }

    /// `follow`, the flight fed from the log.
    async fn feed(
        self: &Arc<Self>,
        key: &Key,
        owner: Option<String>,
        leader: Leader,
        first_byte: Instant,
        idle: Duration,
    ) -> Remote {
        let Ok(conn) = self.redis.dedicated().await else {
            return Remote::Alone(leader);
        };
        let mut reader = Reader {
            fleet: Arc::clone(self),
            conn,
            n: self.names(key, ""),
            owner: String::new(),
            released: false,
            last: String::new(),
            head: false,
            events: 0,
            last_data: Instant::now(),
            first_byte,
            idle,
        };
        // No owner: gone as it was asked for (the takeover below).
        if let Some(owner) = owner {
            reader.join(self.names(key, &owner), owner);
        }
        // Until the head: inline, so a takeover can still go upstream.
        loop {
            let step = if reader.owner.is_empty() {
                if Instant::now() >= reader.first_byte {
                    Step::Ended(End::Error(GatewayError::UpstreamTimeout))
                } else {
                    Step::LeaderGone
                }
            } else {
                reader.step(&leader).await
            };
            match step {
                Step::More if reader.head => break,
                Step::More => {}
                Step::Ended(end) => {
                    let reader = leader.flight.attach_leader(0);
                    leader.end(end);
                    return Remote::Following(reader);
                }
                Step::LeaderGone if reader.events == 0 => {
                    let owner = self.owner();
                    match self.look_up(key, &owner).await {
                        Ok(LookedUp::Claimed(n)) => {
                            Publisher {
                                fleet: Arc::clone(self),
                                n,
                                owner,
                            }
                            .run_for_takeover(leader.flight.attach_leader(0));
                            return Remote::TakeOver(leader);
                        }
                        // The leader finished as this one looked: its answer.
                        Ok(LookedUp::Cached(answer)) => {
                            let reader = leader.flight.attach_leader(0);
                            leader.end(match tiered::decode(&answer) {
                                Some(e) => End::Done(Arc::new(e)),
                                None => End::Lost,
                            });
                            return Remote::Following(reader);
                        }
                        // Someone else took it over: follow them, in their log.
                        Ok(LookedUp::Taken(Some(other))) => {
                            reader.join(self.names(key, &other), other);
                        }
                        // Held, by a leader that did not say who: wait a
                        // read's time before asking again (never a loop of
                        // round trips).
                        Ok(LookedUp::Taken(None)) => {
                            let wait = BLOCK
                                .min(reader.first_byte.saturating_duration_since(Instant::now()));
                            tokio::time::sleep(wait).await;
                        }
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

/// Where a published call is: before upstream's head, or past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    BeforeHead,
    Headed,
}

/// LOOKUP's reply, decoded.
enum LookupReply {
    /// {1, answer}: the shared cache's answer.
    Cached(Vec<u8>),
    /// {2}: claimed for this request.
    Claimed,
    /// {3, leader}: another request leads (its owner name, if it reads).
    Taken(Option<String>),
}

impl redis::FromRedisValue for LookupReply {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let redis::Value::Array(items) = v else {
            return Err("LOOKUP answers an array".to_string().into());
        };
        let mut items = items.into_iter();
        let code = match items.next() {
            Some(redis::Value::Int(c)) => c,
            _ => return Err("LOOKUP's first item is its code".to_string().into()),
        };
        let last = match items.next() {
            Some(redis::Value::BulkString(b)) => Some(b),
            _ => None,
        };
        Ok(match (code, last) {
            (1, Some(answer)) => LookupReply::Cached(answer),
            (2, _) => LookupReply::Claimed,
            (_, holder) => LookupReply::Taken(holder.and_then(|o| String::from_utf8(o).ok())),
        })
    }
}

/// What LOOKUP answered.
enum LookedUp {
    Cached(Vec<u8>),
    Claimed(Names),
    Taken(Option<String>),
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
    /// The leader followed ("": none yet).
    owner: String,
    /// The claim was seen released (one more read before the leader is
    /// taken for gone).
    released: bool,
    last: String,
    head: bool,
    events: usize,
    last_data: Instant,
    first_byte: Instant,
    idle: Duration,
}

impl Reader {
    /// Reads `owner`'s log from the start. (The `LOOKUP` that named the
    /// owner registered this follower with it.)
    fn join(&mut self, n: Names, owner: String) {
        self.n = n;
        self.owner = owner;
        self.released = false;
        self.last = "0-0".to_string();
    }

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
        // Once the claim was seen released, one last look, not a wait.
        let block = if self.released {
            Duration::from_millis(1)
        } else {
            BLOCK.min(deadline - now)
        };
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
            let mut holder = redis::cmd("GET");
            holder.arg(&self.n.lead);
            return match self
                .fleet
                .redis
                .query::<Option<String>>(Op::Coalesce, &holder)
                .await
            {
                Ok(Some(o)) if o == self.owner => Step::More,
                // Released: its end, if any, was written with the release
                // (FINISH), so one more read finds it.
                Ok(_) if !self.released => {
                    self.released = true;
                    Step::More
                }
                Ok(_) => Step::LeaderGone,
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
            if let Some(u) = field("u").filter(|u| !u.is_empty()) {
                // The upstream that answers, named with the head and the end.
                if let Ok(u) = HeaderValue::from_bytes(&u) {
                    leader.flight.set_upstream(&u);
                }
            }
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
                return Step::Ended(match tiered::decode(&d) {
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
                // Its leader lost its own (or was refused): ask again.
                return Step::Ended(End::Lost);
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
