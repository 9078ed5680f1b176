"""keys.py: key pairs in ZeroMQ's certificate format, their loading, and directories of allowed public keys."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest
import zmq
import zmq.auth

from conftest import ROOT, martinet_cmd
from martinet_app import keys
from martinet_app.errors import ConfigError
from martinet_app.keys import KeyDir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _replace(path: Path, text: str) -> None:
    """Replace a file at once, as editors and deployment tools do (a new inode)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.rename(path)


# ---------------------------------------------------------------- generate


def test_generate_writes_certificates_zmq_reads(tmp_path: Path) -> None:
    public_path, secret_path = keys.generate("alice", tmp_path)
    assert (public_path, secret_path) == (tmp_path / "alice.key", tmp_path / "alice.key_secret")
    public, none = zmq.auth.load_certificate(public_path)
    assert none is None
    same_public, secret = zmq.auth.load_certificate(secret_path)
    assert same_public == public and zmq.curve_public(secret) == public
    assert keys.load_secret(secret_path) == (public, secret)
    assert keys.load_public(public_path) == keys.load_public(secret_path) == public
    assert _mode(secret_path) == 0o600


def test_generate_makes_two_different_pairs(tmp_path: Path) -> None:
    a, _ = keys.generate("a", tmp_path)
    b, _ = keys.generate("b", tmp_path)
    assert keys.load_public(a) != keys.load_public(b)


