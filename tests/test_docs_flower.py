"""The Flower page's copy-paste loopback block, run as written: 3 silos from 3 files, TLS, node authentication.

The block is taken from docs/flower.md verbatim and run by bash with its two variables (`FL`, `PORT`) set to a
temporary folder and a free port; its result must equal `fedlora run` of the `run.yaml` it wrote, bit for bit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr is not installed")

from test_flower import assert_same_run  # noqa: E402

from fedlora.runtime.flower_cli import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def loopback_block() -> str:
    text = (ROOT / "docs" / "flower.md").read_text()
    start = text.index("**Rehearse it on one machine**")
    return re.search(r"```\n(.*?)```", text[start:], re.S).group(1)


def test_flower_docs_loopback_block_runs_and_equals_in_process(tmp_path):
    block = loopback_block()
    assert "--node-auth" in block and "--data $FL/silos/client_$i.csv" in block and "--root-certificates" in block
    env = {**os.environ, "FL": str(tmp_path / "fl"), "PORT": str(free_port()), "HF_HUB_OFFLINE": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    log = tmp_path / "block.log"
    with open(log, "wb") as out:  # a file, not a pipe: Flower's helper processes may outlive the block
        p = subprocess.Popen(["bash", "-e", "-c", block], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            code = p.wait(timeout=540)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever the block's `kill` left behind
            except ProcessLookupError:
                pass
    output = log.read_text(errors="replace")[-6000:]
    assert code == 0, output
    run = tmp_path / "fl" / "run"
    assert (run / "summary.json").is_file(), output
    sim = tmp_path / "sim"
    r = subprocess.run(["fedlora", "run", str(tmp_path / "fl" / "silos" / "run.yaml"), "--out", str(sim)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(run, sim)
