"""Running the app: in the foreground for ``quicksilver serve``, or on a background thread
with a free port for tests and the load benchmark (the same uvicorn server either way)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

import quicksilver as qs
from quicksilver.serve.app import Settings, create_app
from quicksilver.serve.scheduler import Scheduler


def serve(llm: qs.LLM, settings: Settings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (uvicorn handles Ctrl-C and shuts the worker down)."""
    app = create_app(llm, settings)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


class BackgroundServer:
    """The app on 127.0.0.1 at a free port, on a daemon thread: ``with BackgroundServer(llm,
    settings) as server: ... server.url ...``. The socket is bound before the thread starts,
    so there is no window in which another process could take the port."""

    def __init__(self, llm: qs.LLM, settings: Settings, scheduler: Scheduler | None = None) -> None:
        self.app = create_app(llm, settings, scheduler)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
