//! The client of `benches/phases.sh`: N chat completions over a few
//! keep-alive HTTP/1.1 connections, closed loop, one thread per connection.
//! Standard library only, so the script builds it with plain `rustc -O`
//! (no Cargo target, nothing added to the crate).
//!
//!     phases_client ADDR N CONNS fixed|distinct:TAG|nostore KEY
//!
//! `fixed` sends the same body every time (after the first, hits when the
//! cache is on); `distinct:TAG` makes every body distinct (misses that are
//! keyed and stored); `nostore` sends the fixed body with `cache-control:
//! no-store` (misses that bypass the cache). Prints one line: requests,
//! seconds, and the counts of each status and `x-sluice-cache` value.
//! Exits 1 if a request failed or was not answered 200.

#![allow(clippy::print_stdout, reason = "a benchmark tool reports on stdout")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The load bench's body (benches/load.rs), ~150 bytes.
const BODY: &str = r#"{"model":"deepseek-chat","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write one sentence about rivers."}]}"#;
const SPLIT: &str = "rivers.";

fn body(mode: &str, n: u64) -> String {
    match mode.strip_prefix("distinct:") {
        Some(tag) => {
            let at = BODY.find(SPLIT).expect("split") + SPLIT.len();
            format!("{} #{tag}{n}{}", &BODY[..at], &BODY[at..])
        }
        None => BODY.to_string(),
    }
}

/// Reads one response; returns its status and `x-sluice-cache` value.
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut chunked, mut cache) = (None, false, String::from("-"));
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed in the head"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => length = v.parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "x-sluice-cache" => cache = v.to_string(),
                _ => {}
            }
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            let mut buf = vec![0; size + 2];
            r.read_exact(&mut buf)?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        let mut buf = vec![0; n];
        r.read_exact(&mut buf)?;
    } else {
        return Err(std::io::Error::other("neither length nor chunked"));
    }
    Ok((status, cache))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: phases_client ADDR N CONNS fixed|distinct:TAG|nostore KEY");
        std::process::exit(2);
    }
    let addr = args[1].clone();
    let n: u64 = args[2].parse().expect("N");
    let conns: usize = args[3].parse().expect("CONNS");
    let mode = args[4].clone();
    let key = args[5].clone();
    let next = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (addr, mode, key) = (addr.clone(), mode.clone(), key.clone());
            let (next, seen, failed) = (Arc::clone(&next), Arc::clone(&seen), Arc::clone(&failed));
            std::thread::spawn(move || {
                let stream = TcpStream::connect(&addr).expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let mut w = stream.try_clone().expect("clone");
                let mut r = BufReader::new(stream);
                let extra = if mode == "nostore" {
                    "cache-control: no-store\r\n"
                } else {
                    ""
                };
                let mut local: BTreeMap<String, u64> = BTreeMap::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let b = body(&mode, i);
                    let req = format!(
                        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\n\
                         authorization: Bearer {key}\r\ncontent-type: application/json\r\n\
                         {extra}content-length: {}\r\n\r\n{b}",
                        b.len()
                    );
                    let ok = w
                        .write_all(req.as_bytes())
                        .and_then(|()| read_response(&mut r));
                    match ok {
                        Ok((status, cache)) => {
                            if status != 200 {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            *local.entry(format!("{status}/{cache}")).or_default() += 1;
                        }
                        Err(e) => {
                            eprintln!("phases_client: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                let mut all = seen.lock().expect("lock");
                for (k, v) in local {
                    *all.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let secs = start.elapsed().as_secs_f64();
    let seen = seen.lock().expect("lock");
    let counts: Vec<String> = seen.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("requests={n} secs={secs:.3} {}", counts.join(" "));
    if failed.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
}
