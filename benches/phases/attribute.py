#!/usr/bin/env python3
"""Per-phase attribution of a callgrind profile of `sluice` (benches/phases.sh).

    attribute.py [--compact] [--explain PHASE] [--sha INSTR,NS]
                 [--cpu COLUMN=USER_US,SYS_US ...] COLUMN=CALLGRIND_FILE:REQUESTS ...
    attribute.py --inclusive FUNCTION_REGEX CALLGRIND_FILE COUNT

Each COLUMN is one dump of callgrind (`callgrind_control --dump`) that
covers REQUESTS identical requests and nothing else. Prints a Markdown table:
for each phase, instructions per request and share of the column's total.
With `--cpu`, the CPU µs per request measured without valgrind (user and
system) are spread over the phases: user time in proportion to instructions,
system time as a row of its own; `--sha` prices the SHA-256 row by the block
instead (INSTR instructions a block under valgrind, NS ns a block natively:
benches/phases/sha.rs). `--compact` prints instructions per request only.
`--explain PHASE` lists the functions whose own instructions make up that
phase (to check the rules below). `--inclusive` prints the inclusive
instructions of the matching functions over COUNT.

How a phase is found. callgrind records, per function, its own instructions
(by source file and line, which for inlined code is the inlined function's
file) and, per call site, the inclusive instructions of each call. This
script walks that call graph from the roots and labels every instruction
with the phase of the *innermost* function on the way that a rule names
("strong" rules), so a phase's figure is exclusive of the phases called
inside it (e.g. `forward` excludes `upstream send` and `relay`). "Weak"
rules (hyper's HTTP/1 code, tokio's scheduler, the connection driver) only
label what no strong phase encloses, so hyper's client code inside the
upstream send counts as the send, and hyper's server code outside the
request path as "hyper". Everything unlabelled (malloc, memcpy, `http`
header maps, serde, sha2's buffering, ...) counts for the phase that called
it. A function called from several phases is split between them in
proportion to the inclusive cost of each call (callgrind keeps call arcs,
not stacks: the split assumes each call of a function costs alike, true of
the phase functions named below). The profile keeps symbols mangled
(`--demangle=no`), so that each monomorphization of a generic function is a
node of its own (hyper's client and server `Dispatcher::poll_catch` demangle
to one name, and merged they would mix the client's and the server's work);
names are demangled here only to match the rules. A cycle (recursion) adds
nothing to its callers beyond the instructions of its functions. Every
instruction is counted once: the rows add up to the column's total (printed
as a check).
"""

import collections
import re
import sys

