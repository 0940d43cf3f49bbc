//! Validation of a request body, in one pass and without a tree: a JSON
//! object, no repeated top-level key, the fields each endpoint needs, the
//! cache key (unless the cache is bypassed) and the prompt's characters for
//! the usage estimate. And the one change Sluice makes to a body: an OpenAI
//! stream's `stream_options.include_usage`, spliced into the client's bytes
//! (Anthropic's streams always carry usage: their bytes go as they came).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::api::json;
use crate::api::text::{ContentChars, PromptText};
use crate::api::{Endpoint, Format};
use crate::cache;
use crate::http::error::GatewayError;
use crate::response::hit::Delivery;

/// A validated API request. Every field but the few read here passes
/// through untouched; nothing built from the body is kept but these.
pub struct ApiRequest {
    /// The cache key, when the cache is used (computed while the body was
    /// scanned, and the scan dropped at once).
    pub key: Option<cache::Key>,
    pub model: String,
    /// Where `model`'s JSON string is in the client's bytes.
    model_span: Range<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// How a stream's body gets `stream_options.include_usage = true`.
    splice: Splice,
    /// Characters of the messages' text (or the FIM prompt), for the usage
    /// estimate: counted only for a request that goes upstream.
    prompt: Prompt,
}

/// A prompt's characters, or where to count them in the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Prompt {
    /// Counted while the body was scanned (a large body, scanned off the
    /// runtime, is counted there too).
    Counted(u64),
    /// Counted when asked (`ApiRequest::prompt_chars`): most small requests
    /// are answered from the cache or a flight and never ask. The spans
    /// of the messages (or FIM prompt) and of Anthropic's `system`.
    At {
        text: Option<Range<usize>>,
        system: Option<Range<usize>>,
    },
}

/// Where the upstream body of a stream differs from the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Splice {
    /// No `stream_options`: the whole member goes in after the opening brace
    /// (at this offset).
    Add(usize),
    /// `stream_options` is `null` (or no object): its value is replaced.
    Replace(Range<usize>),
    /// An object without `include_usage`: the member goes in after its brace.
    Insert { at: usize, empty: bool },
    /// An object with `include_usage` (each occurrence, absolute spans):
    /// each value becomes `true`.
    Set(Vec<Range<usize>>),
    /// Nothing to change (Anthropic's streams carry usage unasked).
    Nothing,
}

/// Whether validation also computes the cache key, and in which scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyed<'a> {
    /// The cache is bypassed: no key.
    No,
    /// Keyed in this scope: a tenant's name, or `None` for the shared pool.
    In(Option<&'a str>),
}

impl ApiRequest {
    /// How the client wants its answer delivered.
    pub(crate) fn delivery(&self) -> Delivery {
        if self.stream {
            Delivery::Stream {
                usage_chunk: self.include_usage,
            }
        } else {
            Delivery::Whole
        }
    }

