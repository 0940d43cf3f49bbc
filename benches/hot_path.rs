//! Micro benchmarks of the request path's hot spots (criterion). Results and
//! method: benches/README.md.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice::api::json;
use sluice::api::openai::{Assembler, Shape};
use sluice::api::sse::{event_data, EventData, Framer};
use sluice::api::Format;
use sluice::app::Snapshot;
use sluice::cache::{self, Entry, Store};
use sluice::config::{Config, LimitSpec};
use sluice::limit::{Limiter, Standings};
use sluice::metrics::Metrics;

fn body_of(size: usize) -> Value {
    let text = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    json!({
        "model": "deepseek-chat",
        "temperature": 0.7,
        "stream": true,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": &text[..size.saturating_sub(120)]},
        ],
    })
}

fn cache_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache_key");
    for kib in [1usize, 16, 128] {
        let raw = serde_json::to_vec(&body_of(kib * 1024)).expect("json");
        g.throughput(Throughput::Bytes((kib * 1024) as u64));
        // The hash over a body already scanned to canonical form.
        let scanned = json::scan(&raw, json::Canonical::Write).expect("json");
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{kib}KiB")),
            &scanned,
            |b, body| b.iter(|| cache::key(Some("search-team"), "chat", black_box(body))),
        );
        // Scan (validate + canonical form) + key: what a request really pays.
        g.bench_with_input(
            BenchmarkId::new("parse_and_key", format!("{kib}KiB")),
            &raw,
            |b, raw| {
                b.iter(|| {
                    let scan = json::scan(black_box(raw), json::Canonical::Write).expect("json");
                    cache::key(Some("search-team"), "chat", &scan)
                })
            },
        );
    }
    g.finish();
}

fn config_with(tenants: usize) -> Config {
    let mut text = String::new();
    for i in 0..tenants {
        text.push_str(&format!(
            "[[tenants]]\nname = \"t{i}\"\nkey_sha256 = [\"{}\"]\n",
            hex::encode(Sha256::digest(format!("sk-key-{i}")))
        ));
    }
    Config::parse(&text, |_| None).expect("config")
}

fn auth(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth_lookup");
    let metrics = std::sync::Arc::new(Metrics::new());
    for tenants in [1usize, 1000] {
        let snap = Snapshot::build(
            config_with(tenants),
            &sluice::Keys::default(),
            None,
            &Limiter::local(),
            &metrics,
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer sk-key-{}", tenants / 2)).expect("v"),
        );
        g.bench_function(format!("{tenants}_tenants"), |b| {
            b.iter(|| {
                snap.authenticate(black_box(&headers), Format::OpenAi)
                    .expect("known")
            })
        });
    }
    g.finish();
}

/// The choice of an upstream for a request: by model, the lowest tier with
/// an available upstream, a free slot, weight.
fn upstream_choice(c: &mut Criterion) {
    let mut g = c.benchmark_group("upstream_choice");
    let metrics = std::sync::Arc::new(Metrics::new());
    let one = config_with(1);
    let three = Config::parse(
        &format!(
            "[[upstreams]]\nname = \"a\"\nbase_url = \"http://a\"\nweight = 3\nmax_concurrent = 64\n\
             [[upstreams]]\nname = \"b\"\nbase_url = \"http://b\"\nmodels = [\"deepseek-chat\", \"deepseek-reasoner\"]\n\
             [[upstreams]]\nname = \"c\"\nbase_url = \"http://c\"\ntier = 1\n\
             model_map = {{ \"deepseek-chat\" = \"ds-v3\" }}\n\
             [[tenants]]\nname = \"t\"\nkey_sha256 = [\"{}\"]\n",
            "ab".repeat(32)
        ),
        |_| None,
    )
    .expect("config");
    for (name, config) in [("1_upstream", one), ("3_upstreams", three)] {
        let snap = Snapshot::build(
            config,
            &sluice::Keys::default(),
            None,
            &Limiter::local(),
            &metrics,
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                snap.first_upstream(black_box("deepseek-chat"))
                    .expect("served")
            })
        });
    }
    g.finish();
}

