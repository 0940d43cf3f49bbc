//! Property tests of the pure parts of the request and response paths,
//! through the crate's public API only: the SSE framer (`sse::Framer`), the
//! cache key (`cache::key`) and the include-usage splice
//! (`request::validate::with_include_usage`). Each property runs on a few hundred
//! generated inputs; a failure prints the shrunk input that broke it.
//!

use std::collections::BTreeSet;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Map, Number, Value};
use sluice::api::sse::{self, Framer};
use sluice::api::Endpoint;
use sluice::api::{anthropic, openai};
use sluice::cache::{self, Key};
use sluice::request::validate::{with_include_usage, ApiRequest, Keyed};

// ---------------------------------------------------------------------------
// Generators and renderers shared by the properties.

/// A small deterministic generator, so a rendering (whitespace, key order,
/// escapes) is a pure function of a seed that proptest generates and shrinks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*; the seed is forced odd so it is never stuck at 0.
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// JSON's insignificant whitespace, in every form it may take.
fn ws(rng: &mut Rng, out: &mut String) {
    const WS: [&str; 6] = ["", "", " ", "\n", "\t", "\r\n  "];
    out.push_str(WS[rng.below(WS.len())]);
}

/// A JSON string literal, with some characters written as `\u` escapes (and
/// `/` as `\/`): the same string, spelled differently.
fn write_str(rng: &mut Rng, s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match rng.below(4) {
            0 => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            1 if c == '/' => out.push_str("\\/"),
            _ => {
                let lit = serde_json::to_string(&c.to_string()).expect("string");
                out.push_str(&lit[1..lit.len() - 1]);
            }
        }
    }
    out.push('"');
}

/// Writes `v` as JSON text with whitespace, key order and string escapes
/// chosen by `rng`. Numbers are written as serde_json writes them.
fn render(v: &Value, rng: &mut Rng, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            rng.shuffle(&mut keys);
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(rng, out);
                write_str(rng, k, out);
                ws(rng, out);
                out.push(':');
                ws(rng, out);
                render(&map[k], rng, out);
                ws(rng, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(rng, out);
                render(item, rng, out);
                ws(rng, out);
            }
            out.push(']');
        }
        Value::String(s) => write_str(rng, s, out),
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn rendered(v: &Value, seed: u64) -> String {
    let mut rng = Rng(seed);
    let mut out = String::new();
    ws(&mut rng, &mut out);
    render(v, &mut rng, &mut out);
    ws(&mut rng, &mut out);
    out
}

