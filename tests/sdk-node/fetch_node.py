#!/usr/bin/env python3
"""Puts Node 22 and npm 10 into a directory, for the Node SDK suite.

The suite's pinned packages (the current majors of `openai`, `ai` and
`@ai-sdk/deepseek`) need Node 22; Debian's nodejs is older. Both come from
the npm registry, the one source a CI machine is sure to reach: Node's
official Linux build is published there as `node-linux-<arch>`, and npm as
`npm`. Each tarball is checked against the sha512 pinned below (the
registry's own `dist.integrity`) before anything is unpacked.

Usage: fetch_node.py DIR    -> DIR/bin/node and DIR/npm/bin/npm-cli.js
"""

import base64
import hashlib
import io
import platform
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
NODE_VERSION = "22.23.5"
NODE_SHA512 = {
    "x64": "3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==",
    "arm64": "e1LOUGKVruPGuLVutn8+Cgm5pI1APm4Kvh+zbb/qe/ZpD9s+TQby5iUgZOWmPpbSKpj0Td8DP1N0NEnXasHizg==",
}
NPM_VERSION = "10.9.4"
NPM_SHA512 = "OnUG836FwboQIbqtefDNlyR0gTHzIfwRfE3DuiNewBvnMnWEpB0VEXwBlFVgqpNzIgYo/MHh3d2Hel/pszapAA=="


def fetch(package: str, version: str, sha512: str) -> tarfile.TarFile:
    name = package.rsplit("/", 1)[-1]
    url = f"{REGISTRY}/{package}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != sha512:
        sys.exit(f"fetch_node: {url} does not match its pinned sha512")
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")


def unpack(archive: tarfile.TarFile, into: Path, only: str | None = None) -> None:
    """Unpacks the tarball's `package/` (or just `package/<only>`) into `into`."""
    members = []
    for member in archive.getmembers():
        if not member.name.startswith("package/"):
            continue
        relative = member.name[len("package/") :]
        if only is not None and relative != only:
            continue
        member.name = relative
        members.append(member)
    # The "data" filter (Python 3.12, and 3.8.17+ point releases) refuses
    # links and paths that leave `into`.
    if hasattr(tarfile, "data_filter"):
        archive.extractall(into, members=members, filter="data")
    else:
        archive.extractall(into, members=members)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    target = Path(sys.argv[1])
    arch = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine())
    if arch is None:
        sys.exit(f"fetch_node: no Node {NODE_VERSION} build for {platform.machine()}")
    unpack(fetch(f"node-linux-{arch}", NODE_VERSION, NODE_SHA512[arch]), target, "bin/node")
    unpack(fetch("npm", NPM_VERSION, NPM_SHA512), target / "npm")


if __name__ == "__main__":
    main()