# (phase, strong?, function regex, file regex or None). First match wins;
# rules with a file regex label only the code of that function whose
# source (inlined code included) is in that file: async functions inlined
# into `Ctx::serve`'s state machine are found this way. Segment rules
# (with a file) are inner to the function's own rule. Each rule names the
# function both where it is now and where it was before the tree was split
# into folders (`de63197` and older: `proxy.rs`, `relay.rs`, `body.rs`,
# `state.rs`, ...), so that both builds get the same rows. In that layout
# `proxy::serve` inlines its phases from one file; what they do through
# functions of their own is found, the glue between them counts as
# `handle`.
CLOSURE = r"(::\{\{closure\}\})*('\d+)?$"
SERVE = r"^sluice::(request::Ctx|proxy)::serve::\{\{closure\}\}"
PROXY = r"^<sluice::server::(stack::)?Proxy as tower_service::Service<.*>>::call::\{\{closure\}\}"
RECORD = r"sluice::(response::record|body)::Record"
RULES = [
    # SHA-256's compression function, wherever it runs (auth, cache key):
    # see benches/phases/sha.rs for why it is a row of its own. The rest
    # of `sha2` (buffering the input) counts for its caller's phase.
    ("sha256", True, r"^sha2::sha256::compress256$", None),
    # Inlined into the request path's state machines.
    ("handle", True, PROXY, r"/src/request/mod\.rs$|/src/proxy\.rs$"),
    ("body read", True, SERVE, r"/src/request/body\.rs$|/http-body-[^/]*/src/lib\.rs$"),
    ("scan, key", True, SERVE, r"/src/request/validate\.rs$"),
    ("admit", True, SERVE, r"/src/limit/"),
    ("cache lookup", True, SERVE, r"/src/request/cache\.rs$|/src/cache/|/src/flight/|/src/cache(_store)?\.rs$"),
    ("forward", True, SERVE, r"/src/request/forward\.rs$|/src/http/headers\.rs$|/src/upstream/|/src/upstream\.rs$"),
    ("relay", True, SERVE, r"/src/response/|/src/body\.rs$|/src/relay\.rs$"),
    # Functions of their own.
    ("handle", True, PROXY, None),
    ("handle", True, r"^sluice::(request|proxy)::handle" + CLOSURE, None),
    ("handle", True, r"^sluice::(http::)?request_id::", None),
    ("route", True, r"^sluice::request::Ctx::route$|^sluice::(http::)?routes::|^sluice::proxy::begin$", None),
    ("auth", True, r"^sluice::request::Ctx::authenticate$|^sluice::(app|state)::Snapshot::authenticate$|^sluice::(tenant|state)::key_sha256$", None),
    ("admit", True, r"^sluice::request::Ctx::admit|^sluice::limit::(Limiter::admit|TenantLimits::admit|UpstreamCheck::check)", None),
    ("rate-limit headers", True, r"^sluice::limit::headers::|^sluice::limit::Standings::write_headers$|^sluice::limit::(format_reset|usd)$", None),
    ("body read", True, r"^sluice::request::body::|^sluice::proxy::read_body", None),
    ("scan, key", True, r"^sluice::request::validate::|^sluice::request::Ctx::validate|^sluice::cache::key$|^sluice::(request::cache|proxy)::CacheMode::of$|^sluice::metrics::ModelLabels::label$|^sluice::proxy::(ApiRequest::parse|parse_off_runtime)", None),
    ("cache hit answer", True, r"^sluice::response::hit::|^<?sluice::cache::Entry>?::replay|^sluice::proxy::(entry_response|hit)$", None),
    ("cache store", True, r"^sluice::cache::Entry::from_completion$|^sluice::cache::tiered::Fill::|^sluice::cache::store::Store::insert|^sluice::cache_store::CacheStore::put", None),
    ("cache lookup", True, r"^sluice::request::cache::|^sluice::request::Ctx::(cached|coalesce)|^sluice::cache::tiered::CacheStore::get|^sluice::cache::store::Store::get|^sluice::(flight|cache)::Flights::(join|follow)|^sluice::proxy::(coalesce|may_lead)|^sluice::cache_store::CacheStore::get", None),
    ("upstream send", True, r"^sluice::upstream::Upstream::send" + CLOSURE, None),
    ("forward", True, r"^sluice::request::forward::|^<sluice::(response::lead|relay)::Launch as |^sluice::http::headers::|^sluice::upstream::Outbound::new$|^sluice::proxy::(forward|upstream_headers|not_forwarded|not_returned|remove_where|mark_no_retry)|^sluice::upstream::strip_hop_by_hop", None),
    ("usage read", True, r"^sluice::(api::openai|sse)::usage_of_completion$|^sluice::api::usage::Usage::read$", None),
    ("settle", True, r"^sluice::limit::Lease::|^sluice::(response::)?relay::Relay::charge$|^sluice::(response::)?relay::cost_usd$", None),
    ("record", True, r"^<" + RECORD + r" as core::ops::drop::Drop>::drop$|^core::ptr::drop_in_place<core::option::Option<alloc::boxed::Box<" + RECORD + r">>>$", None),
    ("relay", True, r"^<?sluice::response::(relay|lead|body|log)::|^<sluice::response::(relay|lead|body|log)::|^<?sluice::upstream::UpstreamBody|^<sluice::upstream::UpstreamBody|^sluice::flight::|^<?sluice::(relay|body)::|^<sluice::(relay|body)::|^sluice::cache::Flight::", None),
    ("tracing", True, r"^<?tracing|^<tracing", None),
    # What is left of `Ctx::serve`'s state machine: the glue between phases.
    ("handle", True, SERVE, None),
    # Weak: only what no phase above encloses.
    ("hyper", False, r"^<?hyper::|^<hyper::|^<?hyper_util::|^<hyper_util::", None),
    ("conn", False, r"^<?sluice::server::|^<sluice::server::|^tokio::net::tcp::listener::", None),
    ("runtime", False, r"^<?tokio::|^<tokio::|^<?mio::", None),
]

