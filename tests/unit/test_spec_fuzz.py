"""A fuzzer over the spec schema: every field, read from the dataclasses of ``tune_llama/spec.py`` (a new field
is covered the day it is added), gets boundary and wrong values. Each value must either be refused with one
``error:`` line naming the field (exit 2, no folder written) before anything starts, or train one step of the
tiny model to finite losses.

The refusal is checked as the user meets it (the ``train`` command, in this process); accepted values go
through the same preflight and one optimizer step of the same loop ``train`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

# No hub here: a model name such as "0" is refused at once instead of after the hub client's retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import TINY
from tune_llama.__main__ import command
from tune_llama.cli import run_cli
from tune_llama.errors import UserError
from tune_llama.spec import Spec, spec_from_dict

# The tiny spec made one optimizer step per epoch, one epoch, and a few validation rows: seconds per case.
ONE_STEP = {"training": {"epochs": 1, "eval_every": 1, "log_every": 1},
            "data": {"synthetic_size": 24, "val_size": 4, "batch_size": 32}}
HUGE = 10 ** 12
SECONDS_PER_RUN = 60  # a value that makes one step take longer than this has no place in a tiny spec


def leaf_fields(cls: Any = Spec, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, declared type) of every field that is not itself a section."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        out += leaf_fields(tp, path + ".") if dataclasses.is_dataclass(tp) else [(path, tp)]
    return out


def wrong_type(tp: Any) -> Any:
    """A value of another type than ``tp`` declares."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    base = inner[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")) else tp
    if base is str or typing.get_origin(base) is Literal:
        return {"not": "a string"}
    return "not-a-value"


def cases() -> list[tuple[str, str, Any]]:
    out = []
    for path, tp in leaf_fields():
        for label, value in (("0", 0), ("-1", -1), ("huge", HUGE), ("empty string", ""),
                             ("wrong type", wrong_type(tp)), ("empty list", [])):
            out.append((path, label, value))
    return out


def base_spec() -> dict[str, Any]:
    raw = yaml.safe_load(TINY.read_text())
    for section, values in ONE_STEP.items():
        raw[section].update(values)
    return raw


def with_value(path: str, value: Any) -> dict[str, Any]:
    raw = base_spec()
    *sections, name = path.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = value
    return raw


class OneStep(Exception):
    """Raised after the first optimizer step: the run has shown it trains."""


def one_step(spec: Spec) -> list[float]:
    """Preflight, then one optimizer step of the loop ``train`` runs; the losses it saw (train, then eval)."""
    from tune_llama.loop import fit, setup, validation_loss
    from tune_llama.preflight import preflight
    checked = preflight(spec)
    run = setup(spec, tokenizer=checked.tokenizer, data=(checked.train, checked.val))
    losses = []

    def stop(run):
        raise OneStep

    try:
        fit(run, report=lambda metrics, _: losses.append(metrics["train_loss"]), on_step=stop)
    except OneStep:
        pass
    return losses + [validation_loss(run)]


class TooSlow(Exception):
    pass


def within(seconds: int, call, *args):
    def alarm(signum, frame):
        raise TooSlow(f"took over {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return call(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refusal_as_the_user_sees_it(path: str, value: Any, tmp_path: Path, capsys) -> str:
    """``tune-llama train SPEC --set PATH=VALUE``: the problem, or '' when it exits 2 with one line naming
    ``path`` and writes nothing."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(base_spec()))
    output = tmp_path / "run"
    capsys.readouterr()
    code = None
    try:
        within(SECONDS_PER_RUN, run_cli, command("train"),
               [str(spec_file), "--set", f"{path}={json.dumps(value)}", "--output", str(output)])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    if code != 2 or not err.startswith("error: ") or "\n" in err or "Traceback" in err:
        return f"exit {code}, stderr: {err[-600:]!r}"
    if path not in err:
        return f"the error does not name {path}: {err}"
    if output.exists():
        return f"refused, but {output} was written"
    return ""


def verdict(path: str, value: Any, tmp_path: Path, capsys) -> str:
    """'' when the value is handled; else what went wrong."""
    try:
        spec = spec_from_dict(with_value(path, value))
    except UserError:
        return refusal_as_the_user_sees_it(path, value, tmp_path, capsys)
    try:
        losses = within(SECONDS_PER_RUN, one_step, spec)
    except UserError:  # preflight: the same one-line refusal, before anything runs
        return refusal_as_the_user_sees_it(path, value, tmp_path, capsys)
    except BaseException as err:  # noqa: BLE001: every other end is the gap this test exists to find
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return f"accepted, then one training step raised {type(err).__name__}: {first}"
    if not all(math.isfinite(x) for x in losses):
        return f"accepted, then one training step gave losses {losses}"
    return ""


def test_the_fuzzer_covers_every_field_of_the_schema():
    paths = {path for path, _ in leaf_fields()}
    assert {"training.eval_every", "model.lora.r", "search.resources.workers", "wandb.tags"} <= paths
    assert len(cases()) == 6 * len(paths)


def test_every_field_refuses_or_trains_on_boundary_and_wrong_values(tmp_path, capsys):
    problems = []
    for i, (path, label, value) in enumerate(cases()):
        problem = verdict(path, value, tmp_path / str(i), capsys)
        if problem:
            problems.append(f"{path} = {value!r} ({label}): {problem}")
    assert not problems, f"{len(problems)} values neither refused nor trained:\n" + "\n".join(problems)
