//! Anthropic's Messages API (what Claude Code and the Anthropic SDKs speak):
//! what an event of a stream says (`Tally::read`, which also keeps the
//! usage spread over `message_start` and `message_delta`), assembling a
//! stream into the message it amounts to (`Assembler`), the reverse
//! (`replay`: a stored message as the events an SDK accumulates into it),
//! what storing or metering a non-streaming message needs to know of it
//! (`message_facts`, `usage_of_message`, `message_text_chars`), and the
//! shapes of an error body and of the event that ends a broken stream.
//! Pure functions over bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::api::text::Chars;
use crate::api::usage::Usage;
use crate::api::{trim_leading_ws, AnyObject, Completion, EventInfo, Replay};

/// Anthropic's usage fields, each as far as it was reported. A stream
/// reports some in `message_start` and the rest (at least `output_tokens`)
/// in `message_delta`; a later report of a field replaces the earlier one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct RawUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl RawUsage {
    /// A `usage` object as upstream meant it: typed, or, when the typed
    /// read refuses it (a repeated field, an odd type), read as a tree
    /// (the last value wins; a field that is no count is not reported).
    fn of_raw(raw: &RawValue) -> Option<RawUsage> {
        if let Ok(u) = serde_json::from_str::<RawUsage>(raw.get()) {
            return Some(u);
        }
        Self::of_value(&serde_json::from_str(raw.get()).ok()?)
    }

    fn of_value(v: &Value) -> Option<RawUsage> {
        let o = v.as_object()?;
        let n = |k: &str| o.get(k).and_then(Value::as_u64);
        Some(RawUsage {
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cache_read_input_tokens: n("cache_read_input_tokens"),
            cache_creation_input_tokens: n("cache_creation_input_tokens"),
        })
    }

    /// Takes the fields a later report has.
    fn overlay(&mut self, later: RawUsage) {
        let take = |mine: &mut Option<u64>, theirs: Option<u64>| {
            if theirs.is_some() {
                *mine = theirs;
            }
        };
        take(&mut self.input_tokens, later.input_tokens);
        take(&mut self.output_tokens, later.output_tokens);
        take(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
        take(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
    }

    /// The usage in Sluice's terms: prompt tokens are every input token
    /// (fresh, read from the prompt cache, written to it), of which those
    /// read from the cache are cache hits; completion tokens are the output.
    fn usage(self) -> Usage {
        let hit = self.cache_read_input_tokens.unwrap_or(0);
        let prompt = self
            .input_tokens
            .unwrap_or(0)
            .saturating_add(hit)
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0));
        let completion = self.output_tokens.unwrap_or(0);
        Usage {
            prompt,
            completion,
            total: prompt.saturating_add(completion),
            prompt_cache_hit: hit,
            prompt_cache_miss: prompt - hit,
            reasoning: 0,
        }
    }
}

/// The kinds of event a Messages stream has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    MessageStart,
    ContentBlockStart,
    ContentBlockDelta,
    ContentBlockStop,
    MessageDelta,
    MessageStop,
    Ping,
    Error,
    /// A type this module does not know (passed through, read for nothing).
    Other,
}

impl Kind {
    fn of(name: Option<&str>) -> Kind {
        match name {
            Some("message_start") => Kind::MessageStart,
            Some("content_block_start") => Kind::ContentBlockStart,
            Some("content_block_delta") => Kind::ContentBlockDelta,
            Some("content_block_stop") => Kind::ContentBlockStop,
            Some("message_delta") => Kind::MessageDelta,
            Some("message_stop") => Kind::MessageStop,
            Some("ping") => Kind::Ping,
            Some("error") => Kind::Error,
            _ => Kind::Other,
        }
    }
}

/// What one event says, before the stream's earlier usage is merged in.
struct Facts {
    kind: Kind,
    usage: Option<RawUsage>,
    text_chars: u64,
    /// Valid JSON that is no object: an error, as for OpenAI's chunks.
    not_object: bool,
}

