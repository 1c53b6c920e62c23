"""Serve a dataset folder on 127.0.0.1 (random free port) and print its base URL; CI's mirror."""

import functools
import http.server
import sys


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=sys.argv[1]))
print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
