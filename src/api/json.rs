//! Request bodies read without a tree: one strict pass (RFC 8259) that
//! validates the JSON, lists the top-level members with their raw spans,
//! refuses a top-level key given twice, and — only when the cache needs it —
//! writes the canonical form the cache key hashes. A leaf: it knows no other
//! Sluice module.
//!
//! Memory stays within a small multiple of the body whatever its shape: the
//! canonical form is at most about 1.7 times the body (`1.5` becomes
//! `15e-1`), the member list holds 12 bytes per member of the objects open
//! on the current path (and of the top level), and nesting is capped at
//! `MAX_DEPTH`. Everything is dropped with the `Scan`, which the request path
//! keeps only until the key is computed.
//!
//! Canonical form: no whitespace; object members sorted by their canonical
//! key bytes at every depth; strings with escapes decoded and re-escaped one
//! way (`"`, `\`, control characters; a lone surrogate stays `\udxxx`);
//! numbers as an exact decimal `[-]DIGITSe[-]EXP` (no leading or trailing
//! zeros in the digits, `e0` left out, zero is `0`), so `1`, `1.0` and `1e0`
//! are one number and a 23-digit integer keeps every digit.

use std::io::Write;
use std::ops::Range;

/// Deeper bodies are refused (as `serde_json` does): recursion stays bounded.
pub(crate) const MAX_DEPTH: u32 = 128;

/// Why a body is not acceptable JSON for Sluice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not JSON, not an object, invalid UTF-8, or nested deeper than
    /// `MAX_DEPTH`.
    Syntax,
    /// The top-level object gives this key (as written, escapes decoded the
    /// canonical way) more than once.
    DuplicateKey(String),
}

/// One top-level member.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// The canonical key with its quotes, in `Scan::arena`.
    key: (u32, u32),
    /// The value as the client wrote it, in the body.
    raw: (u32, u32),
    /// The canonical value, in `Scan::arena` (empty when not canonical).
    canon: (u32, u32),
}

/// A validated body: its top-level members and, when asked for, their
/// canonical values.
pub struct Scan<'a> {
    body: &'a [u8],
    members: Vec<Member>,
    /// Indices into `members`, sorted by key.
    sorted: Vec<u32>,
    arena: Vec<u8>,
}

/// Whether a scan also writes the canonical form of every top-level value
/// (for the cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canonical {
    Write,
    Skip,
}

/// Validates `body` as one JSON object, writing its canonical form or not.
pub fn scan(body: &[u8], canonical: Canonical) -> Result<Scan<'_>, Invalid> {
    let canonical = canonical == Canonical::Write;
    if u32::try_from(body.len()).is_err() || std::str::from_utf8(body).is_err() {
        return Err(Invalid::Syntax);
    }
    // The top-level object is the first level.
    let mut p = Parser {
        b: body,
        i: 0,
        depth: 1,
    };
    // The canonical form is about the body's size: one allocation, not a
    // series of doublings that would hold up to twice that.
    let mut c = Canon {
        arena: Vec::with_capacity(if canonical { body.len() + 16 } else { 256 }),
        ..Canon::default()
    };
    let mut members = Vec::new();
    p.ws();
    p.expect(b'{')?;
    p.ws();
    if p.peek() == Some(b'}') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            let ks = c.arena.len();
            p.string(Some(&mut c.arena))?;
            let key = (ks as u32, c.arena.len() as u32);
            p.ws();
            p.expect(b':')?;
            p.ws();
            let rs = p.i;
            let cs = c.arena.len();
            if canonical {
                p.value(Some(&mut c))?;
            } else {
                p.value(None)?;
            }
            members.push(Member {
                key,
                raw: (rs as u32, p.i as u32),
                canon: (cs as u32, c.arena.len() as u32),
            });
            p.ws();
            match p.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(Invalid::Syntax),
            }
        }
    }
    p.ws();
    if p.i != body.len() {
        return Err(Invalid::Syntax);
    }
    let arena = c.arena;
    let key_of = |m: &Member| inner(&arena[m.key.0 as usize..m.key.1 as usize]);
    let mut sorted: Vec<u32> = (0..members.len() as u32).collect();
    sorted.sort_by(|&a, &b| key_of(&members[a as usize]).cmp(key_of(&members[b as usize])));
    for pair in sorted.windows(2) {
        let (a, b) = (&members[pair[0] as usize], &members[pair[1] as usize]);
        if key_of(a) == key_of(b) {
            // Named in the error message: a hostile key is cut short.
            let key = String::from_utf8_lossy(key_of(a));
            let shown: String = key.chars().take(64).collect();
            let more = if shown.len() < key.len() { "…" } else { "" };
            return Err(Invalid::DuplicateKey(format!("\"{shown}{more}\"")));
        }
    }
    Ok(Scan {
        body,
        members,
        sorted,
        arena,
    })
}