/// Reads one event's data without building it.
fn facts(data: &[u8]) -> Result<Facts, serde_json::Error> {
    #[derive(Deserialize)]
    struct Light<'a> {
        #[serde(rename = "type", default, borrow)]
        kind: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        message: Option<Start<'a>>,
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
        #[serde(default)]
        delta: Option<Text>,
        #[serde(default)]
        content_block: Option<Text>,
    }
    #[derive(Deserialize)]
    struct Start<'a> {
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
    }
    /// The generated text of a delta (or of a block's start).
    #[derive(Deserialize)]
    struct Text {
        #[serde(default)]
        text: Option<Chars>,
        #[serde(default)]
        thinking: Option<Chars>,
        #[serde(default)]
        partial_json: Option<Chars>,
    }
    impl Text {
        fn chars(&self) -> u64 {
            [self.text, self.thinking, self.partial_json]
                .iter()
                .map(|c| c.map_or(0, |c| c.0))
                .sum()
        }
    }
    if trim_leading_ws(data).first() != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(data)?;
        return Ok(Facts {
            kind: Kind::Other,
            usage: None,
            text_chars: 0,
            not_object: true,
        });
    }
    match serde_json::from_slice::<Light<'_>>(data) {
        Ok(l) => {
            let kind = Kind::of(l.kind.as_deref());
            let usage = match kind {
                Kind::MessageStart => l.message.and_then(|m| m.usage),
                Kind::MessageDelta => l.usage,
                _ => None,
            };
            let text_chars = match kind {
                Kind::ContentBlockDelta => l.delta.as_ref().map_or(0, Text::chars),
                Kind::ContentBlockStart => l.content_block.as_ref().map_or(0, Text::chars),
                _ => 0,
            };
            Ok(Facts {
                kind,
                usage: usage.and_then(RawUsage::of_raw),
                text_chars,
                not_object: false,
            })
        }
        // An odd shape (a repeated field, a field of another type): read
        // as a tree, for its kind and usage.
        Err(e) if e.is_data() => {
            let v: Value = serde_json::from_slice(data)?;
            let kind = Kind::of(v.get("type").and_then(Value::as_str));
            let usage = match kind {
                Kind::MessageStart => v.pointer("/message/usage"),
                Kind::MessageDelta => v.get("usage"),
                _ => None,
            };
            Ok(Facts {
                kind,
                usage: usage.and_then(RawUsage::of_value),
                text_chars: 0,
                not_object: false,
            })
        }
        Err(e) => Err(e),
    }
}

/// A stream's reading: each event's facts, with the usage reported so far.
#[derive(Debug, Default)]
pub struct Tally {
    usage: Option<RawUsage>,
    /// A `message_delta` reported usage: the count is the answer's.
    counted: bool,
}

impl Tally {
    /// Reads one event's data: `Err` if it is not JSON at all. An `error`
    /// event is an error and ends the stream (Anthropic sends nothing after
    /// it); `message_stop` ends it whole; `ping` is a keep-alive; the first
    /// `content_block_delta` is the first token.
    pub fn read(&mut self, data: &[u8]) -> Result<EventInfo, serde_json::Error> {
        let f = facts(data)?;
        if let Some(u) = f.usage {
            self.usage.get_or_insert_with(RawUsage::default).overlay(u);
            self.counted |= f.kind == Kind::MessageDelta;
        }
        Ok(EventInfo {
            usage_only: false,
            usage: f.usage.and(self.usage).map(RawUsage::usage),
            is_error: f.not_object || f.kind == Kind::Error,
            text_chars: f.text_chars,
            ends: matches!(f.kind, Kind::MessageStop | Kind::Error),
            token: f.kind == Kind::ContentBlockDelta,
            keepalive: f.kind == Kind::Ping,
            usage_partial: !self.counted,
        })
    }
}

/// One content block being assembled.
#[derive(Debug)]
struct BlockAcc {
    block: Map<String, Value>,
    /// A tool_use's `input_json_delta`s, joined; parsed at its stop.
    json: Option<String>,
}

impl BlockAcc {
    /// Sets `input` from the joined partial JSON (if any came).
    fn close(&mut self) -> Result<(), ()> {
        let Some(json) = self.json.take() else {
            return Ok(());
        };
        if json.trim().is_empty() {
            return Ok(());
        }
        let input: Value = serde_json::from_str(&json).map_err(|_| ())?;
        self.block.insert("input".into(), input);
        Ok(())
    }

