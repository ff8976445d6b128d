"""Moving code between modules must not move a byte: the shards, the forbidden pairs, the manifest
(minus what holds a time, a path or a machine fact) and the trained weights of two small runs are
compared with hashes recorded before the layout changed (tests/data/layout-identity.json).

Float kernels differ by CPU (AVX2 vs AVX512 BLAS paths; ``embed.dtype: auto`` picks bf16 only
where the CPU has it), so the hashes are recorded per CPU class (``cpu_class()``); on a class with
no record the tests skip and say how to record one, from a commit whose output is meant to be
unchanged.

Each run's config is recorded whole (every key, defaults included), so a later change of a default
changes neither run. Record again only for a change that is meant to change the output:
``.venv/bin/python tests/test_layout_identity.py --record``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script (--record)
    sys.path.insert(0, str(HERE.parent))
RECORD = HERE / "data" / "layout-identity.json"

# Keys of the manifest's config that name this machine's folders, not the run.
PATH_KEYS = (("output_dir",), ("cache_dir",), ("data", "path"), ("embed", "model"))
# The demo config with a two-step train; the Cranfield slice as the reliability tests run it.
DEMO_OVERRIDES = ["train.max_steps=2", "train.warmup_steps=1", "eval.enabled=false",
                  "cluster.workers=in_process"]
CRANFIELD_OVERRIDES = {"train": {"enabled": True, "max_steps": 2, "warmup_steps": 1,
                                 "max_length": 32, "checkpoint_every": 100},
                       "cluster": {"workers": "in_process", "n_workers": None,
                                   "threads_per_worker": None}}  # fmt: skip


# Settings added after the records whose default is not what the recorded runs did: a record
# without the key runs with this value (the behaviour it was recorded with).
BEFORE_THE_KEY = {("data", "train_positives"): "all"}


def _drop(tree: dict, keys: tuple[str, ...]) -> None:
    node = tree
    for key in keys[:-1]:
        node = node.get(key, {})
    node.pop(keys[-1], None)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _prune(tree: dict, shape: dict) -> dict:
    """``tree`` with only the keys ``shape`` has: a setting added after the record runs at its
    default here, so adding one is not a change of output."""
    return {k: _prune(v, shape[k]) if isinstance(v, dict) and isinstance(shape[k], dict) else v
            for k, v in tree.items() if k in shape}


def output_hashes(out: Path, folders: dict[str, str], shape: dict | None = None) -> dict[str, str]:
    """sha256 of every shard file, forbidden.parquet, the normalised manifest and the weights.
    ``folders``: this machine's paths (model, data) -> the placeholder they hash as; ``shape``:
    the recorded config, whose keys the manifest's config is cut to."""
    from curate.batch.shards import MANIFEST

    got = {p.name: _sha(p.read_bytes()) for p in sorted((out / "shards").glob("*.parquet"))}
    got["forbidden.parquet"] = _sha((out / "forbidden.parquet").read_bytes())
    manifest = json.loads((out / MANIFEST).read_text())
    for keys in PATH_KEYS:
        _drop(manifest["config"], keys)
    if shape is not None:
        manifest["config"] = _prune(manifest["config"], shape)
    text = json.dumps(manifest, sort_keys=True)
    for path, name in sorted(folders.items(), key=lambda kv: -len(kv[0])):  # longest first
        text = text.replace(path, name)
    got["manifest.json"] = _sha(text.encode())
    weights = sorted((out / "model" / "final").glob("*.safetensors"))
    assert weights, f"{out / 'model'}: no trained weights"
    for p in weights:
        got[f"model/final/{p.name}"] = _sha(p.read_bytes())
    return got


def demo_tree() -> dict:
    from curate.config import load_config

    return load_config(HERE.parent / "configs" / "demo.yaml", DEMO_OVERRIDES).to_dict()


