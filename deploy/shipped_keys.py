"""No shipped file grants access with a publicly known key (docs/config.md).

Used by deploy/check.sh (the example config and the scan of shipped files)
and deploy/k8s/check.sh (the ConfigMap's and compose's configs):

  - refused_then_filled(): a shipped config is refused by
    `sluice check-config` (exit 1, naming key_sha256) for its placeholder
    keys, and valid once each placeholder is replaced by the hash of a fresh
    `sluice new-key`, so everything else in it is still checked;
  - scan(): no shipped document or config holds a 64-hex-digit value (a key
    hash that would work; image digests after "sha256:" aside) or a
    plaintext key (`sk-...` elisions aside).

Usage: python3 deploy/shipped_keys.py path/to/sluice
  (scans the shipped files and checks config/sluice.toml)
"""
import os
import re
import subprocess
import sys
import tempfile

HEX64 = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")
KEY_LINE = re.compile(r"^(\s*key_sha256\s*=\s*\[)([^\]]*)(\].*)$", re.S)
# What a user can read: docs, configs, manifests, the image and the scripts
# that ship with them (src/, tests/ and benches' code are not documents).
SHIPPED = ["README.md", "ARCHITECTURE.md", "config", "deploy", "benches/README.md"]
DOC_EXT = (".md", ".toml", ".yaml", ".yml", ".json", "Dockerfile")


def new_hash(bin_path):
    """The key_sha256 of a fresh `sluice new-key` (the key itself is dropped)."""
    out = subprocess.run([bin_path, "new-key"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^key_sha256:\s*([0-9a-f]{64})\s*$", out, re.M)
    if not m:
        raise SystemExit(f"`sluice new-key` printed no key_sha256 line: {out!r}")
    return m.group(1)


def fill(bin_path, toml):
    """Returns (text, n): every value of a `key_sha256 = [...]` line that is
    not 64 hex digits replaced by a distinct fresh hash; n of them."""
    n = 0

    def value(m):
        nonlocal n
        if HEX64.fullmatch(m.group(1)):
            return m.group(0)
        n += 1
        return f'"{new_hash(bin_path)}"'

    lines = []
    for line in toml.splitlines(keepends=True):
        m = KEY_LINE.match(line)
        if m:
            line = m.group(1) + re.sub(r'"([^"]*)"', value, m.group(2)) + m.group(3)
        lines.append(line)
    return "".join(lines), n


def check_config(bin_path, toml, env=None):
    """Runs `sluice check-config` on TOML text (SLUICE_* stripped from the
    environment, then `env` added); returns (exit code, output)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    run_env.update(env or {})
    try:
        r = subprocess.run([bin_path, "check-config", "--config", f.name],
                           capture_output=True, text=True, env=run_env)
    finally:
        os.unlink(f.name)
    return r.returncode, r.stdout + r.stderr


def refused_then_filled(bin_path, toml, where, env=None):
    """Returns (problems, filled text, whether it is valid, check-config's
    output on it)."""
    problems = []
    if HEX64.search(toml):
        problems.append(f"{where}: holds a 64-hex-digit value (a working key hash?)")
    filled, n = fill(bin_path, toml)
    if n == 0:
        problems.append(f"{where}: no placeholder key_sha256 (every tenant key must be one)")
    code, out = check_config(bin_path, toml, env)
    if code != 1 or "key_sha256" not in out:
        problems.append(f"{where}: check-config should refuse its placeholder keys "
                        f"(exit 1 naming key_sha256), got exit {code}: {out.strip()}")
    code, out = check_config(bin_path, filled, env)
    if code != 0:
        problems.append(f"{where}: invalid with its {n} placeholder(s) replaced by "
                        f"`sluice new-key` hashes: {out.strip()}")
    return problems, filled, code == 0, out


def shipped_files(root="."):
    for entry in SHIPPED:
        path = os.path.join(root, entry)
        if os.path.isfile(path):
            yield path
        for d, dirs, files in os.walk(path):
            dirs[:] = [x for x in dirs if x not in ("__pycache__",)]
            for name in sorted(files):
                yield os.path.join(d, name)


def scan(root="."):
    """Problems: 64-hex values and plaintext keys in shipped files."""
    problems = []
    for path in shipped_files(root):
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        doc = path.endswith(DOC_EXT)
        for no, line in enumerate(text.splitlines(), 1):
            for m in HEX64.finditer(line):
                if not line[:m.start()].endswith("sha256:"):  # an image digest
                    problems.append(f"{path}:{no}: a 64-hex-digit value (a working key hash?)")
            if doc:
                for m in re.finditer(r"\bsk-[A-Za-z0-9_-]+", line):
                    if not line.startswith("...", m.end()):
                        problems.append(f"{path}:{no}: a plaintext key {m.group(0)!r} (write sk-... instead)")
    return problems


def main():
    bin_path = sys.argv[1]
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    problems = scan()
    files = sum(1 for _ in shipped_files())
    example, _, _, _ = refused_then_filled(bin_path, open("config/sluice.toml").read(), "config/sluice.toml")
    problems += example
    if problems:
        print("\n".join(f"PROBLEM: {p}" for p in problems))
        sys.exit(1)
    print(f"keys: {files} shipped files hold no key hash and no plaintext key")
    print("keys: config/sluice.toml refused for its placeholder keys, valid with `sluice new-key` hashes")


if __name__ == "__main__":
    main()
