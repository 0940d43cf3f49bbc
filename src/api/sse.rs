//! Server-sent events: framing bytes into events without copying, and
//! reading an event's `data`. What the data means is the API format's
//! business (`openai`). Pure functions and small state machines: no I/O
//! here, so the relay, the cache and the benches share them.
//!
//! Hand-written rather than taken from an SSE crate: the relay needs events
//! as zero-copy slices of the upstream's buffers, with the raw bytes kept so
//! an event is forwarded exactly as it came, which the crates we looked at
//! (they hand out parsed, owned events) do not offer.

use bytes::{Bytes, BytesMut};

/// Splits a byte stream into SSE events. Each event is returned with its
/// terminating blank line, exactly as received, so forwarding it is a
/// reference-count bump, not a copy.
#[derive(Debug, Default)]
pub struct Framer {
    pending: BytesMut,
}

/// The framer refused to buffer more than its limit without seeing an event
/// boundary: the upstream is not speaking SSE.
#[derive(Debug, PartialEq, Eq)]
pub struct NotSse;

impl Framer {
    /// Upper bound on one event; beyond it the stream is garbage.
    pub(crate) const MAX_EVENT: usize = 4 * 1024 * 1024;

    /// Feeds one chunk, calling `emit` for every complete event.
    pub fn push(&mut self, chunk: Bytes, mut emit: impl FnMut(Bytes)) -> Result<(), NotSse> {
        if self.pending.is_empty() {
            // Common case: the chunk holds whole events; slice them out of it.
            let mut rest = chunk;
            while let Some(end) = event_end(&rest, 0) {
                emit(rest.split_to(end));
            }
            if !rest.is_empty() {
                self.pending.extend_from_slice(&rest);
            }
        } else {
            // An event was split across reads: only now do bytes get copied.
            let searched = self.pending.len().saturating_sub(2);
            self.pending.extend_from_slice(&chunk);
            let mut from = searched;
            while let Some(end) = event_end(&self.pending, from) {
                emit(self.pending.split_to(end).freeze());
                from = 0;
            }
        }
        if self.pending.len() > Self::MAX_EVENT {
            return Err(NotSse);
        }
        Ok(())
    }

    /// Bytes received that do not yet form a whole event.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }
}

/// The end (exclusive) of the first event in `buf`, searching from `from`:
/// just past a blank line (`\n\n`, or `\r\n\r\n`).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        if nl == 0 {
            // A blank line at the very start (DeepSeek sends these while busy).
            return Some(1);
        }
        if buf[nl - 1] == b'\n' || (nl >= 2 && buf[nl - 1] == b'\r' && buf[nl - 2] == b'\n') {
            return Some(nl + 1);
        }
        i = nl + 1;
    }
    None
}

/// What an event carries.
#[derive(Debug, PartialEq, Eq)]
pub enum EventData<'a> {
    /// Only comments (`: keep-alive`) or blank lines.
    None,
    /// `data: [DONE]`.
    Done,
    /// The `data` field (several `data:` lines joined by `\n`).
    Data(std::borrow::Cow<'a, [u8]>),
}

/// Reads the `data` field of one event.
pub fn event_data(event: &[u8]) -> EventData<'_> {
    let mut data: Option<std::borrow::Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        data = Some(match data {
            None => std::borrow::Cow::Borrowed(value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                std::borrow::Cow::Owned(joined)
            }
        });
    }
    match data {
        None => EventData::None,
        Some(d) if d.as_ref() == b"[DONE]" => EventData::Done,
        Some(d) => EventData::Data(d),
    }
}

/// `data: [DONE]`, the end of every successful stream.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Frames every event of `chunks`, read in that order.
    pub(crate) fn frame_all(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(Bytes::copy_from_slice(c), |e| out.push(e.to_vec()))
                .expect("sse");
        }
        out
    }

    #[test]
    fn framing_keeps_events_whole_across_reads() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        let whole = frame_all(&[stream]);
        assert_eq!(whole.len(), 3);
        for split in 1..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(frame_all(&[a, b]), whole, "split at {split}");
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frame_all(&bytewise), whole);
    }

    #[test]
    fn framing_handles_crlf_and_leading_blank_lines() {
        let events = frame_all(&[b"\n\ndata: x\r\n\r\ndata: y\n\n"]);
        assert_eq!(
            events,
            vec![
                b"\n".to_vec(),
                b"\n".to_vec(),
                b"data: x\r\n\r\n".to_vec(),
                b"data: y\n\n".to_vec()
            ]
        );
    }

    #[test]
    fn framing_refuses_endless_garbage() {
        let mut f = Framer::default();
        let junk = Bytes::from(vec![b'x'; Framer::MAX_EVENT + 1]);
        assert_eq!(f.push(junk, |_| {}), Err(NotSse));
    }

    #[test]
    fn event_data_kinds() {
        assert_eq!(event_data(b": keep-alive\n\n"), EventData::None);
        assert_eq!(event_data(b"\n"), EventData::None);
        assert_eq!(event_data(b"data: [DONE]\n\n"), EventData::Done);
        assert_eq!(
            event_data(b"data:{}\n\n"),
            EventData::Data(b"{}".as_slice().into())
        );
        assert_eq!(
            event_data(b"data: a\ndata: b\n\n"),
            EventData::Data(b"a\nb".to_vec().into())
        );
    }
}
