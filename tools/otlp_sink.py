#!/usr/bin/env python3
"""An OTLP/HTTP receiver that keeps nothing: answers every POST to /v1/traces (and /v1/metrics,
/v1/logs) with an empty success, and counts what it was sent. For benchmarks that measure what
exporting traces costs Mira's processes (benches/telemetry-overhead.sh), not a collector.

    tools/otlp_sink.py PORT_FILE      # listens on 127.0.0.1, an ephemeral port written to PORT_FILE
On SIGTERM it prints one JSON line: requests and bytes received.
"""
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

received = {"requests": 0, "bytes": 0}
lock = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (the standard library's name)
        n = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(n)
        with lock:
            received["requests"] += 1
            received["bytes"] += len(body)
        json_reply = "json" in (self.headers.get("content-type") or "")
        reply = b"{}" if json_reply else b""
        self.send_response(200)
        self.send_header("content-type", "application/json" if json_reply else "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))

    def stop(*_):
        print(json.dumps(received), flush=True)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
