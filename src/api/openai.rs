//! OpenAI's chat and text completions (DeepSeek's API): what a chunk of a
//! stream says (`inspect`), assembling a stream into the completion it
//! amounts to (`Assembler`), the reverse (`replay`: a stored completion as
//! chunks), and what storing a non-streaming answer needs to know of it
//! (`completion_facts`, `usage_of_completion`). Pure functions over bytes.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::text::Chars;
use crate::api::usage::Usage;

/// Reads the usage out of a whole non-streaming response body. DeepSeek
/// writes `usage` last, so the object after the last unescaped `"usage":`
/// key is parsed on its own, without walking the (possibly long) choices;
/// anything unexpected falls back to parsing the whole body.
pub fn usage_of_completion(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct WithUsage<'a> {
        #[serde(borrow)]
        usage: Option<&'a serde_json::value::RawValue>,
    }
    const KEY: &[u8] = b"\"usage\"";
    let tail = memchr::memmem::rfind(body, KEY)
        .filter(|&at| at == 0 || body[at - 1] != b'\\')
        .and_then(|at| {
            let rest = trim_leading_ws(&body[at + KEY.len()..]);
            let rest = trim_leading_ws(rest.strip_prefix(b":")?);
            Usage::read(rest)
        });
    tail.or_else(|| {
        let parsed: WithUsage = serde_json::from_slice(trim_leading_ws(body)).ok()?;
        usage_of_raw(parsed.usage?)
    })
}

pub use crate::api::trim_leading_ws;

/// An error body in OpenAI's shape:
/// `{"error":{"message","type","param":null,"code"}}`.
pub(crate) fn error_body(message: &str, error_type: &str, code: &str) -> Bytes {
    let body = json!({
        "error": {"message": message, "type": error_type, "param": Value::Null, "code": code}
    });
    Bytes::from(body.to_string())
}

/// The event that ends a stream broken after bytes were sent: the error
/// body as a data event, with no `[DONE]` after it.
pub(crate) fn error_event(body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// What kind of completion a stream amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `chat.completion` (chat and chat prefix completion).
    Chat,
    /// `text_completion` (FIM).
    Text,
}

#[derive(Debug, Default)]
struct ToolAcc {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Debug, Default)]
struct ChoiceAcc {
    role: Option<String>,
    content: Option<String>,
    reasoning: Option<String>,
    text: String,
    tool_calls: BTreeMap<u64, ToolAcc>,
    finish_reason: Option<Value>,
    /// `logprobs.content` entries, concatenated across chunks.
    logprobs: Option<Vec<Value>>,
}

/// One parsed chunk: what the relay needs to know about an event.
#[derive(Debug, Default)]
pub struct ChunkInfo {
    /// The chunk has no choices but a usage: DeepSeek's usage-only chunk.
    pub usage_only: bool,
    pub usage: Option<Usage>,
    /// The chunk is an error object rather than a completion chunk.
    pub is_error: bool,
    /// Characters of generated text in the chunk (content, reasoning,
    /// tool-call arguments, FIM text), for the usage estimate.
    pub(crate) text_chars: u64,
}

/// The generated text of a chunk (streamed `delta`s, FIM `text`) or of a
/// completion (`message`s), counted without building it.
#[derive(Deserialize, Default)]
struct TextChoice {
    #[serde(default)]
    text: Option<Chars>,
    #[serde(default)]
    delta: Option<TextMessage>,
    #[serde(default)]
    message: Option<TextMessage>,
}

#[derive(Deserialize, Default)]
struct TextMessage {
    #[serde(default)]
    content: Option<Chars>,
    #[serde(default)]
    reasoning_content: Option<Chars>,
    #[serde(default)]
    tool_calls: Option<Vec<TextCall>>,
}

#[derive(Deserialize)]
struct TextCall {
    #[serde(default)]
    function: Option<TextFunction>,
}

#[derive(Deserialize)]
struct TextFunction {
    #[serde(default)]
    arguments: Option<Chars>,
}

