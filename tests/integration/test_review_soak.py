"""Review of issue 10 (the soak): stopped with SIGTERM or Ctrl-C while a router is paused for its fault, the
soak leaves no process behind. Before, SIGTERM ended it at once: the kernel's SIGTERM (PR_SET_PDEATHSIG)
reached every child, but the router it had stopped with SIGSTOP stayed stopped for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from router_worker.settings import Settings

pytestmark = pytest.mark.integration

DRIVER = textwrap.dedent("""
    import sys
    from rich.console import Console
    from router_worker.bench_soak import SoakConfig, SoakError, command
    from router_worker.settings import load_settings
    cfg = SoakConfig(minutes=0.5, rate=20, fault_every_s=20, warmup_s=2, faults=("router_pause",), drain_s=20)
    try:
        command(load_settings(), cfg, json_out=True, console=Console(), err=Console(stderr=True))
    except SoakError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
""")


def _marked(mark: str, skip: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose environment holds ``mark`` (the soak's children)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in (os.getpid(), skip):
            continue
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                out.append((int(pid), Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]))
        except OSError:
            continue
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_soak_stopped_during_its_router_pause_leaves_no_process(
    settings: Settings, tmp_path: Path, sig: signal.Signals
) -> None:
    mark = f"RW_REVIEW_SOAK_MARK={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env |= {"ROUTER_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "", "ROUTER_LOG_LEVEL": "WARNING",
            mark.split("=")[0]: mark.split("=")[1], "PYTHONUNBUFFERED": "1"}  # fmt: skip
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen: list[str] = []
    try:
        assert driver.stderr is not None
        deadline = time.monotonic() + 120
        for line in driver.stderr:
            seen.append(line)
            if "fault: router_pause" in line:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail("the soak ended before its pause: " + "".join(seen))
        time.sleep(0.5)
        assert any(state == "T" for _, state in _marked(mark, driver.pid)), "no router paused"
        driver.send_signal(sig)
        rest = driver.communicate(timeout=60)[1]
        assert driver.returncode in (1, 130, -2), "".join(seen) + rest
        if sig == signal.SIGTERM:
            assert "stopped by SIGTERM" in rest, rest
        time.sleep(2)
        assert _marked(mark, driver.pid) == [], "processes left behind"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        for pid, state in _marked(mark, driver.pid):  # only what this test started
            os.kill(pid, signal.SIGKILL)
            if state == "T":
                os.kill(pid, signal.SIGCONT)
