"""``martinet serve``: bind the three sockets and run the greenlets over one store.

Greenlets: client endpoint, broker (receive, dispatch, heartbeat), status sink and
scheduler. This module only wires them together and handles start and stop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from collections.abc import Iterable
from typing import IO, Any

import gevent
import gevent.event
import zmq.green as zmq
from gevent.pywsgi import WSGIServer

from . import (
    __version__,
    access,
    api,
    clock,
    config,
    dashboard,
    keys,
    limits,
    metrics,
    protocol,
    security,
    timespec,
    web,
)
from .access import Access
from .auth import Authenticator
from .broker import Broker
from .cluster import Cluster, new_server_id
from .db import redact
from .endpoint import ClientEndpoint
from .errors import ConfigError, MartinetError
from .listener import Listener
from .loops import forever
from .metrics import Metrics
from .retention import Retention
from .scheduler import Scheduler
from .security import CLIENT_DOMAIN, WORKER_DOMAIN, Inbox
from .sink import StatusSink
from .store import Store

log = logging.getLogger(__name__)

#: Exit codes of ``martinet serve``.
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_BIND = 3
#: Longest each step of stopping waits, seconds: for the loops to leave the store, for them to end,
#: for the store to be free again, for the last status events to be written.
STOP_TIMEOUT = 3.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_UNWRITTEN = "could not write the last status events (their tasks are re-queued at the next start): %s"


def run_server(
    *,
    bind: str = config.HOST,
    client_port: int = config.CLIENT_PORT,
    worker_port: int = config.WORKER_PORT,
    status_port: int = config.STATUS_PORT,
    db_url: str = config.DB_URL,
    durability: str = config.DURABILITY,
    tz: str | None = None,
    heartbeat: float = config.HEARTBEAT_INTERVAL,
    default_retries: int = config.DEFAULT_RETRIES,
    default_retry_delay: float = config.DEFAULT_RETRY_DELAY,
    default_timeout: float | None = config.DEFAULT_TIMEOUT,
    retry_delay_max: float = config.RETRY_DELAY_MAX,
    max_message_bytes: int = config.MAX_MESSAGE_BYTES,
    max_deliveries: int = config.MAX_DELIVERIES,
    secret_key: str | None = None,
    client_keys: str | None = None,
    worker_keys: str | None = None,
    http_port: int = 0,
    http_token: str | None = None,
    http_read_token: str | None = None,
    insecure: bool = False,
    keep_succeeded: float | None = config.KEEP_SUCCEEDED,
    keep_failed: float | None = config.KEEP_FAILED,
    limit: Iterable[str] = (),
    rate: Iterable[str] = (),
) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code.

    ``default_*`` are the options of tasks that do not give their own; ``retry_delay_max``
    caps the backoff between retries. A larger message than ``max_message_bytes`` on any
    socket is refused (ZeroMQ drops the connection that sent it). A task whose worker is lost
    ``max_deliveries`` times fails instead of being delivered again.

    Finished tasks are deleted ``keep_succeeded`` seconds after they succeeded, ``keep_failed`` after they
    failed or were cancelled (None: kept; retention.py).

    ``secret_key`` (the server's ``*.key_secret``) makes every socket a CURVE server: the client
    port takes the public keys in ``client_keys``, the worker and status ports those in
    ``worker_keys`` (security.py). Without it, a ``bind`` off loopback is refused unless ``insecure``.

    ``http_port`` (0: none) serves the dashboard, the HTTP API and /metrics (web.py); off loopback it
    needs ``http_token`` unless ``insecure`` (access.py). ``http_read_token`` may only read.

    ``durability`` (config.DURABILITY) says what a commit survives before a reply is sent.

    ``limit`` (``KEY=N``) and ``rate`` (``KEY=N/s``, ``/m``, ``/h``) bound how many tasks of a task name or
    limit key run at once and start per interval, across the servers sharing the database (limits.py);
    a value of another form is a ConfigError (exit 2).
    """
    try:
        security.check_bind(bind, secured=secret_key is not None, insecure=insecure)
        access.check_http(bind, http_port, http_token, http_read_token, insecure)
        curve = _server_keys(secret_key, client_keys, worker_keys)
        tzinfo = timespec.parse_tz(tz)
        scheduling = clock.from_environment()
        bounds = limits.parse(limit, rate)
        alone = _serve_alone(db_url)
        defaults = _task_defaults(default_retries, default_retry_delay, default_timeout, retry_delay_max)
        server_id = new_server_id()
        measured = Metrics()
        store = Store.open(
            db_url,
            retry_delay_max=retry_delay_max,
            max_deliveries=max_deliveries,
            server_id=server_id,
            metrics=measured,
            durability=durability,
            limits=bounds,
        )
    except MartinetError as exc:
        log.error("cannot start: %s", exc.message)
        return EXIT_CONFIG
    except Exception as exc:  # driver errors: unreachable PostgreSQL, unwritable SQLite file...
        log.error("cannot open the database %s: %s", redact(db_url), exc)
        return EXIT_CONFIG
    context = zmq.Context()
    sockets: list[Any] = []
    auth = None
    if curve is not None:  # before the sockets bind: the first handshake asks it
        auth = Authenticator(context, curve[1])
        auth.start()
    secret = None if curve is None else curve[0]
    try:
        client = _bind(context, zmq.ROUTER, bind, client_port, sockets, max_message_bytes, secret, CLIENT_DOMAIN)
        workers = _bind(context, zmq.ROUTER, bind, worker_port, sockets, max_message_bytes, secret, WORKER_DOMAIN)
        status = _bind(context, zmq.PULL, bind, status_port, sockets, max_message_bytes, secret, WORKER_DOMAIN)
    except zmq.ZMQError as exc:
        log.error("cannot bind %s: %s (is another server running? choose other ports with --*-port)", bind, exc)
        _close(sockets, context, auth)
        store.close()
        return EXIT_BIND

    # Several servers may share a PostgreSQL or MariaDB database: each also looks at the store every
    # CLUSTER_POLL seconds, in case another server's wake-up (a NOTIFY) was lost. MariaDB has no NOTIFY:
    # there the cluster's lease heartbeat (cluster.py, every second once there are peers) wakes it first.
    shared = store.pool.dialect.shared
    broker = Broker(
        workers,
        store,
        heartbeat=heartbeat,
        liveness=config.HEARTBEAT_LIVENESS,
        max_bytes=max_message_bytes,
        batch_max=config.BATCH_MAX,
        rejected=measured.rejected("worker"),
        inbox=Inbox(workers, auth, WORKER_DOMAIN, measured.rejected("worker")),
        poll=config.CLUSTER_POLL if shared else None,
        address=bind,
    )
    max_sleep = min(config.SCHEDULER_MAX_SLEEP, config.CLUSTER_POLL) if shared else config.SCHEDULER_MAX_SLEEP
    scheduler = Scheduler(store, broker, tz=tzinfo, max_sleep=max_sleep, clock=scheduling)
    endpoint = ClientEndpoint(
        client,
        store,
        broker,
        scheduler,
        tz=tzinfo,
        defaults=defaults,
        max_bytes=max_message_bytes,
        list_limit_max=config.LIST_LIMIT_MAX,
        batch_max=config.BATCH_MAX,
        rejected=measured.rejected("client"),
        inbox=Inbox(client, auth, CLIENT_DOMAIN, measured.rejected("client")),
    )
    sink = StatusSink(
        status,
        store,
        broker,
        scheduler,
        endpoint.notify_finished,
        max_bytes=max_message_bytes,
        batch_max=config.BATCH_MAX,
        rejected=measured.rejected("status"),
        inbox=Inbox(status, auth, WORKER_DOMAIN, measured.rejected("status")),
        waited=endpoint.waits_on,
    )
    endpoint.carry, endpoint.hurry = sink.carry, sink.hurry
    broker.on_finished = store.on_final = endpoint.notify_finished
    store.on_scheduled = scheduler.wake
    measured.collect_from(store, broker, lambda: sink.held)
    cluster = Cluster(
        store, broker, endpoint, scheduler, heartbeat=heartbeat, liveness=config.HEARTBEAT_LIVENESS, address=bind
    )
    try:
        http = _serve_http(bind, http_port, endpoint, Access(http_token, http_read_token), measured)
    except OSError as exc:
        log.error("cannot bind HTTP on %s:%d: %s (choose another --http-port, or 0 for none)", bind, http_port, exc)
        _close(sockets, context, auth)
        store.close()
        return EXIT_BIND
    try:
        cluster.join()
    except MartinetError as exc:
        log.error("cannot start: %s", exc.message)
        _close(sockets, context, auth, http)
        store.close()
        return EXIT_CONFIG

    # Before "serving" is logged: a stop asked for from then on (what a supervisor reads) is a clean stop.
    stopping = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, stopping.set) for sig in _STOP_SIGNALS]
    log.info(
        "martinet %s serving as %s: clients on %s:%d, workers on %s:%d, status on %s:%d, database %s "
        "(durability %s), tz %s",
        __version__,
        server_id,
        bind,
        client_port,
        bind,
        worker_port,
        bind,
        status_port,
        redact(db_url),
        durability,
        tzinfo,
    )
    if os.environ.get(clock.ENV):
        log.warning(
            "%s=%s is set: the scheduling clock started there, %+.0f s off the system clock (for tests only)",
            clock.ENV,
            os.environ[clock.ENV],
            scheduling.offset,
        )
    if http is not None:
        log.info(
            "dashboard, HTTP API and /metrics on http://%s:%d/ (%s)",
            bind,
            http_port,
            "token" if http_token else "open: no token",
        )
    if auth is None:
        log.info("no keys: anyone who can reach the ports can use them (%s)", "--insecure" if insecure else "loopback")
    else:
        log.info("CURVE on every port: client keys in %s, worker keys in %s", client_keys, worker_keys)
        gevent.signal_handler(signal.SIGHUP, auth.reload)
    log.info(
        "task defaults: retries %d, retry delay %g s doubling up to %g s, timeout %s",
        defaults["retries"],
        defaults["retry_delay"],
        retry_delay_max,
        "none" if defaults["timeout"] is None else f"{defaults['timeout']:g} s",
    )
    log.info("limits (running at once, starts per interval): %s", bounds.describe())
    loops = {
        name: gevent.spawn(forever, loop_once, name, stopping)
        for name, loop_once in (
            ("client endpoint", endpoint.loop_once),
            ("scheduler", scheduler.loop_once),
            ("dispatcher", broker.dispatch_once),
            ("broker", broker.receive_once),
            ("heartbeat", broker.heartbeat_once),
            ("status sink", sink.loop_once),
            ("cluster", cluster.beat_once),
            ("retention", Retention(store, keep_succeeded=keep_succeeded, keep_failed=keep_failed).loop_once),
        )
    }
    listener = Listener(db_url, cluster.hear, on_gap=cluster.caught_up) if store.pool.dialect.notify else None
    if listener is not None:
        loops["listener"] = gevent.spawn(forever, listener.loop_once, "listener", stopping)
    broker.wake()

    stopping.wait()
    # The stop is bounded: a second signal, while stopping or as the process exits, changes nothing.
    for handler in handlers:
        handler.cancel()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopping: no new requests or dispatches; writing the status events in hand")
    if http is not None:  # its requests in progress end first, and none begins
        http.stop(timeout=STOP_TIMEOUT)
    _stop(loops, store, sink, cluster)
    if listener is not None:
        listener.close()
    _close(sockets, context, auth)
    if alone is not None:  # last: the store is closed, another server may have the file
        alone.close()
    log.info("stopped")
    return EXIT_OK


