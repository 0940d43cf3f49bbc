// Starts the real `sluice` binary and its simulated upstream for the Node SDK
// suite: one simulator, one gateway with a temporary config.
//
// The binary is $SLUICE_BIN, or target/debug/sluice of this checkout.
// Runs on Node 22 and later.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.SLUICE_BIN || join(ROOT, 'target', 'debug', 'sluice');

export const ALPHA = 'sk-node-alpha-0123456789';
export const BETA = 'sk-node-beta-0123456789';
export const LIMITED = 'sk-node-limited-0123456789';
export const LIMITED_AI = 'sk-node-limited-ai-0123456789';
export const LIMITED_AI_RETRY = 'sk-node-limited-ai-retry-0123456789';
export const A_LIMITED = 'sk-node-a-limited-0123456789';

const sha = (key) => createHash('sha256').update(key).digest('hex');

// The children never outlive the test process: not when it exits, not when
// a signal ends it (the test runner sends SIGTERM on a timeout or ^C), and on
// Linux, through util-linux's setpriv, not even when it is killed outright.
const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p));
const DIE_WITH_PARENT = process.platform === 'linux' && SETPRIV ? [SETPRIV, '--pdeathsig', 'KILL', '--'] : [];
const running = new Set();
const tempDirs = new Set();
const cleanUp = () => {
  for (const child of running) child.kill('SIGKILL');
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
};
process.once('exit', cleanUp);
for (const [signal, number] of [['SIGINT', 2], ['SIGTERM', 15], ['SIGHUP', 1]]) {
  process.once(signal, () => {
    cleanUp();
    process.exit(128 + number);
  });
}

/** A child process whose stdout/stderr lines can be waited on. */
export class Proc {
  constructor(args, env) {
    this.name = args.slice(0, 2).join(' ');
    this.lines = [];
    this.waiters = [];
    this.exited = false;
    const argv = [...DIE_WITH_PARENT, ...args];
    this.child = spawn(argv[0], argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(this.child);
    this.child.once('exit', () => running.delete(this.child));
    for (const stream of [this.child.stdout, this.child.stderr]) {
      createInterface({ input: stream }).on('line', (line) => this.push(line));
    }
    this.exit = new Promise((done) => {
      this.child.on('exit', (code, signal) => {
        this.exited = true;
        for (const w of this.waiters.splice(0)) {
          w.reject(new Error(`${this.name} exited (${signal ?? code}) while waiting for a line:\n${this.tail()}`));
        }
        done();
      });
      this.child.on('error', (e) => {
        for (const w of this.waiters.splice(0)) w.reject(e);
        done();
      });
    });
  }

  push(line) {
    this.lines.push(line);
    for (const w of [...this.waiters]) {
      if (w.predicate(line)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(line);
      }
    }
  }

  tail(n = 20) {
    return this.lines.slice(-n).join('\n');
  }

  /** The first line (already seen or still to come) that satisfies `predicate`. */
  waitFor(predicate, timeoutMs = 30_000) {
    const seen = this.lines.find(predicate);
    if (seen !== undefined) return Promise.resolve(seen);
    if (this.exited) return Promise.reject(new Error(`${this.name} has exited:\n${this.tail()}`));
    return new Promise((resolve, reject) => {
      const w = { predicate };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`${this.name}: no such line within ${timeoutMs} ms; last lines:\n${this.tail()}`));
      }, timeoutMs);
      w.resolve = (line) => {
        clearTimeout(timer);
        resolve(line);
      };
      w.reject = (e) => {
        clearTimeout(timer);
        reject(e);
      };
      this.waiters.push(w);
    });
  }

  async stop() {
    if (!this.exited && this.child.exitCode === null) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), 15_000);
      await this.exit;
      clearTimeout(timer);
    }
  }
}

function config(upstream) {
  return `
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[upstream]
base_url = "${upstream}"
api_key_env = "SDK_TEST_UPSTREAM_KEY"
first_byte_timeout_secs = 5
idle_timeout_secs = 5
balance_poll_secs = 0

[[tenants]]
name = "alpha"
key_sha256 = ["${sha(ALPHA)}"]
requests_per_minute = 0
tokens_per_minute = 0
max_concurrent = 0

[[tenants]]
name = "beta"
key_sha256 = ["${sha(BETA)}"]
models = ["deepseek-chat"]

[[tenants]]
name = "limited"
key_sha256 = ["${sha(LIMITED)}"]
requests_per_minute = 60
request_burst = 1

[[tenants]]
name = "limited-ai"
key_sha256 = ["${sha(LIMITED_AI)}"]
requests_per_minute = 60
request_burst = 1

[[tenants]]
name = "limited-ai-retry"
key_sha256 = ["${sha(LIMITED_AI_RETRY)}"]
requests_per_minute = 60
request_burst = 1

[[tenants]]
name = "a-limited"
key_sha256 = ["${sha(A_LIMITED)}"]
requests_per_minute = 60
request_burst = 1
`;
}

/**
 * Starts the simulator and the gateway. Returns { base, upstream, gateway,
 * accessLog(requestId), stop() }.
 */
export async function startStack() {
  if (!existsSync(BIN)) {
    throw new Error(`no sluice binary at ${BIN}: build it (cargo build) or set SLUICE_BIN`);
  }
  const started = [];
  const dir = mkdtempSync(join(tmpdir(), 'sluice-sdk-node-'));
  tempDirs.add(dir);
  const stop = async () => {
    await Promise.all(started.map((p) => p.stop()));
    rmSync(dir, { recursive: true, force: true });
    tempDirs.delete(dir);
  };
  const env = { ...process.env, SDK_TEST_UPSTREAM_KEY: 'sk-upstream', SLUICE_LOG_FORMAT: 'json', RUST_LOG: 'info' };
  for (const name of ['SLUICE_LISTEN', 'SLUICE_ADMIN_LISTEN', 'SLUICE_UPSTREAM_URL', 'SLUICE_CONFIG', 'SLUICE_REDIS_URL']) {
    delete env[name];
  }
  try {
    const sim = new Proc([BIN, 'simulate', '--listen', '127.0.0.1:0'], env);
    started.push(sim);
    const simLine = await sim.waitFor((l) => l.startsWith('simulator listening on '));
    const upstream = simLine.split(' ').pop();

    const cfg = join(dir, 'sluice.toml');
    writeFileSync(cfg, config(upstream));
    const gateway = new Proc([BIN, '--config', cfg], env);
    started.push(gateway);
    const listening = await gateway.waitFor((l) => l.includes('"sluice listening"'));
    const base = `http://${JSON.parse(listening).listen}`;

    /** The gateway's access-log line (parsed) for a request id, once written. */
    const accessLog = async (requestId) => {
      const marker = `"${requestId}"`;
      const line = await gateway.waitFor((l) => l.includes(marker) && parseLog(l)?.request_id === requestId);
      return parseLog(line);
    };
    return { base, upstream, gateway, accessLog, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

function parseLog(line) {
  try {
    const v = JSON.parse(line);
    return v && typeof v === 'object' ? { ...v, ...(v.fields ?? {}) } : undefined;
  } catch {
    return undefined;
  }
}