    /// Validates a body in one pass without building a tree, refusing a
    /// repeated top-level key whatever the cache mode; computes the cache
    /// key too unless `keyed` is `Keyed::No`.
    pub fn parse(
        bytes: &[u8],
        endpoint: Endpoint,
        keyed: Keyed<'_>,
    ) -> Result<ApiRequest, GatewayError> {
        let canonical = match keyed {
            Keyed::No => json::Canonical::Skip,
            Keyed::In(_) => json::Canonical::Write,
        };
        let scan = json::scan(bytes, canonical).map_err(|e| match e {
            json::Invalid::Syntax => GatewayError::InvalidJson,
            json::Invalid::DuplicateKey(k) => GatewayError::DuplicateKey(k.into()),
        })?;
        let starts = |name: &str, c: u8| scan.get(name).is_some_and(|r| r.first() == Some(&c));
        let missing_model = GatewayError::MissingField("`model` is required and must be a string.");
        let model_span = scan.span("model").ok_or(missing_model.clone())?;
        let model = Some(&bytes[model_span.clone()])
            .filter(|r| r.first() == Some(&b'"'))
            .and_then(json_string)
            .ok_or(missing_model)?;
        match endpoint {
            Endpoint::Fim if !starts("prompt", b'"') => {
                return Err(GatewayError::MissingField(
                    "`prompt` is required and must be a string.",
                ));
            }
            Endpoint::Chat
            | Endpoint::ChatPrefix
            | Endpoint::Models
            | Endpoint::Messages
            | Endpoint::CountTokens
                if !starts("messages", b'[') =>
            {
                return Err(GatewayError::MissingField(
                    "`messages` is required and must be an array.",
                ));
            }
            Endpoint::Messages if !scan.get("max_tokens").is_some_and(is_integer) => {
                return Err(GatewayError::MissingField(
                    "`max_tokens` is required and must be an integer.",
                ));
            }
            Endpoint::Fim
            | Endpoint::Chat
            | Endpoint::ChatPrefix
            | Endpoint::Models
            | Endpoint::Messages
            | Endpoint::CountTokens => {}
        }
        // Only what generates an answer streams (`count_tokens` answers a
        // count whatever its body says).
        let stream = endpoint.generates() && scan.get("stream") == Some(&b"true"[..]);
        let (splice, include_usage) = match scan.span("stream_options") {
            _ if endpoint.format() == Format::Anthropic => (Splice::Nothing, false),
            None => (Splice::Add(open_brace(bytes)), false),
            Some(span) => match json::members(&bytes[span.clone()]) {
                None => (Splice::Replace(span), false),
                Some(members) => {
                    let usage: Vec<Range<usize>> = members
                        .iter()
                        .filter(|(k, _)| k.as_slice() == b"\"include_usage\"")
                        .map(|(_, v)| span.start + v.start..span.start + v.end)
                        .collect();
                    // The last occurrence is what most parsers keep.
                    let wants = usage.last().is_some_and(|r| &bytes[r.clone()] == b"true");
                    let splice = if usage.is_empty() {
                        Splice::Insert {
                            at: span.start + open_brace(&bytes[span]),
                            empty: members.is_empty(),
                        }
                    } else {
                        Splice::Set(usage)
                    };
                    (splice, wants)
                }
            },
        };
        let key = match keyed {
            Keyed::No => None,
            Keyed::In(scope) => Some(cache::key(scope, endpoint.label(), &scan)),
        };
        // Where the prompt's text is: the messages (or FIM prompt), and
        // Anthropic's `system`.
        let text = match endpoint {
            Endpoint::Fim => scan.span("prompt"),
            Endpoint::Chat
            | Endpoint::ChatPrefix
            | Endpoint::Models
            | Endpoint::Messages
            | Endpoint::CountTokens => scan.span("messages"),
        };
        let system = match endpoint.format() {
            Format::Anthropic => scan.span("system"),
            Format::OpenAi => None,
        };
        let mut prompt = Prompt::At { text, system };
        if bytes.len() >= SCAN_ON_RUNTIME_MAX {
            prompt = Prompt::Counted(prompt.chars(bytes));
        }
        Ok(ApiRequest {
            key,
            model,
            model_span,
            stream,
            include_usage: stream && include_usage,
            splice,
            prompt,
        })
    }

    /// The prompt's characters, for the usage estimate; `body` is the
    /// client's bytes this request was parsed from.
    pub(crate) fn prompt_chars(&self, body: &[u8]) -> u64 {
        self.prompt.chars(body)
    }
}

impl Prompt {
    /// Counted without building the prompt's strings.
    fn chars(&self, body: &[u8]) -> u64 {
        let (text, system) = match self {
            Prompt::Counted(n) => return *n,
            Prompt::At { text, system } => (text, system),
        };
        let raw = |span: &Option<Range<usize>>| span.clone().and_then(|r| body.get(r));
        let system = raw(system)
            .and_then(|raw| serde_json::from_slice::<ContentChars>(raw).ok())
            .map_or(0, |c| c.0);
        raw(text)
            .and_then(|raw| serde_json::from_slice::<PromptText>(raw).ok())
            .map_or(0, |t| t.chars)
            + system
    }
}