fn key_text() -> impl Strategy<Value = String> {
    // Mostly a few short names, so objects at different depths share keys
    // and sorting has work to do; sometimes anything at all.
    prop_oneof![
        4 => "[a-d]{0,3}",
        1 => "[a-c\"\\\\/\u{0}-\u{1f}é\u{1F600}]{0,5}",
        1 => any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        key_text().prop_map(Value::String),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key_text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request-like top-level object: a JSON object, as every cached body is.
fn body() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key_text(), json(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn parse(text: &[u8]) -> Value {
    serde_json::from_slice(text).expect("generated JSON parses")
}

// ---------------------------------------------------------------------------
// SSE framer: the same events however the bytes are split across reads.

/// The framer's contract written the slow, obvious way: an event ends just
/// past a blank line (`\n\n`, `\r\n\r\n`, or a `\n` that starts an event, as
/// DeepSeek's keep-alive blank lines do). What is left is pending.
fn reference_frames(bytes: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut events = Vec::new();
    let mut start = 0;
    for i in 0..bytes.len() {
        if bytes[i] != b'\n' {
            continue;
        }
        let ev = &bytes[start..=i];
        let n = ev.len();
        let ends =
            n == 1 || ev[n - 2] == b'\n' || (n >= 3 && ev[n - 2] == b'\r' && ev[n - 3] == b'\n');
        if ends {
            events.push(ev.to_vec());
            start = i + 1;
        }
    }
    (events, bytes[start..].to_vec())
}

fn frame(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut framer = Framer::default();
    let mut events = Vec::new();
    for chunk in chunks {
        framer
            .push(Bytes::copy_from_slice(chunk), |e| events.push(e.to_vec()))
            .expect("well under MAX_EVENT");
    }
    (events, framer.pending().to_vec())
}

/// Byte streams that look like SSE often enough to matter: lines, blank
/// lines, CRLF, comments, `data:` fields, and bare bytes between them.
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b": keep-alive".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(br#"{"choices":[{"delta":{"content":"hi"}}]}"#.to_vec()),
        Just(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#.to_vec()),
        prop::collection::vec(any::<u8>(), 0..8),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
}

/// Cut points for `len` bytes: sorted, deduplicated, inside the input.
fn splits(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn framer_is_blind_to_read_boundaries(
        bytes in sse_bytes(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let whole = frame(&[&bytes]);
        let chunks = splits(&bytes, &cuts);
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(&frame(&refs), &whole);
        // One byte at a time is the most split a stream can be.
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        prop_assert_eq!(&frame(&bytewise), &whole);
        // And the events are the ones the contract names, with nothing lost
        // or added: events then pending give back the input.
        prop_assert_eq!(&whole, &reference_frames(&bytes));
        prop_assert_eq!(whole.0.concat().len() + whole.1.len(), bytes.len());
    }

    /// What the relay reads from the events (data, `[DONE]`, usage) does not
    /// depend on how the bytes arrived either.
    #[test]
    fn usage_read_from_a_stream_is_blind_to_read_boundaries(
        prompt in 0u64..1_000_000,
        completion in 0u64..1_000_000,
        deltas in prop::collection::vec("[a-z \n]{0,12}", 0..6),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let end = if crlf { "\r\n\r\n" } else { "\n\n" };
        let mut stream = String::from(": keep-alive\n\n");
        for d in &deltas {
            let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": d}}]});
            stream.push_str(&format!("data: {chunk}{end}"));
        }
        let usage = serde_json::json!({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}});
        stream.push_str(&format!("data: {usage}{end}data: [DONE]{end}"));

        let chunks = splits(stream.as_bytes(), &cuts);
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (events, pending) = frame(&refs);
        prop_assert!(pending.is_empty());
        let mut found = None;
        let mut done = false;
        for ev in &events {
            match sse::event_data(ev) {
                sse::EventData::None => {}
                sse::EventData::Done => done = true,
                sse::EventData::Data(d) => {
                    let info = openai::inspect(&d).expect("valid chunk");
                    prop_assert!(!info.is_error);
                    if info.usage_only {
                        found = info.usage;
                    }
                }
            }
        }
        prop_assert!(done);
        let u = found.expect("the usage chunk was seen");
        prop_assert_eq!((u.prompt, u.completion, u.total), (prompt, completion, prompt + completion));
    }
}

// ---------------------------------------------------------------------------
// Cache key: the same for JSON-equal bodies, different otherwise.

/// The one place these properties call `cache::key`: over the body's
/// strict scan, as the request path computes it.
fn key_of(scope: Option<&str>, endpoint: &str, bytes: &[u8]) -> Key {
    let scan =
        sluice::api::json::scan(bytes, sluice::api::json::Canonical::Write).expect("a JSON object");
    cache::key(scope, endpoint, &scan)
}

/// The `n`th node of `v` in pre-order (wrapping), replaced by `new`.
fn replace_nth(v: &Value, n: usize, new: Value) -> Value {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Object(m) => m.values().map(count).sum(),
            Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    fn go(v: &mut Value, n: &mut usize, new: &mut Option<Value>) {
        if *n == 0 {
            if let Some(new) = new.take() {
                *v = new;
            }
            return;
        }
        *n -= 1;
        match v {
            Value::Object(m) => m.values_mut().for_each(|c| go(c, n, new)),
            Value::Array(a) => a.iter_mut().for_each(|c| go(c, n, new)),
            _ => {}
        }
    }
    let mut out = v.clone();
    let mut n = n % count(v);
    go(&mut out, &mut n, &mut Some(new));
    out
}

/// Small edits that make a body mean something else.
#[derive(Debug, Clone)]
enum Edit {
    /// Some node (the whole body, a member, an element, a leaf) replaced.
    Replace(usize, Value),
    /// A member added at the top, or a top-level member dropped.
    AddMember(String, Value),
    DropMember(usize),
    /// The body wrapped in an array, or every top-level value in one.
    Wrap,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<usize>(), json()).prop_map(|(n, v)| Edit::Replace(n, v)),
        1 => (key_text(), json()).prop_map(|(k, v)| Edit::AddMember(k, v)),
        1 => any::<usize>().prop_map(Edit::DropMember),
        1 => Just(Edit::Wrap),
    ]
}

fn apply(v: &Value, e: &Edit) -> Value {
    match e {
        Edit::Replace(n, new) => replace_nth(v, *n, new.clone()),
        Edit::AddMember(k, new) => {
            let mut out = v.clone();
            if let Some(m) = out.as_object_mut() {
                m.insert(k.clone(), new.clone());
            }
            out
        }
        Edit::DropMember(n) => {
            let mut out = v.clone();
            if let Some(m) = out.as_object_mut() {
                if let Some(k) = m.keys().nth(n % m.len().max(1)).cloned() {
                    m.remove(&k);
                }
            }
            out
        }
        Edit::Wrap => match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), Value::Array(vec![v.clone()])))
                    .collect(),
            ),
            other => Value::Array(vec![other.clone()]),
        },
    }
}

