"""bench/gpu_check.py --dry-run: the GPU check script runs end to end on a CPU (Triton interpreter, tiny shapes),
so a GPU session's few minutes are not spent discovering a bug in the script itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

from kernel_check import requires_triton

ROOT = Path(__file__).resolve().parents[1]


@requires_triton
def test_gpu_check_script_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "0 failures" in r.stdout
    rows = json.loads(out.read_text())
    kinds = {row["name"].split(",")[0] for row in rows}
    assert kinds == {"conv_cov expand", "conv_cov reduce", "linear_cov", "eig_correction", "self_scores",
                     "pairwise", "precondition", "lowrank"}
    assert all(row["ok"] and row["err"] <= 2 * row["torch_err"] + 1e-5 for row in rows)
    table = r.stdout.splitlines()[-len(rows) - 4:-2]
    assert "| kernel / layer |" in table[0] and "predicted H200 us" in table[0]
    # every row carries bench/roofline.py's prediction for its op and shape: "<fused> (<torch>) | <x>x / <ratio>"
    assert all(line.split("|")[-3].strip()[0].isdigit() and "x /" in line.split("|")[-2] for line in table[2:])