impl<'a> Scan<'a> {
    fn find(&self, name: &str) -> Option<&Member> {
        // A name Sluice asks for needs no escaping: its canonical form is
        // itself.
        let want = |m: &Member| {
            inner(&self.arena[m.key.0 as usize..m.key.1 as usize]).cmp(name.as_bytes())
        };
        let at = self
            .sorted
            .binary_search_by(|&i| want(&self.members[i as usize]))
            .ok()?;
        Some(&self.members[self.sorted[at] as usize])
    }

    /// The raw bytes of a top-level member's value, as the client wrote them.
    pub(crate) fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.span(name).map(|r| &self.body[r])
    }

    /// Where a top-level member's value sits in the body.
    pub(crate) fn span(&self, name: &str) -> Option<Range<usize>> {
        self.find(name).map(|m| m.raw.0 as usize..m.raw.1 as usize)
    }

    /// Writes the canonical JSON of the body, leaving out the top-level
    /// members named in `skip`. Only for a scan made with `canonical`.
    pub(crate) fn write_canonical(&self, skip: &[&str], out: &mut impl FnMut(&[u8])) {
        out(b"{");
        let mut first = true;
        for &i in &self.sorted {
            let m = &self.members[i as usize];
            let key = &self.arena[m.key.0 as usize..m.key.1 as usize];
            if skip.iter().any(|s| inner(key) == s.as_bytes()) {
                continue;
            }
            if !first {
                out(b",");
            }
            first = false;
            out(key);
            out(b":");
            out(&self.arena[m.canon.0 as usize..m.canon.1 as usize]);
        }
        out(b"}");
    }
}