/// JSON equality with numbers compared by value, exactly: `1`, `1.0` and
/// `-0.0`/`0` are equal; `9007199254740993` and `9007199254740992.0` are not.
fn json_eq(a: &Value, b: &Value) -> bool {
    fn num_eq(a: &Number, b: &Number) -> bool {
        let int = |n: &Number| n.as_i64().map(i128::from).or(n.as_u64().map(i128::from));
        match (int(a), int(b)) {
            (Some(x), Some(y)) => x == y,
            (Some(i), None) | (None, Some(i)) => {
                let f = a
                    .as_f64()
                    .filter(|_| a.is_f64())
                    .or(b.as_f64())
                    .unwrap_or(f64::NAN);
                f.fract() == 0.0 && f.abs() < 1e38 && f as i128 == i
            }
            (None, None) => a.as_f64() == b.as_f64(),
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_eq(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        (x, y) => x == y,
    }
}

/// What the key is over: the body less the top-level delivery fields.
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("stream");
        m.remove("stream_options");
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn key_ignores_key_order_whitespace_and_escapes(
        v in body(),
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        let (ta, tb) = (rendered(&v, a), rendered(&v, b));
        prop_assert_eq!(parse(ta.as_bytes()), parse(tb.as_bytes()));
        prop_assert_eq!(
            key_of(Some("t"), "chat", ta.as_bytes()),
            key_of(Some("t"), "chat", tb.as_bytes()),
            "{} vs {}", ta, tb
        );
    }

    /// `stream` and `stream_options` at the top only say how to deliver the
    /// answer, so a streaming and a non-streaming request share an entry.
    #[test]
    fn key_ignores_top_level_delivery_fields(
        v in body(),
        stream in json(),
        opts in json(),
        seed in any::<u64>(),
    ) {
        let mut with = v.clone();
        if let Some(m) = with.as_object_mut() {
            m.insert("stream".into(), stream);
            m.insert("stream_options".into(), opts);
        }
        let plain = content(&v);
        prop_assert_eq!(
            key_of(None, "chat", rendered(&plain, seed).as_bytes()),
            key_of(None, "chat", rendered(&with, seed).as_bytes())
        );
    }

    #[test]
    fn key_differs_when_the_body_means_something_else(
        v in body(),
        e in edit(),
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        let w = apply(&v, &e);
        // Only objects are requests (an edit may have replaced the root).
        prop_assume!(w.is_object());
        // Round trip through text first: the key sees what a parse yields
        // (an f64 may come back as its nearest neighbour).
        let (tv, tw) = (rendered(&v, a), rendered(&w, b));
        let (pv, pw) = (parse(tv.as_bytes()), parse(tw.as_bytes()));
        let (cv, cw) = (content(&pv), content(&pw));
        // `1` and `1.0` differ as `Value`s but are JSON-equal: whether their
        // keys agree is the number-spelling property's business, below.
        prop_assume!(cv == cw || !json_eq(&cv, &cw));
        let (kv, kw) = (key_of(Some("t"), "chat", tv.as_bytes()), key_of(Some("t"), "chat", tw.as_bytes()));
        prop_assert_eq!(kv == kw, cv == cw, "{} vs {}", tv, tw);
    }

    #[test]
    fn key_separates_scopes_and_endpoints(
        v in body(),
        t1 in "[a-z0-9_-]{1,8}",
        t2 in "[a-z0-9_-]{1,8}",
    ) {
        let text = v.to_string();
        let k = |scope: Option<&str>, ep: &str| key_of(scope, ep, text.as_bytes());
        prop_assert_eq!(k(Some(&t1), "chat") == k(Some(&t2), "chat"), t1 == t2);
        prop_assert_ne!(k(Some(&t1), "chat"), k(None, "chat"));
        let eps = [
            Endpoint::Chat.label(),
            Endpoint::ChatPrefix.label(),
            Endpoint::Fim.label(),
        ];
        let keys: BTreeSet<Key> = eps.iter().map(|ep| k(Some(&t1), ep)).collect();
        prop_assert_eq!(keys.len(), eps.len());
    }
}

/// One number, spelled several ways that are JSON-equal: `1`, `1.0`,
/// `1e0`, `10e-1`, `0.1e1`, `1.50` and `1.5`, `15E-1`…
fn spellings() -> impl Strategy<Value = (String, String)> {
    // mantissa digits and a decimal exponent: the number is m × 10^e.
    (0u64..10_000_000, -6i32..6, any::<bool>(), any::<u64>()).prop_map(|(m, e, neg, seed)| {
        let mut rng = Rng(seed);
        let sign = if neg && m != 0 { "-" } else { "" };
        let mut spell = || -> String {
            let digits = m.to_string();
            // Move the decimal point by `shift` places and compensate in
            // the exponent; add trailing zeros to the fraction; choose the
            // exponent's letter and sign.
            let shift = rng.below(4) as i32;
            let exp = e + shift;
            let (int, frac) = if shift as usize >= digits.len() {
                (
                    "0".to_string(),
                    format!("{}{digits}", "0".repeat(shift as usize - digits.len())),
                )
            } else {
                let cut = digits.len() - shift as usize;
                (digits[..cut].to_string(), digits[cut..].to_string())
            };
            let frac = format!("{frac}{}", "0".repeat(rng.below(3)));
            let mut s = format!("{sign}{int}");
            if !frac.is_empty() {
                s.push('.');
                s.push_str(&frac);
            } else if rng.below(2) == 0 {
                s.push_str(".0");
            }
            if exp != 0 || rng.below(2) == 0 {
                s.push(if rng.below(2) == 0 { 'e' } else { 'E' });
                if exp >= 0 && rng.below(2) == 0 {
                    s.push('+');
                }
                s.push_str(&exp.to_string());
            }
            s
        };
        (spell(), spell())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn key_ignores_number_spelling((a, b) in spellings(), v in body(), name in key_text()) {
        let mut v = v;
        if let Some(m) = v.as_object_mut() {
            m.remove(&name);
        }
        let with = |n: &str| {
            let mut text = v.to_string();
            // Insert `"name": n` as the first member of the object.
            let member = format!("{}:{n}", serde_json::to_string(&name).expect("string"));
            let sep = if text == "{}" { "" } else { "," };
            text.insert_str(1, &format!("{member}{sep}"));
            text
        };
        let (ta, tb) = (with(&a), with(&b));
        prop_assert_eq!(
            key_of(Some("t"), "chat", ta.as_bytes()),
            key_of(Some("t"), "chat", tb.as_bytes()),
            "{} vs {}", ta, tb
        );
    }
}

#[test]
fn key_number_spelling_examples() {
    let k = |n: &str| {
        key_of(
            None,
            "chat",
            format!(r#"{{"model":"m","n":{n}}}"#).as_bytes(),
        )
    };
    for same in [
        ["1", "1.0"],
        ["1", "1e0"],
        ["1", "10e-1"],
        ["1.5", "1.50"],
        ["-0.25", "-25e-2"],
    ] {
        assert_eq!(k(same[0]), k(same[1]), "{same:?}");
    }
    for different in [["1", "2"], ["1", "1.5"], ["1", "\"1\""], ["0.1", "1"]] {
        assert_ne!(k(different[0]), k(different[1]), "{different:?}");
    }
}

// ---------------------------------------------------------------------------
// Include-usage splice: the client's object plus the one field, nothing else.

/// Top-level keys of a JSON object in the order written, duplicates kept
/// (serde_json's `Value` keeps only the last of a repeated key).
fn top_level_keys(bytes: &[u8]) -> Vec<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                keys.push(k);
            }
            Ok(keys)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde::Deserializer::deserialize_map(&mut de, Keys).expect("an object")
}

/// The bytes of `before` that `after` changed: `before` less the longest
/// common prefix and suffix the two share.
fn changed<'a>(before: &'a [u8], after: &[u8]) -> &'a [u8] {
    let p = before.iter().zip(after).take_while(|(a, b)| a == b).count();
    let max_s = before.len().min(after.len()) - p;
    let s = before
        .iter()
        .rev()
        .zip(after.iter().rev())
        .take(max_s)
        .take_while(|(a, b)| a == b)
        .count();
    &before[p..before.len() - s]
}