impl TextChoice {
    fn chars(&self) -> u64 {
        let n = |c: &Option<Chars>| c.map_or(0, |c| c.0);
        let message = |m: &Option<TextMessage>| {
            m.as_ref().map_or(0, |m| {
                n(&m.content)
                    + n(&m.reasoning_content)
                    + m.tool_calls
                        .iter()
                        .flatten()
                        .map(|c| c.function.as_ref().map_or(0, |f| n(&f.arguments)))
                        .sum::<u64>()
            })
        };
        n(&self.text) + message(&self.delta) + message(&self.message)
    }
}

/// Characters of generated text in a whole non-streaming completion, for
/// the usage estimate; 0 when the body is not one (cut off, garbage).
pub(crate) fn completion_text_chars(body: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct Completion {
        #[serde(default)]
        choices: Vec<TextChoice>,
    }
    serde_json::from_slice::<Completion>(trim_leading_ws(body))
        .map_or(0, |c| c.choices.iter().map(TextChoice::chars).sum())
}

/// Reads what the relay needs from one chunk without building it: whether
/// it is valid JSON at all, an error object, the usage-only chunk, and its
/// usage. Used when the stream is not being assembled for the cache.
pub fn inspect(data: &[u8]) -> Result<ChunkInfo, serde_json::Error> {
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct Light<'a, C> {
        #[serde(default = "none")]
        choices: Option<Vec<C>>,
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
    }
    fn none<C>() -> Option<Vec<C>> {
        None
    }
    let error = ChunkInfo {
        is_error: true,
        ..ChunkInfo::default()
    };
    // A chunk is an object: valid JSON of another type is an error chunk
    // (serde would read a struct from an array), anything else is no JSON.
    if trim_leading_ws(data).first() != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(data)?;
        return Ok(error);
    }
    // Read with the text counted; a chunk whose choices have an odd shape
    // is read again without (it carries no text Sluice can count).
    let light: Light<'_, TextChoice> = match serde_json::from_slice(data) {
        Ok(l) => l,
        Err(e) if e.is_data() => {
            match serde_json::from_slice::<Light<'_, serde::de::IgnoredAny>>(data) {
                Ok(l) => Light {
                    choices: l
                        .choices
                        .map(|c| c.iter().map(|_| TextChoice::default()).collect()),
                    usage: l.usage,
                    error: l.error,
                },
                // Odd field types: an error chunk.
                Err(e) if e.is_data() => return Ok(error),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    if light.error.is_some() {
        return Ok(error);
    }
    let usage = light.usage.and_then(usage_of_raw);
    Ok(ChunkInfo {
        usage_only: light.choices.as_ref().is_none_or(Vec::is_empty) && usage.is_some(),
        usage,
        is_error: false,
        text_chars: light.choices.iter().flatten().map(TextChoice::chars).sum(),
    })
}

/// A `usage` object as upstream wrote it (of a repeated field, the last).
fn usage_of_raw(raw: &serde_json::value::RawValue) -> Option<Usage> {
    Usage::read(raw.get().as_bytes())
}

/// Assembles stream chunks into the completion they amount to: content,
/// reasoning_content and tool calls merged by index, finish_reason, usage.
#[derive(Debug)]
pub struct Assembler {
    shape: Shape,
    head: Map<String, Value>,
    choices: BTreeMap<u64, ChoiceAcc>,
    usage: Option<Value>,
    /// A chunk `inspect` read could not be assembled (a number out of a
    /// tree's range): the answer is relayed as it came, but not whole here.
    broken: bool,
}

impl Assembler {
    pub fn new(shape: Shape) -> Self {
        Self {
            shape,
            head: Map::new(),
            choices: BTreeMap::new(),
            usage: None,
            broken: false,
        }
    }

    /// Whether every chunk pushed was assembled (`finish` is the answer).
    pub fn is_whole(&self) -> bool {
        !self.broken
    }

    /// Takes in one chunk's JSON. The chunk is read by `inspect`, as when
    /// nothing is assembled, so the cache on and off judge an event alike:
    /// `Err` if it is not JSON at all, an error chunk for what `inspect`
    /// calls one; what it accepts is then assembled.
    pub fn push(&mut self, data: &[u8]) -> Result<ChunkInfo, serde_json::Error> {
        let info = inspect(data)?;
        if info.is_error || self.broken {
            return Ok(info);
        }
        match serde_json::from_slice::<Value>(data) {
            Ok(Value::Object(obj)) => self.absorb(obj),
            Ok(_) | Err(_) => self.broken = true,
        }
        Ok(info)
    }

