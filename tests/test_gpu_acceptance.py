"""`python bench/gpu_acceptance.py --dry-run`: the whole GPU acceptance plan on the CPU at toy size, as CI
runs it. Besides exit status 0, the DeepSpeed ZeRO-2 bf16 run must have exported fp32 master weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_group, subprocess_env

pytestmark = [pytest.mark.slow]


def test_gpu_acceptance_dry_run_passes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "acceptance.json"
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS")  # the in-process parts use the machine's cores, as a user's run would
    script = str(REPO / "bench" / "gpu_acceptance.py")
    done = run_group([sys.executable, script, "--dry-run", "--json", str(out)], timeout=900, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    report = json.loads(out.read_text())
    parts = {row["part"] for row in report["rows"]}
    assert parts == {"gpu_tests", "step_bf16", "step_fp16", "demo", "deepspeed_zero2", "chunked_big_batch"}
    assert all(row["ok"] for row in report["rows"])
    (fp32,) = [r for r in report["rows"] if r["name"].startswith("exported tensors fp32")]
    assert fp32["value"].startswith("True / ")
    demo_steps = [r for r in report["rows"] if r["part"] == "demo" and r["name"] == "optimizer steps"]
    assert demo_steps[0]["value"] == 3
    assert "| part" not in done.stdout and "PASSED" in done.stdout