/// The members of one object (a `stream_options` value): each key in its
/// canonical form (quotes included, escapes decoded the canonical way) with
/// its value's span relative to `object`. `None` if `object` is not a JSON
/// object.
pub(crate) fn members(object: &[u8]) -> Option<Vec<(Vec<u8>, Range<usize>)>> {
    let mut p = Parser {
        b: object,
        i: 0,
        depth: 0,
    };
    let mut out = Vec::new();
    p.ws();
    p.expect(b'{').ok()?;
    p.ws();
    if p.peek() == Some(b'}') {
        return Some(out);
    }
    loop {
        p.ws();
        let mut key = Vec::new();
        p.string(Some(&mut key)).ok()?;
        p.ws();
        p.expect(b':').ok()?;
        p.ws();
        let vs = p.i;
        p.value(None).ok()?;
        out.push((key, vs..p.i));
        p.ws();
        match p.next() {
            Some(b',') => continue,
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

/// Walks the one object at the start of `bytes` (white space before it is
/// fine) without allocating: `f` gets each member's key as written (between
/// its quotes, escapes not decoded) and its value as written, and returns
/// `false` to give up. The offset just past the object; `None` if it is not
/// a valid JSON object or `f` gave up. What follows the object is not read.
pub(crate) fn each_member(bytes: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> bool) -> Option<usize> {
    let mut p = Parser {
        b: bytes,
        i: 0,
        depth: 0,
    };
    p.ws();
    if p.peek() != Some(b'{') {
        return None;
    }
    p.enter().ok()?;
    p.ws();
    if p.peek() == Some(b'}') {
        return Some(p.i + 1);
    }
    loop {
        p.ws();
        let ks = p.i;
        p.string(None).ok()?;
        let key = &bytes[ks + 1..p.i - 1];
        p.ws();
        p.expect(b':').ok()?;
        p.ws();
        let vs = p.i;
        p.value(None).ok()?;
        if !f(key, &bytes[vs..p.i]) {
            return None;
        }
        p.ws();
        match p.next() {
            Some(b',') => continue,
            Some(b'}') => return Some(p.i),
            _ => return None,
        }
    }
}

/// Scratch for canonical output: the bytes written so far and the members
/// of the objects still open.
#[derive(Default)]
struct Canon {
    arena: Vec<u8>,
    /// (key start, key end, value end) in `arena`, per member.
    open: Vec<(u32, u32, u32)>,
    tmp: Vec<u8>,
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    depth: u32,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Result<(), Invalid> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(Invalid::Syntax)
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn value(&mut self, out: Option<&mut Canon>) -> Result<(), Invalid> {
        match self.peek() {
            Some(b'{') => self.object(out),
            Some(b'[') => self.array(out),
            Some(b'"') => self.string(out.map(|c| &mut c.arena)),
            Some(b't') => self.literal(b"true", out),
            Some(b'f') => self.literal(b"false", out),
            Some(b'n') => self.literal(b"null", out),
            Some(b'-' | b'0'..=b'9') => self.number(out),
            _ => Err(Invalid::Syntax),
        }
    }

    fn literal(&mut self, word: &[u8], out: Option<&mut Canon>) -> Result<(), Invalid> {
        if !self.b[self.i..].starts_with(word) {
            return Err(Invalid::Syntax);
        }
        self.i += word.len();
        if let Some(c) = out {
            c.arena.extend_from_slice(word);
        }
        Ok(())
    }

    fn enter(&mut self) -> Result<(), Invalid> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Invalid::Syntax);
        }
        self.i += 1;
        Ok(())
    }

    fn array(&mut self, mut out: Option<&mut Canon>) -> Result<(), Invalid> {
        self.enter()?;
        if let Some(c) = out.as_deref_mut() {
            c.arena.push(b'[');
        }
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
        } else {
            loop {
                self.ws();
                self.value(out.as_deref_mut())?;
                self.ws();
                match self.next() {
                    Some(b',') => {
                        if let Some(c) = out.as_deref_mut() {
                            c.arena.push(b',');
                        }
                    }
                    Some(b']') => break,
                    _ => return Err(Invalid::Syntax),
                }
            }
        }
        if let Some(c) = out {
            c.arena.push(b']');
        }
        self.depth -= 1;
        Ok(())
    }

    fn object(&mut self, mut out: Option<&mut Canon>) -> Result<(), Invalid> {
        self.enter()?;
        let (start, base) = match out.as_deref_mut() {
            Some(c) => {
                c.arena.push(b'{');
                (c.arena.len() - 1, c.open.len())
            }
            None => (0, 0),
        };
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
        } else {
            loop {
                self.ws();
                let ks = out.as_deref().map_or(0, |c| c.arena.len());
                self.string(out.as_deref_mut().map(|c| &mut c.arena))?;
                let ke = out.as_deref().map_or(0, |c| c.arena.len());
                self.ws();
                self.expect(b':')?;
                if let Some(c) = out.as_deref_mut() {
                    c.arena.push(b':');
                }
                self.ws();
                self.value(out.as_deref_mut())?;
                if let Some(c) = out.as_deref_mut() {
                    let ve = c.arena.len();
                    c.open.push((ks as u32, ke as u32, ve as u32));
                }
                self.ws();
                match self.next() {
                    Some(b',') => {
                        if let Some(c) = out.as_deref_mut() {
                            c.arena.push(b',');
                        }
                    }
                    Some(b'}') => break,
                    _ => return Err(Invalid::Syntax),
                }
            }
        }
        if let Some(c) = out {
            c.close_object(start, base);
        }
        self.depth -= 1;
        Ok(())
    }

    /// A string at `self.i`; with `out`, its canonical form (quoted).
    fn string(&mut self, mut out: Option<&mut Vec<u8>>) -> Result<(), Invalid> {
        self.expect(b'"')?;
        if let Some(o) = out.as_deref_mut() {
            o.push(b'"');
        }
        loop {
            let run = self.i;
            self.skip_plain();
            if let Some(o) = out.as_deref_mut() {
                o.extend_from_slice(&self.b[run..self.i]);
            }
            match self.next() {
                Some(b'"') => break,
                Some(b'\\') => self.escape(out.as_deref_mut())?,
                // A raw control character, or the end of the input.
                _ => return Err(Invalid::Syntax),
            }
        }
        if let Some(o) = out {
            o.push(b'"');
        }
        Ok(())
    }

    /// Past the bytes of a string that need no attention (not `"`, `\`
    /// or a control character): eight at a time while none is special,
    /// since message text is most of a body.
    fn skip_plain(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        // A high bit set for a zero byte (false positives only in bytes
        // after a true one: the lowest flagged byte is always a true one).
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
        loop {
            if let Some(chunk) = self.b.get(self.i..self.i + 8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let x = u64::from_le_bytes(word);
                let special = zero(x ^ (ONES * u64::from(b'"')))
                    | zero(x ^ (ONES * u64::from(b'\\')))
                    | (x.wrapping_sub(ONES * 0x20) & !x & HIGH);
                if special == 0 {
                    self.i += 8;
                    continue;
                }
                // Straight to the first special byte (little-endian: the
                // lowest flag is the first byte), not a byte at a time.
                self.i += (special.trailing_zeros() / 8) as usize;
                return;
            }
            match self.b.get(self.i) {
                Some(&c) if c != b'"' && c != b'\\' && c >= 0x20 => self.i += 1,
                _ => return,
            }
        }
    }

    /// The escape after a backslash.
    fn escape(&mut self, out: Option<&mut Vec<u8>>) -> Result<(), Invalid> {
        let decoded: u32 = match self.next() {
            Some(b'"') => 0x22,
            Some(b'\\') => 0x5c,
            Some(b'/') => 0x2f,
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => 0x0a,
            Some(b'r') => 0x0d,
            Some(b't') => 0x09,
            Some(b'u') => {
                let hi = self.hex4()?;
                if (0xd800..0xdc00).contains(&hi) && self.b[self.i..].starts_with(b"\\u") {
                    let save = self.i;
                    self.i += 2;
                    let lo = self.hex4()?;
                    if (0xdc00..0xe000).contains(&lo) {
                        0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                    } else {
                        // Not a pair: the high half stands alone, and the
                        // next escape is read on its own.
                        self.i = save;
                        hi
                    }
                } else {
                    hi
                }
            }
            _ => return Err(Invalid::Syntax),
        };
        if let Some(o) = out {
            write_char(o, decoded);
        }
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, Invalid> {
        let digits = self.b.get(self.i..self.i + 4).ok_or(Invalid::Syntax)?;
        let mut v = 0u32;
        for &d in digits {
            let n = (d as char).to_digit(16).ok_or(Invalid::Syntax)?;
            v = v * 16 + n;
        }
        self.i += 4;
        Ok(v)
    }

    fn digits(&mut self) -> Range<usize> {
        let s = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        s..self.i
    }

    fn number(&mut self, out: Option<&mut Canon>) -> Result<(), Invalid> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let int = self.digits();
        if int.is_empty() || (int.len() > 1 && self.b[int.start] == b'0') {
            return Err(Invalid::Syntax);
        }
        let mut frac = self.i..self.i;
        if self.peek() == Some(b'.') {
            self.i += 1;
            frac = self.digits();
            if frac.is_empty() {
                return Err(Invalid::Syntax);
            }
        }
        let mut exp = (false, self.i..self.i);
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            let neg = match self.peek() {
                Some(b'-') => {
                    self.i += 1;
                    true
                }
                Some(b'+') => {
                    self.i += 1;
                    false
                }
                _ => false,
            };
            exp = (neg, self.digits());
            if exp.1.is_empty() {
                return Err(Invalid::Syntax);
            }
        }
        if let Some(c) = out {
            write_number(
                &mut c.arena,
                negative,
                &self.b[int],
                &self.b[frac],
                exp.0,
                &self.b[exp.1],
            );
        }
        Ok(())
    }
}

