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
                    .map(|m| match m.get("content") {
                        Some(Value::String(s)) => chars(s),
                        Some(Value::Array(parts)) => parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .map(chars)
                            .sum(),
                        _ => 0,
                    })
                    .sum(),
            },
            _ => PromptText {
                kind: TextKind::Other,
                chars: 0,
            },
        }
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
        let (field, inner) = match self.0 {
            Want::Message => ("content", Want::Content),
            Want::Part => ("text", Want::Text),
            Want::Prompt | Want::Content | Want::Text => ("", Want::Text),
        };
        let mut chars = 0u64;
        while let Some(is_field) = map.next_key_seed(KeyIs(field))? {
            if is_field {
                chars = map.next_value_seed(Count(inner))?.1;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
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

/// Whether a map key is the one looked for, read without allocating.
struct KeyIs(&'static str);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIs {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(!self.0.is_empty() && v == self.0)
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