/// Bodies at least this large are scanned on the blocking pool: a few
/// megabytes of JSON take milliseconds of CPU, which must not stall every
/// other request on the same runtime worker.
const SCAN_ON_RUNTIME_MAX: usize = 256 * 1024;

/// Validates a body (`ApiRequest::parse`): on the runtime when it is
/// small, on the blocking pool when it is large.
pub(crate) async fn parse_body(
    bytes: &Bytes,
    endpoint: Endpoint,
    keyed: Keyed<'_>,
) -> Result<ApiRequest, GatewayError> {
    if bytes.len() < SCAN_ON_RUNTIME_MAX {
        return ApiRequest::parse(bytes, endpoint, keyed);
    }
    let parsing = Box::pin(parse_off_runtime(bytes.clone(), endpoint, keyed));
    parsing.await
}

async fn parse_off_runtime(
    bytes: Bytes,
    endpoint: Endpoint,
    keyed: Keyed<'_>,
) -> Result<ApiRequest, GatewayError> {
    // The scope is copied: the blocking task outlives this borrow.
    enum Owned {
        No,
        In(Option<Box<str>>),
    }
    let owned = match keyed {
        Keyed::No => Owned::No,
        Keyed::In(scope) => Owned::In(scope.map(Box::from)),
    };
    tokio::task::spawn_blocking(move || {
        let keyed = match &owned {
            Owned::No => Keyed::No,
            Owned::In(scope) => Keyed::In(scope.as_deref()),
        };
        ApiRequest::parse(&bytes, endpoint, keyed)
    })
    .await
    .unwrap_or(Err(GatewayError::Internal))
}

/// A JSON string (as written, quotes included, valid JSON) decoded: its
/// bytes as they are when it has no escape, which is nearly always.
fn json_string(raw: &[u8]) -> Option<String> {
    let inner = raw.get(1..raw.len().checked_sub(1)?)?;
    if inner.contains(&b'\\') {
        return serde_json::from_slice(raw).ok();
    }
    std::str::from_utf8(inner).ok().map(str::to_owned)
}

/// Whether a JSON value (as written) is an integer: digits, with an
/// optional minus sign, and no fraction or exponent.
fn is_integer(raw: &[u8]) -> bool {
    let digits = raw.strip_prefix(b"-").unwrap_or(raw);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

/// The offset just past the first `{` (a validated object has one).
fn open_brace(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| b == b'{').map_or(0, |i| i + 1)
}

impl ApiRequest {
    /// The body sent upstream (for a stream, with `include_usage`; see
    /// `with_include_usage`) and where the model's JSON string is in it.
    pub(crate) fn upstream_body(&self, bytes: &Bytes) -> (Bytes, Range<usize>) {
        if !self.stream {
            return (bytes.clone(), self.model_span.clone());
        }
        let body = with_include_usage(bytes, self);
        // Every splice is outside the model's string: it moves by the
        // growth of the splices before it.
        let grown = body.len() as isize - bytes.len() as isize;
        let moved = |at: usize| -> usize {
            let growth = match &self.splice {
                Splice::Add(p) | Splice::Insert { at: p, .. } if *p <= at => grown,
                Splice::Replace(r) if r.end <= at => grown,
                // Each value became `true` (unless all were already).
                Splice::Set(values) if body.len() != bytes.len() || body != *bytes => values
                    .iter()
                    .filter(|r| r.end <= at)
                    .map(|r| 4 - r.len() as isize)
                    .sum(),
                _ => 0,
            };
            at.saturating_add_signed(growth)
        };
        let span = moved(self.model_span.start)..moved(self.model_span.end);
        (body, span)
    }
}

