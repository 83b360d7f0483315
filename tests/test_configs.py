"""Every YAML under configs/ parses with its command's parser and has a comment above each key.

LightningCLI configs are checked with `rlhf fit --config X --print_config` (full type
validation of trainer, model and data, without instantiating anything); `rlhf label`
configs (file names containing "label") with the labeling parser, `rlhf evaluate` configs (names
containing "evaluate") with the evaluation parser. Overlays (`OVERLAYS`: a
file that only changes a few values of a base config) are parsed on top of their base, as
they are used: `rlhf fit --config BASE --config OVERLAY`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rlhf_lightning import cli

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml")) + sorted(CONFIG_DIR.rglob("*.yml"))
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_][\w.\-/]*\s*:(\s|$)")
# overlay → its base config (relative to configs/)
OVERLAYS = {
    f"quickstart/{name}.yaml": "quickstart/ppo.yaml"
    for name in ("ppo_overopt", "grpo", "rloo", "reinforce_pp")
} | {
    "smollm2/reward_gold.yaml": "smollm2/reward_proxy.yaml",
    "smollm2/grpo_hh.yaml": "smollm2/ppo_hh.yaml",
}


def _ids(paths):
    return [str(p.relative_to(CONFIG_DIR)) for p in paths]


def _config_args(path: Path) -> list[str]:
    """`--config` arguments for `path`: its base first when it is an overlay."""
    base = OVERLAYS.get(str(path.relative_to(CONFIG_DIR)))
    chain = ([CONFIG_DIR / base] if base else []) + [path]
    return [arg for item in chain for arg in ("--config", str(item))]


def _print_config(args: list[str], capsys) -> dict:
    """The resolved config of `rlhf fit <args> --print_config`, as a dict."""
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", *args, "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key → value of every non-dict value in a nested dict."""
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_leaves(value, f"{prefix}{key}."))
        else:
            found[prefix + key] = value
    return found


def test_configs_exist():
    assert any(p.name == "sft.yaml" for p in CONFIGS)
    for overlay, base in OVERLAYS.items():
        assert (CONFIG_DIR / overlay).is_file() and (CONFIG_DIR / base).is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_config_parses(path, capsys):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    if "label" in path.stem:
        from rlhf_lightning.labeling import build_parser

        build_parser().parse_args(["--config", str(path)])
        return
    if "evaluate" in path.stem:
        from rlhf_lightning.evaluation.run import build_parser as evaluate_parser

        evaluate_parser().parse_args(["--config", str(path)])
        return
    printed = _print_config(_config_args(path), capsys)
    assert {"trainer", "model", "data"} <= set(printed)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS), ids=sorted(OVERLAYS))
def test_overlay_changes_exactly_its_own_values(overlay, capsys):
    """The resolved config of base + overlay differs from the base's in the overlay's keys only,
    each set to the overlay's value (a misspelt or list-valued key would not give that)."""
    own = _leaves(yaml.safe_load((CONFIG_DIR / overlay).read_text()))
    assert not [key for key, value in own.items() if isinstance(value, list)], "lists replace"
    base = _leaves(_print_config(["--config", str(CONFIG_DIR / OVERLAYS[overlay])], capsys))
    merged = _leaves(_print_config(_config_args(CONFIG_DIR / overlay), capsys))
    assert set(own) <= set(base), f"not in the base: {sorted(set(own) - set(base))}"
    changed = {key for key in merged if merged[key] != base.get(key)}
    assert changed == {key for key in own if own[key] != base[key]}
    assert all(merged[key] == value for key, value in own.items())


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_every_key_has_a_comment_above(path):
    missing = []
    previous = ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if KEY_LINE.match(line) and not previous.startswith("#"):
            missing.append(f"{path.name}:{number}: {stripped}")
        previous = stripped
    assert not missing, "keys without a comment line above:\n" + "\n".join(missing)