impl Canon {
    /// Ends the object that starts at `start` (its `{`), whose members are
    /// `open[base..]`: sorts them by key when they are not in order already.
    fn close_object(&mut self, start: usize, base: usize) {
        let arena = &self.arena;
        let key = |m: &(u32, u32, u32)| inner(&arena[m.0 as usize..m.1 as usize]);
        let members = &mut self.open[base..];
        let in_order = members.windows(2).all(|w| key(&w[0]) <= key(&w[1]));
        if !in_order {
            members.sort_by(|a, b| key(a).cmp(key(b)));
            self.tmp.clear();
            self.tmp.push(b'{');
            for (n, m) in members.iter().enumerate() {
                if n > 0 {
                    self.tmp.push(b',');
                }
                self.tmp
                    .extend_from_slice(&arena[m.0 as usize..m.2 as usize]);
            }
            self.arena.truncate(start);
            self.arena.extend_from_slice(&self.tmp);
            if self.tmp.capacity() > 64 * 1024 {
                // Keep no large scratch beyond this object.
                self.tmp = Vec::new();
            }
        }
        self.arena.push(b'}');
        self.open.truncate(base);
    }
}

/// A quoted key without its quotes: keys sort by their characters.
fn inner(quoted: &[u8]) -> &[u8] {
    &quoted[1..quoted.len() - 1]
}

