"""GGUF loading through `ModelSpec(gguf_file=...)`: write a tiny Llama as GGUF, load it back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_lightning.models.loading import ModelSpec, load_causal_lm

gguf = pytest.importorskip("gguf")

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _to_gguf_rope_layout(weight: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF stores q/k rows interleaved per rotary pair; transformers undoes this on load."""
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, dim, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(model, path, vocab: list[str]) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab)
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_types([1] * len(vocab))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gg_name in _LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gg_name == "attn_q":
                weight = _to_gguf_rope_layout(weight, cfg.num_attention_heads)
            elif gg_name == "attn_k":
                weight = _to_gguf_rope_layout(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("as_path", [True, False])
def test_gguf_round_trip_logits(tmp_path, tiny_config, as_path):
    vocab = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]
    model = load_causal_lm(ModelSpec(config=tiny_config(len(vocab)))).eval()
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, vocab)
    spec = (
        ModelSpec(gguf_file=str(path))
        if as_path
        else ModelSpec(name_or_path=str(tmp_path), gguf_file="tiny.gguf")
    )
    loaded = load_causal_lm(spec).eval()
    ids = torch.randint(0, len(vocab), (2, 7))  # [B, T]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    # the dequantised model exports like any other and reloads without the GGUF file
    loaded.save_pretrained(tmp_path / "export")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, loaded(ids).logits, atol=0, rtol=0)
