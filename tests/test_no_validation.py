"""Training without a validation split (``data.val_per_domain: 0``, VTAB-1K's final stage): the splits give val's
images to train, the loop selects the last step (results.json's ``best`` is its ``last``), the run resumes and
evaluates like any other, and the places 0 cannot work are config errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex import cli
from loraplex.config import ConfigError, load_config
from loraplex.data.sources import load_source
from loraplex.data.splits import split
from loraplex.train import regimes
from loraplex.train.runner import domain_splits, train

from .tiny import tiny_config

NO_VAL = {"val_per_domain": 0}
SHORT = {"steps": 8, "eval_every": 2, "checkpoint_every": 4, "warmup_steps": 1}


def adapters(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / which / "adapters.safetensors")


def test_a_run_without_validation_selects_its_last_step_and_evaluates_as_written(tmp_path, capsys):
    path = tiny_config(tmp_path, data=NO_VAL, train=SHORT, output={"tensorboard": True})
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    assert "no validation split: the last step is the selected model" in capsys.readouterr().out
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == results["best_step"] == 8
    assert results["best"] == results["last"] and results["last"]["val"] == {}
    assert set(results["best"]["test"]) == {"acc/digits", "acc/mnist", "acc/mean"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)) and {r["split"] for r in records} == {"train"}
    assert any((run / "tb").iterdir())
    best, final = adapters(run, "best"), adapters(run, "final")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)

    for which in ("best", "final"):
        assert cli.main(["eval", str(run), "--json", "--which", which]) == 0
        assert json.loads(capsys.readouterr().out) == pytest.approx(results["best"]["test"])
    assert cli.main(["eval", str(run), "--split", "val"]) == 2
    assert "trained without a validation split (data.val_per_domain: 0)" in capsys.readouterr().err
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert f"{100 * results['best']['test']['acc/mean']:.1f}" in (tmp_path / "report" / "report.md").read_text()


def test_the_train_split_takes_the_images_validation_would_have_taken(tmp_path):
    source = load_source("digits")
    with_val, without = (split(source, seed=3, train=None, val=val, test=60) for val in (40, 0))
    assert len(without.val) == 0 and torch.equal(without.test, with_val.test)
    assert torch.equal(without.train, torch.cat([with_val.train, with_val.val]).sort().values)

    data = {"domains": ["digits"], "train_per_domain": None, "test_per_domain": 60}
    sizes = {}
    for val in (40, 0):
        splits = domain_splits(load_config(tiny_config(tmp_path / str(val), data={**data, "val_per_domain": val})))
        sizes[val] = {part: len(domains[0]) for part, domains in splits.items()}
    assert sizes[0] == {"train": sizes[40]["train"] + 40, "val": 0, "test": 60}
    counted = domain_splits(load_config(tiny_config(tmp_path / "counted", data=NO_VAL)))  # train_per_domain 120
    assert [len(d) for d in counted["train"]] == [120, 120] and [len(d) for d in counted["val"]] == [0, 0]
    assert counted["val"][0].images.shape[1:] == counted["train"][0].images.shape[1:]  # empty, at the run's size


class Killed(Exception):
    """Stands for the process being killed between two checkpoints."""


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_adapters(tmp_path, monkeypatch):
    straight = load_config(tiny_config(tmp_path / "a", data=NO_VAL, train=SHORT))
    results = train(straight, progress=False)

    resumed = load_config(tiny_config(tmp_path / "b", data=NO_VAL, train=SHORT))
    real_loss, calls = regimes.MultiDomainRegime.loss, {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # after the step-4 checkpoint
            raise Killed
        return real_loss(self, model, batch)

    with monkeypatch.context() as patched:
        patched.setattr(regimes.MultiDomainRegime, "loss", loss)
        with pytest.raises(Killed):
            train(resumed, progress=False)
    run = Path(resumed.output.dir)
    assert not (run / "results.json").exists() and not (run / "best").exists()
    again = train(resumed, progress=False)
    a, b = adapters(Path(straight.output.dir), "best"), adapters(run, "best")
    assert all(torch.equal(a[key], b[key]) for key in a)
    timeless = lambda r: {k: v for k, v in r.items() if k != "train_seconds"}  # noqa: E731
    assert timeless(again) == timeless(results)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the lines past the checkpoint were dropped, and no val lines written
    assert train(resumed, progress=False) == again  # finished: read back, not trained again


@pytest.mark.parametrize(
    ("sections", "overrides", "message"),
    [
        ({"data": {"val_per_domain": -1}}, [], "data.val_per_domain must be ≥ 0 (0: no validation split"),
        ({"data": {"val_per_domain": 0.0}}, [], "got 0.0; for no validation split give the count 0"),
        ({}, ["data.val_per_domain=-3"], "--set data.val_per_domain=-3: data.val_per_domain must be ≥ 0"),
        (
            {"data": {"domains": ["scenes"], "tasks": ["semseg"], **NO_VAL}, "train": {"regime": "multitask"}},
            [],
            "data.val_per_domain: 0 (no validation split) is for train.regime multidomain, not multitask",
        ),
        (
            {"data": {"domains": ["digits"], "sequence": [[0, 1], [2, 3]], **NO_VAL}, "train": {"regime": "continual"}},
            [],
            "data.val_per_domain: 0 (no validation split) is for train.regime multidomain, not continual",
        ),
    ],
)
def test_where_no_validation_cannot_work_the_config_says_so(tmp_path, sections, overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(tiny_config(tmp_path, **sections), overrides)
    assert message in str(caught.value)


def test_a_fraction_that_leaves_a_domain_no_validation_images_is_refused(tmp_path):
    config = load_config(tiny_config(tmp_path, data={"domains": ["digits"], "val_per_domain": 0.0001}))
    with pytest.raises(ConfigError, match=r"data.val_per_domain=0.0001 leaves digits no validation images"):
        domain_splits(config)