/// A decoded code point, escaped the one canonical way.
fn write_char(out: &mut Vec<u8>, cp: u32) {
    match cp {
        0x22 => out.extend_from_slice(b"\\\""),
        0x5c => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        0x0a => out.extend_from_slice(b"\\n"),
        0x0d => out.extend_from_slice(b"\\r"),
        0x09 => out.extend_from_slice(b"\\t"),
        c if c < 0x20 || (0xd800..0xe000).contains(&c) => {
            // Control characters, and a surrogate that has no partner
            // (valid JSON, but no character): kept as an escape.
            out.extend_from_slice(format!("\\u{c:04x}").as_bytes());
        }
        c => {
            let ch = char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        }
    }
}

/// The exact canonical form of a JSON number given by its parts:
/// `[-]DIGITS[eEXP]`, where DIGITS has no leading or trailing zeros and
/// the value is DIGITS × 10^EXP. Zero (and minus zero) is `0`.
fn write_number(
    out: &mut Vec<u8>,
    negative: bool,
    int: &[u8],
    frac: &[u8],
    exp_negative: bool,
    exp: &[u8],
) {
    // The digits of int and frac as one sequence, without copying them.
    let n = int.len() + frac.len();
    let at = |i: usize| {
        if i < int.len() {
            int[i]
        } else {
            frac[i - int.len()]
        }
    };
    let Some(first) = (0..n).find(|&i| at(i) != b'0') else {
        out.push(b'0');
        return;
    };
    let last = (first..n).rev().find(|&i| at(i) != b'0').unwrap_or(first);
    if negative {
        out.push(b'-');
    }
    if last < int.len() {
        out.extend_from_slice(&int[first..=last]);
    } else if first >= int.len() {
        out.extend_from_slice(&frac[first - int.len()..=last - int.len()]);
    } else {
        out.extend_from_slice(&int[first..]);
        out.extend_from_slice(&frac[..=last - int.len()]);
    }
    if frac.is_empty() && exp.is_empty() && last + 1 == n {
        // A plain integer without trailing zeros, the common case.
        return;
    }
    // EXP = exp - frac.len() + (trailing zeros dropped).
    let shift = (n - 1 - last) as i64 - frac.len() as i64;
    let exp = {
        let e = &exp[exp.iter().position(|&d| d != b'0').unwrap_or(exp.len())..];
        if e.len() <= 18 {
            let mut v: i64 = 0;
            for &d in e {
                v = v * 10 + i64::from(d - b'0');
            }
            let v = if exp_negative { -v } else { v };
            let total = v + shift;
            if total != 0 {
                // Written in place: no String per number.
                let _ = write!(out, "e{total}");
            }
            return;
        }
        (exp_negative, e)
    };
    // An exponent of more than 18 digits: its magnitude dwarfs `shift`
    // (bounded by the body's length), so the sign stays and only the
    // digits move.
    let (neg, digits) = exp;
    let delta = if neg { -shift } else { shift };
    out.push(b'e');
    if neg {
        out.push(b'-');
    }
    out.extend_from_slice(&add_small(digits, delta));
}