def _stop(loops: dict[str, gevent.Greenlet], store: Store, sink: StatusSink, cluster: Cluster) -> None:
    """End the loops while none of them is inside the store, then write the events in hand, end this
    server's lease and close the store.

    Each step waits at most STOP_TIMEOUT. A loop still inside the store by then is killed where
    it is (which may break the connection: the last write opens a fresh one); one that does not
    end is named in the log and left behind.
    """
    with store.exclusive(STOP_TIMEOUT) as alone:
        if not alone:
            log.warning("a loop is still inside the store after %g s: stopping the loops there", STOP_TIMEOUT)
        _kill(loops)
    with store.exclusive(STOP_TIMEOUT) as alone:
        if not alone:
            log.error(_UNWRITTEN, f"the store is still in use after {STOP_TIMEOUT:g} s")
            return
        _flush(sink)
        try:
            cluster.leave()
        except MartinetError as exc:  # the lease runs out on its own
            log.warning("could not end this server's lease: %s", exc.message)
        store.close()


def _kill(loops: dict[str, gevent.Greenlet]) -> None:
    """Kill the loops and wait at most STOP_TIMEOUT for them to end; name those that do not."""
    gevent.killall(list(loops.values()), block=False)
    gevent.joinall(list(loops.values()), timeout=STOP_TIMEOUT)
    left = [name for name, greenlet in loops.items() if not greenlet.dead]
    if left:
        log.error("did not stop within %g s, left behind: %s", STOP_TIMEOUT, ", ".join(left))