/// A streaming chat request: `model`, `messages`, `stream: true`, and other
/// members, with `stream_options` as `opts` says (absent when `None`).
fn stream_request(opts: impl Strategy<Value = Option<Value>>) -> impl Strategy<Value = Value> {
    let message = ("[a-z]{1,9}", key_text())
        .prop_map(|(role, content)| serde_json::json!({"role": role, "content": content}));
    (
        key_text(),
        prop::collection::vec(message, 0..4),
        prop::collection::btree_map(key_text(), json(), 0..5),
        opts,
    )
        .prop_map(|(model, messages, extra, opts)| {
            let mut m: Map<String, Value> = extra
                .into_iter()
                .filter(|(k, _)| k != "stream_options")
                .collect();
            m.insert("model".into(), Value::String(model));
            m.insert("messages".into(), Value::Array(messages));
            m.insert("stream".into(), Value::Bool(true));
            if let Some(o) = opts {
                m.insert("stream_options".into(), o);
            }
            Value::Object(m)
        })
}

/// What the splice must produce: the client's object with
/// `stream_options.include_usage = true` and nothing else changed.
fn expected(client: &Value) -> Value {
    let mut want = client.clone();
    let obj = want.as_object_mut().expect("object");
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !opts.is_object() {
        *opts = Value::Object(Map::new());
    }
    opts.as_object_mut()
        .expect("object")
        .insert("include_usage".into(), Value::Bool(true));
    want
}

