"""rlhf-lightning: SFT, reward modelling and PPO on PyTorch Lightning.

Re-exports are lazy so that `import rlhf_lightning.kernels` stays light.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "RLHFDataModule": "rlhf_lightning.data.datamodule",
    "SFTModule": "rlhf_lightning.modules.sft",
    "RewardModule": "rlhf_lightning.modules.reward",
    "PPOModule": "rlhf_lightning.modules.ppo",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlhf_lightning' has no attribute {name!r}")
