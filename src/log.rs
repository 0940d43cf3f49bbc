//! How a log line is written, in both formats (docs/config.md): the JSON
//! line (`SLUICE_LOG_FORMAT=json`: one object a line, `timestamp`,
//! `level`, the event's fields, its `message` first, then `target`), and
//! the fields of the human-readable line (`name=value`, strings quoted).
//! Both write what tracing-subscriber's own formats write, byte for byte
//! (the tests hold one against the other), but cheaper, because every
//! request logs a line:
//!
//! - `JsonLines` uses tracing-subscriber's serializer and field visitor,
//!   but into a byte buffer of the thread's own, checked as UTF-8 once. The
//!   crate's formatter hands serde_json an `io::Write` adaptor that checks
//!   each of the serializer's many small writes as UTF-8 on its own: about
//!   13 000 instructions of the 29 000 an access-log line cost.
//! - `TextFields` writes a string that needs no escaping as it is, between
//!   quotes, and integers with `itoa`, where the crate's visitor formats
//!   every value with `Debug`, a character at a time.

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use serde::ser::{SerializeMap, Serializer as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_serde::AsSerde;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON line format, for `tracing_subscriber::fmt().event_format`.
pub struct JsonLines;

/// A thread's scratch: the timestamp and the line being written.
#[derive(Default)]
struct Scratch {
    time: String,
    line: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut s) => {
                let Scratch { time, line } = &mut *s;
                write_line(event, time, line, &mut writer)
            }
            // A line logged while one is being written (a field's `Debug`
            // that logs): scratch of its own.
            Err(_) => write_line(event, &mut String::new(), &mut Vec::new(), &mut writer),
        })
    }
}

fn write_line(
    event: &Event<'_>,
    time: &mut String,
    line: &mut Vec<u8>,
    writer: &mut Writer<'_>,
) -> fmt::Result {
    time.clear();
    line.clear();
    SystemTime.format_time(&mut Writer::new(time))?;
    let meta = event.metadata();
    let mut json = serde_json::Serializer::new(&mut *line);
    let mut map = json.serialize_map(None).map_err(|_| fmt::Error)?;
    map.serialize_entry("timestamp", time.as_str())
        .map_err(|_| fmt::Error)?;
    map.serialize_entry("level", &meta.level().as_serde())
        .map_err(|_| fmt::Error)?;
    let mut fields = tracing_serde::SerdeMapVisitor::new(map);
    event.record(&mut fields);
    let mut map = fields.take_serializer().map_err(|_| fmt::Error)?;
    map.serialize_entry("target", meta.target())
        .map_err(|_| fmt::Error)?;
    map.end().map_err(|_| fmt::Error)?;
    line.push(b'\n');
    writer.write_str(std::str::from_utf8(line).map_err(|_| fmt::Error)?)
}

/// The fields of a human-readable line, for
/// `tracing_subscriber::fmt().fmt_fields`: `message` first as it is, then
/// `name=value` for each field, separated by spaces.
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// The separator and `name=` (the message has neither a name nor, when
    /// first, a separator); `false` if an earlier write failed.
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = match name {
            "message" => self.writer.write_str(sep),
            _ => {
                let name = name.strip_prefix("r#").unwrap_or(name);
                self.writer
                    .write_str(sep)
                    .and_then(|()| self.writer.write_str(name))
                    .and_then(|()| self.writer.write_char('='))
            }
        };
        self.result.is_ok()
    }

    fn put(&mut self, text: &str) {
        self.result = self.writer.write_str(text);
    }
}

