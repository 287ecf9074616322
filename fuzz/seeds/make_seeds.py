#!/usr/bin/env python3
"""Writes the small, tracked seed inputs under fuzz/seeds/<target>/.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. The seeds are valid (or nearly
valid) inputs that get the fuzzer past the first checks quickly; the corpora that grow
from them (fuzz/corpus/) are not tracked.
"""
import hashlib
import pathlib
import re
import struct
import tomllib

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field, wire):
    return varint(field << 3 | wire)


def vfield(field, n):
    return key(field, 0) + varint(n)


def bfield(field, data):
    return key(field, 2) + varint(len(data)) + data


def framed(msg):
    return struct.pack(">I", len(msg)) + msg


def manifest(content, chunk_size):
    chunks = [content[i:i + chunk_size] for i in range(0, len(content), chunk_size)]
    # BLAKE3 is not in Python's stdlib; the decoder only checks the hash lengths.
    fake = [hashlib.sha256(b"blake3:" + c).digest() for c in chunks]
    msg = b""
    if content:
        msg += vfield(1, len(content))
    msg += vfield(2, chunk_size)
    msg += bfield(3, hashlib.sha256(content).digest())
    for h in fake:
        msg += bfield(4, h)
    return msg


def write(target, name, data):
    d = HERE / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def default_toml(path):
    src = (ROOT / path).read_text()
    return re.search(r'DEFAULT_CONFIG_TOML: &str = r##"(.*?)"##;', src, re.S).group(1)


def main():
    # chunk_protocol: framed requests and responses.
    ticket = bfield(1, bytes(range(40))) + bfield(2, bytes(64))
    write("chunk_protocol", "request-chunk",
          framed(bfield(1, ticket) + bfield(2, bytes(32)) + vfield(4, 7)))
    write("chunk_protocol", "request-bitfield",
          framed(bfield(1, ticket) + bfield(2, bytes(32)) + vfield(3, 1)))
    write("chunk_protocol", "response-chunk",
          framed(bfield(2, vfield(1, 3) + bfield(2, b"chunk bytes"))))
    write("chunk_protocol", "response-empty-chunk", framed(bfield(2, b"")))
    write("chunk_protocol", "response-held",
          framed(bfield(1, vfield(1, 13) + bfield(2, b"\xff\x0f"))))
    write("chunk_protocol", "response-refused",
          framed(bfield(3, vfield(1, 5) + bfield(2, b"every upload slot is busy"))))

    # manifest: encoded manifests.
    write("manifest", "empty", manifest(b"", 1024))
    write("manifest", "one-chunk", manifest(b"x" * 100, 1024))
    write("manifest", "three-chunks", manifest(bytes(2 * 1024 + 5), 1024))
    write("manifest", "content-id", hashlib.sha256(b"x").hexdigest())

    # config: selector byte, then TOML [NUL env overrides].
    agent = default_toml("agent/src/config.rs")
    coord = default_toml("coordinator/src/config.rs")
    write("config", "agent-default", "\x00" + agent)
    write("config", "coordinator-default", "\x01" + coord)
    write("config", "agent-seed-style",
          "\x00id = \"agent-001\"\ndata_dir = \"/srv/arcade\"\n[download]\nconcurrent = 3\n"
          "timeout = 300\nretry = 3\n[cache]\nmax_size = 1000\neviction = \"lfu\"\nttl = 24\n"
          "[[builtin]]\nplugin = \"notify/stdout@1.0.0\"\nfile = \"notify-stdout\"\n"
          "[labels]\nzone = \"eu-west-1a\"\n")
    write("config", "agent-env",
          "\x00id = \"a1\"\n\x00ARCADE_CACHE_TTL=2h\nARCADE_MESH_LISTEN=[\"/ip4/127.0.0.1/tcp/0\"]\n"
          "ARCADE_DOWNLOAD_RETRY=5\nARCADE_CACHE_EVICTION=fifo")
    write("config", "coordinator-seed-style",
          "\x01[plugin]\nstorage_path = \"./plugins\"\nmax_plugin_size = 100\nenable_cache = true\n"
          "cache_ttl = 3600\n\n[plugin.security]\nrequire_checksum = true\nallow_unsafe = false\n")
    write("config", "coordinator-env",
          "\x01\x00ARCADE_ADMIN_TOKEN=admin-token-1\nARCADE_PLUGIN_SECURITY_ALLOW_UNSAFE=true\n"
          "ARCADE_JOBS_LEASE_TTL=2m\nARCADE_PLUGIN_CHUNK_SIZE=64KiB")
    for i, s in enumerate(["512KiB", "100MB", "7TiB", "4096", " 1 GiB "]):
        write("config", f"size-{i}", "\x02" + s)
    for i, s in enumerate(["500ms", "30s", "5m", "2h", "1d", "30"]):
        write("config", f"duration-{i}", "\x03" + s)

    # A libFuzzer dictionary for the config target: keys, sections, env names, units.
    words = set()

    def walk(table, path):
        for k, v in table.items():
            words.add(k)
            if isinstance(v, dict):
                words.add(f"[{'.'.join(path + [k])}]")
                walk(v, path + [k])
            else:
                name = "_".join(p.replace(".", "_").replace("-", "_").upper()
                                for p in path + [k])
                words.add(f"ARCADE_{name}=")

    for text in (agent, coord):
        walk(tomllib.loads(text), [])
    words |= {"[[builtin]]", "[labels]", "plugin", "file", "B", "KiB", "KB", "MiB", "MB",
              "GiB", "GB", "TiB", "TB", "ms", "s", "m", "h", "d", "off", "human", "json",
              "lru", "lfu", "fifo", "fail", "previous-version", "http://", "https://",
              "/ip4/", "/tcp/", "/ip6/", "@1.0.0", "true", "false"}
    dicts = HERE.parent / "dicts"
    dicts.mkdir(exist_ok=True)
    lines = sorted('"' + w.replace("\\", "\\\\").replace('"', '\\"') + '"' for w in words)
    (dicts / "config.dict").write_text("# Generated by seeds/make_seeds.py.\n" + "\n".join(lines) + "\n")

    # plugin_ref: ids, versions, references.
    for i, s in enumerate(["notify/slack", "build/maven-3.x", "1.0.0-rc.1+build.5",
                           "notify/slack@1.0.0", "x/y/z_1@0.1.2-alpha.1",
                           "notify/stdout\n1.2.3"]):
        write("plugin_ref", f"seed-{i}", s)


if __name__ == "__main__":
    main()