def test_secret_file_is_0600_from_its_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode the file has the moment it exists, with a umask that would let anything through."""
    modes: dict[str, int] = {}
    real_open = os.open

    def spying_open(path: os.PathLike, flags: int, mode: int = 0o777, **kwargs: object) -> int:
        fd = real_open(path, flags, mode, **kwargs)
        if flags & os.O_CREAT:
            modes[Path(path).name] = stat.S_IMODE(os.fstat(fd).st_mode)
        return fd

    monkeypatch.setattr(keys.os, "open", spying_open)
    old_umask = os.umask(0)
    try:
        keys.generate("alice", tmp_path)
    finally:
        os.umask(old_umask)
    assert modes == {"alice.key_secret": 0o600, "alice.key": 0o644}


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    public_path, secret_path = keys.generate("alice", tmp_path)
    before = public_path.read_bytes(), secret_path.read_bytes()
    with pytest.raises(ConfigError, match="alice.key exists already"):
        keys.generate("alice", tmp_path)
    assert (public_path.read_bytes(), secret_path.read_bytes()) == before


def test_generate_refuses_when_either_file_exists(tmp_path: Path) -> None:
    (tmp_path / "bob.key_secret").write_text("mine")
    with pytest.raises(ConfigError, match="bob.key_secret exists already"):
        keys.generate("bob", tmp_path)
    assert not (tmp_path / "bob.key").exists()
    (tmp_path / "carol.key").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="carol.key exists already"):
        keys.generate("carol", tmp_path)
    assert not (tmp_path / "carol.key_secret").exists()


def test_generate_makes_the_directory(tmp_path: Path) -> None:
    public_path, _ = keys.generate("w1", tmp_path / "new" / "keys")
    assert public_path.exists()


def test_generate_directory_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        keys.generate("w1", tmp_path / "file")


@pytest.mark.parametrize("name", ["", "a/b", "/abs", ".hidden", "..", "tab\there", "nul\0"])
def test_generate_bad_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="bad key name"):
        keys.generate(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- load_secret, load_public


def test_load_secret_reads_pyzmq_certificates(tmp_path: Path) -> None:
    public_file, secret_file = zmq.auth.create_certificates(tmp_path, "made_by_pyzmq")
    os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert keys.load_secret(secret_file) == (public, secret)
    assert keys.load_public(public_file) == public


def test_load_secret_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key file .*nope.key_secret.*martinet keygen"):
        keys.load_secret(tmp_path / "nope.key_secret")


def test_load_secret_of_a_public_file(tmp_path: Path) -> None:
    public_path, _ = keys.generate("alice", tmp_path)
    with pytest.raises(ConfigError, match=r"alice.key holds no secret key: pass the NAME.key_secret"):
        keys.load_secret(public_path)


def test_load_secret_not_a_certificate(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ConfigError, match="is not a key file: not text"):
        keys.load_secret(garbage)
    with pytest.raises(ConfigError, match="not a regular file"):
        keys.load_secret(tmp_path)


def test_load_secret_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key_secret"
    bad.write_text('curve\n    public-key = "short"\n    secret-key = "%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%"\n')
    with pytest.raises(ConfigError, match="its secret-key is not a CURVE key"):
        keys.load_secret(bad)


def test_load_secret_public_and_secret_disagree(tmp_path: Path) -> None:
    _, secret_path = keys.generate("alice", tmp_path)
    other = keys.load_public(keys.generate("bob", tmp_path)[0]).decode()
    mine = keys.load_public(secret_path).decode()
    secret_path.write_text(secret_path.read_text().replace(mine, other))
    with pytest.raises(ConfigError, match="its public-key is not the one of its secret-key"):
        keys.load_secret(secret_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_secret_unreadable(tmp_path: Path) -> None:
    _, secret_path = keys.generate("alice", tmp_path)
    secret_path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read the key file .*Permission denied"):
        keys.load_secret(secret_path)


def test_load_secret_warns_when_others_can_read_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, secret_path = keys.generate("alice", tmp_path)
    with caplog.at_level(logging.WARNING, logger="martinet_app.keys"):
        keys.load_secret(secret_path)
        assert caplog.records == []
        secret_path.chmod(0o640)
        keys.load_secret(secret_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{secret_path} can be read by other users (mode 640): run chmod 600 {secret_path}"
    ]


def test_load_public_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key file"):
        keys.load_public(tmp_path / "missing.key")
    empty = tmp_path / "empty.key"
    empty.write_text("# nothing\nmetadata\ncurve\n")
    with pytest.raises(ConfigError, match="empty.key holds no public key"):
        keys.load_public(empty)
    outside = tmp_path / "outside.key"
    outside.write_text('public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"\n')
    with pytest.raises(ConfigError, match="holds no public key"):
        keys.load_public(outside)
    big = tmp_path / "big.key"
    big.write_bytes(b"#" * 100_000)
    with pytest.raises(ConfigError, match="larger than"):
        keys.load_public(big)


def test_load_public_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        keys.load_public(fifo)


# ---------------------------------------------------------------- KeyDir


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "client-keys"
    directory.mkdir()
    for name in ("alice", "bob"):
        _new_pair(tmp_path, name).rename(directory / f"{name}.key")
    return directory


def _new_pair(tmp_path: Path, name: str) -> Path:
    """A new pair made away from the key directory; returns its public file."""
    return keys.generate(name, tmp_path / "pairs")[0]


def _public(directory: Path, name: str) -> bytes:
    return keys.load_public(directory / f"{name}.key")


def test_keydir_names_the_keys(key_dir: Path) -> None:
    allowed = KeyDir(key_dir)
    alice = _public(key_dir, "alice")
    assert allowed.names() == ["alice", "bob"]
    assert allowed.name(alice) == allowed.name(alice.decode()) == "alice"
    assert allowed.name(b"0" * 40) is None
    assert allowed.name(b"\xff" * 40) is None
    assert allowed.refresh() is False


def test_keydir_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key directory .*martinet keygen NAME --dir DIR"):
        KeyDir(tmp_path / "missing")
    (tmp_path / "ignored.key_secret").write_text("")
    with pytest.raises(ConfigError, match=r"holds no public key \(\*.key\): .*martinet keygen NAME --dir DIR"):
        KeyDir(tmp_path)


def test_keydir_of_bad_files_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bad.key").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="none of its 1 is usable"):
        KeyDir(tmp_path)
    assert "left out bad.key: " in caplog.text


def test_keydir_refresh_sees_a_key_added(key_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    allowed = KeyDir(key_dir)
    _new_pair(tmp_path, "carol").rename(key_dir / "carol.key")
    with caplog.at_level(logging.INFO, logger="martinet_app.keys"):
        assert allowed.refresh() is True
    assert allowed.name(_public(key_dir, "carol")) == "carol"
    assert f"key directory {key_dir}: added carol; 3 key(s) allowed" in caplog.text
    assert allowed.refresh() is False


def test_keydir_refresh_sees_a_key_removed(key_dir: Path) -> None:
    allowed = KeyDir(key_dir)
    alice = _public(key_dir, "alice")
    (key_dir / "alice.key").unlink()
    assert allowed.refresh() is True
    assert allowed.name(alice) is None
    assert allowed.names() == ["bob"]


def test_keydir_refresh_sees_a_key_modified(key_dir: Path, tmp_path: Path) -> None:
    allowed = KeyDir(key_dir)
    alice = _public(key_dir, "alice")
    public_path = _new_pair(tmp_path, "alice2")
    _replace(key_dir / "alice.key", public_path.read_text())
    assert allowed.refresh() is True
    assert allowed.name(alice) is None
    assert allowed.name(keys.load_public(public_path)) == "alice"


def test_keydir_refresh_sees_a_key_rewritten_in_place(key_dir: Path, tmp_path: Path) -> None:
    allowed = KeyDir(key_dir)
    bob = key_dir / "bob.key"
    before = bob.stat()
    public_path = _new_pair(tmp_path, "bob2")
    bob.write_text(public_path.read_text())
    # Same inode and size: only the times tell. A rewrite within the file system's clock tick
    # keeps them; any later edit moves them on, as this one does by hand.
    os.utime(bob, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert allowed.refresh() is True
    assert allowed.name(keys.load_public(public_path)) == "bob"


def test_keydir_refresh_reads_only_changed_files(key_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = KeyDir(key_dir)
    read: list[str] = []
    real = keys.load_public
    monkeypatch.setattr(keys, "load_public", lambda path: read.append(Path(path).name) or real(path))
    assert allowed.refresh() is False
    assert read == []
    os.utime(key_dir / "bob.key", ns=(0, 10**18))
    assert allowed.refresh() is False  # the same key
    assert read == ["bob.key"]


def test_keydir_leaves_out_bad_files(key_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    allowed = KeyDir(key_dir)
    alice = _public(key_dir, "alice")
    with caplog.at_level(logging.WARNING, logger="martinet_app.keys"):
        _replace(key_dir / "alice.key", "curve\n    public-key = 'not a key'\n")
        (key_dir / "dir.key").mkdir()
        (key_dir / "dangling.key").symlink_to(key_dir / "nowhere")
        (key_dir / "huge.key").write_bytes(b" " * 100_000)
        assert allowed.refresh() is True
        assert allowed.refresh() is False
    assert allowed.name(alice) is None
    assert allowed.names() == ["bob"]
    left_out = sorted(r.getMessage().split(": ")[1] for r in caplog.records)
    assert left_out == ["left out alice.key", "left out dangling.key", "left out dir.key", "left out huge.key"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_keydir_leaves_out_an_unreadable_file(key_dir: Path) -> None:
    allowed = KeyDir(key_dir)
    (key_dir / "alice.key").chmod(0)
    assert allowed.refresh() is True
    assert allowed.names() == ["bob"]
    (key_dir / "alice.key").chmod(0o644)
    assert allowed.refresh() is True
    assert allowed.names() == ["alice", "bob"]


def test_keydir_ignores_dot_files_and_secret_files(key_dir: Path, tmp_path: Path) -> None:
    allowed = KeyDir(key_dir)
    public_path, secret_path = keys.generate("dave", tmp_path / "pairs")
    (key_dir / ".#dave.key").write_text(public_path.read_text())
    (key_dir / "dave.key_secret").write_text(secret_path.read_text())
    assert allowed.refresh() is False
    assert allowed.names() == ["alice", "bob"]


def test_keydir_duplicate_key_keeps_one_name(key_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (key_dir / "zed.key").write_text((key_dir / "alice.key").read_text())
    allowed = KeyDir(key_dir)
    assert allowed.names() == ["alice", "bob"]
    assert "alice and zed hold the same key; it is named alice" in caplog.text


def test_keydir_directory_gone_allows_nothing(key_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    allowed = KeyDir(key_dir)
    moved = key_dir.with_name("moved")
    key_dir.rename(moved)
    assert allowed.refresh() is True
    assert allowed.names() == []
    assert allowed.refresh() is False
    assert caplog.text.count("cannot list the key directory") == 1
    moved.rename(key_dir)
    assert allowed.refresh() is True
    assert allowed.names() == ["alice", "bob"]


# ---------------------------------------------------------------- martinet keygen


def _keygen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(martinet_cmd("keygen", *args), cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_keygen_command(tmp_path: Path) -> None:
    done = _keygen("server", "--dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    public_path, secret_path = tmp_path / "keys" / "server.key", tmp_path / "keys" / "server.key_secret"
    assert done.stdout.splitlines()[:2] == [f"public key: {public_path}", f"secret key: {secret_path}"]
    assert "--client-keys or --worker-keys" in done.stdout and "--server-key" in done.stdout
    assert _mode(secret_path) == 0o600
    assert keys.load_secret(secret_path)[0] == keys.load_public(public_path)


def test_keygen_command_refuses_existing_files(tmp_path: Path) -> None:
    assert _keygen("alice", "--dir", str(tmp_path)).returncode == 0
    before = (tmp_path / "alice.key_secret").read_bytes()
    done = _keygen("alice", "--dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == (
        f"martinet: error: {tmp_path / 'alice.key'} exists already: a key is never overwritten; "
        "remove it first, or choose another NAME\n"
    )
    assert (tmp_path / "alice.key_secret").read_bytes() == before


def test_keygen_command_bad_name(tmp_path: Path) -> None:
    done = _keygen("../alice", "--dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("martinet: error: bad key name '../alice'")
