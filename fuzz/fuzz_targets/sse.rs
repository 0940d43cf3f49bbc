//! The SSE framer and what the relay reads from each event, on bytes an
//! upstream could send. The first input byte chooses how the rest is cut into
//! reads and the completion's shape.
//!
//! Checked: no panic; the events do not depend on how the bytes were cut;
//! events and the pending tail give back the input; and a stream assembled
//! into a completion, replayed as a cache hit would replay it and assembled
//! again, gives the same completion (docs/api.md, "Cache": a replay reassembles to the
//! identical message). The same for Anthropic's Messages stream: its
//! reader and its assembler agree on every event, and a message assembled
//! from the events, replayed, assembles to the same message.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::api::anthropic;
use sluice::api::openai::{self, Assembler, Shape};
use sluice::api::sse::{self, EventData, Framer};

type Framed = (Vec<Bytes>, Vec<u8>, bool);

fn frame<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Framed {
    let mut framer = Framer::default();
    let mut events = Vec::new();
    let mut refused = false;
    for chunk in chunks {
        if framer
            .push(Bytes::copy_from_slice(chunk), |e| events.push(e))
            .is_err()
        {
            refused = true;
            break;
        }
    }
    (events, framer.pending().to_vec(), refused)
}

/// Reads of pseudo-random sizes from 1 to 64 bytes.
fn cuts(bytes: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut state = u32::from(seed) | 1;
    let mut rest = bytes;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % 64 + 1).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

fn assemble(events: &[Bytes], shape: Shape) -> Value {
    let mut asm = Assembler::new(shape);
    for ev in events {
        if let EventData::Data(d) = sse::event_data(ev) {
            // What the relay does when it does not assemble: must not panic,
            // and must agree with the assembler on what the chunk is.
            let light = openai::inspect(&d);
            let full = asm.push(&d);
            match (light, full) {
                // Where neither calls the chunk an error, they read the same.
                (Ok(l), Ok(f)) if !l.is_error && !f.is_error => {
                    assert_eq!(l.usage, f.usage, "usage of {d:?}");
                    assert_eq!(l.usage_only, f.usage_only, "usage_only of {d:?}");
                }
                // What the assembler takes as JSON, `inspect` takes too.
                (Err(_), Ok(_)) => panic!("inspect refused what the assembler took: {d:?}"),
                // Not checked: `inspect` stops at the first error, so JSON
                // followed by junk (`1 x`) is "valid JSON of the wrong type"
                // (an error chunk, forwarded) to it and "not JSON" (the
                // stream fails) to the assembler: the relay treats the same
                // event differently with the cache on and off. Regression
                // seeds: corpus/sse/regress-*. See FUZZING.md.
                _ => {}
            }
        }
    }
    asm.finish()
}

/// Anthropic's reading of the events: the reader (cache off) and the
/// assembler (cache on) agree on every event; a whole message replays into
/// events that assemble into it again.
fn anthropic_round_trip(events: &[Bytes]) {
    let mut tally = anthropic::Tally::default();
    let mut asm = anthropic::Assembler::new();
    for ev in events {
        if let EventData::Data(d) = sse::event_data(ev) {
            match (tally.read(&d), asm.push(&d)) {
                (Ok(l), Ok(f)) => assert_eq!(l, f, "the two readings of {d:?}"),
                (Err(_), Err(_)) => {}
                (l, f) => panic!("the reader and the assembler disagree on {d:?}: {l:?} / {f:?}"),
            }
        }
    }
    if !asm.is_whole() {
        return;
    }
    let message = asm.finish();
    let Some(replay) = anthropic::replay(&message) else {
        return;
    };
    let (events, pending, refused) = frame([&replay.chunks[..]]);
    assert!(pending.is_empty() && !refused, "a replay frames into whole events");
    let mut again = anthropic::Assembler::new();
    for ev in &events {
        if let EventData::Data(d) = sse::event_data(ev) {
            again.push(&d).expect("a replayed event is JSON");
        }
    }
    assert!(again.is_whole(), "a replay assembles: {message}");
    let again = again.finish();
    assert!(same(&again, &message), "replay round trip: {again} vs {message}");
}

/// JSON equality, floats exact: serde_json is built with `float_roundtrip`,
/// so a float read, written and read again is the same float, and written
/// again the same text (FUZZING.md, finding 3).
fn same(a: &Value, b: &Value) -> bool {
    a == b && a.to_string() == b.to_string()
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    let whole = frame([bytes]);
    let split = frame(cuts(bytes, seed));
    if !whole.2 && !split.2 {
        assert_eq!(whole.0, split.0, "events depend on the reads");
        assert_eq!(whole.1, split.1, "pending depends on the reads");
        let total: usize = whole.0.iter().map(Bytes::len).sum::<usize>() + whole.1.len();
        assert_eq!(total, bytes.len(), "bytes lost or added");
    }

    anthropic_round_trip(&whole.0);

    let shape = if seed & 0x80 == 0 {
        Shape::Chat
    } else {
        Shape::Text
    };
    let completion = assemble(&whole.0, shape);
    // A cache hit replays the stored completion; reassembled, it must be the
    // completion again.
    let Some(replay) = openai::replay(&completion) else {
        return;
    };
    let mut again = replay.chunks.to_vec();
    if let Some(u) = &replay.usage_chunk {
        again.extend_from_slice(u);
    }
    again.extend_from_slice(sse::DONE_EVENT);
    let (events, pending, refused) = frame([again.as_slice()]);
    assert!(
        pending.is_empty() && !refused,
        "a replay frames into whole events"
    );
    let shape = match completion["object"].as_str() {
        Some("text_completion") => Shape::Text,
        _ => Shape::Chat,
    };
    let replayed = assemble(&events, shape);
    // The message of every choice (content, reasoning, tool calls, finish
    // reason, logprobs) and the usage come back. The envelope (`id`,
    // `model`, …) rides on the chunks, so a completion without choices or
    // usage replays as `[DONE]` alone and loses it: not checked then.
    if replay.chunks.is_empty() && replay.usage_chunk.is_none() {
        assert!(
            same(&replayed["choices"], &completion["choices"]),
            "replay round trip: {replayed} vs {completion}"
        );
    } else {
        assert!(
            same(&replayed, &completion),
            "replay round trip: {replayed} vs {completion}"
        );
    }
});