def _flush(sink: StatusSink) -> None:
    """Write the status events in hand, taking at most STOP_TIMEOUT."""
    timer = gevent.Timeout.start_new(STOP_TIMEOUT)
    try:
        sink.flush()
    except (gevent.Timeout, MartinetError) as exc:
        # The timeout may come out as a database error: psycopg2 closes a connection interrupted in a query.
        if timer.pending and isinstance(exc, MartinetError):
            log.error(_UNWRITTEN, exc.message)
        else:
            log.error(_UNWRITTEN, f"not done within {STOP_TIMEOUT:g} s")
    finally:
        timer.close()


def _task_defaults(retries: int, retry_delay: float, timeout: float | None, retry_delay_max: float) -> dict:
    """The options a task gets when it gives none, checked like a client's; ConfigError if unusable."""
    if not isinstance(retry_delay_max, (int, float)) or not retry_delay_max >= 0:
        raise ConfigError(f"the retry delay cap must be a number of seconds >= 0, got {retry_delay_max!r}")
    try:
        return protocol.check_options(
            {"retries": retries, "retry_delay": retry_delay, "timeout": timeout, "priority": config.DEFAULT_PRIORITY}
        )
    except MartinetError as exc:
        raise ConfigError(f"bad task default: {exc.message}") from None