    /// Appends to a string field of the block.
    fn append(&mut self, key: &str, piece: Value) -> Result<(), ()> {
        let Value::String(piece) = piece else {
            return Err(());
        };
        match self.block.get_mut(key) {
            Some(Value::String(s)) => s.push_str(&piece),
            None | Some(Value::Null) => {
                self.block.insert(key.into(), Value::String(piece));
            }
            Some(_) => return Err(()),
        }
        Ok(())
    }
}

/// Assembles a stream's events into the message the non-streaming call
/// would have answered: the `message_start` message, its content blocks
/// (text, thinking with its signature, tool_use with its input parsed from
/// the joined `input_json_delta`s), `message_delta`'s stop reason and
/// sequence, and the usage with every later report laid over the first.
#[derive(Debug, Default)]
pub struct Assembler {
    tally: Tally,
    message: Option<Map<String, Value>>,
    usage: Map<String, Value>,
    blocks: BTreeMap<u64, BlockAcc>,
    /// `message_delta`'s `delta` fields, laid over the message at the end.
    delta: Map<String, Value>,
    /// An event could not be assembled: relayed as it came, but the
    /// answer is not whole here.
    broken: bool,
}

impl Assembler {
    pub fn new() -> Assembler {
        Assembler::default()
    }

    /// Whether every event pushed was assembled (`finish` is the answer).
    pub fn is_whole(&self) -> bool {
        !self.broken && self.message.is_some()
    }

    /// Takes in one event's data. Read as `Tally::read` reads it, so the
    /// cache on and off judge an event alike; what it accepts is then
    /// assembled.
    pub fn push(&mut self, data: &[u8]) -> Result<EventInfo, serde_json::Error> {
        let info = self.tally.read(data)?;
        if info.is_error || self.broken {
            return Ok(info);
        }
        let absorbed = match serde_json::from_slice::<Value>(data) {
            Ok(Value::Object(obj)) => self.absorb(obj),
            Ok(_) | Err(_) => Err(()),
        };
        if absorbed.is_err() {
            self.broken = true;
        }
        Ok(info)
    }

    fn block(&mut self, obj: &Map<String, Value>) -> Result<&mut BlockAcc, ()> {
        let index = obj.get("index").and_then(Value::as_u64).ok_or(())?;
        self.blocks.get_mut(&index).ok_or(())
    }

    fn absorb(&mut self, mut obj: Map<String, Value>) -> Result<(), ()> {
        match Kind::of(obj.get("type").and_then(Value::as_str)) {
            Kind::MessageStart => {
                let Some(Value::Object(mut message)) = obj.remove("message") else {
                    return Err(());
                };
                if let Some(Value::Object(u)) = message.remove("usage") {
                    self.usage = u;
                }
                self.message = Some(message);
            }
            Kind::ContentBlockStart => {
                let index = obj.get("index").and_then(Value::as_u64).ok_or(())?;
                let Some(Value::Object(block)) = obj.remove("content_block") else {
                    return Err(());
                };
                self.blocks.insert(index, BlockAcc { block, json: None });
            }
            Kind::ContentBlockDelta => {
                let Some(Value::Object(mut delta)) = obj.remove("delta") else {
                    return Err(());
                };
                // The field each kind of delta carries; taken, not copied.
                let (field, into) = match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => ("text", Some("text")),
                    Some("thinking_delta") => ("thinking", Some("thinking")),
                    Some("signature_delta") => ("signature", Some("signature")),
                    Some("input_json_delta") => ("partial_json", None),
                    Some("citations_delta") => ("citation", Some("citations")),
                    _ => return Err(()),
                };
                let piece = delta.remove(field).unwrap_or(Value::Null);
                let acc = self.block(&obj)?;
                match into {
                    Some("citations") => match acc.block.get_mut("citations") {
                        Some(Value::Array(list)) => list.push(piece),
                        None | Some(Value::Null) => {
                            acc.block
                                .insert("citations".into(), Value::from(vec![piece]));
                        }
                        Some(_) => return Err(()),
                    },
                    Some(key) => acc.append(key, piece)?,
                    None => {
                        let Value::String(piece) = piece else {
                            return Err(());
                        };
                        acc.json.get_or_insert_with(String::new).push_str(&piece);
                    }
                }
            }
            Kind::ContentBlockStop => self.block(&obj)?.close()?,
            Kind::MessageDelta => {
                if let Some(Value::Object(delta)) = obj.remove("delta") {
                    self.delta.extend(delta);
                }
                if let Some(Value::Object(u)) = obj.remove("usage") {
                    self.usage.extend(u);
                }
            }
            Kind::MessageStop | Kind::Ping | Kind::Other => {}
            Kind::Error => return Err(()),
        }
        Ok(())
    }

    /// The assembled message, as the non-streaming call would have
    /// answered it (`Value::Null` if no `message_start` came).
    pub fn finish(self) -> Value {
        let Some(mut message) = self.message else {
            return Value::Null;
        };
        let mut content = Vec::with_capacity(self.blocks.len());
        for mut acc in self.blocks.into_values() {
            if acc.close().is_err() {
                return Value::Null;
            }
            content.push(Value::Object(acc.block));
        }
        message.insert("content".into(), Value::from(content));
        message.extend(self.delta);
        if !self.usage.is_empty() {
            message.insert("usage".into(), Value::Object(self.usage));
        }
        Value::Object(message)
    }
}

