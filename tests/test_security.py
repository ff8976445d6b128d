"""Security: configs are plain YAML, model folders run no code unless asked, nothing unpickles
user-supplied data, and checkpoints load with torch's restricted unpickler. (Written paths staying
inside output_dir and path-like ids never naming files: tests/test_crash.py, on a real run.)"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import train.train as trainer
from curate import schema
from curate.batch import shards
from curate.config import EmbedConfig, TrainConfig, load_config
from curate.embed import encoder as embed
from curate.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
LIBRARY = [p for d in ("curate", "pipelines", "train") for p in sorted((REPO / d).rglob("*.py"))]


# --- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["output_dir=!!python/object/apply:os.getcwd []",
                                      "seed=!!python/name:os.system"])  # fmt: skip
def test_overrides_use_the_safe_loader(override):
    with pytest.raises(ConfigError, match="not plain YAML.*safe loader"):
        load_config(None, [override])


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mine:\n  top_k: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not plain YAML"):
        load_config(path)


# --- remote code -------------------------------------------------------------------------------


def test_encoder_refuses_remote_code_by_default(remote_code_model):
    folder, marker = remote_code_model
    assert EmbedConfig().trust_remote_code is False
    with pytest.raises(ConfigError, match="embed.trust_remote_code: true"):
        embed.Encoder.load(EmbedConfig(model=str(folder), device="cpu"), folder)
    assert not marker.exists()


def test_trainer_refuses_remote_code_by_default(remote_code_model, tmp_path):
    folder, marker = remote_code_model
    with pytest.raises(ConfigError, match="embed.trust_remote_code"):
        trainer.train(tmp_path / "shards", tmp_path / "model", folder, TrainConfig(), EmbedConfig())
    assert not marker.exists()


def test_trust_remote_code_reaches_transformers_only_when_set(tmp_path):
    calls = []

    class Auto:
        @classmethod
        def from_pretrained(cls, path, **kw):
            calls.append(kw)
            return "loaded"

    assert embed.pretrained(Auto, tmp_path) == "loaded"
    assert embed.pretrained(Auto, tmp_path, trust_remote_code=True) == "loaded"
    assert calls == [{"local_files_only": True, "trust_remote_code": False},
                     {"local_files_only": True, "trust_remote_code": True}]  # fmt: skip


# --- pickle ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _shard_dir(root: Path) -> Path:
    rows = [{"batch_id": 0, "query_id": f"q{i}", "query": f"question {i}", "pos_id": f"p{i}",
             "pos": f"answer {i}", "pos_score": 0.5, "neg_ids": [f"n{i}"], "negs": [f"other {i}"],
             "neg_scores": [0.1], "neg_ranks": [1], "topic": 0, "known_pos_ids": [f"p{i}"]}
            for i in range(2)]  # fmt: skip
    shard_dir = root / "shards"
    files = shards.write_shards(pa.Table.from_pylist(rows, schema=schema.SHARD), shard_dir, 1)
    shards.write_manifest(shard_dir, {"files": files})
    return shard_dir


def test_a_planted_checkpoint_cannot_run_code(tmp_path, tiny_model):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "model" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "model": _Payload(marker)}, ckpt / "state.pt")
    cfg = TrainConfig(max_steps=2, max_length=16)
    with pytest.raises(pickle.UnpicklingError):
        trainer.train(_shard_dir(tmp_path), tmp_path / "model", tiny_model, cfg, EmbedConfig())
    assert not marker.exists()


@pytest.mark.parametrize("learn_temperature", [False, True])
def test_our_checkpoints_load_with_weights_only(tmp_path, learn_temperature):
    from train.loss import LearnableTemperature

    model = torch.nn.Linear(4, 2)
    temp = LearnableTemperature(0.05) if learn_temperature else 0.05
    params = list(model.parameters()) + (list(temp.parameters()) if learn_temperature else [])
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, trainer.lr_lambda(1, 10))
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched.step()
    trainer.save_checkpoint(tmp_path, 1, model, opt, sched, temp)
    state = torch.load(tmp_path / "step-00000001" / "state.pt", weights_only=True)
    assert state["step"] == 1 and torch.equal(state["rng"], torch.get_rng_state())
    assert (state["temp"] is not None) == learn_temperature


# Calls that unpickle or run code from data, and the one safe form each may take in curate.
_UNSAFE = {
    r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|\bjoblib\.load\(": None,
    r"torch\.load\(": r"weights_only=True",
    r"allow_pickle\s*=\s*True": None,
    r"yaml\.(load|unsafe_load|full_load)\(": None,
    r"trust_remote_code\s*=\s*True": None,
    r"(?<![.\w])(eval|exec)\(": None,  # not model.eval()
}


def test_library_never_unpickles_or_runs_code_from_data():
    found = []
    for path in LIBRARY:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, safe in _UNSAFE.items():
                if re.search(pattern, code) and not (safe and re.search(safe, code)):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
    assert LIBRARY, "no library files found"
