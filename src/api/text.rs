//! Counting text for the usage estimate (docs/api.md): characters of a request's
//! messages (or FIM prompt) and of generated text, read straight from JSON
//! without building strings or trees, so a request keeps only a number.
//! A leaf: used by `sse` (generated text) and the request path (prompts).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
#[cfg(test)]
use serde_json::Value;

/// What kind of JSON value a request's `messages` or `prompt` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextKind {
    Array,
    String,
    Other,
}

/// A request's `messages` (or FIM `prompt`), read in the validation pass:
/// its kind, and the characters of its text — each message's `content`
/// string or its content parts' `text`; the prompt string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PromptText {
    pub(crate) kind: TextKind,
    pub(crate) chars: u64,
}

impl<'de> Deserialize<'de> for PromptText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PromptText, D::Error> {
        let (kind, chars) = Count(Want::Prompt).deserialize(d)?;
        Ok(PromptText { kind, chars })
    }
}

impl PromptText {
    /// The same reading of an already built value.
    #[cfg(test)]
    pub(crate) fn of_value(v: &Value) -> PromptText {
        let chars = |s: &str| s.chars().count() as u64;
        match v {
            Value::String(s) => PromptText {
                kind: TextKind::String,
                chars: chars(s),
            },
            Value::Array(messages) => PromptText {
                kind: TextKind::Array,
                chars: messages
                    .iter()
                    .map(|m| m.get("content").map_or(0, content_chars))
                    .sum(),
            },
            _ => PromptText {
                kind: TextKind::Other,
                chars: 0,
            },
        }
    }
}

/// The characters of a content value as the streaming count reads it: a
/// string, or parts' `text`, `thinking` and `content` (recursively).
#[cfg(test)]
fn content_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(parts) => parts
            .iter()
            .filter_map(Value::as_object)
            .map(|p| {
                let text = |k: &str| {
                    p.get(k)
                        .and_then(Value::as_str)
                        .map_or(0, |s| s.chars().count() as u64)
                };
                text("text") + text("thinking") + p.get("content").map_or(0, content_chars)
            })
            .sum(),
        _ => 0,
    }
}

/// The characters of a JSON string, read without building it; any other
/// value counts 0.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chars(pub u64);

impl<'de> Deserialize<'de> for Chars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Chars, D::Error> {
        Count(Want::Text).deserialize(d).map(|(_, n)| Chars(n))
    }
}

/// The characters of a message's content (Anthropic's `system` too): a
/// string, or the `text` of an array of content blocks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContentChars(pub u64);

impl<'de> Deserialize<'de> for ContentChars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ContentChars, D::Error> {
        Count(Want::Content)
            .deserialize(d)
            .map(|(_, n)| ContentChars(n))
    }
}

/// Where in a request body the counter is.
#[derive(Clone, Copy)]
enum Want {
    /// `messages` (an array of messages) or `prompt` (a string).
    Prompt,
    /// One message: its `content` counts.
    Message,
    /// A message's content: a string, or an array of parts.
    Content,
    /// One content part: its `text` counts.
    Part,
    /// A string whose characters count.
    Text,
}

struct Count(Want);

impl<'de> DeserializeSeed<'de> for Count {
    type Value = (TextKind, u64);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

const OTHER: (TextKind, u64) = (TextKind::Other, 0);

impl<'de> Visitor<'de> for Count {
    type Value = (TextKind, u64);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        let counts = matches!(self.0, Want::Prompt | Want::Content | Want::Text);
        Ok((
            TextKind::String,
            if counts { v.chars().count() as u64 } else { 0 },
        ))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let inner = match self.0 {
            Want::Prompt => Some(Want::Message),
            Want::Content => Some(Want::Part),
            Want::Message | Want::Part | Want::Text => None,
        };
        let mut chars = 0u64;
        match inner {
            Some(want) => {
                while let Some((_, n)) = seq.next_element_seed(Count(want))? {
                    chars = chars.saturating_add(n);
                }
            }
            None => while seq.next_element::<IgnoredAny>()?.is_some() {},
        }
        Ok((TextKind::Array, chars))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // The fields that count, and how each is read: a message's
        // `content`; a part's `text`, `thinking` (Anthropic's earlier
        // reasoning) and `content` (Anthropic's `tool_result`: a string or
        // parts).
        let fields: &[(&str, Want)] = match self.0 {
            Want::Message => &[("content", Want::Content)],
            Want::Part => &[
                ("text", Want::Text),
                ("thinking", Want::Text),
                ("content", Want::Content),
            ],
            Want::Prompt | Want::Content | Want::Text => &[],
        };
        // A repeated key counts once, as its last value (what parsers keep).
        let mut counted = [0u64; 3];
        while let Some(field) = map.next_key_seed(KeyOf(fields))? {
            match field {
                Some(i) => counted[i] = map.next_value_seed(Count(fields[i].1))?.1,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let chars = counted.iter().fold(0u64, |a, n| a.saturating_add(*n));
        Ok((TextKind::Other, chars))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(OTHER)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(OTHER)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(OTHER)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(OTHER)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(OTHER)
    }
}

/// Which of the fields looked for a map key is, read without allocating.
struct KeyOf(&'static [(&'static str, Want)]);

impl<'de> DeserializeSeed<'de> for KeyOf {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyOf {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|(name, _)| *name == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> PromptText {
        let streamed: PromptText = serde_json::from_str(json).expect("json");
        let value: Value = serde_json::from_str(json).expect("json");
        assert_eq!(streamed, PromptText::of_value(&value), "{json}");
        streamed
    }

    #[test]
    fn counts_anthropics_thinking_and_tool_results_too() {
        let p = read(
            r#"[{"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"sig"},{"type":"tool_use","id":"t","name":"ls","input":{"path":"/"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"a.txt"}]},{"type":"tool_result","tool_use_id":"u","content":"ok"}]}]"#,
        );
        assert_eq!(p.chars, 3 + 5 + 2);
    }

    #[test]
    fn counts_the_text_of_messages_not_their_json() {
        let p = read(
            r#"[{"role":"system","content":"abcd"},{"role":"user","content":[{"type":"text","text":"héllo"},{"type":"image_url","image_url":{"url":"http://x"}}]},{"role":"assistant","content":null,"tool_calls":[]}, 7, "x"]"#,
        );
        assert_eq!(
            p,
            PromptText {
                kind: TextKind::Array,
                chars: 4 + 5
            }
        );
        assert_eq!(
            read(r#""a\"b""#),
            PromptText {
                kind: TextKind::String,
                chars: 3
            }
        );
        assert_eq!(read(r#"{"content":"x"}"#).kind, TextKind::Other);
        assert_eq!(read("null").kind, TextKind::Other);
        assert_eq!(
            read("[]"),
            PromptText {
                kind: TextKind::Array,
                chars: 0
            }
        );
    }

    #[test]
    fn chars_of_any_value() {
        let c: Chars = serde_json::from_str(r#""日本語""#).expect("json");
        assert_eq!(c, Chars(3));
        let c: Chars = serde_json::from_str(r#"{"a":[1,"xx"]}"#).expect("json");
        assert_eq!(c, Chars(0));
        let c: ContentChars = serde_json::from_str(r#""abc""#).expect("json");
        assert_eq!(c, ContentChars(3));
        let c: ContentChars =
            serde_json::from_str(r#"[{"type":"text","text":"ab"},{"type":"text","text":"cd","cache_control":{"type":"ephemeral"}}]"#)
                .expect("json");
        assert_eq!(c, ContentChars(4));
    }
}
