#!/usr/bin/env python3
"""make vm-test's QMP client: one command to a QEMU's monitor socket.

    vm-qmp.py SOCK COMMAND [JSON-ARGS] [--event NAME] [--timeout S]
    vm-qmp.py SOCK migrate-wait [--timeout S]

Connects to QEMU's QMP socket, negotiates capabilities, runs COMMAND with
the JSON object JSON-ARGS as its arguments and prints its "return" value as
JSON. With --event NAME it then waits for that event (say DEVICE_DELETED
after device_del) before it exits. `migrate-wait` polls query-migrate
until the migration completed (or failed) and prints the final status.
Every wait is bounded by --timeout (default 60 s); a QMP error, a failed
migration or a timeout exits 1 with the reason on stderr.
"""
import json
import socket
import sys
import time

READ_LIMIT = 1 << 20  # one QMP reply, at most: the monitor is ours, but bounded


class Qmp:
    def __init__(self, path, deadline):
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.read()  # the greeting
        self.execute("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from QEMU in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU closed the monitor")
            self.buf += chunk
            if len(self.buf) > READ_LIMIT:
                raise ValueError("a QMP message over the read limit")
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, arguments=None):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_event(self, name):
        while True:
            for e in self.events:
                if e["event"] == name:
                    return e
            self.events = []
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)


def main(argv):
    timeout = 60.0
    event = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--timeout":
            timeout = float(argv[i + 1])
            i += 2
        elif argv[i] == "--event":
            event = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    if len(rest) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path, command = rest[0], rest[1]
    args = json.loads(rest[2]) if len(rest) > 2 else None
    q = Qmp(path, time.monotonic() + timeout)
    if command == "migrate-wait":
        while True:
            status = q.execute("query-migrate").get("status")
            if status in ("completed", "failed", "cancelled"):
                print(json.dumps({"status": status}))
                return 0 if status == "completed" else 1
            if time.monotonic() > q.deadline:
                raise TimeoutError(f"migration still {status}")
            time.sleep(0.1)
    print(json.dumps(q.execute(command, args)))
    if event:
        q.wait_event(event)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"vm-qmp: {e}", file=sys.stderr)
        sys.exit(1)