/// Splices and checks what holds for every case: the body parses to the
/// client's object plus the field, no top-level key is repeated, and
/// Sluice reads the result as asking for usage. Returns the bytes sent.
fn splice_checked(text: &str) -> Result<Bytes, TestCaseError> {
    let bytes = Bytes::from(text.to_owned());
    let client = parse(&bytes);
    let mut outs = Vec::new();
    // Validation with and without building the tree (cache on and off)
    // must splice alike.
    for keep in [false, true] {
        let api = ApiRequest::parse(
            &bytes,
            Endpoint::Chat,
            if keep {
                Keyed::In(Some("t"))
            } else {
                Keyed::No
            },
        )
        .expect("a valid request");
        prop_assert!(api.stream);
        outs.push(with_include_usage(&bytes, &api));
    }
    prop_assert_eq!(&outs[0], &outs[1]);
    let out = outs.swap_remove(0);
    let sent = std::str::from_utf8(&out).unwrap_or("<not UTF-8>");
    let keys = top_level_keys(&out);
    let unique: BTreeSet<&String> = keys.iter().collect();
    prop_assert_eq!(unique.len(), keys.len(), "a repeated key in {}", sent);
    prop_assert_eq!(parse(&out), expected(&client), "{} became {}", text, sent);
    let again = ApiRequest::parse(&out, Endpoint::Chat, Keyed::No).expect("still valid");
    prop_assert!(again.include_usage, "{}", sent);
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No `stream_options`: the field is added and every byte the client
    /// sent reaches upstream as sent (one insertion, nothing else).
    #[test]
    fn splice_adds_the_field_and_keeps_every_byte(v in stream_request(Just(None)), seed in any::<u64>()) {
        let text = rendered(&v, seed);
        let out = splice_checked(&text)?;
        prop_assert_eq!(changed(text.as_bytes(), &out), b"", "{} became {:?}", text, out);
    }

    /// `stream_options` an object: `include_usage` set inside it. Fails
    /// today: the body is re-serialized, and a float can come back as its
    /// neighbour (`-1.474927536723323e-236` reached upstream as
    /// `-1.4749275367233229e-236`, which parses to another f64).
    #[test]
    fn splice_sets_the_field_inside_the_clients_object(
        v in stream_request(prop::collection::btree_map(key_text(), json(), 0..4)
            .prop_map(|m| Some(Value::Object(m.into_iter().collect())))),
        seed in any::<u64>(),
    ) {
        splice_checked(&rendered(&v, seed))?;
    }

    /// ... and only the `stream_options` member changes: every other byte,
    /// key order and number spelling as sent (docs/api.md, "Request bodies").
    #[test]
    fn splice_into_the_clients_object_keeps_every_other_byte(
        v in stream_request(prop::collection::btree_map(key_text(), json(), 0..4)
            .prop_map(|m| Some(Value::Object(m.into_iter().collect())))),
        seed in any::<u64>(),
    ) {
        let text = rendered(&v, seed);
        let out = splice_checked(&text)?;
        let region = changed(text.as_bytes(), &out);
        let opts = rendered(&v["stream_options"], seed);
        // The change lies within the client's stream_options object.
        prop_assert!(region.len() <= opts.len(), "{} became {:?}", text, out);
    }

    /// `stream_options: null`: replaced by the object, not repeated.
    #[test]
    fn splice_replaces_a_null(v in stream_request(Just(Some(Value::Null))), seed in any::<u64>()) {
        let text = rendered(&v, seed);
        let out = splice_checked(&text)?;
        let region = changed(text.as_bytes(), &out);
        prop_assert!(
            region.iter().all(|b| b"null \t\r\n".contains(b)),
            "{} became {:?}", text, out
        );
    }
}