/// One SSE event: `event: <type>` and its data.
fn event(out: &mut Vec<u8>, data: &Value) {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or("");
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut *out, data).ok();
    out.extend_from_slice(b"\n\n");
}

/// Turns a stored message into the events an Anthropic SDK accumulates
/// into an equal message: `message_start` (the message without content,
/// its stop reason and sequence null, its usage), per content block
/// `content_block_start` (the block with its streamed field empty), its
/// deltas and `content_block_stop`, then `message_delta` (stop reason,
/// stop sequence, usage) and `message_stop`. `None` for what is not a
/// message.
pub fn replay(message: &Value) -> Option<Replay> {
    let obj = message.as_object()?;
    let content = obj.get("content")?.as_array()?;
    let mut start = obj.clone();
    start.insert("content".into(), Value::Array(Vec::new()));
    let mut delta = Map::new();
    for key in ["stop_reason", "stop_sequence"] {
        if let Some(v) = obj.get(key) {
            start.insert(key.into(), Value::Null);
            delta.insert(key.into(), v.clone());
        }
    }
    let mut out = Vec::with_capacity(1024);
    event(
        &mut out,
        &json!({"type": "message_start", "message": start}),
    );
    for (index, block) in content.iter().enumerate() {
        let block = block.as_object()?;
        let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
        let mut opening = block.clone();
        let mut deltas = Vec::new();
        // Only a string field is streamed as deltas; a block whose field
        // is anything else arrives whole in its start.
        let text_of = |key: &str| block.get(key).filter(|v| v.is_string()).cloned();
        match kind {
            "text" => {
                if let Some(text) = text_of("text") {
                    opening.insert("text".into(), Value::from(""));
                    deltas.push(json!({"type": "text_delta", "text": text}));
                }
            }
            "thinking" => {
                if let Some(thinking) = text_of("thinking") {
                    opening.insert("thinking".into(), Value::from(""));
                    deltas.push(json!({"type": "thinking_delta", "thinking": thinking}));
                }
                if let Some(sig) = text_of("signature") {
                    opening.insert("signature".into(), Value::from(""));
                    deltas.push(json!({"type": "signature_delta", "signature": sig}));
                }
            }
            "tool_use" | "server_tool_use" => {
                if let Some(input) = block.get("input") {
                    opening.insert("input".into(), Value::Object(Map::new()));
                    deltas.push(
                        json!({"type": "input_json_delta", "partial_json": input.to_string()}),
                    );
                }
            }
            // Any other block arrives whole in its start.
            _ => {}
        }
        event(
            &mut out,
            &json!({"type": "content_block_start", "index": index, "content_block": opening}),
        );
        for d in deltas {
            event(
                &mut out,
                &json!({"type": "content_block_delta", "index": index, "delta": d}),
            );
        }
        event(
            &mut out,
            &json!({"type": "content_block_stop", "index": index}),
        );
    }
    let mut closing = json!({"type": "message_delta", "delta": delta});
    if let Some(u) = obj.get("usage") {
        closing["usage"] = u.clone();
    }
    event(&mut out, &closing);
    event(&mut out, &json!({"type": "message_stop"}));
    Some(Replay {
        chunks: Bytes::from(out),
        usage_chunk: None,
    })
}

