"""A loopback TCP proxy that a test can make refuse or black-hole, to stage a tracking-server outage.

``TcpProxy(target_port).start()`` listens on ``127.0.0.1:<port>`` and forwards to the target. Modes:

- ``pass``: forward both ways;
- ``refuse``: nothing listens on the port (connection refused), every open connection is reset — a server that
  is down;
- ``blackhole``: connections are accepted and what they send is dropped, never answered — a hung server or a
  lost network (the client waits for its timeout);
- ``mute``: requests reach the server, its answers are dropped — a write that commits although the client times
  out (what a retry must not send twice).

Every mode change closes the connections open at the time. One asyncio loop on a daemon thread; :meth:`stop`
closes everything and joins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole", "mute"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """``host:port`` → ``target_host:target_port`` with a switchable :data:`Mode`."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host, self.port = host, port or free_port(host)
        self.mode: Mode = "pass"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def set_mode(self, mode: Mode) -> None:
        self._call(self._switch(mode))

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._switch("refuse"))
        self._call(self._cancel_tasks())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)

    async def _switch(self, mode: Mode) -> None:
        self.mode = mode
        for w in list(self._conns):
            self._abort(w)
        self._conns.clear()
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
        else:
            await self._listen()

    @staticmethod
    def _abort(w: asyncio.StreamWriter) -> None:
        transport = w.transport
        if not transport.is_closing():
            transport.abort()  # a reset, as from a server process that died

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            if self.mode == "blackhole":
                while await reader.read(65536):
                    pass  # swallowed: no answer ever comes
                return
            try:
                up_r, up_w = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._conns.add(up_w)
            await asyncio.gather(self._pump(reader, up_w, True), self._pump(up_r, writer, False),
                                 return_exceptions=True)
        finally:
            self._conns.discard(writer)
            self._abort(writer)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await src.read(65536):
                if not (self.mode == "pass" or (self.mode == "mute" and upstream)):
                    continue  # dropped
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()
            self._conns.discard(dst)
