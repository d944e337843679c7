"""Running the app: bind the address first (a busy port fails in a second, not after embedding a
grid), open the session, then serve with uvicorn and say ``serving http://HOST:PORT/`` on stdout
once it accepts connections (HOST one a browser here can open: 127.0.0.1 when bound to
0.0.0.0)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import sys
from typing import Callable, Iterator

from taxamap.errors import TaxamapError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) (port 0: a free one); TaxamapError with a fix otherwise."""
    if not 0 <= int(port) <= 65535:
        raise TaxamapError(f"--port must be 0-65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TaxamapError(f"cannot listen on {host}: {exc.strerror}; give an address such as "
                           "127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise TaxamapError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose "
                           "another --port (or stop the program using it)") from None
    sock.set_inheritable(True)
    return sock


def url_of(host: str, sock: socket.socket) -> str:
    """``http://HOST:PORT/`` of a bound socket (IPv6 hosts in brackets)."""
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/"


def is_wildcard(host: str) -> bool:
    """True for the addresses that mean "every interface" (0.0.0.0, ::), which no browser can
    open."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


def browser_url(host: str, sock: socket.socket) -> str:
    """A URL of the bound socket that a browser on this machine can open: the loopback address
    when bound to every interface (``0.0.0.0`` -> ``127.0.0.1``), else ``http://HOST:PORT/``."""
    if is_wildcard(host):
        host = "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
    return url_of(host, sock)


def network_urls(sock: socket.socket) -> list[str]:
    """URLs other machines may use for a server bound to every interface: this machine's name,
    and its address on the network of the default route (found without sending a packet; absent
    when there is none)."""
    port = sock.getsockname()[1]
    urls = [f"http://{socket.gethostname()}:{port}/"]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # UDP connect only picks a route; nothing is sent
        address = probe.getsockname()[0]
        if not ipaddress.ip_address(address).is_loopback:
            urls.append(f"http://{address}:{port}/")
    except OSError:
        pass
    finally:
        probe.close()
    return urls


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hold back the library's progress lines (INFO of the "taxamap" logger), keeping warnings:
    the warm-up's species is the server's choice, not something the user asked about."""
    logger = logging.getLogger("taxamap")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def allowed_hosts_for(host: str) -> list[str] | None:
    """Host headers a loopback server answers (guards against DNS rebinding); None: any."""
    if not is_loopback(host):
        return None
    return ["127.0.0.1", "localhost", "[::1]", "::1", host]


#: Seconds an idle keep-alive connection stays open (uvicorn's ``timeout_keep_alive``).
KEEP_ALIVE_S = 5

_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


def guarded_protocol(read_timeout: float):
    """uvicorn's h11 protocol with the deadline uvicorn leaves out: a request's head must arrive
    within ``read_timeout`` s of the connection opening (or of the previous answer) and the rest
    of a body the app answered without reading (a refused upload) within ``read_timeout`` s of
    the answer, else the connection is closed (with a 408 when half a head had come). Without it
    a client sending half a request and stalling holds its connection forever. Bodies the app
    reads are timed by the app (``taxamap.serve.app``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"error": f"the request did not arrive within {read_timeout:g} s"}).encode()
    answer = _REQUEST_TIMEOUT % (len(body), body)

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._stop()
            super().connection_lost(exc)

        def _waiting(self) -> bool:
            """Waiting on the client alone: for a request's head, or for the rest of a body
            after the answer was sent."""
            theirs, ours = self.conn.their_state, self.conn.our_state
            return theirs is h11.IDLE or (theirs is h11.SEND_BODY
                                          and ours in (h11.DONE, h11.MUST_CLOSE))

        def _watch(self) -> None:
            if self.transport.is_closing() or not self._waiting():
                self._stop()
            elif self._deadline is None:  # the time counts from when the waiting began
                self._deadline = self.loop.call_later(read_timeout, self._expired)

        def _stop(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or not self._waiting():
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(answer)  # half a head: h11 has no request to answer
            self.transport.close()

    return GuardedH11Protocol


def make_server(app, sock: socket.socket, on_ready: Callable[[], None] | None = None,
                log_level: str = "warning", *, read_timeout: float | None = None):
    """A uvicorn server of ``app`` on the bound ``sock`` that calls ``on_ready`` once it
    accepts connections; idle connections close after KEEP_ALIVE_S, half-sent requests after
    ``read_timeout`` s (default: the app's default). Run it with ``server.run(sockets=[sock])``."""
    import uvicorn

    from taxamap.serve.app import DEFAULT_READ_TIMEOUT

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S,
                            http=guarded_protocol(read_timeout or DEFAULT_READ_TIMEOUT),
                            ws="none")
    return Server(config)


def serve(session_factory: Callable[[], object], *, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, max_upload: int | None = None,
          say: Callable[[str], None] | None = None, **limits) -> int:
    """``taxamap serve``: bind, open the session (``session_factory()``), serve until
    interrupted. Prints ``serving http://HOST:PORT/`` on stdout when ready (a loopback HOST when
    bound to every interface, with the network URLs on stderr); returns 0. ``limits``:
    :func:`~taxamap.serve.app.create_app`'s ``max_uploads``, ``read_timeout`` and
    ``upload_timeout``."""
    from taxamap.serve import require_web_stack
    from taxamap.serve.app import DEFAULT_MAX_UPLOAD, create_app

    require_web_stack()
    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    if not is_loopback(host):
        say(f"warning: --host {host} makes the map reachable from other machines; "
            "taxamap serve has no login or encryption, so use it only on a network you trust")
    sock = bind(host, port)
    try:
        session = session_factory()
        app = create_app(session, max_upload=max_upload or DEFAULT_MAX_UPLOAD,
                         allowed_hosts=allowed_hosts_for(host), **limits)
        try:
            with quiet_progress():
                app.state.service.warm_up()
            url = browser_url(host, sock)
            if is_wildcard(host):
                say(f"listening on every interface ({host}); other machines may try "
                    + " or ".join(network_urls(sock)))
            server = make_server(app, sock, on_ready=lambda: print(f"serving {url}", flush=True),
                                 read_timeout=app.state.service.read_timeout)
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
                pass
            say("taxamap serve: stopped")
        finally:
            app.state.service.close()
    finally:
        sock.close()
    return 0
