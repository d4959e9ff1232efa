#!/usr/bin/env python3
"""An agent that fetches a secret from agentwall, uses it, and clears it. Python standard
library only.

The agent proves its identity with its own SVID over mutual TLS to the decision API's TCP
address (decision.listen). agentwall hands the secret over if the agent's policy has a
`secret:` rule for the path, with a lease that the agent renews before it ends:

    python3 secret_agent.py --address 127.0.0.1:8443 agent/reporter/db-password \\
        --send 127.0.0.1:5000 --keep

--send HOST:PORT stands for using the secret: it writes the value to that address, once.
--keep stays and renews the lease when two thirds of it have passed, and at once for each line
read on standard input; it stops at the end of its input or when a renewal is refused.

The SVID, its key and the trust bundle come from AGENTWALL_SVID, AGENTWALL_SVID_KEY and
AGENTWALL_BUNDLE, which `agentwall exec --cert` sets; the address from --address or
AGENTWALL_DECISION_ADDRESS. Each step prints one JSON line, never the value.
"""

import argparse
import base64
import http.client
import json
import os
import select
import socket
import ssl
import sys
import time


class AgentwallConnection(http.client.HTTPSConnection):
    """HTTPS to agentwall, whose node certificate names "agentwall" whatever address it is
    reached at."""

    def __init__(self, address, context):
        host, port = address.rsplit(":", 1)
        super().__init__(host, int(port), timeout=10)
        self.tls = context

    def connect(self):
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname="agentwall")


class SecretClient:
    """One mTLS connection to agentwall's decision API, kept open between requests."""

    def __init__(self, address, cert, key, bundle):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=bundle)
        ctx.load_cert_chain(cert, key)
        self.conn = AgentwallConnection(address, ctx)

    def _post(self, path, body):
        try:
            reply = self._send(path, body)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # agentwall closed the idle connection: open a new one, once.
            self.conn.close()
            reply = self._send(path, body)
        data = bytearray(reply.read())
        try:
            return reply.status, json.loads(data)
        finally:
            clear(data)

    def _send(self, path, body):
        self.conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json"}
        )
        return self.conn.getresponse()

    def fetch(self, path):
        return self._post("/v1/secrets/fetch", {"path": path})

    def renew(self, lease_id):
        return self._post("/v1/secrets/renew", {"lease": lease_id})


def take_value(answer):
    """The secret's value as a bytearray (cleared by clear()), removed from the answer."""
    encoded = answer.pop("value")
    return bytearray(base64.b64decode(encoded))


def clear(buf):
    """Overwrites a bytearray in place. Python's strings cannot be cleared: the value is kept
    in a bytearray from the moment it is decoded (the base64 text of the answer is a string
    that lives until it is collected)."""
    for i in range(len(buf)):
        buf[i] = 0


def use(value, address):
    """Stands for using the secret: writes it to address once."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(value)
    return len(value)


def say(**fields):
    print(json.dumps(fields), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--address", default=os.environ.get("AGENTWALL_DECISION_ADDRESS"))
    p.add_argument("--send", help="HOST:PORT to write the value to once")
    p.add_argument("--keep", action="store_true", help="stay and renew the lease")
    a = p.parse_args()
    if not a.address:
        sys.exit("give --address HOST:PORT (agentwall's decision.listen)")
    try:
        client = SecretClient(
            a.address,
            os.environ["AGENTWALL_SVID"],
            os.environ["AGENTWALL_SVID_KEY"],
            os.environ["AGENTWALL_BUNDLE"],
        )
        status, answer = client.fetch(a.path)
    except (OSError, ssl.SSLError, http.client.HTTPException) as e:
        say(fetched=False, error=type(e).__name__)
        return 2
    if status != 200:
        say(fetched=False, status=status, error=answer.get("error"))
        return 3
    value = take_value(answer)
    lease = answer["lease"]
    say(fetched=True, path=answer["path"], version=answer["version"], lease=lease)
    if a.send:
        say(sent=use(value, a.send))
    clear(value)
    if not a.keep:
        return 0
    while True:
        due = lease["ttl_seconds"] * 2 / 3
        ready, _, _ = select.select([sys.stdin], [], [], due)
        if ready and not sys.stdin.readline():
            return 0
        try:
            status, answer = client.renew(lease["id"])
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            say(renewed=False, error=type(e).__name__)
            return 2
        if status != 200:
            say(renewed=False, status=status, error=answer.get("error"))
            return 3
        clear(take_value(answer))
        lease = answer["lease"]
        say(renewed=True, version=answer["version"], lease=lease)


if __name__ == "__main__":
    sys.exit(main())
