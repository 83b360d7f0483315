"""One-line error reports for the `rlhf` command: which errors are bad input, and which config key
an error is about.

`main` in `cli.py` reports an error as `rlhf: error: <what> (<config key>)` with exit code 2 when
it is bad input: parse errors (jsonargparse), bad records (`file:line`) at any time, and any
error raised while the Trainer, model and data are built and set up (missing files and model specs
included), before the first batch (`RunState.stepping`). The config key comes from the part that failed
(model / data / trainer, read from the traceback) and the values or key names the message quotes —
a heuristic: an unusual message gets only the section name, e.g. `(model)`. `--debug` or
`RLHF_DEBUG=1` turns reporting off (full traceback).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

DEBUG_ENV = "RLHF_DEBUG"
DEBUG_FLAG = "--debug"


@dataclass
class RunState:
    """How far one command got: decides whether an error is reported as one line."""

    config: Any = None
    """The parsed config of the subcommand (a jsonargparse Namespace), to name keys in errors."""
    stepping: bool = False
    """True once the first training / evaluation batch (or labelling batch) has started."""
    one_line: bool = True
    """Parsers raise their errors (reported in one line) instead of printing usage and exiting."""


def debug_switch(args: Sequence[str]) -> tuple[bool, list[str]]:
    """(debug requested by `--debug` or `RLHF_DEBUG`, the arguments without `--debug`)."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    rest = [a for a in args if a != DEBUG_FLAG]
    return env or len(rest) < len(args), rest


# ------------------------------------------------------------------ which errors are input errors
def _always_input_errors() -> tuple[type[BaseException], ...]:
    """Bad input whenever it surfaces: parse errors, bad records, model specs, missing files."""
    from jsonargparse import ArgumentError

    from rlhf_lightning.data.records import RecordError
    from rlhf_lightning.models.loading import ModelSpecError

    return (ArgumentError, RecordError, ModelSpecError, FileNotFoundError)


def _setup_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a bad config while the Trainer, model and data are built and set up."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, TypeError, OSError, ImportError, RuntimeError, MisconfigurationException)


def reportable(err: BaseException, state: RunState) -> bool:
    """True when `err` is reported as `rlhf: error: ...` (exit 2) rather than re-raised.

    Once the first batch has started only bad records (data read lazily, e.g. PPO-ptx
    demonstrations) stay one line: a missing file or model spec raised then comes from user code
    (a reward function, a callback) and keeps its traceback.
    """
    from rlhf_lightning.data.records import RecordError

    if state.stepping:
        return isinstance(err, RecordError)
    return isinstance(err, _always_input_errors() + _setup_errors())


# ------------------------------------------------------------------ naming the config key
_COMPONENTS = (
    ("lightning.pytorch:LightningModule", "model"),
    ("lightning.pytorch:LightningDataModule", "data"),
    ("lightning.pytorch:Trainer", "trainer"),
    ("lightning.pytorch.loggers:Logger", "trainer.logger"),
    ("lightning.pytorch:Callback", "trainer.callbacks"),
)


def failing_component(err: BaseException) -> str | None:
    """Config section of the innermost model / datamodule / trainer method in the traceback."""
    classes = []
    for spec, key in _COMPONENTS:
        module, _, name = spec.partition(":")
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            classes.append((getattr(loaded, name), key))
    found = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        found = next((key for cls, key in classes if isinstance(owner, cls)), found)
    return found


def _entries(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, bool]]:
    """(dotted key, value, is_branch) for every branch and leaf of a plain config tree."""
    if isinstance(node, dict):
        children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items()]
    elif isinstance(node, list | tuple):
        children = [(f"{prefix}[{i}]", v) for i, v in enumerate(node)]
    else:
        yield prefix, node, False
        return
    if prefix:
        yield prefix, node, True
    for key, value in children:
        if not key.rsplit(".", 1)[-1].startswith("__"):  # jsonargparse metadata
            yield from _entries(value, key)


def _short(key: str) -> str:
    return key.replace(".init_args.", ".")


def _position(message: str, pattern: str) -> int | None:
    match = re.search(pattern, message)
    return match.start() if match else None


def _mentioned(message: str, key: str) -> int | None:
    """Where the message spells the key (`model.kl.estimator`, or a leading `num_responses:`)."""
    for form in dict.fromkeys((key, _short(key))):
        if "." in form or "[" in form:
            pattern = rf"(?<![\w.]){re.escape(form)}(?![\w.\[])"
        else:
            pattern = rf"^{re.escape(form)}:"
        found = _position(message, pattern)
        if found is not None:
            return found
    return None


