"""The run layer: config validation, the training loop (selection, logs, resume after a real kill,
non-finite loss), DDP equivalence, and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loraplex import cli
from loraplex.config import ConfigError, from_dict, load_config
from loraplex.train import TrainingDiverged, fit
from loraplex.train.regimes import within_domain_partners
from loraplex.train.runner import build_model, build_regime, train

from .tiny import TINY, tiny_config


def adapters(run_dir: Path, which: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run_dir / which / "adapters.safetensors")


# ---- config -------------------------------------------------------------------------------------
def test_config_errors_name_the_key(tmp_path):
    base = json.loads(json.dumps(TINY))
    cases = [
        ({"train": {"stesp": 3}}, r"unknown key\(s\) \['train.stesp'\]"),
        ({"train": {"steps": "many"}}, r"train.steps must be int, got 'many'"),
        ({"train": {"steps": 0}}, r"train.steps must be > 0"),
        ({"train": {"warmup_steps": 50}}, r"train.warmup_steps must lie in \[0, train.steps=12\)"),
        ({"data": {"sampling": "random"}}, r"data.sampling must be"),
        ({"method": {"name": "nope"}}, r"method.name: unknown method 'nope'"),
        ({"method": {"name": "lora", "rnk": 3}}, r"unknown key 'method.rnk' for method 'lora'"),
        ({"method": {"name": "lora", "rank": "eight"}}, r"method.rank must be int, got 'eight'"),
        ({"method": {"name": "lora", "rank": 0}}, r"method: config key 'rank' must be ≥ 1"),
        ({"extra": {}}, r"unknown section\(s\) \['extra'\]"),
        ({"train": {"device": "gpu"}}, r"train.device must be auto, cpu, cuda or cuda:<index>, got 'gpu'"),
        ({"train": {"precision": "fp8"}}, r"train.precision must be one of \['fp32', 'bf16', 'fp16'\]"),
        ({"backbone": {"dtype": "bf16"}}, r"backbone.dtype=bf16 .* run it under train.precision=bf16 \(got fp32\)"),
        ({"data": {"workers": -1}}, r"data.workers must be ≥ 0"),
        ({"train": {"mixup": -0.2}}, r"train.mixup must be ≥ 0 \(0 turns it off\), got -0.2"),
        ({"train": {"mixup": 0.2, "regime": "continual"}}, r"train.mixup applies to the multidomain regime only"),
    ]
    for change, message in cases:
        raw = json.loads(json.dumps(base))
        for section, values in change.items():
            raw[section] = values if section in ("method", "extra") else {**raw[section], **values}
        with pytest.raises(ConfigError, match=message):
            from_dict(raw)


def test_overrides_are_typed_and_the_resolved_config_is_complete(tmp_path):
    path = tiny_config(tmp_path)
    config = load_config(path, ["train.steps=7", "train.lr=1e-2", "method.rank=3", "data.domains=[digits]"])
    assert config.train.steps == 7 and config.train.lr == 0.01 and isinstance(config.train.lr, float)
    assert config.method["rank"] == 3 and config.method["tasks"] == ["digits"]
    assert config.method["domain_rank"] is None  # every method default is filled in
    with pytest.raises(ConfigError, match=r"--set expects section\.key=value"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match="must start with one of"):
        load_config(path, ["steps=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


# ---- loop ---------------------------------------------------------------------------------------
def test_training_writes_logs_selection_and_results(tmp_path):
    config = load_config(tiny_config(tmp_path))
    results = train(config, progress=False)
    run = Path(config.output.dir)
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "results.json", "best", "final"} <= {
        p.name for p in run.iterdir()
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [4, 8, 12]
    best = max(val, key=lambda r: r["acc/mean"])
    assert results["best_step"] == best["step"]
    assert results["best"]["val"]["acc/mean"] == pytest.approx(best["acc/mean"])
    assert results["last"]["val"]["acc/mean"] == pytest.approx(val[-1]["acc/mean"])
    assert set(results["best"]["test"]) == {"acc/digits", "acc/mnist", "acc/mean"}
    lr = [r["lr"] for r in records if r["split"] == "train"]
    assert lr[1] == pytest.approx(3e-3) and lr[-1] == pytest.approx(0.0, abs=1e-12)  # warm-up, then cosine to 0
    assert json.loads((run / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["params"]["trainable"] == results["params"]["adapter"] + results["params"]["head"]


def kill_after_checkpoint(cmd: list[str], run: Path, step: int, checkpoint: str = "checkpoint.pt") -> None:
    """Start a real training process and SIGKILL it as soon as ``run / checkpoint`` holds a step past ``step``."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        ckpt = run / checkpoint
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["loop"]["step"] >= step:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_killed_run_resumes_to_the_same_adapters(tmp_path, precision):
    """Killed after a checkpoint and resumed — with data workers this time, an execution-only setting — a run
    ends bit-identical to one that was never stopped, in fp32 (with augmentation and mixup) and in bf16
    (autocast, frozen weights held in bf16); ``loraplex eval`` then reproduces its test numbers."""
    slow = {"steps": 40, "checkpoint_every": 5, "eval_every": 10, "threads": 1, "precision": precision}
    sections = {"train": slow, "backbone": {"dtype": precision}}
    if precision == "fp32":  # random crops and mixup's pairs and weights too must replay exactly after a resume
        sections["data"] = {"augment": True}
        slow["mixup"] = 0.4
    straight = load_config(tiny_config(tmp_path / "a", **sections))
    results = train(straight, progress=False)

    path = tiny_config(tmp_path / "b", **sections)
    run = tmp_path / "b" / "run"
    cmd = [sys.executable, "-m", "loraplex", "train", str(path), "--no-progress"]
    kill_after_checkpoint(cmd, run, step=10)
    assert not (run / "results.json").exists()
    done = subprocess.run([*cmd, "--set", "data.workers=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = adapters(Path(straight.output.dir)), adapters(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # lines the killed process wrote past its checkpoint were dropped
    assert len([s for s in steps if s == 40]) == 2  # one train, one val record at the end
    evaluated = subprocess.run(
        [sys.executable, "-m", "loraplex", "eval", str(run), "--json"], capture_output=True, text=True, timeout=300
    )
    assert json.loads(evaluated.stdout) == pytest.approx(results["best"]["test"])


def test_fp16_training_scales_the_loss_and_checkpoints_the_scaler(tmp_path):
    steps = {"steps": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "precision": "fp16"}
    config = load_config(tiny_config(tmp_path, train=steps, backbone={"dtype": "fp16"}))
    results = train(config, progress=False)
    saved = torch.load(Path(config.output.dir) / "checkpoint.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 0  # the loss scale travels with the run
    assert all(math.isfinite(v) for v in results["best"]["test"].values())
    assert {t.dtype for t in adapters(Path(config.output.dir)).values()} == {torch.float32}  # trained in fp32


def test_compiled_training_equals_eager_training(tmp_path):
    settings = {"steps": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2}
    eager = train(load_config(tiny_config(tmp_path / "eager", train=settings)), progress=False)
    path = tiny_config(tmp_path / "compiled", train={**settings, "compile": "eager"})
    compiled = train(load_config(path), progress=False)
    a, b = adapters(tmp_path / "eager" / "run"), adapters(tmp_path / "compiled" / "run")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert compiled["best"]["test"] == pytest.approx(eager["best"]["test"])


def test_weight_decay_spares_biases_norms_and_what_timm_names(tmp_path):
    from loraplex.train.loop import make_optimizer

    from .test_mtlora import dense_model
    from .tiny import build

    cfg = load_config(tiny_config(tmp_path)).train
    for model, exempt in (
        (build("full_finetune"), {"backbone.pos_embed", "backbone.cls_token"}),
        (dense_model("mtlora"), {"backbone.layers.0.blocks.0.attn.relative_position_bias_table"}),
    ):
        decay = {
            id(p): group["weight_decay"] for group in make_optimizer(model, cfg).param_groups for p in group["params"]
        }
        named = {n: decay[id(p)] for n, p in model.named_parameters() if p.requires_grad}
        assert all(named[n] == 0.0 for n in exempt), exempt
        assert all(v == 0.0 for n, v in named.items() if n.endswith("bias") or re.search(r"\.norm\d?\.", n))
        assert all(v == cfg.weight_decay for n, v in named.items() if n.endswith(("qkv.weight", "fc1.weight")))


def test_a_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    config = load_config(tiny_config(tmp_path))
    model, regime = build_model(config), build_regime(config, dist=_single())
    real_loss = regime.loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, metrics = real_loss(model, batch)
        return (loss * math.nan if calls["n"] == 7 else loss), metrics

    regime.loss = poisoned
    run = Path(config.output.dir)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 7.*checkpoint: step 4"):
        fit(model, regime, config.train, run, tensorboard=False, progress=False)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["loop"]["step"] == 4


def test_mixup_blends_images_of_one_domain_and_their_losses_alike(tmp_path):
    """Each image is blended with one of its own domain (another head's labels would mean nothing to its head),
    with one weight per batch, and the loss blends the cross-entropies against both labels with that weight."""
    domains = torch.tensor([0, 1, 1, 2, 2, 2, 0, 3, 1, 2])
    torch.manual_seed(0)
    partners = within_domain_partners(domains)
    assert sorted(partners.tolist()) == list(range(10)) and torch.equal(domains[partners], domains)
    assert partners[7] == 7  # alone in its domain: blended with itself

    plain, mixed = (
        build_regime(load_config(tiny_config(tmp_path / name, train=train)), dist=_single())
        for name, train in (("plain", {}), ("mixed", {"mixup": 0.4}))
    )
    a, b = plain.next_batch(), mixed.next_batch()  # the stream is seeded: the same samples
    assert torch.equal(a.labels, b.labels) and torch.equal(a.domains, b.domains)
    assert torch.equal(b.domains[b.partners], b.domains) and not torch.equal(b.partners, torch.arange(len(b.labels)))
    assert 0 < b.mix < 1
    torch.testing.assert_close(b.images, b.mix * a.images + (1 - b.mix) * a.images[b.partners])
    model = build_model(load_config(tmp_path / "mixed" / "config.yaml"))
    loss, _ = mixed.loss(model, b)
    out = model(b.images, task=b.domains)
    own, other = out.sample_losses(b.labels).mean(), out.sample_losses(b.labels[b.partners]).mean()
    torch.testing.assert_close(loss, b.mix * own + (1 - b.mix) * other)
    plain.close(), mixed.close()


def test_resuming_into_a_run_dir_with_another_config_is_refused(tmp_path):
    train(load_config(tiny_config(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match=r"another recipe \(train.lr: 0.003 → 0.5\)"):
        train(load_config(tiny_config(tmp_path), ["train.lr=0.5"]), progress=False)
    resumed = train(load_config(tiny_config(tmp_path), ["train.threads=1"]), progress=False)  # execution only
    assert resumed["steps"] == 12


def test_a_run_saved_before_a_config_key_existed_still_resumes(tmp_path):
    config = load_config(tiny_config(tmp_path))
    train(config, progress=False)
    saved = Path(config.output.dir) / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["train"]["task_weights"], older["data"]["tasks"]  # keys later versions added, at their defaults
    saved.write_text(yaml.safe_dump(older))
    assert train(config, progress=False)["steps"] == 12  # read back, not refused
    older["train"]["lr"] = 0.5
    saved.write_text(yaml.safe_dump(older))
    with pytest.raises(ConfigError, match="another recipe"):
        train(config, progress=False)


def _single():
    from loraplex.train.dist import Dist

    return Dist()


# ---- DDP ----------------------------------------------------------------------------------------
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    settings = {"steps": 6, "eval_every": 6, "checkpoint_every": 6, "threads": 1}
    one = load_config(tiny_config(tmp_path / "one", train=settings))
    train(one, progress=False)
    path = tiny_config(tmp_path / "two", train=settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        "-m", "loraplex", "train", str(path), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = adapters(Path(one.output.dir)), adapters(tmp_path / "two" / "run")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    results = json.loads((tmp_path / "two" / "run" / "results.json").read_text())
    assert results["steps"] == 6


# ---- CLI ----------------------------------------------------------------------------------------
def test_every_command_has_help(capsys):
    for command in ("pretrain", "train", "eval", "params", "export", "report"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: loraplex " + command in capsys.readouterr().out


def test_cli_params_eval_export_and_errors(tmp_path, capsys):
    path = tiny_config(tmp_path)
    assert cli.main(["params", str(path), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == {"adapter", "router", "head", "trainable", "frozen", "total"}
    d, r, depth = 48, 2, 2
    per_layer = lambda out: (1 + 2) * r * (d + out)  # noqa: E731 — shared + 2 domains, A r×d, B out×r
    assert counts["adapter"] == depth * (per_layer(3 * d) + per_layer(4 * d))
    assert counts["head"] == 2 * (d + 1) * 10

    assert cli.main(["train", str(path), "--no-progress", "--set", "train.steps=4", "--set", "train.eval_every=2",
                     "--set", "train.checkpoint_every=2", "--set", "train.warmup_steps=1"]) == 0  # fmt: skip
    assert "acc/mean" in capsys.readouterr().out
    run = tmp_path / "run"
    assert cli.main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "results.json").read_text())["best"]["test"]
    assert evaluated == pytest.approx(saved)
    assert cli.main(["export", str(run), "--task", "mnist", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert f"{100 * saved['acc/mean']:.1f}" in (tmp_path / "report" / "report.md").read_text()

    assert cli.main(["params", str(path), "--set", "method.rank=many"]) == 2
    assert "method.rank must be" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_pretrain_writes_a_zoo_entry_that_loads_by_name_and_is_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAPLEX_ZOO", str(tmp_path / "zoo"))
    steps = {"steps": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2}
    path = tiny_config(tmp_path, method={"name": "full_finetune"}, train=steps, output={"zoo_name": "tiny_zoo"})
    with pytest.raises(ConfigError, match="full_finetune"):
        from loraplex.train.runner import pretrain

        pretrain(load_config(path, ["method.name=lora"]), progress=False)
    assert cli.main(["pretrain", str(path), "--no-progress"]) == 0
    entry = json.loads((tmp_path / "zoo" / "tiny_zoo.json").read_text())
    assert entry["architecture"] == "vit_tiny_patch16_224" and entry["summary"]["images_seen"] == 4 * 16
    trained = load_file(tmp_path / "run" / "final" / "adapters.safetensors")

    from loraplex.config import BackboneSection
    from loraplex.models import BackboneError, create_backbone

    backbone = create_backbone(BackboneSection(name="tiny_zoo", img_size=16))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, trained[f"backbone.{key}"]), key
    with pytest.raises(BackboneError, match=r"trained at 16 px .*img_size=32: .*pos_embed"):  # a ViT's pos_embed
        create_backbone(BackboneSection(name="tiny_zoo", img_size=32))
    weights = tmp_path / "zoo" / "tiny_zoo.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(BackboneError, match="sha256"):
        create_backbone(BackboneSection(name="tiny_zoo", img_size=16))


def test_the_demo_trains_checks_the_engine_and_writes_the_report(tmp_path, capsys):
    from loraplex import demo

    demo.main(["--config", str(tiny_config(tmp_path, train={"steps": 4, "warmup_steps": 1}))])
    out = capsys.readouterr().out
    assert "pixels+LR" in out and "mnist" in out
    assert "reloaded adapters give identical logits: True" in out
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4  # merged and PEFT paths reproduce the model
    assert (tmp_path / "run" / "report" / "report.html").exists()