// ---------------------------------------------------------------------------
// Anthropic's Messages API: a stored message, replayed as the events a
// streamed hit sends, assembles into the same message (docs/api.md,
// "Anthropic Messages API").

/// One content block: text, thinking with its signature, or a tool call
/// with any JSON input.
fn message_block() -> impl Strategy<Value = Value> {
    prop_oneof![
        key_text().prop_map(|t| serde_json::json!({"type": "text", "text": t})),
        (key_text(), "[A-Za-z0-9+/=]{0,40}").prop_map(
            |(t, sig)| serde_json::json!({"type": "thinking", "thinking": t, "signature": sig})
        ),
        ("[a-z_]{1,12}", json()).prop_map(
            |(name, input)| serde_json::json!({"type": "tool_use", "id": "toolu_1", "name": name, "input": input})
        ),
    ]
}

fn stored_message() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(message_block(), 0..5),
        prop_oneof![Just("end_turn"), Just("tool_use"), Just("max_tokens")],
        (0u64..1_000_000, 0u64..1_000_000, 0u64..1_000_000),
    )
        .prop_map(|(content, stop, (input, read, output))| {
            serde_json::json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": content, "stop_reason": stop, "stop_sequence": null,
                "usage": {"input_tokens": input, "cache_read_input_tokens": read, "output_tokens": output},
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_stored_message_replays_into_events_that_assemble_to_it(
        message in stored_message(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let replay = anthropic::replay(&message).expect("a message replays");
        let chunks = splits(&replay.chunks, &cuts);
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (events, pending) = frame(&refs);
        prop_assert!(pending.is_empty());
        let mut asm = anthropic::Assembler::new();
        let mut usage = None;
        for ev in &events {
            if let sse::EventData::Data(d) = sse::event_data(ev) {
                let info = asm.push(&d).expect("a replayed event is JSON");
                prop_assert!(!info.is_error);
                usage = info.usage.or(usage);
            }
        }
        prop_assert!(asm.is_whole());
        let again = asm.finish();
        prop_assert_eq!(again.to_string(), message.to_string());
        // The usage read along the way is the stored one.
        let u = usage.expect("usage");
        let n = |k: &str| message["usage"][k].as_u64().unwrap_or(0);
        prop_assert_eq!(u.prompt, n("input_tokens") + n("cache_read_input_tokens"));
        prop_assert_eq!(u.completion, n("output_tokens"));
    }
}