/// What storing a non-streaming answer needs to know of it, read without
/// building a tree: that [`replay`] can turn it into events (an object
/// whose `type`, if any, is `message`, with a `content` array of objects),
/// and its usage. `None`: not a message.
pub(crate) fn message_facts(body: &[u8]) -> Option<Completion> {
    #[derive(Deserialize)]
    struct Facts<'a> {
        #[serde(rename = "type", default, borrow)]
        kind: Option<Cow<'a, str>>,
        /// Checked (an array of objects), not kept.
        #[serde(rename = "content")]
        _content: Vec<AnyObject>,
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
    }
    let facts: Facts = serde_json::from_slice(trim_leading_ws(body)).ok()?;
    if facts.kind.as_deref().is_some_and(|k| k != "message") {
        return None;
    }
    Some(Completion {
        usage: facts.usage.and_then(RawUsage::of_raw).map(RawUsage::usage),
    })
}

/// The usage of a whole non-streaming message; `None` without one.
pub fn usage_of_message(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct WithUsage<'a> {
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
    }
    let parsed: WithUsage = serde_json::from_slice(trim_leading_ws(body)).ok()?;
    parsed.usage.and_then(RawUsage::of_raw).map(RawUsage::usage)
}

/// Characters of generated text in a whole message, for the usage
/// estimate: its text, its thinking and its tool inputs' JSON; 0 when the
/// body is not one.
pub(crate) fn message_text_chars(body: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(default, borrow)]
        content: Vec<Block<'a>>,
    }
    #[derive(Deserialize)]
    struct Block<'a> {
        #[serde(default)]
        text: Option<Chars>,
        #[serde(default)]
        thinking: Option<Chars>,
        #[serde(default, borrow)]
        input: Option<&'a RawValue>,
    }
    serde_json::from_slice::<Message>(trim_leading_ws(body)).map_or(0, |m| {
        m.content
            .iter()
            .map(|b| {
                b.text.map_or(0, |c| c.0)
                    + b.thinking.map_or(0, |c| c.0)
                    + b.input.map_or(0, |i| i.get().chars().count() as u64)
            })
            .sum()
    })
}

/// An error body in Anthropic's shape:
/// `{"type":"error","error":{"type","message"},"request_id"}`.
pub(crate) fn error_body(error_type: &str, message: &str, request_id: Option<&str>) -> Bytes {
    let mut body = json!({
        "type": "error",
        "error": {"type": error_type, "message": message},
    });
    if let Some(id) = request_id {
        body["request_id"] = Value::from(id);
    }
    Bytes::from(body.to_string())
}

