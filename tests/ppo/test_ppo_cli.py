"""`rlhf fit` with PPOModule from a YAML config, and `--ckpt_path` resume through the CLI."""

from __future__ import annotations

import json

import torch

from rlhf_lightning.cli import main

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 1
  log_every_n_steps: 1
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: "{root}", name: tb, version: ppo}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: "{root}/ckpt", every_n_train_steps: 4, save_top_k: -1}}
model:
  class_path: PPOModule
  init_args:
    model_spec:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}}
    reward:
      function: rlhf_lightning.ppo.toy:word_frequency
      function_kwargs: {{word: good}}
      normalize: none
    generation: {{max_new_tokens: 6}}
    update: {{ppo_epochs: 1, num_minibatches: 1}}
    export_dir: "{root}/export"
data:
  tokenizer: "{root}/tok"
  prompts: {{path: "{root}/prompts.jsonl", val_fraction: 0.0}}
  batch_size: 8
"""


def test_cli_fit_and_resume(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    rows = [{"prompt": f"the movie was {w}"} for w in ("great", "boring", "fine", "bad") * 6]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = tmp_path / "ppo.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    assert main(["fit", "--config", str(config)]) == 0  # 24 prompts / 8 = 3 iterations
    assert (tmp_path / "export" / "config.json").exists()
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # 2 optimizers × 1 step → iteration 2
    assert torch.load(ckpt, weights_only=True)["ppo_state"]["iteration"] == 2
    assert main(["fit", "--config", str(config), "--ckpt_path", str(ckpt)]) == 0
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
