"""Shared fixtures: tiny random-init models and small generated data, so the default
suite runs in minutes on two CPU cores."""

from __future__ import annotations

import os
from typing import Any

import pytest
import timm
import torch

# Never let a test wait on the network: hub look-ups fail at once instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _keep_process_locale():
    """ITK's DICOM code (GDCM) may switch the C locale to "C"; then every later subprocess
    in this pytest process decodes its output as ASCII. Put the locale back after each test."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


def make_tiny_vit(**overrides: Any) -> torch.nn.Module:
    """A 2-block, 48-wide ViT on 32x32 images (8x8 patches -> 16 patch tokens)."""
    kwargs: dict[str, Any] = dict(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5
    )
    kwargs.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)


@pytest.fixture
def tiny_vit():
    return make_tiny_vit


def _drop_file_permission_override() -> None:
    """Remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this process (Linux capset(2)):
    a root process then meets file modes as any owner does (a 0o555 folder is read-only for it),
    while it still owns the test's files. Irreversible: call it in a child process only."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    mask = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    data[0].effective &= mask
    data[0].permitted &= mask
    data[0].inheritable &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


@pytest.fixture
def as_unprivileged():
    """``as_unprivileged(check)`` runs ``check()`` where file modes bind: directly for a normal
    user; as root in a forked child without the capabilities that let root ignore them (so the
    read-only-folder tests run in root containers too). A failure in the child fails the test
    with the child's traceback."""
    import sys
    import traceback

    def run(check) -> None:
        if os.name != "posix" or os.geteuid() != 0:
            check()
            return
        if not sys.platform.startswith("linux"):
            pytest.skip("dropping root's file-permission override needs Linux capabilities")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                os.close(read_end)
                torch.set_num_threads(1)
                _drop_file_permission_override()
                check()
                status = 0
            except BaseException:  # noqa: BLE001 - everything goes back to the parent
                os.write(write_end, traceback.format_exc().encode("utf-8", "replace"))
            finally:
                os._exit(status)
        os.close(write_end)
        # A child that hangs (a thread pool after fork) is killed rather than waited on forever;
        # its report (a traceback, far below the pipe's buffer) is read once it has exited.
        import time

        deadline = time.monotonic() + 300
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                os.close(read_end)
                pytest.fail("the unprivileged check did not finish in 300 s and was killed", pytrace=False)
            time.sleep(0.05)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode("utf-8", "replace")
        if os.waitstatus_to_exitcode(status) != 0:
            pytest.fail(f"the unprivileged check failed:\n{report}", pytrace=False)

    return run
