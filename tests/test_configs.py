"""Every YAML under configs/ parses with its command's parser and has a comment above each key.

LightningCLI configs are checked with `rlhf fit --config X --print_config` (full type
validation of trainer, model and data, without instantiating anything); `rlhf label`
configs (file names containing "label") with the labeling parser.
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


def _ids(paths):
    return [str(p.relative_to(CONFIG_DIR)) for p in paths]


def test_configs_exist():
    assert any(p.name == "sft.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_config_parses(path, capsys):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    if "label" in path.stem:
        from rlhf_lightning.labeling import build_parser

        build_parser().parse_args(["--config", str(path)])
        return
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", str(path), "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"trainer", "model", "data"} <= set(printed)


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