def cranfield_tree(data_dir: Path, model: Path) -> dict:
    from curate.config import config_from_dict
    from tests.slice_data import pipeline_config

    tree = pipeline_config(Path("unused"), data_dir, model, **CRANFIELD_OVERRIDES)
    return config_from_dict(tree).to_dict()


def run_case(tree: dict, out: Path, data: str | None = None, model: str | None = None) -> dict:
    """``tree`` (a whole recorded config) with this machine's folders -> the output's hashes."""
    import curate

    tree = json.loads(json.dumps(tree))
    for keys in PATH_KEYS:
        _drop(tree, keys)
    shape = json.loads(json.dumps(tree))
    for (section, key), value in BEFORE_THE_KEY.items():
        tree.setdefault(section, {}).setdefault(key, value)
    tree["output_dir"] = str(out)
    tree["data"]["path"] = data or "demo"
    if model:
        tree["embed"]["model"] = model
    curate.run(curate.config.config_from_dict(tree), quiet=True, stop_after="train")
    folders = {str(out): "<out>", **({data: "<data>"} if data else {}),
               **({model: "<model>"} if model else {})}  # fmt: skip
    return output_hashes(out, folders, shape)


def _cranfield_inputs(tmp: Path, cranfield: Path, tiny_model: Path) -> tuple[str, str]:
    from tests.slice_data import write_slice

    return str(write_slice(tmp / "slice", cranfield)), str(tiny_model)


def cpu_class() -> str:
    """The CPU facts that change float results: architecture, vendor, widest vector ISA."""
    import platform

    flags, vendor = set(), "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id") and vendor == "unknown":
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = next((name for name, need in (("avx512_bf16", {"avx512_bf16", "amx_bf16"}),
                                        ("avx512f", {"avx512f"}), ("avx2", {"avx2"}))
                if need & flags), "base")  # fmt: skip
    return f"{platform.machine()}-{vendor}-{isa}"


@pytest.fixture(scope="module")
def recorded() -> dict:
    if not RECORD.is_file():
        pytest.fail(f"{RECORD}: no recorded hashes; record them on the commit before a move")
    machines = json.loads(RECORD.read_text())["machines"]
    if (key := cpu_class()) not in machines:
        pytest.skip(f"no layout-identity record for CPU class {key} (recorded: "
                    f"{', '.join(sorted(machines))}); record one on a commit whose output is "
                    "meant to be unchanged: "
                    ".venv/bin/python tests/test_layout_identity.py --record")
    return machines[key]


def test_demo_output_is_byte_identical(tmp_path, recorded):
    case = recorded["demo"]
    assert run_case(case["config"], tmp_path / "demo") == case["hashes"]


def test_cranfield_output_is_byte_identical(tmp_path, recorded, cranfield, tiny_model):
    case = recorded["cranfield"]
    data, model = _cranfield_inputs(tmp_path, cranfield, tiny_model)
    assert run_case(case["config"], tmp_path / "cranfield", data, model) == case["hashes"]


def _record() -> None:
    import tempfile

    from tests.conftest import CRANFIELD, build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "tiny-bert")  # seeded: the fixture's bytes
        demo = demo_tree()
        data, model = _cranfield_inputs(tmp, CRANFIELD, model)
        cran = cranfield_tree(Path(data), Path(model))
        for tree in (demo, cran):
            for keys in PATH_KEYS:
                _drop(tree, keys)
        record = {
            "demo": {"config": demo, "hashes": run_case(demo, tmp / "demo")},
            "cranfield": {"config": cran, "hashes": run_case(cran, tmp / "cran", data, model)},
        }
    machines = json.loads(RECORD.read_text())["machines"] if RECORD.is_file() else {}
    machines[cpu_class()] = record  # the other classes' records are kept
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"machines": machines}, indent=1, sort_keys=True) + "\n")
    print(f"recorded {RECORD} for {cpu_class()}")


if __name__ == "__main__" and "--record" in sys.argv:
    _record()
