"""CURVE key files: make a pair, read one, and follow a directory of the public keys allowed in.

The files are ZeroMQ certificates (ZPL text, the format czmq writes and ``zmq.auth.load_certificate``
reads): ``NAME.key`` holds the public key, ``NAME.key_secret`` the public and the secret one, both
z85. The public file is the one to give away; the secret one never leaves its machine.
"""

from __future__ import annotations

import datetime
import logging
import os
import stat
import struct
from pathlib import Path

import zmq
from zmq.utils import z85

from .errors import ConfigError

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: A certificate is a few hundred bytes: a larger file is not one, and is not read whole.
_MAX_FILE_BYTES = 64 * 1024
_HOW_TO_MAKE = "make a pair with 'martinet keygen NAME --dir DIR'"
_PUBLIC_ADVICE = (
    "#   Public: give it to the server (its --client-keys or --worker-keys directory),",
    "#   or, if it is the server's own key, to clients and workers (--server-key).",
)
_SECRET_ADVICE = (
    "#   SECRET: keep it on this machine, readable only by its user (mode 0600).",
    "#   Never copy it: {name}.key is the half to give away.",
)


def generate(name: str, directory: str | Path) -> tuple[Path, Path]:
    """Write a new key pair, ``NAME.key`` and ``NAME.key_secret`` (mode 0600), in ``directory`` (made if missing).

    Returns their paths. ConfigError if NAME is not a plain file name, a file is there already
    (nothing is overwritten), or the files cannot be written.
    """
    _check_name(name)
    directory = Path(directory)
    public_path = directory / (name + PUBLIC_SUFFIX)
    secret_path = directory / (name + SECRET_SUFFIX)
    _make_directory(directory)
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise _exists(path)
    public, secret = zmq.curve_keypair()
    _create(secret_path, _certificate("Secret", _SECRET_ADVICE, name, public, secret), 0o600)
    try:
        _create(public_path, _certificate("Public", _PUBLIC_ADVICE, name, public), 0o644)
    except ConfigError:
        secret_path.unlink()
        raise
    return public_path, secret_path


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """The (public, secret) z85 keys of a ``NAME.key_secret`` file; warns if other users can read it."""
    path = Path(path)
    fields, mode = _read(path)
    secret = _key(path, fields, "secret-key")
    if secret is None:
        raise ConfigError(
            f"{path} holds no secret key: pass the NAME{SECRET_SUFFIX} file martinet keygen made "
            f"(NAME{PUBLIC_SUFFIX} is its public half, for the other side)"
        )
    public = zmq.curve_public(secret)
    written = _key(path, fields, "public-key")
    if written is not None and written != public:
        raise ConfigError(f"{path}: its public-key is not the one of its secret-key: {_HOW_TO_MAKE} anew")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s can be read by other users (mode %03o): run chmod 600 %s", path, mode & 0o777, path)
    return public, secret


def load_public(path: str | Path) -> bytes:
    """The public z85 key of a ``NAME.key`` (or ``NAME.key_secret``) file."""
    path = Path(path)
    fields, _mode = _read(path)
    public = _key(path, fields, "public-key")
    if public is None:
        raise ConfigError(f"{path} holds no public key: pass a NAME{PUBLIC_SUFFIX} file made by martinet keygen")
    return public


