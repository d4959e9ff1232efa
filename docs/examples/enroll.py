#!/usr/bin/env python3
"""Enroll with agentwall using only the Python standard library.

An agent proves its identity to the agentwall daemon over the enrollment socket (TLS with a
client certificate over a Unix socket); the daemon then binds the agent's cgroup to that
identity, and the kernel enforces the identity's policy. See docs/enrollment.md.

    python3 enroll.py --cert svid.pem --key svid.key [--connect 127.0.0.1:8080 ...]

Socket and bundle default to AGENTWALL_ENROLL_SOCKET and AGENTWALL_BUNDLE, which
`agentwall exec --self-enroll` sets. With --connect, the agent tries each address after
enrolling and prints one JSON line per attempt (used by agentwall's own tests).
"""

import argparse
import json
import os
import socket
import ssl
import sys

SERVER_NAME = "agentwall"


def enroll(socket_path, cert, key, bundle, timeout=10.0):
    """Enrolls the calling process's cgroup; returns the daemon's reply as a dict.

    Raises RuntimeError with the daemon's reason when enrollment is refused.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=bundle)
    ctx.load_cert_chain(certfile=cert, keyfile=key)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    raw.connect(socket_path)
    with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
        tls.sendall(json.dumps({"op": "enroll"}).encode() + b"\n")
        line = tls.makefile("rb").readline(16 * 1024)
    reply = json.loads(line)
    if reply.get("type") != "enrolled":
        raise RuntimeError(reply.get("message", "unexpected reply: %r" % reply))
    return reply


def try_connect(addr):
    host, _, port = addr.rpartition(":")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(2)
    try:
        s.connect((host.strip("[]"), int(port)))
        s.sendall(b"hello from an enrolled agent\n")
        return {"connect": addr, "ok": True}
    except OSError as e:
        return {"connect": addr, "ok": False, "errno": e.errno}
    finally:
        s.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=os.environ.get("AGENTWALL_ENROLL_SOCKET", "/run/agentwall/enroll.sock"))
    p.add_argument("--bundle", default=os.environ.get("AGENTWALL_BUNDLE"))
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--connect", action="append", default=[])
    a = p.parse_args()
    if not a.bundle:
        p.error("give --bundle (the agentwall CA certificate) or set AGENTWALL_BUNDLE")
    try:
        reply = enroll(a.socket, a.cert, a.key, a.bundle)
        print(json.dumps(reply), flush=True)
    except (RuntimeError, OSError, ssl.SSLError) as e:
        print(json.dumps({"type": "error", "message": str(e)}), flush=True)
        for addr in a.connect:
            print(json.dumps(try_connect(addr)), flush=True)
        return 1
    for addr in a.connect:
        print(json.dumps(try_connect(addr)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
