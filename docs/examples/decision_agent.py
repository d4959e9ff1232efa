#!/usr/bin/env python3
"""Agent-to-agent calls over mTLS with agentwall's decision API, Python standard library only.

Agent B serves a resource. It requires a client certificate (an SVID of the trust bundle),
reads the caller's SPIFFE ID from it, and asks agentwall's decision API whether the holder of
that certificate may do the requested action with the given attributes before it serves:

    python3 decision_agent.py serve --port 8443 --resource service:report-api --count 10

Agent A calls it with its own SVID and checks B's SPIFFE ID:

    python3 decision_agent.py call --to 127.0.0.1:8443 --expect spiffe://agentwall.local/agent/report-api/prod \\
        --action read --attr table=events

Both take their SVID, key and bundle from AGENTWALL_SVID, AGENTWALL_SVID_KEY and
AGENTWALL_BUNDLE, which `agentwall exec --cert` sets, and the decision socket from
AGENTWALL_DECISION_SOCKET or --decision-socket. Each prints one JSON line per call.
"""

import argparse
import http.client
import json
import os
import socket
import ssl
import sys

DEFAULT_DECISION_SOCKET = "/run/agentwall/decision.sock"


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (the decision API's)."""

    def __init__(self, path, timeout=5.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def decide(decision_socket, caller_pem, resource, action, attributes):
    """Asks agentwall whether the holder of caller_pem (the certificate the caller presented)
    may do action on resource; returns its answer. agentwall verifies the certificate
    itself: trust bundle, expiry, revocation."""
    body = json.dumps(
        {
            "caller": {"certificate": caller_pem},
            "resource": resource,
            "action": action,
            "attributes": attributes,
        }
    )
    conn = UnixHTTPConnection(decision_socket)
    try:
        conn.request("POST", "/v1/decide", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        answer = json.loads(reply.read(64 * 1024))
    finally:
        conn.close()
    if reply.status != 200:
        return {"allow": False, "reason": answer.get("error", "status %d" % reply.status)}
    return answer


def spiffe_id_of(cert):
    """The URI SAN of a peer certificate as ssl.getpeercert() returns it."""
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith("spiffe://"):
            return value
    return None


def tls_context(server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=os.environ["AGENTWALL_BUNDLE"])
    ctx.load_cert_chain(os.environ["AGENTWALL_SVID"], os.environ["AGENTWALL_SVID_KEY"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        # An SVID names a SPIFFE ID, not a host: the caller checks the ID itself.
        ctx.check_hostname = False
    return ctx


def serve(args):
    ctx = tls_context(server=True)
    listener = socket.create_server(("127.0.0.1", args.port))
    print(json.dumps({"listening": args.port}), flush=True)
    for _ in range(args.count):
        raw, _ = listener.accept()
        raw.settimeout(10)
        try:
            with ctx.wrap_socket(raw, server_side=True) as tls:
                caller = spiffe_id_of(tls.getpeercert())
                pem = ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))
                request = json.loads(tls.makefile("rb").readline(16 * 1024))
                answer = decide(
                    args.decision_socket,
                    pem,
                    args.resource,
                    request.get("action", ""),
                    request.get("attributes", {}),
                )
                if answer.get("allow"):
                    reply = {"ok": True, "served": request.get("action")}
                else:
                    reply = {"ok": False, "refused": answer.get("reason")}
                tls.sendall(json.dumps(reply).encode() + b"\n")
                print(
                    json.dumps({"caller": caller, "allow": answer.get("allow"), "rule": answer.get("rule")}),
                    flush=True,
                )
        except (OSError, ValueError) as e:
            print(json.dumps({"error": str(e)}), flush=True)
    return 0


def call(args):
    host, _, port = args.to.rpartition(":")
    attributes = dict(a.split("=", 1) for a in args.attr)
    try:
        raw = socket.create_connection((host, int(port)), timeout=5)
    except PermissionError:
        # The kernel refused the connect: the caller's policy does not reach B.
        print(json.dumps({"ok": False, "error": "EPERM"}), flush=True)
        return 0
    with tls_context(server=False).wrap_socket(raw) as tls:
        server = spiffe_id_of(tls.getpeercert())
        if server != args.expect:
            print(json.dumps({"ok": False, "error": "server is %s" % server}), flush=True)
            return 0
        tls.sendall(json.dumps({"action": args.action, "attributes": attributes}).encode() + b"\n")
        reply = json.loads(tls.makefile("rb").readline(16 * 1024))
    print(json.dumps(reply), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--resource", required=True)
    s.add_argument("--count", type=int, default=1)
    s.add_argument(
        "--decision-socket",
        default=os.environ.get("AGENTWALL_DECISION_SOCKET", DEFAULT_DECISION_SOCKET),
    )
    c = sub.add_parser("call")
    c.add_argument("--to", required=True)
    c.add_argument("--expect", required=True, help="the SPIFFE ID the server must have")
    c.add_argument("--action", required=True)
    c.add_argument("--attr", action="append", default=[], help="NAME=VALUE")
    args = p.parse_args()
    return serve(args) if args.mode == "serve" else call(args)


if __name__ == "__main__":
    sys.exit(main())