/// The body sent upstream for a stream: the client's bytes with
/// `stream_options.include_usage = true`, spliced in so every other byte
/// (key order, number spelling, whitespace) passes through as it came.
pub fn with_include_usage(bytes: &Bytes, api: &ApiRequest) -> Bytes {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    const OBJECT: &[u8] = br#"{"include_usage":true}"#;
    const USAGE: &[u8] = br#""include_usage":true"#;
    let splice = |at: Range<usize>, with: &[&[u8]]| {
        let extra: usize = with.iter().map(|w| w.len()).sum();
        let mut out = BytesMut::with_capacity(bytes.len() + extra);
        out.extend_from_slice(&bytes[..at.start]);
        for w in with {
            out.extend_from_slice(w);
        }
        out.extend_from_slice(&bytes[at.end..]);
        out.freeze()
    };
    match &api.splice {
        Splice::Add(at) => splice(*at..*at, &[MEMBER]),
        Splice::Replace(span) => splice(span.clone(), &[OBJECT]),
        Splice::Insert { at, empty: true } => splice(*at..*at, &[USAGE]),
        Splice::Insert { at, empty: false } => splice(*at..*at, &[USAGE, b","]),
        Splice::Nothing => bytes.clone(),
        Splice::Set(values) => {
            if values.iter().all(|r| &bytes[r.clone()] == b"true") {
                return bytes.clone();
            }
            let mut out = BytesMut::with_capacity(bytes.len() + 4);
            let mut at = 0;
            for r in values {
                out.extend_from_slice(&bytes[at..r.start]);
                out.extend_from_slice(b"true");
                at = r.end;
            }
            out.extend_from_slice(&bytes[at..]);
            out.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn spliced(raw: &str) -> String {
        let raw = Bytes::copy_from_slice(raw.as_bytes());
        let api = ApiRequest::parse(&raw, Endpoint::Chat, Keyed::No).expect("valid");
        assert!(api.stream);
        String::from_utf8(with_include_usage(&raw, &api).to_vec()).expect("utf8")
    }

    #[test]
    fn the_model_name_is_decoded() {
        for (raw, want) in [
            (
                r#"{"model":"deepseek-chat","messages":[]}"#,
                "deepseek-chat",
            ),
            (
                r#"{"model":"deepseek\u002dchat","messages":[]}"#,
                "deepseek-chat",
            ),
            (r#"{"model":"a\"b","messages":[]}"#, "a\"b"),
            (r#"{"model":"","messages":[]}"#, ""),
            (r#"{"model":"модель","messages":[]}"#, "модель"),
        ] {
            let api = ApiRequest::parse(raw.as_bytes(), Endpoint::Chat, Keyed::No).expect(raw);
            assert_eq!(api.model, want, "{raw}");
        }
    }

    #[test]
    fn the_model_is_found_in_the_upstream_body() {
        for raw in [
            r#"{"model":"mm","messages":[]}"#,
            r#"{"model":"mm","messages":[],"stream":true}"#,
            r#"{"stream":true,"stream_options":null,"model":"mm","messages":[]}"#,
            r#"{"model":"mm","stream":true,"stream_options":null,"messages":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false},"model":"mm","messages":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true},"model":"mm","messages":[]}"#,
            r#"{"stream":true,"stream_options":{"x":1},"model":"mm","messages":[]}"#,
            r#"{"stream":true,"stream_options":{},"model":"mm","messages":[]}"#,
            r#"{"stream":true,"model":"mm","stream_options":{"include_usage":false},"messages":[]}"#,
        ] {
            let raw = Bytes::copy_from_slice(raw.as_bytes());
            let api = ApiRequest::parse(&raw, Endpoint::Chat, Keyed::No).expect("valid");
            let (body, span) = api.upstream_body(&raw);
            assert_eq!(&body[span], b"\"mm\"", "{raw:?}");
        }
    }

    #[test]
    fn include_usage_is_spliced_without_touching_other_bytes() {
        let m =
            r#""model":"m", "messages": [], "temperature": 1.50, "seed": 12345678901234567890123"#;
        // Absent: the member goes in after the opening brace.
        assert_eq!(
            spliced(&format!(" {{{m}, \"stream\":true}}")),
            format!(" {{\"stream_options\":{{\"include_usage\":true}},{m}, \"stream\":true}}")
        );
        // `null`: replaced, never a second key.
        assert_eq!(
            spliced(&format!("{{{m},\"stream_options\": null,\"stream\":true}}")),
            format!("{{{m},\"stream_options\": {{\"include_usage\":true}},\"stream\":true}}")
        );
        // An object: include_usage set inside it, every other byte kept.
        assert_eq!(
            spliced(&format!(
                "{{{m},\"stream\":true,\"stream_options\":{{\"x\":1.0, \"include_usage\" : false}}}}"
            )),
            format!("{{{m},\"stream\":true,\"stream_options\":{{\"x\":1.0, \"include_usage\" : true}}}}")
        );
        assert_eq!(
            spliced(&format!(
                "{{{m},\"stream\":true,\"stream_options\":{{ \"x\":2}}}}"
            )),
            format!(
                "{{{m},\"stream\":true,\"stream_options\":{{\"include_usage\":true, \"x\":2}}}}"
            )
        );
        assert_eq!(
            spliced(&format!("{{{m},\"stream\":true,\"stream_options\":{{ }}}}")),
            format!("{{{m},\"stream\":true,\"stream_options\":{{\"include_usage\":true }}}}")
        );
        let already =
            format!("{{{m},\"stream\":true,\"stream_options\":{{\"include_usage\":true}}}}");
        assert_eq!(spliced(&already), already);
        // Each result parses to the client's object plus the one field.
        for raw in [
            format!("{{{m},\"stream\":true,\"stream_options\":[1]}}"),
            format!(
                "{{{m},\"stream\":true,\"stream_options\":{{\"a\":{{\"include_usage\":false}}}}}}"
            ),
        ] {
            let out: Value = serde_json::from_str(&spliced(&raw)).expect("json");
            assert_eq!(out["stream_options"]["include_usage"], true, "{raw}");
        }
    }

    #[test]
    fn a_prompt_is_counted_when_asked_and_a_large_one_while_scanned() {
        let small = br#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
        let api = ApiRequest::parse(small, Endpoint::Chat, Keyed::No).expect("valid");
        assert!(matches!(api.prompt, Prompt::At { .. }));
        assert_eq!(api.prompt_chars(small), 5);
        let text = "x".repeat(SCAN_ON_RUNTIME_MAX);
        let large = serde_json::to_vec(
            &serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]}),
        )
        .expect("json");
        let api = ApiRequest::parse(&large, Endpoint::Chat, Keyed::No).expect("valid");
        // Counted off the runtime with the scan: nothing left to count on it.
        assert_eq!(api.prompt, Prompt::Counted(SCAN_ON_RUNTIME_MAX as u64));
        assert_eq!(api.prompt_chars(b""), SCAN_ON_RUNTIME_MAX as u64);
    }

    #[test]
    fn anthropic_bodies_go_as_they_came_and_count_system_and_messages() {
        let raw = Bytes::from_static(
            br#"{"model":"claude-x","max_tokens":8,"stream":true,"system":[{"type":"text","text":"abcd"}],"messages":[{"role":"user","content":[{"type":"text","text":"hello"},{"type":"tool_result","tool_use_id":"t","content":"xy"}]}]}"#,
        );
        let api = ApiRequest::parse(&raw, Endpoint::Messages, Keyed::In(Some("t"))).expect("valid");
        assert!(api.stream && !api.include_usage);
        assert_eq!(with_include_usage(&raw, &api), raw, "no splice");
        assert_eq!(
            api.prompt_chars(&raw),
            4 + 5 + 2,
            "a tool result's text counts"
        );
        let plain = br#"{"model":"m","max_tokens":8,"system":"be brief","messages":[{"role":"user","content":"hi"}]}"#;
        let api = ApiRequest::parse(plain, Endpoint::Messages, Keyed::No).expect("valid");
        assert_eq!(api.prompt_chars(plain), 8 + 2);
        // The endpoint is in the key: a chat body is keyed apart.
        let chat = ApiRequest::parse(
            br#"{"model":"m","max_tokens":8,"messages":[]}"#,
            Endpoint::Chat,
            Keyed::In(Some("t")),
        )
        .expect("valid");
        let messages = ApiRequest::parse(
            br#"{"model":"m","max_tokens":8,"messages":[],"stream":true}"#,
            Endpoint::Messages,
            Keyed::In(Some("t")),
        )
        .expect("valid");
        let whole = ApiRequest::parse(
            br#"{"messages":[],"max_tokens":8,"model":"m"}"#,
            Endpoint::Messages,
            Keyed::In(Some("t")),
        )
        .expect("valid");
        assert_ne!(chat.key, messages.key);
        assert_eq!(messages.key, whole.key, "stream is delivery, not content");
    }

    #[test]
    fn parse_validates_fields() {
        // With and without the cache key, every body is judged alike.
        let bad = |body: &str, ep| {
            let keyed = ApiRequest::parse(body.as_bytes(), ep, Keyed::In(Some("t")))
                .err()
                .map(|e| e.code());
            let plain = ApiRequest::parse(body.as_bytes(), ep, Keyed::No)
                .err()
                .map(|e| e.code());
            assert_eq!(keyed, plain, "{body}");
            keyed
        };
        assert_eq!(bad("nope", Endpoint::Chat), Some("invalid_json"));
        assert_eq!(bad("[1]", Endpoint::Chat), Some("invalid_json"));
        assert_eq!(
            bad(r#"{"model":"m","messages":[]}trailing"#, Endpoint::Chat),
            Some("invalid_json")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":[],"x":1,"x":2}"#, Endpoint::Chat),
            Some("invalid_json")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":[],"t":1e400}"#, Endpoint::Chat),
            None
        );
        assert_eq!(bad("{}", Endpoint::Chat), Some("missing_field"));
        assert_eq!(
            bad(r#"{"model":1,"messages":[]}"#, Endpoint::Chat),
            Some("missing_field")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":{}}"#, Endpoint::Chat),
            Some("missing_field")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":null}"#, Endpoint::Chat),
            Some("missing_field")
        );
        assert_eq!(
            bad(r#"{"model":"m","messages":[]}"#, Endpoint::Fim),
            Some("missing_field")
        );
        assert_eq!(bad(r#"{"model":"m","prompt":"x"}"#, Endpoint::Fim), None);
        // Messages: an integer max_tokens too; count_tokens needs none.
        let m = r#""model":"claude-x","messages":[{"role":"user","content":"hi"}]"#;
        for (body, ep, code) in [
            (
                format!("{{{m},\"max_tokens\":1024}}"),
                Endpoint::Messages,
                None,
            ),
            (
                format!("{{{m},\"max_tokens\":-1}}"),
                Endpoint::Messages,
                None,
            ),
            (
                format!("{{{m}}}"),
                Endpoint::Messages,
                Some("missing_field"),
            ),
            (
                format!("{{{m},\"max_tokens\":1.5}}"),
                Endpoint::Messages,
                Some("missing_field"),
            ),
            (
                format!("{{{m},\"max_tokens\":1e3}}"),
                Endpoint::Messages,
                Some("missing_field"),
            ),
            (
                format!("{{{m},\"max_tokens\":\"5\"}}"),
                Endpoint::Messages,
                Some("missing_field"),
            ),
            (
                r#"{"model":"m","max_tokens":5}"#.to_string(),
                Endpoint::Messages,
                Some("missing_field"),
            ),
            (
                r#"{"model":5,"messages":[],"max_tokens":5}"#.to_string(),
                Endpoint::Messages,
                Some("missing_field"),
            ),
            (format!("{{{m}}}"), Endpoint::CountTokens, None),
            (
                r#"{"model":"m","messages":"hi"}"#.to_string(),
                Endpoint::CountTokens,
                Some("missing_field"),
            ),
        ] {
            assert_eq!(bad(&body, ep), code, "{body}");
        }
        let ok = ApiRequest::parse(
            br#"{"model":"m\u0031","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
            Endpoint::Chat,
            Keyed::In(None),
        )
        .expect("valid");
        assert!(ok.stream && ok.include_usage && ok.key.is_some());
        assert_eq!(ok.model, "m1", "escapes in the model name are decoded");
        let dup = ApiRequest::parse(
            br#"{"model":"a","model":"b","messages":[]}"#,
            Endpoint::Chat,
            Keyed::No,
        );
        let Err(e) = dup else {
            panic!("a repeated key is refused")
        };
        assert!(e.to_string().contains("\"model\""), "{e}");
    }
}