def _serve_alone(db_url: str) -> IO[str] | None:
    """On SQLite, a lock beside the database file, held while this server runs; ConfigError if another holds it.

    SQLite takes one server: two would each think they own every running task. flock, not fcntl's
    locks: those are SQLite's own, and closing any descriptor of the file would drop them.
    """
    path = db_url.removeprefix("sqlite:///")
    if path == db_url or path == ":memory:":  # not SQLite, or a database no other process can open
        return None
    try:
        lock = open(f"{path}.lock", "a+")  # noqa: SIM115 - held open for the life of the server
    except OSError as exc:
        raise ConfigError(f"cannot create {path}.lock beside the SQLite database: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(
            f"the SQLite database {path} is served by another martinet serve (pid {holder}): SQLite takes one "
            "server at a time; stop that one, or serve several from PostgreSQL (--db postgresql://...)"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _server_keys(secret_key: str | None, client_keys: str | None, worker_keys: str | None) -> tuple[bytes, dict] | None:
    """The server's secret key and the key directory of each ZAP domain; None without a secret key."""
    if secret_key is None:
        if client_keys or worker_keys:
            raise ConfigError("--client-keys and --worker-keys need --secret-key, the server's own NAME.key_secret")
        return None
    if not client_keys or not worker_keys:
        raise ConfigError(
            "--secret-key needs --client-keys DIR and --worker-keys DIR: the public keys allowed on the client "
            "port, and on the worker and status ports (one DIR may serve both)"
        )
    _, secret = keys.load_secret(secret_key)
    return secret, {CLIENT_DOMAIN: keys.KeyDir(client_keys), WORKER_DOMAIN: keys.KeyDir(worker_keys)}


def _bind(
    context: Any,
    kind: int,
    host: str,
    port: int,
    sockets: list[Any],
    max_bytes: int,
    secret: bytes | None,
    domain: str,
) -> Any:
    socket = context.socket(kind)
    sockets.append(socket)
    if secret is not None:
        security.serve_curve(socket, secret, domain)
    socket.setsockopt(zmq.LINGER, 0)
    # Messages up to twice the limit are read, so that the sockets can answer or log "too large";
    # past that, ZeroMQ drops the connection that sent one, and memory stays bounded.
    socket.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes)
    if kind == zmq.ROUTER:
        # Fail loudly on a send to a peer that left, instead of dropping the message.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A reconnecting worker takes over its routing id from its dead connection.
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    socket.bind(f"tcp://{host}:{port}")
    return socket


def _serve_http(bind: str, port: int, endpoint: ClientEndpoint, access: Access, measured: Metrics) -> WSGIServer | None:
    """The HTTP port's server, started; None when ``port`` is 0. OSError if it cannot bind."""
    if port == 0:
        return None
    routes = [*api.routes(endpoint), *dashboard.routes(access), *metrics.routes(measured)]
    return web.serve(web.WebApp(routes, access, measured.rejected("http")), bind, port)


def _close(sockets: list[Any], context: Any, auth: Authenticator | None, http: WSGIServer | None = None) -> None:
    if http is not None:
        http.stop(timeout=STOP_TIMEOUT)
    for socket in sockets:
        socket.close(linger=0)
    if auth is not None:
        auth.stop()
    context.term()