def _value_named(message: str, value: Any) -> int | None:
    """Where the message quotes a string value: 'v', "v", `v`, =v, a leading `v:`, or a path."""
    if not isinstance(value, str) or len(value) < 2:
        return None
    v = re.escape(value)
    patterns = [rf"['\"`]{v}['\"`]", rf"(?<![\w.])=['\"`]?{v}(?![\w./-])", rf"^{v}(?=[:\[]| \()"]
    if "/" in value:  # paths are distinctive enough unquoted
        patterns.append(rf"(?<![\w./-]){v}(?![\w/-]|\.\w)")
    return _position(message, "|".join(patterns))


def _name_named(message: str, key: str) -> int | None:
    """Where the message names the key's last part: quoted, `name=`, `name >= 2`, `X.name`."""
    name = re.escape(re.sub(r"\[\d+\]$", "", key).rsplit(".", 1)[-1])
    quoted = rf"['\"`]{name}['\"`]"
    return _position(
        message, rf"{quoted}|(?<![\w.]){name} ?(?:[<>!=]=?|[≤≥])|(?<=\w\.){name}(?![\w.])"
    )


def _under(key: str, component: str) -> bool:
    return key == component or key.startswith((component + ".", component + "["))


def _hits(message: str, entries, names: bool = False) -> dict[str, int]:
    """{key: position} of the keys the message spells or whose value it quotes (or names)."""
    hits: dict[str, int] = {}
    for key, value, branch in entries:
        if names:
            found = _name_named(message, key)
        else:
            found = _mentioned(message, key)
            if found is None and not branch:
                found = _value_named(message, value)
        if found is not None:
            hits.setdefault(key, found)
    return hits


def config_keys(message: str, config: Any, component: str | None = None) -> list[str]:
    """Config keys an error message is about, in the order the message names them.

    Keys the message spells out or whose string value it quotes, first under `component`
    (e.g. "model"), then anywhere; failing both, keys under `component` whose name it quotes.
    More than three hits collapse into their common prefix; no hit gives the component itself.
    """
    tree = config.as_dict() if hasattr(config, "as_dict") else config
    entries = list(_entries(tree)) if tree is not None else []
    scoped = [e for e in entries if _under(e[0], component)] if component else entries
    hits = _hits(message, scoped) or _hits(message, entries) or _hits(message, scoped, names=True)
    keys = sorted(hits, key=lambda k: (hits[k], k))
    if len(keys) > 3:
        keys = [os.path.commonprefix([k + "." for k in keys]).rsplit(".", 1)[0] or component]
    return [k for k in keys if k] or ([component] if component else [])


def _parse_error(message: str) -> tuple[str, list[str]]:
    """jsonargparse's `Parser key "k": problem` as (problem, [k]); nested keys are joined
    (`Parser key "model": … Parser key "optim": … Parser key "lr"` → `model.optim.lr`)."""
    text = " ".join(message.split())
    keys = re.findall(r'Parser key "([^"]+)":', text)
    match = re.match(r'^Parser key "[^"]+":\s*(.*)$', text)
    return (match.group(1) if match else text), [".".join(keys)] if keys else []


_WRAPPERS = ("Does not validate against any of", "Parser key", "- ", "Problem with given class")


def root_cause(err: BaseException) -> BaseException:
    """The error inside jsonargparse's wrappers ("Does not validate against any of ...")."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = err.__cause__ or err.__context__
        if cause is None or not " ".join(str(err).split()).startswith(_WRAPPERS):
            break
        err = cause
    return err


def _message(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return " ".join(str(err).split()) or type(err).__name__


def error_line(err: BaseException, state: RunState) -> str:
    """The `<what> (<config key>)` part of `rlhf: error: ...` for an input error."""
    from jsonargparse import ArgumentError

    _, keys = _parse_error(str(err)) if isinstance(err, ArgumentError) else ("", [])
    cause = root_cause(err)
    what, inner_keys = _parse_error(_message(cause))
    if not keys:
        keys = inner_keys or config_keys(what, state.config, failing_component(cause))
    for key in keys:  # "model.kl.estimator: 'k4' is not ..." → "'k4' is not ... (key)"
        for form in (key, _short(key)):
            if what.startswith(form + ": "):
                what = what[len(form) + 2 :]
    return f"{what} ({', '.join(keys)})" if keys else what