fn limiter(c: &mut Criterion) {
    use futures_util::FutureExt;
    let metrics = Metrics::new();
    let limiter = Limiter::local();
    let limits = limiter.tenant(
        "t",
        LimitSpec {
            requests_per_minute: u32::MAX / 2,
            request_burst: u32::MAX / 2,
            tokens_per_minute: u64::MAX / 4,
            max_concurrent: u32::MAX / 2,
        },
        None,
        &metrics,
    );
    // Admission (request bucket, concurrency), the token check and the
    // settlement: the limiter's whole work for one request, in memory.
    c.bench_function("limiter/admit_check_settle", |b| {
        b.iter(|| {
            let mut s = Standings::default();
            let a = limiter
                .admit(&limits, &mut s)
                .now_or_never()
                .expect("in memory, admission never waits")
                .expect("allowed");
            a.check.check(&limits, &mut s).expect("allowed");
            if let Some(lease) = a.lease {
                lease.settle(1, 0.0);
            }
        })
    });
}

fn completion() -> Value {
    json!({
        "id": "x", "object": "chat.completion", "created": 1, "model": "deepseek-chat", "system_fingerprint": "fp",
        "choices": [{"index": 0, "logprobs": null, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "word ".repeat(400)}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 400, "total_tokens": 430},
    })
}

fn cache_hit(c: &mut Criterion) {
    let store = Store::new(1 << 30, std::time::Duration::from_secs(3600));
    let raw = serde_json::to_vec(&body_of(1024)).expect("json");
    let key = cache::key(
        Some("t"),
        "chat",
        &json::scan(&raw, json::Canonical::Write).expect("json"),
    );
    let entry = Entry::from_completion(Bytes::from(completion().to_string()), Format::OpenAi)
        .expect("entry");
    store.insert(key, std::sync::Arc::new(entry));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    use sluice::response::hit::Delivery;
    let replayed = Delivery::Stream { usage_chunk: true };
    for (name, delivery) in [("non_stream", Delivery::Whole), ("sse_replay", replayed)] {
        c.bench_function(&format!("cache_hit/{name}"), |b| {
            b.iter(|| {
                let entry = store.get(black_box(&key)).expect("hit");
                let resp =
                    sluice::response::hit::entry_response(&entry, delivery).expect("replays");
                // Drain the body as hyper would.
                rt.block_on(resp.into_body().collect())
                    .map(|c| c.to_bytes())
                    .expect("body")
            })
        });
    }
}

/// A recorded 500-event stream as DeepSeek sends it, cut into network-sized reads.
fn recorded_stream() -> Vec<Bytes> {
    let mut all = Vec::new();
    for i in 0..499 {
        let v = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-chat",
            "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "logprobs": null, "finish_reason": null}]});
        all.extend_from_slice(format!("data: {v}\n\n").as_bytes());
    }
    let usage = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-chat", "choices": [],
        "usage": {"prompt_tokens": 30, "completion_tokens": 499, "total_tokens": 529}});
    all.extend_from_slice(format!("data: {usage}\n\ndata: [DONE]\n\n").as_bytes());
    all.chunks(1400).map(Bytes::copy_from_slice).collect()
}

fn sse(c: &mut Criterion) {
    let reads = recorded_stream();
    let total: usize = reads.iter().map(Bytes::len).sum();
    let mut g = c.benchmark_group("sse_500_events");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("frame_and_usage", |b| {
        b.iter(|| {
            let mut framer = Framer::default();
            let mut usage = None;
            for r in &reads {
                framer
                    .push(r.clone(), |ev| {
                        if let EventData::Data(d) = event_data(&ev) {
                            let info = sluice::api::openai::inspect(&d).expect("json");
                            if info.usage.is_some() {
                                usage = info.usage;
                            }
                        }
                    })
                    .expect("sse");
            }
            usage.expect("usage")
        })
    });
    g.bench_function("frame_usage_and_assemble", |b| {
        b.iter(|| {
            let mut framer = Framer::default();
            let mut asm = Assembler::new(Shape::Chat);
            for r in &reads {
                framer
                    .push(r.clone(), |ev| {
                        if let EventData::Data(d) = event_data(&ev) {
                            asm.push(&d).expect("json");
                        }
                    })
                    .expect("sse");
            }
            Entry::from_assembled(&asm.finish(), Format::OpenAi).expect("entry")
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    cache_key,
    auth,
    upstream_choice,
    limiter,
    cache_hit,
    sse
);
criterion_main!(benches);