/// A decimal magnitude (ASCII digits, no leading zero, far larger than
/// `delta`) plus `delta`.
fn add_small(digits: &[u8], delta: i64) -> Vec<u8> {
    let mut v: Vec<u8> = digits.iter().rev().map(|d| d - b'0').collect();
    let mut carry = delta.unsigned_abs();
    let up = delta >= 0;
    let mut i = 0;
    while carry > 0 {
        let step = (carry % 10) as u8;
        carry /= 10;
        if up {
            let s = v[i] + step;
            v[i] = s % 10;
            carry += u64::from(s / 10);
        } else if v[i] >= step {
            v[i] -= step;
        } else {
            v[i] = v[i] + 10 - step;
            carry += 1;
        }
        i += 1;
        if i == v.len() && carry > 0 {
            v.push(0);
        }
    }
    while v.len() > 1 && v.last() == Some(&0) {
        v.pop();
    }
    v.iter().rev().map(|d| d + b'0').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(body: &str) -> String {
        let s = scan(body.as_bytes(), Canonical::Write).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        let mut out = Vec::new();
        s.write_canonical(&[], &mut |b| out.extend_from_slice(b));
        String::from_utf8(out).expect("utf8")
    }

    fn value_of(body: &str) -> String {
        let c = canon(body);
        c["{\"a\":".len()..c.len() - 1].to_string()
    }

    fn value(v: &str) -> String {
        let c = canon(&format!("{{\"v\":{v}}}"));
        c["{\"v\":".len()..c.len() - 1].to_string()
    }

    #[test]
    fn numbers_are_exact_and_spelling_free() {
        for (a, b) in [
            ("1", "1"),
            ("1.0", "1"),
            ("1e0", "1"),
            ("10E-1", "1"),
            ("100", "1e2"),
            ("1.50", "15e-1"),
            ("0.5", "5e-1"),
            ("-0", "0"),
            ("-0.000e7", "0"),
            ("-12.5e+3", "-125e2"),
            ("1e400", "1e400"),
            ("12345678901234567890123", "12345678901234567890123"),
            ("123456789012345678901230", "12345678901234567890123e1"),
            ("1.5e-99999999999999999999", "15e-100000000000000000000"),
            ("10e99999999999999999999", "1e100000000000000000000"),
        ] {
            assert_eq!(value(a), b, "{a}");
        }
        assert_eq!(
            add_small(b"1000000000000000000000", -1),
            b"999999999999999999999"
        );
        for bad in [
            "01", "1.", ".5", "-", "1e", "1e+", "+1", "0x1", "NaN", "1.e3",
        ] {
            assert!(
                scan(format!("{{\"v\":{bad}}}").as_bytes(), Canonical::Write).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_sort_at_every_depth_and_strings_have_one_form() {
        assert_eq!(
            canon(r#" { "b" : [ {"z":1, "a":{"y":null,"x":true}} ], "a" : "\u0041\/\n" } "#),
            r#"{"a":"A/\n","b":[{"a":{"x":true,"y":null},"z":1}]}"#
        );
        assert_eq!(value(r#""\ud83d\ude00""#), "\"\u{1f600}\"");
        assert_eq!(value(r#""\ud800x""#), r#""\ud800x""#);
        assert_eq!(value(r#""\u001F\u007f""#), "\"\\u001f\u{7f}\"");
        assert!(matches!(
            scan(br#"{"a\u0062":1,"ab":2}"#, Canonical::Write),
            Err(Invalid::DuplicateKey(_))
        ));
        // Sorted by the key's characters, not by its quotes.
        assert_eq!(canon(r#"{"a":1,"a!":2}"#), r#"{"a":1,"a!":2}"#);
        assert_eq!(canon(r#"{"a!":1,"a":2}"#), r#"{"a":2,"a!":1}"#);
    }

    #[test]
    fn a_special_byte_is_found_at_every_place_in_a_word() {
        // Plain text of every length before and after each kind of special
        // byte, with multi-byte characters among it: the fast skip must stop
        // exactly at the first special byte wherever it lies in a word.
        for before in 0..20 {
            for after in 0..12 {
                let plain = |n: usize| "é-abc".chars().cycle().take(n).collect::<String>();
                let (a, b) = (plain(before), plain(after));
                for (special, decoded) in [("\\\"", "\""), ("\\n", "\n"), ("\\\\", "\\")] {
                    let body = format!(r#"{{"k":"{a}{special}{b}"}}"#);
                    let want = serde_json::to_string(
                        &serde_json::json!({ "k": format!("{a}{decoded}{b}") }),
                    )
                    .expect("json");
                    assert_eq!(canon(&body), want, "{body}");
                }
                // A raw control character is refused wherever it is.
                let body = format!("{{\"k\":\"{a}\u{1}{b}\"}}");
                assert!(scan(body.as_bytes(), Canonical::Skip).is_err(), "{body:?}");
            }
        }
    }

    #[test]
    fn top_level_duplicates_are_refused_nested_ones_kept() {
        assert_eq!(
            scan(br#"{"model":"a","m\u006fdel":"b"}"#, Canonical::Skip).err(),
            Some(Invalid::DuplicateKey("\"model\"".into()))
        );
        assert!(scan(br#"{"a":{"x":1,"x":2}}"#, Canonical::Skip).is_ok());
        assert_eq!(canon(r#"{"a":{"x":2,"x":1}}"#), r#"{"a":{"x":2,"x":1}}"#);
    }

    #[test]
    fn invalid_bodies() {
        for bad in [
            "",
            "[]",
            "1",
            "{",
            "{\"a\"}",
            "{\"a\":1,}",
            "{\"a\":1}x",
            "{'a':1}",
            "{\"a\":\"\t\"}",
            "{\"a\":tru}",
            "{\"a\":[1,]}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12\"}",
        ] {
            assert_eq!(
                scan(bad.as_bytes(), Canonical::Skip).err(),
                Some(Invalid::Syntax),
                "{bad:?}"
            );
            assert_eq!(
                scan(bad.as_bytes(), Canonical::Write).err(),
                Some(Invalid::Syntax),
                "{bad:?}"
            );
        }
        assert!(
            scan(b"{\"a\":\"\xff\"}", Canonical::Skip).is_err(),
            "invalid UTF-8"
        );
        // Special bytes anywhere in a long string, found eight at a time.
        for at in 0..24 {
            let mut text = "é-long text that spans words".to_string();
            text.insert(at + 2, '\t');
            let body = format!("{{\"a\":\"{text}\"}}");
            assert_eq!(
                scan(body.as_bytes(), Canonical::Write).err(),
                Some(Invalid::Syntax)
            );
            let body = format!("{{\"a\":\"{}\\n{}\"}}", &text[..at + 2], &text[at + 3..]);
            assert_eq!(
                value_of(&body),
                format!("\"{}\\n{}\"", &text[..at + 2], &text[at + 3..])
            );
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(127), "]".repeat(127));
        assert!(scan(deep.as_bytes(), Canonical::Write).is_ok());
        let deeper = format!("{{\"a\":{}{}}}", "[".repeat(128), "]".repeat(128));
        assert!(scan(deeper.as_bytes(), Canonical::Write).is_err());
    }

    #[test]
    fn members_and_spans() {
        let body = br#"{"model":"m", "stream_options" : {"a":1, "include_usage":false}}"#;
        let s = scan(body, Canonical::Skip).expect("valid");
        assert_eq!(s.get("model"), Some(&b"\"m\""[..]));
        let span = s.span("stream_options").expect("present");
        let m = members(&body[span.clone()]).expect("object");
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].0, b"\"include_usage\"");
        assert_eq!(&body[span][m[1].1.clone()], b"false");
        let m = members(br#"{"include\u005fusage":1}"#).expect("object");
        assert_eq!(m[0].0, b"\"include_usage\"");
        assert!(members(b"null").is_none());
        assert_eq!(members(b"{ }").map(|m| m.len()), Some(0));
    }
}
