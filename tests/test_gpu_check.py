"""benchmarks/gpu_check.py --smoke: the GPU check's every step, tiny on CPU, in a process where
faiss, polars and Dask cannot be imported (as on the lent GPU image), writing its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The lent image has torch, transformers, sentence-transformers and pyarrow, none of these.
WITHOUT = ("faiss", "polars", "dask", "distributed")
RUN = (
    "import runpy, sys\n"
    "for name in {without!r}: sys.modules[name] = None  # import of it fails\n"
    "sys.argv = ['gpu_check.py', '--smoke', '--out', {out!r}]\n"
    "runpy.run_path({script!r}, run_name='__main__')\n"
)


def test_smoke_runs_without_faiss_polars_dask_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = RUN.format(
        without=WITHOUT, out=str(out), script=str(REPO / "benchmarks" / "gpu_check.py")
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["smoke"] and got["environment"]["device"] == "cpu"
    assert set(WITHOUT) <= set(got["environment"]["absent"])
    assert got["embed"]["curate_texts_per_s"] > 0 and got["embed"]["st_texts_per_s"] > 0
    assert got["mine"]["top10_ids_equal_share"] >= 0.99  # both searches exact in fp32 on CPU
    assert got["mine"]["large_queries_per_s"] > 0
    assert got["train"]["rows"] == 16 and got["train"]["curate_loss"] > 0
    assert got["train"]["st_loss"] > 0
    assert set(got["ratios"]) == {"embed", "mine", "train"} and all(
        r > 0 for r in got["ratios"].values()
    )
    assert "ratios (curate / sentence-transformers)" in proc.stdout
