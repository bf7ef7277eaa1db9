"""``rapidserve serve`` as a subprocess, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import tritonclient.grpc as tc


class RemoteServer:
    """``rapidserve serve`` in a subprocess on a free port; stopped with SIGTERM -> wait -> kill."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = ""
        command = [sys.executable, "-m", "rapidserve", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
                   "--metrics-port", "0", "--http-port", "0", *args]  # fmt: skip
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.port = self._wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.url = f"127.0.0.1:{self.port}"

    def metrics_url(self) -> str:
        """The /metrics address, read from the log line that follows the gRPC one."""
        port = self._wait_for(r"metrics at http://127\.0\.0\.1:(\d+)/metrics")
        return f"http://127.0.0.1:{port}/metrics"

    def _wait_for(self, pattern: str, timeout_s: float = 60) -> int:
        return int(self.wait_for_line(pattern, timeout_s).group(1))

    def wait_for_line(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        """The first log line from now on that matches ``pattern``; RuntimeError if the server exits."""
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                self.proc.stdout.close()
                raise RuntimeError(f"server exited with {code}:\n{self.log}")
            self.log += line
            match = re.search(pattern, line)
            if match:
                return match
        raise TimeoutError(self.log)

    def wait_ready(self, client: tc.InferenceServerClient, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not client.is_server_ready():
            assert self.proc.poll() is None, "server exited"
            assert time.monotonic() < deadline, "server not ready in time"
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.stdout is None or self.proc.stdout.closed:
            return self.proc.wait()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log += self.proc.stdout.read()
        self.proc.stdout.close()
        return self.proc.wait()