    /// Assembles one chunk that `inspect` accepted.
    fn absorb(&mut self, mut obj: Map<String, Value>) {
        for key in ["id", "created", "model", "system_fingerprint"] {
            if !self.head.contains_key(key) {
                if let Some(val) = obj.get(key) {
                    self.head.insert(key.to_string(), val.clone());
                }
            }
        }
        if let Some(u) = obj.get_mut("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.take());
        }
        let choices = match obj.get_mut("choices") {
            Some(Value::Array(c)) => std::mem::take(c),
            _ => Vec::new(),
        };
        for mut choice in choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(index).or_default();
            if let Some(fr) = choice.get_mut("finish_reason").filter(|f| !f.is_null()) {
                acc.finish_reason = Some(fr.take());
            }
            if let Some(Value::Array(items)) = choice
                .get_mut("logprobs")
                .and_then(|l| l.get_mut("content"))
            {
                acc.logprobs.get_or_insert_with(Vec::new).append(items);
            }
            if let Some(Value::String(t)) = choice.get("text") {
                acc.text.push_str(t);
            }
            let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) else {
                continue;
            };
            if let Some(Value::String(r)) = delta.get("role") {
                acc.role = Some(r.clone());
            }
            if let Some(Value::String(c)) = delta.get("content") {
                acc.content.get_or_insert_with(String::new).push_str(c);
            }
            if let Some(Value::String(r)) = delta.get("reasoning_content") {
                acc.reasoning.get_or_insert_with(String::new).push_str(r);
            }
            if let Some(Value::Array(calls)) = delta.get("tool_calls") {
                for call in calls {
                    let ti = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let tool = acc.tool_calls.entry(ti).or_default();
                    if let Some(Value::String(id)) = call.get("id") {
                        tool.id = Some(id.clone());
                    }
                    if let Some(Value::String(t)) = call.get("type") {
                        tool.kind = Some(t.clone());
                    }
                    if let Some(f) = call.get("function") {
                        if let Some(Value::String(n)) = f.get("name") {
                            tool.name.push_str(n);
                        }
                        if let Some(Value::String(a)) = f.get("arguments") {
                            tool.arguments.push_str(a);
                        }
                    }
                }
            }
        }
    }

    /// The assembled completion, as the non-streaming endpoint would have
    /// answered it.
    pub fn finish(self) -> Value {
        let mut out = self.head;
        out.insert(
            "object".into(),
            Value::from(match self.shape {
                Shape::Chat => "chat.completion",
                Shape::Text => "text_completion",
            }),
        );
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                let finish = c.finish_reason.unwrap_or(Value::Null);
                let logprobs = c.logprobs.map_or(Value::Null, |items| json!({"content": items}));
                match self.shape {
                    Shape::Text => json!({
                        "index": index, "text": c.text, "logprobs": logprobs, "finish_reason": finish,
                    }),
                    Shape::Chat => {
                        let mut message = Map::new();
                        message.insert("role".into(), Value::from(c.role.unwrap_or_else(|| "assistant".into())));
                        message.insert("content".into(), c.content.map_or(Value::Null, Value::from));
                        if let Some(r) = c.reasoning {
                            message.insert("reasoning_content".into(), Value::from(r));
                        }
                        if !c.tool_calls.is_empty() {
                            let calls: Vec<Value> = c
                                .tool_calls
                                .into_values()
                                .map(|t| {
                                    json!({
                                        "id": t.id,
                                        "type": t.kind.unwrap_or_else(|| "function".into()),
                                        "function": {"name": t.name, "arguments": t.arguments},
                                    })
                                })
                                .collect();
                            message.insert("tool_calls".into(), Value::from(calls));
                        }
                        json!({
                            "index": index, "message": message, "logprobs": logprobs, "finish_reason": finish,
                        })
                    }
                }
            })
            .collect();
        out.insert("choices".into(), Value::from(choices));
        if let Some(u) = self.usage {
            out.insert("usage".into(), u);
        }
        Value::Object(out)
    }
}

use crate::api::Completion;
pub use crate::api::Replay;