# Sluice's code inlined into a function of another crate (under fat LTO
# the service future is inlined into hyper's dispatcher and `futures_util`'s
# `Map`), or into the glue of `handle`: labelled by its source file. Only for
# functions that no strong rule above names, or that are `handle`'s own.
INLINED = [
    ("route", r"/src/http/routes\.rs$"),
    ("handle", r"/src/request/mod\.rs$|/src/http/request_id\.rs$|/src/server/stack\.rs$|/src/http/error\.rs$"),
    ("auth", r"/src/app\.rs$|/src/tenant\.rs$"),
    ("rate-limit headers", r"/src/limit/headers\.rs$"),
    ("admit", r"/src/limit/"),
    ("body read", r"/src/request/body\.rs$"),
    ("scan, key", r"/src/request/validate\.rs$|/src/api/text\.rs$"),
    ("cache lookup", r"/src/request/cache\.rs$|/src/flight/"),
    ("forward", r"/src/request/forward\.rs$|/src/http/headers\.rs$"),
    ("upstream send", r"/src/upstream/"),
    ("usage read", r"/src/api/usage\.rs$"),
    ("cache hit answer", r"/src/response/hit\.rs$"),
    ("record", r"/src/response/record\.rs$|/src/metrics\.rs$"),
    ("relay", r"/src/response/"),
    ("conn", r"/src/server/conn\.rs$"),
]

# Rows in the order of the request path.
ORDER = [
    "conn", "hyper", "handle", "route", "auth", "admit", "body read",
    "scan, key", "cache lookup", "cache hit answer", "forward",
    "upstream send", "relay", "usage read", "cache store", "settle",
    "rate-limit headers", "record", "tracing", "runtime", "other", "sha256",
]
DESCRIBE = {
    "conn": "accept, connection driver (`server::conn`, `Proxy`)",
    "hyper": "hyper's HTTP/1 server: read, parse head, write answer",
    "handle": "`Proxy`, `request::handle`: request id, `Record`, answer's headers",
    "route": "route (`Ctx::route`, head detached)",
    "auth": "auth: the key hashed, the tenant looked up (hash blocks: SHA-256 row)",
    "admit": "admit (buckets, concurrency; upstream check)",
    "body read": "body read (`request::body`)",
    "scan, key": "scan, canonical form, cache key (`ApiRequest::parse`; hash blocks: SHA-256 row)",
    "cache lookup": "cache lookup, flight join (`Ctx::cached`/`coalesce`)",
    "cache hit answer": "hit answer from stored bytes (`response::hit`)",
    "forward": "forward, less send and relay (`Ctx::forward`, `Launch`)",
    "upstream send": "upstream send (`Upstream::send`: pool, hyper client, write, answer's head)",
    "relay": "relay (`Relay::poll`, `LeadBody`), less the rows below",
    "usage read": "usage read from the answer (`usage_of_completion`)",
    "cache store": "cache store: answer checked, usage read, stored (`Entry::from_completion`, `Fill::store`)",
    "settle": "settle (price, `Lease`)",
    "rate-limit headers": "`x-ratelimit-*` headers (`Standings::write_headers`)",
    "record": "`Record::drop`: metrics (and access log)",
    "tracing": "`tracing` (access-log event)",
    "runtime": "tokio: scheduler, I/O driver, timers",
    "other": "other (nothing above encloses it)",
    "sha256": "SHA-256 blocks (`compress256`) of the key (auth) and of the cache key",
}
STRONG = {p: s for p, s, _, _ in RULES}


def parse(path):
    """names[id], files[id], segs[fn][file] = [self, [(callee, incl), ...]]."""
    names, files = {}, {}
    segs = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, []]))
    cur_fn = cur_file = fn_file = callee = None
    pending_call = False
    total = 0

    def comp(table, v):
        m = re.match(r"\((\d+)\)(?: (.*))?$", v)
        if not m:
            table.setdefault(v, v)
            return v
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return m.group(1)

    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if pending_call:
                    segs[cur_fn][cur_file][1].append((callee, cost))
                    pending_call = False
                else:
                    segs[cur_fn][cur_file][0] += cost
                    total += cost
                continue
            k, _, v = line.partition("=")
            if k == "fn":
                cur_fn = comp(names, v)
                cur_file = fn_file
            elif k == "fl":
                fn_file = cur_file = comp(files, v)
            elif k in ("fi", "fe"):
                cur_file = comp(files, v)
            elif k in ("cfi", "cfl"):
                comp(files, v)
            elif k == "cfn":
                callee = comp(names, v)
            elif k == "calls":
                pending_call = True
    return names, files, segs, total


