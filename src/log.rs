//! The JSON log line (`SLUICE_LOG_FORMAT=json`, docs/config.md): one
//! object a line, `timestamp`, `level`, the event's fields (its `message`
//! first), then `target`: tracing-subscriber's JSON format, flattened,
//! written the same way (its serializer, its field visitor) but into a
//! byte buffer of the thread's own.
//!
//! Written here because every request logs a line: tracing-subscriber's
//! formatter hands serde_json an `io::Write` adaptor over its `fmt::Write`
//! buffer, which checks each of the serializer's many small writes as
//! UTF-8 on its own, about 13 000 instructions of the 29 000 an access-log
//! line cost (benches/README.md). Here the line is checked once, whole.

use std::cell::RefCell;
use std::fmt;

use serde::ser::{SerializeMap, Serializer as _};
use tracing::{Event, Subscriber};
use tracing_serde::AsSerde;
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

    /// The lines `log` writes through `JsonLines` and through
    /// tracing-subscriber's own JSON format (flattened, no span).
    fn both(log: impl Fn()) -> (String, String) {
        let ours = Sink::default();
        let theirs = Sink::default();
        let (o, t) = (ours.clone(), theirs.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || o.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, &log);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || t.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, &log);
        let text = |s: Sink| String::from_utf8(s.0.lock().expect("sink").clone()).expect("utf8");
        (text(ours), text(theirs))
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
        let (ours, theirs) = both(|| {
            tracing::info!(
                target: "sluice::access",
                request_id = "req_1",
                tenant = "a \"quoted\"\nname é",
                status = 200u16,
                stream = false,
                duration_ms = 1.25f64,
                ttft_ms = None::<f64>,
                upstream = Some("default"),
                error = ?"debug \u{1}",
                "request"
            );
            tracing::warn!(delta = -3i64, "sluice listening");
        });
        assert_eq!(ours.lines().count(), 2, "{ours}");
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
