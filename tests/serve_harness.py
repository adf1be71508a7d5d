"""A real ``hpipe serve`` subprocess for tests: on 127.0.0.1 and a free port, waited for until
/health says ready, and stopped with SIGTERM (checking exit 0 and that no worker outlived it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from runtime_harness import children_of

from hpipe.runtime.launch import free_port

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"


class Server:
    def __init__(self, argv: list[str], *, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        extra = ["--api-key", api_key] if api_key else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpipe.cli", "serve", *argv, "--port", str(self.port),
             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=5)

    def wait_ready(self, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.communicate()}")
            try:
                r = self.health()
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError("server not ready in time")

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", self.api_key or "none")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=120, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self) -> None:
        workers = children_of(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.returncode == 0, err
        assert "stopped (SIGTERM); every worker has ended" in err
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{p}").exists() for p in workers), "a worker outlived serve"