def demangle(names):
    """Readable names for the profile's symbols, which callgrind kept
    mangled (`--demangle=no`): demangled, a name stays unique to one
    monomorphization of a generic function (hyper's client and server
    `Dispatcher::poll_catch` are two functions, not one), while the names
    the rules match drop the hash. Uses binutils' `c++filt` (Rust legacy
    and v0 mangling)."""
    import subprocess

    ids = list(names)
    raw = [names[i] for i in ids]
    base, rec = [], []
    for n in raw:
        m = re.match(r"^(.*?)('\d+)?$", n)
        base.append(m.group(1))
        rec.append(m.group(2) or "")
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(base) + "\n", capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        out = base
    for i, d, r in zip(ids, out, rec):
        d = re.sub(r"::h[0-9a-f]{16}$", "", d)
        d = re.sub(r"\[[0-9a-f]+\]", "", d)
        d = re.sub(r"\.llvm\.\d+$", "", d)
        names[i] = d + r


def combine(outer, inner):
    """The phase of an instruction labelled `inner` inside `outer`."""
    if inner is None:
        return outer
    if STRONG[inner] or outer is None or not STRONG[outer]:
        return inner
    return outer


def attribute(path, explain=None):
    names, files, segs, total = parse(path)
    demangle(names)
    compiled = [(p, re.compile(f), re.compile(fl) if fl else None) for p, _, f, fl in RULES]
    inlined = [(p, re.compile(fl)) for p, fl in INLINED]
    fn_label, seg_label = {}, {}
    for fn, ss in segs.items():
        name = names.get(fn, fn)
        fn_label[fn] = next((p for p, f, fl in compiled if fl is None and f.search(name)), None)
        own = fn_label[fn]
        for fi in ss:
            path_ = files.get(fi, fi) or ""
            seg_label[fn, fi] = next(
                (p for p, f, fl in compiled if fl is not None and f.search(name) and fl.search(path_)),
                None,
            )
            if seg_label[fn, fi] is None and (own is None or own == "handle" or not STRONG[own]):
                seg_label[fn, fi] = next((p for p, fl in inlined if fl.search(path_)), None)
    called = {g for ss in segs.values() for s in ss.values() for g, _ in s[1]}
    memo, on_stack = {}, set()
    dropped = [0]

    # D[fn] = {(phase, source fn or None): instructions} of fn's inclusive
    # cost; the source is kept only with --explain.
    def dist(fn):
        if fn in memo:
            return memo[fn]
        on_stack.add(fn)
        out = collections.Counter()
        for fi, (self_cost, calls) in segs.get(fn, {}).items():
            seg = collections.Counter()
            if self_cost:
                seg[(None, fn if explain else None)] += self_cost
            for g, c in calls:
                if g in on_stack or not c:
                    # Recursion: the callee's instructions are already
                    # counted as this cycle's own.
                    dropped[0] += c
                    continue
                dg = dist(g)
                tg = sum(dg.values())
                if tg:
                    for k, v in dg.items():
                        seg[k] += v * c / tg
            sl = seg_label[fn, fi]
            for (ph, src), v in seg.items():
                out[(combine(sl, ph), src)] += v
        fl = fn_label.get(fn)
        if fl:
            relabelled = collections.Counter()
            for (ph, src), v in out.items():
                relabelled[(combine(fl, ph), src)] += v
            out = relabelled
        on_stack.discard(fn)
        memo[fn] = out
        return out

    sys.setrecursionlimit(100000)
    result = collections.Counter()
    for fn in segs:
        if fn not in called:
            for (ph, src), v in dist(fn).items():
                result[(ph or "other", src)] += v
    phases = collections.Counter()
    for (ph, _), v in result.items():
        phases[ph] += v
    sources = None
    if explain:
        sources = sorted(
            ((v, names.get(src, src)) for (ph, src), v in result.items() if ph == explain),
            reverse=True,
        )
    return phases, total, sources


