"""Starts the real `sluice` binary and its simulated upstream for the SDK suite.

The binary is `$SLUICE_BIN`, or `target/debug/sluice` of this checkout.
"""

import hashlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import queue
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SLUICE_BIN", str(ROOT / "target" / "debug" / "sluice"))

ALPHA = "sk-sdk-alpha-0123456789"
BETA = "sk-sdk-beta-0123456789"
LIMITED = "sk-sdk-limited-0123456789"
BUDGETED = "sk-sdk-budgeted-0123456789"
# The Anthropic SDK suite's own limited and budgeted tenants, so the two
# suites do not spend each other's buckets.
A_LIMITED = "sk-sdk-a-limited-0123456789"
A_BUDGETED = "sk-sdk-a-budgeted-0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Proc:
    """A child process whose stdout/stderr lines are readable with a timeout."""

    def __init__(self, args, env=None):
        self.p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines = queue.Queue()
        for stream in (self.p.stdout, self.p.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, predicate, timeout=30):
        while True:
            line = self.lines.get(timeout=timeout)
            if predicate(line):
                return line

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.p.kill()


def start_simulator():
    sim = Proc([BIN, "simulate", "--listen", "127.0.0.1:0"])
    line = sim.wait_for(lambda l: l.startswith("simulator listening on "))
    return sim, line.rsplit(" ", 1)[1]


def start_gateway(upstream: str, extra_upstream: str = ""):
    config = f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[upstream]
base_url = "{upstream}"
api_key_env = "SDK_TEST_UPSTREAM_KEY"
first_byte_timeout_secs = 2
idle_timeout_secs = 2
balance_poll_secs = 0
{extra_upstream}

[[tenants]]
name = "alpha"
key_sha256 = ["{sha(ALPHA)}"]
requests_per_minute = 0
tokens_per_minute = 0
max_concurrent = 0

[[tenants]]
name = "beta"
key_sha256 = ["{sha(BETA)}"]
models = ["deepseek-chat"]

[[tenants]]
name = "limited"
key_sha256 = ["{sha(LIMITED)}"]
requests_per_minute = 60
request_burst = 1

[[tenants]]
name = "budgeted"
key_sha256 = ["{sha(BUDGETED)}"]
models = ["deepseek-chat"]
budget_usd = 0.000001

[[tenants]]
name = "a-limited"
key_sha256 = ["{sha(A_LIMITED)}"]
requests_per_minute = 60
request_burst = 1

[[tenants]]
name = "a-budgeted"
key_sha256 = ["{sha(A_BUDGETED)}"]
models = ["deepseek-chat"]
budget_usd = 0.000001

[pricing.deepseek-chat]
input_cache_hit = 0.028
input_cache_miss = 0.28
output = 0.42
"""
    f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    f.write(config)
    f.close()
    env = dict(os.environ, SDK_TEST_UPSTREAM_KEY="sk-upstream", SLUICE_LOG_FORMAT="json", RUST_LOG="info")
    for name in ("SLUICE_LISTEN", "SLUICE_ADMIN_LISTEN", "SLUICE_UPSTREAM_URL", "SLUICE_CONFIG"):
        env.pop(name, None)
    gw = Proc([BIN, "--config", f.name], env=env)
    line = gw.wait_for(lambda l: '"sluice listening"' in l)
    addr = json.loads(line)["listen"]
    return gw, f"http://{addr}", f.name


@pytest.fixture(scope="session")
def stack():
    sim, upstream = start_simulator()
    gw, base, cfg = start_gateway(upstream)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    dead, dead_base, dead_cfg = start_gateway(f"http://127.0.0.1:{dead_port}", "max_retries = 0")
    yield {"base": base, "upstream": upstream, "dead": dead_base}
    for p in (gw, dead, sim):
        p.stop()
    for c in (cfg, dead_cfg):
        os.unlink(c)
