"""``resd.mps.mps_active``: an MPS control daemon is its ``control`` socket (or FIFO)
in the pipe directory, live. Real sockets under a temporary root; short paths,
since a Unix socket's path is limited to 108 bytes."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from resd.mps import DEFAULT_PIPE_DIRECTORY, control_path, mps_active


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / DEFAULT_PIPE_DIRECTORY.lstrip("/")).mkdir(parents=True)
    return tmp_path


def bind(path: Path, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if listen:
        sock.listen()
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def test_default_pipe_directory(root: Path, sockets: list[socket.socket]) -> None:
    assert control_path({}, root) == root / "tmp/nvidia-mps/control"
    assert not mps_active({}, root)  # the directory alone is not a daemon
    sockets.append(bind(control_path({}, root)))
    assert mps_active({}, root)


def test_pipe_directory_from_the_environment(root: Path, sockets: list[socket.socket]) -> None:
    env = {"CUDA_MPS_PIPE_DIRECTORY": "/run/mps"}
    (root / "run/mps").mkdir(parents=True)
    sockets.append(bind(root / "tmp/nvidia-mps/control"))  # the default one does not count
    assert not mps_active(env, root)
    sockets.append(bind(root / "run/mps/control"))
    assert mps_active(env, root)
    assert mps_active({"CUDA_MPS_PIPE_DIRECTORY": ""}, root)  # empty: the default


def test_a_stale_socket_is_no_daemon(root: Path, sockets: list[socket.socket]) -> None:
    """A daemon that died leaves its socket behind; nobody accepts on it."""
    sockets.append(bind(control_path({}, root), listen=False))
    assert not mps_active({}, root)


def test_a_fifo_counts(root: Path) -> None:
    os.mkfifo(control_path({}, root))
    assert mps_active({}, root)


def test_a_plain_file_or_directory_does_not(root: Path) -> None:
    path = control_path({}, root)
    path.write_text("")
    assert not mps_active({}, root)
    path.unlink()
    path.mkdir()
    assert not mps_active({}, root)


def test_no_pipe_directory(tmp_path: Path) -> None:
    assert not mps_active({}, tmp_path)
    assert not mps_active({"CUDA_MPS_PIPE_DIRECTORY": "/nowhere"}, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root connects whatever the mode")
def test_a_socket_we_may_not_use_still_counts(root: Path, sockets: list[socket.socket]) -> None:
    """A root daemon's socket may be closed to resd's user, yet it serves the host."""
    path = control_path({}, root)
    sockets.append(bind(path))
    path.chmod(0)
    assert mps_active({}, root)