class KeyDir:
    """The public keys allowed by one directory: every ``NAME.key`` file in it, named by NAME.

    :meth:`name` is a dict lookup; only :meth:`refresh` touches the disk.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"no key directory {self.path}: create it and put public keys in it ({_HOW_TO_MAKE})")
        #: File name -> (its stat signature, its key or None if unusable): what the last refresh read.
        self._files: dict[str, tuple[tuple[int, ...], bytes | None]] = {}
        #: Public key (z85 text) -> name.
        self._names: dict[str, str] = {}
        self._scan_error: str | None = None
        self.refresh()
        if self._scan_error is not None:
            raise ConfigError(self._scan_error)
        if not self._names:
            unusable = f" (none of its {len(self._files)} is usable: see the warnings logged)" if self._files else ""
            raise ConfigError(
                f"the key directory {self.path} holds no public key (*{PUBLIC_SUFFIX}){unusable}: {_HOW_TO_MAKE} "
                f"where the client or worker runs, and copy its NAME{PUBLIC_SUFFIX} into {self.path}"
            )

    def refresh(self) -> bool:
        """Re-read the directory if its listing or a file's stat changed; whether the set of keys changed.

        Never raises: a file that cannot be read or is not a key is logged and left out, and a
        directory that cannot be listed allows no key until it can be.
        """
        listing = self._listing()
        if listing == {name: signature for name, (signature, _key) in self._files.items()}:
            return False
        self._files = {name: self._file(name, signature) for name, signature in listing.items()}
        names = self._by_key()
        if names == self._names:
            return False
        self._log_change(names)
        self._names = names
        return True

    def name(self, public_z85: bytes | str) -> str | None:
        """The name of this public key (z85) if the directory allows it now, else None."""
        if isinstance(public_z85, bytes):
            public_z85 = public_z85.decode("ascii", "replace")
        return self._names.get(public_z85)

    def names(self) -> list[str]:
        """The names of the keys allowed now, sorted."""
        return sorted(self._names.values())

    def _listing(self) -> dict[str, tuple[int, ...]]:
        """Every ``*.key`` file name in the directory with its stat signature ((): cannot be stat'ed)."""
        try:
            entries = [entry.name for entry in os.scandir(self.path)]
        except OSError as exc:
            message = (
                f"cannot list the key directory {self.path} ({exc.strerror}): no key in it is allowed until it can be"
            )
            if message != self._scan_error:
                log.error("%s", message)
            self._scan_error = message
            return {}
        self._scan_error = None
        # Dot files are editors' temporary and lock files (emacs's .#NAME.key), never keys.
        return {
            name: _signature(self.path / name)
            for name in entries
            if name.endswith(PUBLIC_SUFFIX) and not name.startswith(".")
        }

    def _file(self, name: str, signature: tuple[int, ...]) -> tuple[tuple[int, ...], bytes | None]:
        """The file's key, read again only if its signature changed since the last refresh."""
        known = self._files.get(name)
        if known is not None and known[0] == signature:
            return known
        try:
            return signature, load_public(self.path / name)
        except ConfigError as exc:
            log.warning("key directory %s: left out %s: %s", self.path, name, exc.message)
            return signature, None

    def _by_key(self) -> dict[str, str]:
        """Public key (z85 text) -> name, from the files read; a key in two files keeps the first name."""
        names: dict[str, str] = {}
        for file_name in sorted(self._files):
            key = self._files[file_name][1]
            if key is None:
                continue
            name = file_name.removesuffix(PUBLIC_SUFFIX)
            first = names.setdefault(key.decode("ascii"), name)
            if first != name:
                log.warning(
                    "key directory %s: %s and %s hold the same key; it is named %s", self.path, first, name, first
                )
        return names

    def _log_change(self, names: dict[str, str]) -> None:
        before = {name: key for key, name in self._names.items()}
        after = {name: key for key, name in names.items()}
        changes = (
            ("added", sorted(after.keys() - before.keys())),
            ("removed", sorted(before.keys() - after.keys())),
            ("new key for", sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
        )
        described = "; ".join(f"{what} {', '.join(items)}" for what, items in changes if items)
        log.info("key directory %s: %s; %d key(s) allowed", self.path, described, len(after))


def _signature(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced, rewritten or has its mode changed (ctime), cheaply."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_name(name: str) -> None:
    separator = any(sep and sep in name for sep in (os.sep, os.altsep))
    if not name or name.startswith(".") or separator or not name.isprintable():
        raise ConfigError(
            f"bad key name {name!r}: use a plain file name such as 'server' or 'worker-1' "
            "(not empty, no path separator, no leading dot)"
        )


def _make_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory: pass --dir a directory (made if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the key directory {directory}: {exc.strerror}") from None


def _exists(path: Path) -> ConfigError:
    return ConfigError(f"{path} exists already: a key is never overwritten; remove it first, or choose another NAME")


def _certificate(kind: str, advice: tuple[str, ...], name: str, public: bytes, secret: bytes | None = None) -> str:
    """A ZPL certificate, as czmq and pyzmq write them."""
    made = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"#   ZeroMQ CURVE {kind} Certificate, made by martinet keygen on {made}"]
    lines += [line.format(name=name) for line in advice]
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _create(path: Path, text: str, mode: int) -> None:
    """Write a new file created with ``mode`` (never wider, even for a moment); ConfigError if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with open(fd, "w", encoding="ascii") as file:
            file.write(text)
    except OSError as exc:
        path.unlink()
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def _read(path: Path) -> tuple[dict[str, str], int]:
    """The fields of a certificate's ``curve`` section and the file's mode; ConfigError if it is no certificate."""
    try:
        # O_NONBLOCK: opening a FIFO put where a key belongs must not hang the server.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"no key file {path}: check the path, or {_HOW_TO_MAKE}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path} is not a key file: not a regular file")
        with open(fd, "rb", closefd=False) as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"{path} is not a key file: larger than {_MAX_FILE_BYTES} bytes")
    try:
        return _curve_fields(data.decode("utf-8")), mode
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a key file: not text") from None


def _curve_fields(text: str) -> dict[str, str]:
    """``name = value`` pairs under the top-level ``curve`` section of ZPL text, values unquoted."""
    fields: dict[str, str] = {}
    section = None
    for line in text.splitlines():
        content = line.strip()
        if not content or content.startswith("#"):
            continue
        if not line[0].isspace():
            section = content
        elif section == "curve" and "=" in content:
            name, _, value = content.partition("=")
            fields[name.strip()] = value.strip().strip("\"'")
    return fields


def _key(path: Path, fields: dict[str, str], field: str) -> bytes | None:
    """The z85 key in ``field`` (None if absent); ConfigError if it is not a CURVE key."""
    value = fields.get(field)
    if value is None:
        return None
    try:
        valid = len(value) == 40 and len(z85.decode(value)) == 32
    except (KeyError, ValueError, struct.error):  # a character outside z85, or a group past 2**32
        valid = False
    if not valid:
        raise ConfigError(f"{path}: its {field} is not a CURVE key (40 z85 characters): {_HOW_TO_MAKE} anew")
    return value.encode("ascii")
