"""A request handler served on 127.0.0.1 at a free port from a daemon thread: what the API
stand-ins (tests/kfp_standin.py, tests/k8s_standin.py) listen with."""

import threading
from http.server import ThreadingHTTPServer


class LoopbackServer:
    def __init__(self, handler):
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # its request threads are daemons
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)