/// What storing a non-streaming answer needs to know of it, read without
/// building a tree (the miss path stores every cacheable answer, most of
/// them never replayed): that [`replay`] can turn it into chunks (an object
/// with a `choices` array, each chat choice with a `message` object), and
/// its usage. `None`: not a completion.
pub(crate) fn completion_facts(body: &[u8]) -> Option<Completion> {
    use crate::api::AnyObject;
    use serde_json::value::RawValue;
    use std::borrow::Cow;

    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        message: Option<AnyObject>,
    }
    #[derive(Deserialize)]
    struct Facts<'a> {
        #[serde(default, borrow)]
        object: Option<Cow<'a, str>>,
        choices: Vec<Choice>,
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
    }
    let facts: Facts = serde_json::from_slice(trim_leading_ws(body)).ok()?;
    let chat = facts.object.as_deref() != Some("text_completion");
    if chat && facts.choices.iter().any(|c| c.message.is_none()) {
        return None;
    }
    let usage = facts.usage.and_then(usage_of_raw);
    Some(Completion { usage })
}

/// Turns a stored completion into the chunks that reassemble to it.
pub fn replay(completion: &Value) -> Option<Replay> {
    let obj = completion.as_object()?;
    let shape = match obj.get("object").and_then(Value::as_str) {
        Some("text_completion") => Shape::Text,
        _ => Shape::Chat,
    };
    let mut envelope = Map::new();
    for key in ["id", "created", "model", "system_fingerprint"] {
        if let Some(v) = obj.get(key) {
            envelope.insert(key.into(), v.clone());
        }
    }
    envelope.insert(
        "object".into(),
        Value::from(match shape {
            Shape::Chat => "chat.completion.chunk",
            Shape::Text => "text_completion",
        }),
    );
    let mut out = Vec::new();
    let event = |choices: Vec<Value>, usage: Option<&Value>, out: &mut Vec<u8>| {
        let mut chunk = envelope.clone();
        chunk.insert("choices".into(), Value::from(choices));
        if let Some(u) = usage {
            chunk.insert("usage".into(), u.clone());
        }
        out.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut *out, &Value::Object(chunk)).ok();
        out.extend_from_slice(b"\n\n");
    };
    for choice in obj.get("choices")?.as_array()? {
        let index = choice.get("index").cloned().unwrap_or(Value::from(0));
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        let logprobs = choice.get("logprobs").cloned().unwrap_or(Value::Null);
        match shape {
            Shape::Text => {
                let text = choice.get("text").cloned().unwrap_or(Value::from(""));
                event(
                    vec![
                        json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null}),
                    ],
                    None,
                    &mut out,
                );
                event(
                    vec![
                        json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish}),
                    ],
                    None,
                    &mut out,
                );
            }
            Shape::Chat => {
                let message = choice.get("message").and_then(Value::as_object)?;
                let mut delta = Map::new();
                delta.insert(
                    "role".into(),
                    message
                        .get("role")
                        .cloned()
                        .unwrap_or(Value::from("assistant")),
                );
                for key in ["content", "reasoning_content"] {
                    if let Some(v) = message.get(key) {
                        delta.insert(key.into(), v.clone());
                    }
                }
                if let Some(Value::Array(calls)) = message.get("tool_calls") {
                    let calls: Vec<Value> = calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let mut c = c.clone();
                            if let Some(o) = c.as_object_mut() {
                                o.insert("index".into(), Value::from(i));
                            }
                            c
                        })
                        .collect();
                    delta.insert("tool_calls".into(), Value::from(calls));
                }
                event(
                    vec![
                        json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": null}),
                    ],
                    None,
                    &mut out,
                );
                event(
                    vec![
                        json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}),
                    ],
                    None,
                    &mut out,
                );
            }
        }
    }
    let usage_chunk = obj.get("usage").filter(|u| u.is_object()).map(|u| {
        let mut buf = Vec::new();
        event(Vec::new(), Some(u), &mut buf);
        Bytes::from(buf)
    });
    Some(Replay {
        chunks: Bytes::from(out),
        usage_chunk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sse::tests::frame_all;
    use crate::api::sse::{event_data, EventData};

    #[test]
    fn completion_facts_accept_what_replay_can_build_and_nothing_else() {
        let chat = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi \"q\""},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_cache_hit_tokens":1,"prompt_cache_miss_tokens":2}}"#;
        let usage = completion_facts(chat)
            .map(|c| c.usage)
            .expect("a completion")
            .expect("usage");
        assert_eq!((usage.prompt, usage.completion, usage.total), (3, 2, 5));
        assert_eq!(usage.prompt_cache_hit, 1);
        let v: Value = serde_json::from_slice(chat).expect("json");
        assert!(replay(&v).is_some());
        // Leading blank lines, as DeepSeek may send them.
        assert!(completion_facts(&[b"\n\n ", &chat[..]].concat()).is_some());
        // No usage, a null one, one that is no object: stored without usage.
        for usage in ["", r#","usage":null"#, r#","usage":"n/a""#] {
            let body = format!(r#"{{"choices":[{{"message":{{"content":"a"}}}}]{usage}}}"#);
            assert_eq!(
                completion_facts(body.as_bytes()),
                Some(Completion { usage: None }),
                "{body}"
            );
        }
        // A repeated usage field: read as the whole answer's tree reads it.
        let repeated = br#"{"choices":[{"message":{}}],"usage":{"prompt_tokens":2,"total_tokens":9,"total_tokens":9}}"#;
        let v: Value = serde_json::from_slice(repeated).expect("json");
        assert_eq!(
            completion_facts(repeated).expect("a completion").usage,
            Usage::from_value(&v["usage"])
        );
        assert!(Usage::from_value(&v["usage"]).is_some());
        // A text completion needs no message.
        let text = br#"{"object":"text_completion","choices":[{"text":"fn","index":0}]}"#;
        assert!(completion_facts(text).is_some());
        // Not completions: each would fail to replay, and is not stored.
        for bad in [
            &br#"{"choices":[{"text":"no message in a chat answer"}]}"#[..],
            br#"{"choices":[{"message":"not an object"}]}"#,
            br#"{"choices":[{"message":[]}]}"#,
            br#"{"choices":{}}"#,
            br#"{"object":"chat.completion"}"#,
            br#"[1,2]"#,
            br#"{"choices":[] "#,
        ] {
            assert_eq!(
                completion_facts(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
            if let Ok(v) = serde_json::from_slice::<Value>(bad) {
                if v.get("choices").is_some_and(Value::is_array) {
                    assert!(replay(&v).is_none());
                }
            }
        }
    }

    #[test]
    fn usage_reads_deepseek_fields() {
        let u = usage_of_completion(
            br#"

{"usage":{"prompt_tokens":50,"completion_tokens":30,"total_tokens":80,"prompt_cache_hit_tokens":10,"prompt_cache_miss_tokens":40,"completion_tokens_details":{"reasoning_tokens":7}}}"#,
        )
        .expect("usage");
        assert_eq!(
            u,
            Usage {
                prompt: 50,
                completion: 30,
                total: 80,
                prompt_cache_hit: 10,
                prompt_cache_miss: 40,
                reasoning: 7
            }
        );
        assert_eq!(u.billable(), 80);
    }

    fn chunks_of(completion: &Value) -> Vec<Vec<u8>> {
        let r = replay(completion).expect("replay");
        let mut all = r.chunks.to_vec();
        all.extend_from_slice(&r.usage_chunk.expect("usage"));
        frame_all(&[&all])
    }

    /// A completion replayed as chunks, assembled again.
    fn replayed_and_assembled(completion: &Value, shape: Shape) -> Value {
        let mut a = Assembler::new(shape);
        for ev in chunks_of(completion) {
            let EventData::Data(d) = event_data(&ev) else {
                panic!("data")
            };
            a.push(&d).expect("json");
        }
        a.finish()
    }

    #[test]
    fn usage_is_found_past_content_that_mentions_it() {
        let body = br#"{"choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 999}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let u = usage_of_completion(body).expect("usage");
        assert_eq!((u.prompt, u.completion, u.total), (3, 4, 7));
        assert_eq!(usage_of_completion(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_of_completion(br#"{"choices":[]}"#), None);
        assert_eq!(usage_of_completion(b"<html>"), None);
    }

    #[test]
    fn stream_and_completion_round_trip() {
        let completion = json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "deepseek-reasoner",
            "system_fingerprint": "fp",
            "choices": [{"index": 0, "logprobs": {"content": [{"token": "hi", "logprob": -0.1, "top_logprobs": []}]}, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "hi", "reasoning_content": "think",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]
            }}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        });
        let assembled = replayed_and_assembled(&completion, Shape::Chat);
        assert_eq!(assembled, completion);
    }

    #[test]
    fn tool_call_deltas_merge_by_index() {
        let mut a = Assembler::new(Shape::Chat);
        let chunks = [
            r#"{"id":"i","model":"m","created":2,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"get","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"b","type":"function","function":{"name":"put","arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}},{"index":1,"function":{"arguments":"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        ];
        let mut last = ChunkInfo::default();
        for c in chunks {
            last = a.push(c.as_bytes()).expect("json");
        }
        assert!(last.usage_only);
        let v = a.finish();
        let calls = &v["choices"][0]["message"]["tool_calls"];
        assert_eq!(calls[0]["function"]["arguments"], "{\"x\":1}");
        assert_eq!(calls[1]["function"]["name"], "put");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert!(v["choices"][0]["message"]["content"].is_null());
        assert_eq!(v["usage"]["total_tokens"], 3);
    }

    #[test]
    fn text_completion_round_trip() {
        let completion = json!({
            "id": "f", "object": "text_completion", "created": 1, "model": "deepseek-chat",
            "choices": [{"index": 0, "text": "fn main() {}", "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        });
        let assembled = replayed_and_assembled(&completion, Shape::Text);
        assert_eq!(assembled, completion);
    }
    #[test]
    fn inspect_and_the_assembler_read_every_event_alike() {
        // The fuzz-found disagreements (FUZZING.md), and their neighbours.
        let events: [&[u8]; 9] = [
            b"1 x",
            b"[]",
            br#"[null, {"prompt_tokens":5}]"#,
            b"42",
            b"not json",
            br#"{"choices":5}"#,
            br#"{"error":{"message":"overloaded"}}"#,
            br#"{"choices":[{"index":0,"delta":{"content":"hi"}}]}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}"#,
        ];
        for ev in events {
            let light = inspect(ev);
            let mut a = Assembler::new(Shape::Chat);
            let full = a.push(ev);
            let shown = String::from_utf8_lossy(ev);
            match (&light, &full) {
                (Err(_), Err(_)) => {}
                (Ok(l), Ok(f)) => {
                    assert_eq!(l.is_error, f.is_error, "{shown}");
                    assert_eq!(l.usage, f.usage, "{shown}");
                    assert_eq!(l.usage_only, f.usage_only, "{shown}");
                    assert_eq!(l.text_chars, f.text_chars, "{shown}");
                }
                _ => panic!("{shown}: {light:?} against {full:?}"),
            }
        }
        // Not JSON at all, and JSON that is no object: no event is both.
        assert!(inspect(b"1 x").is_err());
        assert!(inspect(b"[]").expect("json").is_error);
        assert!(inspect(br#"[null, {"prompt_tokens":5}]"#)
            .expect("json")
            .usage
            .is_none());
    }

    #[test]
    fn a_repeated_usage_field_in_a_chunk_is_read_as_upstream_meant_it() {
        let chunk = br#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5,"total_tokens":5}}"#;
        let info = inspect(chunk).expect("json");
        assert!(!info.is_error);
        assert_eq!(info.usage.map(|u| u.total), Some(5));
        assert!(info.usage_only);
    }
    #[test]
    fn floats_survive_storing_and_replay_exactly() {
        // FUZZING.md finding 3: `2.0000000000000002e102` came back `2e102`.
        let completion = json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "deepseek-chat",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": [
                {"token": "a", "logprob": 2.0000000000000002e102, "top_logprobs": []},
                {"token": "b", "logprob": -1.474927536723323e-236, "top_logprobs": []},
                {"token": "c", "logprob": 0.1, "top_logprobs": []},
                {"token": "d", "logprob": -9.5367431640625e-7, "top_logprobs": []}
            ]}, "message": {"role": "assistant", "content": "abcd"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        });
        let stored = completion.to_string();
        let assembled =
            replayed_and_assembled(&serde_json::from_str(&stored).expect("json"), Shape::Chat);
        let again = assembled;
        assert_eq!(again, completion);
        assert_eq!(again.to_string(), stored, "byte for byte");
    }
}