/// Whether `Debug` writes `s` as itself between quotes: printable ASCII,
/// no quote, no backslash.
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            // As the crate writes it: `Display`, through the escape guard.
            return self.record_debug(field, &format_args!("{value}"));
        }
        if !plain(value) {
            return self.record_debug(field, &value);
        }
        if self.start(field) {
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.put(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.put(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.put(if value { "true" } else { "false" });
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let message = field.name() == "message";
        if !self.start(field) {
            return;
        }
        self.result = if message && self.writer.sanitizes_ansi_escapes() {
            write!(Sanitized(&mut self.writer), "{value:?}")
        } else {
            write!(self.writer, "{value:?}")
        };
    }
}

/// A message as tracing-subscriber writes it: the characters a terminal
/// reads as control sequences (ESC, BEL, BS, FF, DEL, C1) escaped.
struct Sanitized<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Sanitized<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(|c: char| {
            matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        }) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                _ => write!(self.0, "\\x{:02x}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `log` writes through the subscriber `make` builds around a
    /// sink.
    fn capture<S>(make: impl FnOnce(Sink) -> S, log: &impl Fn()) -> String
    where
        S: Subscriber + Send + Sync + 'static,
    {
        let sink = Sink::default();
        tracing::subscriber::with_default(make(sink.clone()), log);
        let bytes = sink.0.lock().expect("sink").clone();
        String::from_utf8(bytes).expect("utf8")
    }

    /// The lines `log` writes through `JsonLines` and through
    /// tracing-subscriber's own JSON format (flattened, no span).
    fn both(log: impl Fn()) -> (String, String) {
        let fmt = |s: Sink| tracing_subscriber::fmt().with_writer(move || s.clone());
        let ours = capture(|s| fmt(s).event_format(JsonLines).finish(), &log);
        let theirs = capture(
            |s| {
                fmt(s)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .finish()
            },
            &log,
        );
        (ours, theirs)
    }

    /// The lines `log` writes in the human-readable format with `TextFields`
    /// and with tracing-subscriber's own fields, each less its timestamp.
    fn both_text(log: impl Fn()) -> (Vec<String>, Vec<String>) {
        let fmt = |s: Sink| {
            tracing_subscriber::fmt()
                .with_writer(move || s.clone())
                .with_ansi(false)
        };
        let ours = capture(|s| fmt(s).fmt_fields(TextFields).finish(), &log);
        let theirs = capture(|s| fmt(s).finish(), &log);
        let untimed = |text: String| {
            text.lines()
                .map(|l| l.split_once(' ').expect("a timestamp").1.to_string())
                .collect::<Vec<_>>()
        };
        (untimed(ours), untimed(theirs))
    }

    /// The lines both tests write: every kind of field value, strings that
    /// need escaping in either format, a message with terminal control
    /// characters, an event without fields and one without a message.
    fn events() {
        tracing::info!(
            target: "sluice::access",
            request_id = "req_1",
            tenant = "plain",
            quoted = "a \"b\" \\ c",
            unicode = "é\u{200b}\u{7f}\n\u{1}",
            r#type = "raw name",
            status = 200u16,
            delta = -3i64,
            stream = false,
            duration_ms = 1.25f64,
            whole_ms = 1.0f64,
            ttft_ms = None::<f64>,
            upstream = Some("default"),
            error = ?"debug",
            "request"
        );
        tracing::warn!(grace_secs = 30, "shutting down: \x1b[31m \u{85} bell\x07");
        tracing::info!("no fields");
        tracing::info!(only = 1u8);
    }

    #[test]
    fn text_fields_are_tracing_subscribers_fields() {
        let (ours, theirs) = both_text(events);
        assert_eq!(ours.len(), 4);
        assert_eq!(ours, theirs);
        assert!(
            ours[0].contains(r#"request request_id="req_1" tenant="plain" quoted="a \"b\" \\ c""#),
            "{}",
            ours[0]
        );
    }

    /// Each line with its timestamp's value blanked (the two formats ran
    /// at different times).
    fn untimed(text: &str) -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                let t = v["timestamp"].as_str().expect("a timestamp");
                assert!(t.ends_with('Z') && t.contains('T'), "{t}");
                v["timestamp"] = serde_json::Value::Null;
                v
            })
            .collect()
    }

    #[test]
    fn lines_are_tracing_subscribers_json_lines() {
        let (ours, theirs) = both(events);
        assert_eq!(ours.lines().count(), 4, "{ours}");
        assert_eq!(untimed(&ours), untimed(&theirs));
        // Byte for byte, keys in the same order, once past the timestamps.
        let after_time = |t: &str| -> Vec<String> {
            t.lines()
                .map(|l| {
                    assert!(l.starts_with("{\"timestamp\":\""), "{l}");
                    l[l.find("\",\"level\"").expect("a level")..].to_string()
                })
                .collect()
        };
        assert_eq!(after_time(&ours), after_time(&theirs));
        assert!(
            ours.lines()
                .next()
                .expect("a line")
                .ends_with(",\"target\":\"sluice::access\"}"),
            "{ours}"
        );
    }
}
