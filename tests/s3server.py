"""A real S3-compatible server on loopback for the object-store tests: moto's server mode in a subprocess of its own,
reached through s3fs over HTTP like any S3 endpoint (AWS_ENDPOINT_URL_S3), never an in-process mock."""

import os
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # what any S3 client reads: this process's s3fs and the po-batch runs it starts
        self.env = {"AWS_ENDPOINT_URL_S3": self.url, "AWS_ACCESS_KEY_ID": "po-batch-test",
                    "AWS_SECRET_ACCESS_KEY": "po-batch-test", "AWS_DEFAULT_REGION": "us-east-1",
                    "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server() -> S3Server:
    server = S3Server()
    os.environ.update(server.env)
    return server
