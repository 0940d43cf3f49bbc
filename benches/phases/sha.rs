//! The cost of one SHA-256 block, for `benches/phases.sh`. valgrind cannot
//! run the SHA-NI instructions the `sha2` crate picks at run time on CPUs
//! that have them, so under callgrind every block runs the portable code
//! (about 3 500 instructions, several times a SHA-NI block's time). The
//! script counts the blocks a request hashes in its profile (the
//! instructions of `sha2::sha256::compress256` over those of one block,
//! which this program measures under callgrind) and prices them at the
//! native time of one block, which this program measures without it. Built
//! by the script with `rustc -O` against the `sha2` rlib of the release
//! build (the same compiled code as in `sluice`).
//!
//!     sha          # prints ns_per_block=<ns>: a one-block digest, timed
//!                  # in on-CPU time (the VM may be shared), best of 5
//!     sha COUNT    # COUNT one-block digests, untimed (run under callgrind)

#![allow(clippy::print_stdout, reason = "a benchmark tool reports on stdout")]

use sha2::{Digest, Sha256};
use std::hint::black_box;

/// A tenant key's length: one block with its padding, as auth hashes.
const KEY: [u8; 52] = [b'k'; 52];

fn digests(n: u32) {
    for _ in 0..n {
        black_box(Sha256::digest(black_box(&KEY)));
    }
}

/// This thread's time on a CPU so far, in ns (`/proc/thread-self/schedstat`):
/// unlike the wall clock, it leaves out the time other processes ran.
fn on_cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat")
}

fn main() {
    if let Some(n) = std::env::args().nth(1) {
        digests(n.parse().expect("COUNT"));
        return;
    }
    let n = 1_000_000u32;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = on_cpu_ns();
        digests(n);
        best = best.min((on_cpu_ns() - start) / f64::from(n));
    }
    println!("ns_per_block={best:.1}");
}