def inclusive(regex, path):
    """Inclusive instructions of the functions matching `regex` (counted
    twice where one calls another: meant for one leaf function)."""
    names, _, segs, _ = parse(path)
    demangle(names)
    r = re.compile(regex)
    return sum(
        s[0] + sum(c for _, c in s[1])
        for fn, ss in segs.items()
        if r.search(names.get(fn, fn))
        for s in ss.values()
    )


def main(argv):
    explain, cpu, cols, sha, compact = None, {}, [], None, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--inclusive":
            print(round(inclusive(argv[i + 1], argv[i + 2]) / int(argv[i + 3])))
            return 0
        if a == "--compact":
            compact = True
            i += 1
            continue
        if a in ("--explain", "--cpu", "--sha"):
            v = argv[i + 1]
            i += 2
            if a == "--explain":
                explain = v
            elif a == "--cpu":
                col, _, v = v.partition("=")
                u, s = v.split(",")
                cpu[col] = (float(u), float(s))
            else:
                per_block, ns = v.split(",")
                sha = (float(per_block), float(ns))
            continue
        col, _, rest = a.partition("=")
        path, _, n = rest.rpartition(":")
        cols.append((col, path, int(n)))
        i += 1
    if not cols:
        print(__doc__, file=sys.stderr)
        return 2
    data = []
    for col, path, n in cols:
        phases, total, sources = attribute(path, explain)
        blocks = None
        if sha:
            blocks = inclusive(r"^sha2::sha256::compress256$", path) / sha[0] / n
        data.append((col, phases, total, n, blocks))
        if explain:
            print(f"## {col}: functions whose own instructions are '{explain}', per request")
            for v, name in sources[:40]:
                if v / n >= 1:
                    print(f"{v / n:10.0f}  {name[:160]}")
            print()

    def us(col, phases, total, n, blocks, phase):
        """µs a request of `phase`: user time in proportion to instructions,
        SHA-256 priced by the block (see benches/phases/sha.rs)."""
        user = cpu[col][0]
        if not sha:
            return user * phases.get(phase, 0) / total
        sha_us = blocks * sha[1] / 1000
        if phase == "sha256":
            return sha_us
        rest = total - phases.get("sha256", 0)
        return (user - sha_us) * phases.get(phase, 0) / rest

    head, rule = "| phase |", "|---|"
    for col, *_ in data:
        head += f" {col} |" if compact else f" {col}: instr/req | share |"
        rule += "---:|" if compact else "---:|---:|"
        if col in cpu:
            head += " µs/req |"
            rule += "---:|"
    print(head)
    print(rule)
    rows = [p for p in ORDER if any(d[1].get(p, 0) / d[3] >= 0.5 for d in data)]
    for p in rows:
        desc = DESCRIBE[p]
        if p == "sha256" and sha:
            desc += " †"
        line = f"| {desc} |"
        for col, phases, total, n, blocks in data:
            v = phases.get(p, 0)
            line += f" {v / n:,.0f} |" if compact else f" {v / n:,.0f} | {100 * v / total:.1f} % |"
            if col in cpu:
                line += f" {us(col, phases, total, n, blocks, p):.2f} |"
        print(line)
    line = "| **total, user space** |"
    for col, phases, total, n, _ in data:
        line += f" **{total / n:,.0f}** |" if compact else f" **{total / n:,.0f}** | 100 % |"
        if col in cpu:
            line += f" **{cpu[col][0]:.2f}** |"
    print(line)
    if cpu:
        for desc, f in (
            ("kernel (system time: syscalls, loopback TCP)", lambda c: c[1]),
            ("**CPU, user + system**", lambda c: sum(c)),
        ):
            line = f"| {desc} |"
            for col, *_ in data:
                line += " | |"
                if col in cpu:
                    v = f(cpu[col])
                    line += f" **{v:.2f}** |" if desc.startswith("**") else f" {v:.2f} |"
            print(line)
    print()
    for col, phases, total, n, blocks in data:
        summed = sum(phases.values())
        note = f"; {blocks:.2f} SHA-256 blocks a request" if blocks is not None else ""
        print(f"check {col}: rows sum to {summed:,.0f} of {total:,} instructions "
              f"({100 * summed / total:.2f} %), {n} requests{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
