"""Model loading: config dict, local dir round trip, GGUF path handling, dtype, LoRA, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lightning.models.loading import (
    ModelSpec,
    ModelSpecError,
    export_pretrained,
    is_peft,
    load_causal_lm,
    load_sequence_classifier,
    resolve_dtype,
    unwrap_peft,
)


def test_from_config_fills_vocab_and_pad(tiny_config):
    cfg = tiny_config(50)
    del cfg["vocab_size"]
    model = load_causal_lm(ModelSpec(config=cfg), vocab_size=37, pad_token_id=0)
    assert model.config.vocab_size == 37
    assert model.config.pad_token_id == 0
    assert model.get_input_embeddings().weight.shape == (37, 32)
    assert next(model.parameters()).dtype == torch.float32


def test_dtype_and_errors(tiny_config):
    model = load_causal_lm(ModelSpec(config=tiny_config(20), dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert resolve_dtype("torch.float16") == torch.float16
    with pytest.raises(ModelSpecError, match="'dtype'"):
        resolve_dtype("float8")
    with pytest.raises(ModelSpecError, match="needs one of"):
        load_causal_lm(ModelSpec())
    with pytest.raises(ModelSpecError, match="exclusive"):
        load_causal_lm(ModelSpec(name_or_path="x", config=tiny_config(20)))
    with pytest.raises(ModelSpecError, match="model_type"):
        load_causal_lm(ModelSpec(config={"hidden_size": 8}))
    with pytest.raises(ModelSpecError, match="'gguf_file'"):
        load_causal_lm(ModelSpec(gguf_file="/nonexistent/model.gguf"))


def test_local_dir_round_trip_and_classifier(tmp_path, tiny_config, tiny_tokenizer):
    spec = ModelSpec(config=tiny_config(len(tiny_tokenizer)))
    model = load_causal_lm(spec, pad_token_id=tiny_tokenizer.pad_token_id).eval()
    out = export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["the movie was great"], return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)
    again = load_causal_lm(ModelSpec(name_or_path=str(out))).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)
    clf = load_sequence_classifier(ModelSpec(name_or_path=str(out)), num_labels=1)
    assert clf.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert clf(ids).logits.shape == (1, 1)


def test_lora_and_gradient_checkpointing(tmp_path, tiny_config, within_torch_error):
    spec = ModelSpec(
        config=tiny_config(30),
        gradient_checkpointing=True,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    model = load_causal_lm(spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    ids = torch.randint(0, 30, (2, 6))  # [B, T]
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # LoRA B starts at zero: perturb it so the merge matters, then export merges into a copy.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.eval()
    out = export_pretrained(model, None, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # merged W + s·BA vs the adapter path: two float32 routes
        exact = copy.deepcopy(model).double()(ids).logits  # [B, T, V] float64
        within_torch_error(plain(ids).logits, model(ids).logits, exact, name="merged logits")
    assert hasattr(model, "merge_and_unload")  # live model still wrapped


def test_unwrap_peft_merges_a_copy_or_returns_the_wrapped_model(tiny_config):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    model = load_causal_lm(ModelSpec(config=tiny_config(30), lora=lora))
    plain = load_causal_lm(ModelSpec(config=tiny_config(30)))
    assert is_peft(model) and not is_peft(plain)
    assert unwrap_peft(plain, merge=True) is plain and unwrap_peft(plain, merge=False) is plain
    inner = unwrap_peft(model, merge=False)
    assert inner is model.get_base_model()
    assert any("lora_" in name for name, _ in inner.named_parameters())  # adapters still injected
    merged = unwrap_peft(model, merge=True)
    assert not is_peft(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    assert is_peft(model)  # the live model is left wrapped
    with pytest.raises(TypeError):
        unwrap_peft(model)  # merge is a required keyword


def test_missing_local_dir_is_one_line_spec_error(tmp_path):
    with pytest.raises(ModelSpecError, match="'name_or_path': cannot load") as info:
        load_causal_lm(ModelSpec(name_or_path=str(tmp_path / "missing")))
    assert "\n" not in str(info.value)


def test_package_sources_resolve_to_the_installed_folder():
    import json as json_package
    from pathlib import Path

    from rlhf_lightning.models.loading import ModelSpecError, resolve_source

    assert resolve_source("pkg:json") == str(Path(json_package.__file__).parent)
    assert resolve_source("some/hub-id") == "some/hub-id" and resolve_source(None) is None
    with pytest.raises(ModelSpecError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_source("pkg:no_such_pkg_xyz")