/// The event that ends a stream broken after bytes were sent: an `error`
/// event, which every Anthropic SDK raises on.
pub(crate) fn error_event(error_type: &str, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(160);
    event(
        &mut out,
        &json!({"type": "error", "error": {"type": error_type, "message": message}}),
    );
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sse::tests::frame_all;
    use crate::api::sse::{event_data, EventData};

    fn datas(stream: &[u8]) -> Vec<Vec<u8>> {
        frame_all(&[stream])
            .into_iter()
            .filter_map(|ev| match event_data(&ev) {
                EventData::Data(d) => Some(d.into_owned()),
                EventData::None | EventData::Done => None,
            })
            .collect()
    }

    /// A stream as Anthropic sends it: thinking, text and a tool call.
    const STREAM: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"cache_creation_input_tokens":2,"cache_read_input_tokens":4,"output_tokens":1}}}"#,
        "\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me "}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"think."}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"c2ln"}}"#,
        "\n\nevent: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\nevent: content_block_start\n",
        r#"data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hi "}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"there"}}"#,
        "\n\nevent: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":1}"#,
        "\n\nevent: content_block_start\n",
        r#"data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Pa"}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"ris\", \"n\": 2.5}"}}"#,
        "\n\nevent: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":2}"#,
        "\n\nevent: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":42}}"#,
        "\n\nevent: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n"
    );

    fn assembled(stream: &[u8]) -> (Value, Vec<EventInfo>) {
        let mut a = Assembler::new();
        let infos = datas(stream)
            .iter()
            .map(|d| a.push(d).expect("json"))
            .collect();
        assert!(a.is_whole());
        (a.finish(), infos)
    }

    #[test]
    fn a_stream_assembles_into_its_message() {
        let (message, infos) = assembled(STREAM.as_bytes());
        assert_eq!(
            message,
            json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": [
                    {"type": "thinking", "thinking": "Let me think.", "signature": "c2ln"},
                    {"type": "text", "text": "Hi there"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "n": 2.5}},
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 10, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 4, "output_tokens": 42},
            })
        );
        // Usage: from message_start, then the last message_delta over it.
        let usages: Vec<Usage> = infos.iter().filter_map(|i| i.usage).collect();
        assert_eq!(usages.len(), 2);
        let last = usages[1];
        assert_eq!((last.prompt, last.completion, last.total), (16, 42, 58));
        assert_eq!((last.prompt_cache_hit, last.prompt_cache_miss), (4, 12));
        assert_eq!(usages[0].completion, 1);
        // The ping is a keep-alive; the first token is the first delta;
        // only message_stop ends the stream.
        assert!(infos[1].keepalive && !infos[1].token);
        let first_token = infos.iter().position(|i| i.token).expect("a delta");
        assert_eq!(first_token, 3);
        assert!(infos.iter().rev().skip(1).all(|i| !i.ends));
        assert!(infos.last().expect("events").ends);
        // Generated text: thinking, text and the tool input's JSON.
        let chars: u64 = infos.iter().map(|i| i.text_chars).sum();
        assert_eq!(
            chars,
            ("Let me think.".len() + "Hi there".len() + r#"{"city": "Paris", "n": 2.5}"#.len())
                as u64
        );
    }

    #[test]
    fn the_tally_and_the_assembler_read_every_event_alike() {
        let events: [&[u8]; 9] = [
            b"1 x",
            b"[]",
            b"42",
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            br#"{"type":"message_delta","delta":{},"usage":{"output_tokens":3,"output_tokens":4}}"#,
            br#"{"type":"content_block_delta","index":0,"delta":5}"#,
            br#"{"type":"ping"}"#,
            br#"{"type":"something_new","x":1}"#,
            br#"{"type":"message_start","message":{"usage":{"input_tokens":"many"}}}"#,
        ];
        for ev in events {
            let shown = String::from_utf8_lossy(ev);
            let light = Tally::default().read(ev);
            let full = Assembler::new().push(ev);
            match (&light, &full) {
                (Err(_), Err(_)) => {}
                (Ok(l), Ok(f)) => assert_eq!(l, f, "{shown}"),
                _ => panic!("{shown}: {light:?} against {full:?}"),
            }
        }
        assert!(Tally::default().read(b"1 x").is_err());
        assert!(Tally::default().read(b"[]").expect("json").is_error);
        let error = Tally::default().read(events[3]).expect("json");
        assert!(error.is_error && error.ends);
        // A repeated usage field: the last value, as a tree reads it.
        let repeated = Tally::default().read(events[4]).expect("json");
        assert_eq!(repeated.usage.map(|u| u.completion), Some(4));
        // A count that is no number is not reported.
        let odd = Tally::default().read(events[8]).expect("json");
        assert_eq!(odd.usage.map(|u| u.prompt), Some(0));
    }

    #[test]
    fn a_stored_message_replays_into_events_that_assemble_to_it() {
        let (message, _) = assembled(STREAM.as_bytes());
        let replayed = replay(&message).expect("a message");
        assert!(replayed.usage_chunk.is_none());
        let (again, infos) = assembled(&replayed.chunks);
        assert_eq!(again, message);
        assert_eq!(again.to_string(), message.to_string(), "byte for byte");
        // The events are named, in Anthropic's order, ending in message_stop.
        let names: Vec<String> = frame_all(&[&replayed.chunks])
            .iter()
            .map(|ev| {
                let text = String::from_utf8_lossy(ev);
                text.lines().next().unwrap_or("").to_string()
            })
            .collect();
        assert_eq!(
            names.first().map(String::as_str),
            Some("event: message_start")
        );
        assert_eq!(
            names.last().map(String::as_str),
            Some("event: message_stop")
        );
        assert!(names.contains(&"event: message_delta".to_string()));
        let last = infos.iter().rev().find_map(|i| i.usage).expect("usage");
        assert_eq!((last.prompt, last.completion), (16, 42));
        // Floats and odd blocks survive exactly.
        let odd = json!({
            "id": "m", "type": "message", "role": "assistant", "model": "deepseek-chat",
            "content": [
                {"type": "text", "text": "", "citations": null},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 2.0000000000000002e102, "y": []}},
            ],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 2, "service_tier": "standard"},
        });
        let (again, _) = assembled(&replay(&odd).expect("replay").chunks);
        assert_eq!(again.to_string(), odd.to_string());
        // Fields of another type than a string arrive whole.
        let odder = json!({
            "content": [
                {"type": "text", "text": 5},
                {"type": "thinking", "thinking": "t", "signature": null},
                {"type": "text"},
            ],
        });
        let (again, _) = assembled(&replay(&odder).expect("replay").chunks);
        assert_eq!(again, odder);
        assert!(replay(&json!({"content": "no array"})).is_none());
        assert!(replay(&json!({"content": [1]})).is_none());
    }

    #[test]
    fn a_stream_that_cannot_be_assembled_is_not_whole() {
        let mut a = Assembler::new();
        for d in [
            &br#"{"type":"message_start","message":{"id":"m","content":[]}}"#[..],
            br#"{"type":"content_block_delta","index":3,"delta":{"type":"text_delta","text":"x"}}"#,
        ] {
            a.push(d).expect("json");
        }
        assert!(!a.is_whole());
        let mut a = Assembler::new();
        for d in [
            &br#"{"type":"message_start","message":{"id":"m","content":[]}}"#[..],
            br#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}"#,
            br#"{"type":"content_block_stop","index":0}"#,
        ] {
            a.push(d).expect("json");
        }
        assert!(!a.is_whole(), "a tool input that is not JSON");
        assert!(!Assembler::new().is_whole(), "no message_start");
    }

    #[test]
    fn facts_of_a_whole_message() {
        let body = br#"

{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":"h\u00e9llo"},{"type":"tool_use","id":"t","name":"f","input":{"a":1}}],"usage":{"input_tokens":5,"cache_read_input_tokens":3,"output_tokens":7}}"#;
        let u = message_facts(body)
            .expect("a message")
            .usage
            .expect("usage");
        assert_eq!(
            (u.prompt, u.prompt_cache_hit, u.completion, u.total),
            (8, 3, 7, 15)
        );
        assert_eq!(usage_of_message(body), Some(u));
        assert_eq!(message_text_chars(body), 5 + r#"{"a":1}"#.len() as u64);
        assert_eq!(
            message_facts(br#"{"type":"message","content":[]}"#),
            Some(Completion { usage: None })
        );
        for bad in [
            &br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#[..],
            br#"{"type":"message","content":"text"}"#,
            br#"{"type":"message","content":[1]}"#,
            br#"{"choices":[]}"#,
            b"<html>",
        ] {
            assert!(
                message_facts(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(usage_of_message(b"<html>"), None);
        assert_eq!(message_text_chars(b"<html>"), 0);
    }

    #[test]
    fn error_shapes() {
        let body = error_body("rate_limit_error", "slow down", Some("req-1"));
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}, "request_id": "req-1"})
        );
        let ev = error_event("api_error", "upstream stream interrupted");
        let text = std::str::from_utf8(&ev).expect("utf8");
        assert!(text.starts_with("event: error\ndata: {") && text.ends_with("}\n\n"));
        let data = datas(&ev);
        let v: Value = serde_json::from_slice(&data[0]).expect("json");
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "api_error");
        let info = Tally::default().read(&data[0]).expect("json");
        assert!(info.is_error && info.ends);
    }
}
