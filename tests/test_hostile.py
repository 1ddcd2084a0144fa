"""A user's own mistakes and a hostile machine: every case is one clear line and exit 2 (a diverged run: 1),
nothing is silently wrong and nothing is lost.  Each case that was once silent or lost data is a regression
test here (issue 13)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import loraplex as lp
from loraplex import cli
from loraplex.config import load_config
from loraplex.core.state import TENSORS_FILE, state_digest
from loraplex.train import TrainingDiverged, fit
from loraplex.train.dist import Dist
from loraplex.train.loop import CHECKPOINT, RESULTS, dumps
from loraplex.train.runner import build_model, build_regime, train

from .tiny import TINY, tiny_config

SHORT = {"steps": 8, "warmup_steps": 1, "eval_every": 4, "checkpoint_every": 4}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run (8 steps), copied by each test that damages it."""
    root = tmp_path_factory.mktemp("finished")
    train(load_config(tiny_config(root, train=SHORT)), progress=False)
    return root


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run: ``run/`` beside its ``config.yaml``."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["output"]["dir"] = str(tmp_path / "run")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "run"


def fails(capsys, argv: list[str], fragment: str, code: int = 2) -> str:
    """Run the CLI, expect exit ``code`` and one error line holding ``fragment``."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1, err
    return err


# ---- user-fixable failures: one line, exit 2 ---------------------------------------------------
CONFIG_CASES = [
    (["--set", "data.domains=[nope]"], "data.domains: unknown source 'nope'"),
    (["--set", "method.target_modules=[attn.query]"], "target_modules ['attn.query'] matched no nn.Linear"),
    (["--set", "method.rank=1000"], "has rank 1000, but its 144×48 weight has rank at most 48"),
    (["--set", "train.steps=abc"], "--set train.steps=abc: train.steps must be int"),
    (["--set", "method.dropout=1.5"], "config key 'dropout' must lie in [0, 1), got 1.5"),
    (["--set", "method.alpha=-2"], "config key 'alpha' must be > 0, got -2"),
    (["--set", "method.k=0"], "config key 'k' must be an int ≥ 1 or a fraction in (0, 1], got 0"),
    (["--set", "method.k=1.5"], "config key 'k' as an energy fraction must lie in (0, 1], got 1.5"),
    (["--set", "train.device=tpu"], "train.device must be auto, cpu, cuda or cuda:<index>, got 'tpu'"),
]


@pytest.mark.parametrize(("overrides", "fragment"), CONFIG_CASES)
def test_a_bad_config_is_one_line_naming_the_key(overrides, fragment, tmp_path, capsys):
    fails(capsys, ["params", str(tiny_config(tmp_path)), *overrides], fragment)


def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    path = tiny_config(tmp_path, output={"dir": str(tmp_path / "taken")})
    fails(capsys, ["train", str(path), "--no-progress"], "is a file, not a directory")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p: p.write_bytes(b""), "is unreadable"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is unreadable"),
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "is unreadable"),
    ],
    ids=["zero-byte", "truncated", "garbage"],
)
def test_an_unreadable_checkpoint_is_named(run, damage, fragment, capsys):
    damage(run / CHECKPOINT)
    fails(capsys, ["train", str(run.parent / "config.yaml"), "--no-progress"], f"{run / CHECKPOINT} {fragment}")


def test_bit_rot_in_a_checkpoint_is_caught_not_resumed(run, capsys):
    """Regression: flipped bytes in tensor data loaded silently, and a re-run re-finalised from them."""
    saved = torch.load(run / CHECKPOINT, weights_only=True)
    key = next(k for k in saved["model"] if k.endswith(".B"))
    saved["model"][key] = saved["model"][key] + 1.0  # bytes changed, checksum kept
    torch.save(saved, run / CHECKPOINT)
    before = (run / RESULTS).read_text()
    fails(capsys, ["train", str(run.parent / "config.yaml"), "--no-progress"], "is damaged")
    assert (run / RESULTS).read_text() == before


def test_bit_rot_in_an_adapter_file_is_refused(run, capsys):
    """Regression: flipped bytes in an adapter loaded silently (accuracy 58% → 10%)."""
    path = run / "best" / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor's data
    path.write_bytes(bytes(data))
    fails(capsys, ["eval", str(run)], "is damaged: its tensors do not match the checksum")


def test_a_non_finite_adapter_is_refused(run, capsys):
    """Regression: NaN adapters in best/ were evaluated (10%, exit 0)."""
    path = run / "best" / TENSORS_FILE
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".B"))
    tensors[key] = torch.full_like(tensors[key], math.nan)
    save_file(tensors, path, metadata={"format": "loraplex", "sha256": state_digest(tensors)})  # a valid file
    fails(capsys, ["eval", str(run)], "holds NaN or infinite values")


def test_run_directory_mistakes_are_named(run, tmp_path, capsys):
    (run / "config.yaml").write_text("train: [unclosed")
    fails(capsys, ["eval", str(run)], "config.yaml is corrupted")
    fails(capsys, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "missing")
    fails(capsys, ["eval", str(tmp_path / "missing")], "not a run directory")
    fails(capsys, ["export", str(tmp_path / "missing"), "--task", "mnist"], "not a run directory")


def test_export_mistakes_are_named(run, capsys):
    fails(capsys, ["export", str(run), "--task", "mnsit"], "--task: unknown task 'mnsit'")


def test_a_run_that_is_not_one_lora_per_task_cannot_be_exported(tmp_path, capsys):
    dense = tiny_config(
        tmp_path,
        backbone={"name": "swin_tiny_patch4_window7_224", "img_size": 32,
                  "kwargs": {"patch_size": 2, "window_size": 4, "embed_dim": 24, "depths": [2, 2],
                             "num_heads": [2, 2]}},
        method={"name": "mtlora", "rank": 2, "task_rank": 2},
        data={"domains": ["scenes"], "tasks": ["semseg", "depth"], "train_per_domain": 8, "val_per_domain": 4,
              "test_per_domain": 4},
        train={"regime": "multitask", "steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_every": 2,
               "checkpoint_every": 2},
    )  # fmt: skip
    assert cli.main(["train", str(dense), "--no-progress"]) == 0
    capsys.readouterr()
    fails(capsys, ["export", str(tmp_path / "run"), "--task", "depth"], "cannot be exported as a PEFT LoRA")


def test_a_full_disk_is_said_and_the_last_good_files_are_kept(run, monkeypatch, capsys):
    import errno

    config = run.parent / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["train"]["steps"] = 12  # go on past the finished 8 steps; the next checkpoint cannot be written
    config.write_text(yaml.safe_dump(raw))
    before = (run / CHECKPOINT).read_bytes()

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    fails(capsys, ["train", str(config), "--no-progress"], "the disk is full")
    assert (run / CHECKPOINT).read_bytes() == before  # the good checkpoint is untouched
    assert not [p for p in run.iterdir() if p.name.startswith(f".{CHECKPOINT}.")]  # and no half-written file


# ---- divergence: nothing non-finite is ever written --------------------------------------------
def _poisoned_fit(tmp_path, poison) -> tuple[Path, Exception]:
    config = load_config(tiny_config(tmp_path, train={**SHORT, "steps": 12}))
    torch.manual_seed(0)
    model, regime = build_model(config), build_regime(config, Dist())
    real_loss, calls = regime.loss, {"n": 0}

    def loss(trained, batch):
        calls["n"] += 1
        out = real_loss(trained, batch)
        poison(model, calls["n"])
        return out

    regime.loss = loss
    run = Path(config.output.dir)
    with pytest.raises(TrainingDiverged) as caught:
        fit(model, regime, config.train, run, tensorboard=False, progress=False)
    return run, caught.value


def test_an_infinite_gradient_stops_before_the_update(tmp_path):
    def poison(model, n):
        if n == 7:
            b = next(p for name, p in model.named_parameters() if name.endswith(".B"))
            b.register_hook(lambda g: g * math.inf)

    run, err = _poisoned_fit(tmp_path, poison)
    assert "gradient norm became" in str(err) and "step 4" in str(err)
    assert torch.load(run / CHECKPOINT, weights_only=True)["loop"]["step"] == 4


def test_non_finite_weights_are_never_written(tmp_path):
    """Regression: only the loss was checked, so a checkpoint or best/ could hold NaN tensors."""
    steps = {"n": 0}

    def after_step(optimizer, args, kwargs):  # the 8th update leaves NaN weights; step 8 validates and checkpoints
        steps["n"] += 1
        if steps["n"] == 8:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(math.nan)

    hook = register_optimizer_step_post_hook(after_step)
    try:
        run, err = _poisoned_fit(tmp_path, lambda model, n: None)
    finally:
        hook.remove()
    assert "NaN or infinite" in str(err) and "Last good checkpoint: step 4" in str(err)
    saved = torch.load(run / CHECKPOINT, weights_only=True)
    assert saved["loop"]["step"] == 4 and all(torch.isfinite(t).all() for t in saved["model"].values())
    assert all(torch.isfinite(t).all() for t in load_file(run / "best" / TENSORS_FILE).values())


def test_metrics_json_is_strict():
    line = dumps({"loss": math.nan, "acc": 0.5, "nested": [math.inf]})
    assert json.loads(line) == {"loss": None, "acc": 0.5, "nested": [None]}


# ---- run directories -----------------------------------------------------------------------------
def test_a_finished_run_is_not_finalised_again(run, capsys):
    """Regression: re-running a finished command rewrote final/ and results.json from the checkpoint."""
    before = {p: p.stat().st_mtime_ns for p in (run / RESULTS, run / "final" / TENSORS_FILE)}
    assert cli.main(["train", str(run.parent / "config.yaml"), "--no-progress"]) == 0
    assert "is finished (8 steps)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_run_continues_when_its_steps_are_raised(run):
    config = load_config(run.parent / "config.yaml", ["train.steps=12"])
    results = train(config, progress=False)
    assert results["steps"] == 12
    assert json.loads((run / RESULTS).read_text())["steps"] == 12
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 12


def test_a_moved_run_resumes_where_it_lies(run, tmp_path):
    """Regression: a run directory moved, or given as an absolute path, was refused as "a different config"."""
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run, moved)
    config = load_config(run.parent / "config.yaml", [f"output.dir={moved}", "train.steps=12"])
    assert train(config, progress=False)["steps"] == 12


def test_a_second_writer_is_refused(run, capsys):
    """Regression: two processes on one run directory both ran and interleaved their logs."""
    with (run / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 12345 on elsewhere")
        held.flush()
        fails(capsys, ["train", str(run.parent / "config.yaml"), "--no-progress"], "is in use by process 12345")


def test_orphaned_temporaries_are_cleaned(run):
    orphan = run / f".{CHECKPOINT}.k1ll3d"
    orphan.write_bytes(b"half a checkpoint")
    best_orphan = run / "best" / f".{TENSORS_FILE}.k1ll3d"
    best_orphan.write_bytes(b"half an adapter")
    train(load_config(run.parent / "config.yaml", ["train.steps=12"]), progress=False)
    assert not orphan.exists() and not best_orphan.exists()


# ---- backbones and the zoo -----------------------------------------------------------------------
def test_pretrain_refuses_to_overwrite_a_zoo_entry_and_fingerprints_name_it(tmp_path, monkeypatch, capsys):
    """Regression: pretrain overwrote a zoo entry without asking, and runs on it then failed naming the timm
    architecture instead of the entry."""
    monkeypatch.setenv("LORAPLEX_ZOO", str(tmp_path / "zoo"))
    steps = {"steps": 2, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2}
    recipe = tiny_config(tmp_path / "pre", method={"name": "full_finetune"}, train=steps,
                         output={"zoo_name": "mine"})  # fmt: skip
    assert cli.main(["pretrain", str(recipe), "--no-progress"]) == 0
    on_zoo = tiny_config(tmp_path / "down", backbone={**TINY["backbone"], "name": "mine", "kwargs": {}}, train=steps)
    assert cli.main(["train", str(on_zoo), "--no-progress"]) == 0
    capsys.readouterr()
    again = ["pretrain", str(recipe), "--no-progress", "--set", f"output.dir={tmp_path / 'pre2'}"]
    fails(capsys, again, "zoo entry 'mine' exists")
    assert cli.main([*again, "--overwrite", "--set", "train.seed=1"]) == 0  # other weights under the same name
    capsys.readouterr()
    fails(capsys, ["eval", str(tmp_path / "down" / "run")], "trained on backbone zoo entry 'mine'")


# ---- what a person sees --------------------------------------------------------------------------
def test_progress_is_printed_as_it_happens_without_a_bar(tmp_path, capsys):
    assert cli.main(["train", str(tiny_config(tmp_path, train=SHORT)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for line in ("loraplex: shared_specific on digits, mnist", "model built:", "step 4/8 val: acc/mean",
                 "step 8/8 val:", "test (last, step 8): acc/mean", "test (best, step"):  # fmt: skip
        assert line in out, line
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"loraplex {lp.__version__}"


# ---- adapter files -------------------------------------------------------------------------------
def test_bases_rebuilt_from_the_frozen_weights_are_not_stored(tmp_path):
    """Regression: a subspace adapter stored every column-space basis, larger than its backbone."""
    from .tiny import BACKBONES, build, images

    model = build("shared_specific", rank=2, constraint="subspace", target_modules=["qkv", "fc1"])
    model.save(tmp_path / "a")
    stored = load_file(tmp_path / "a" / TENSORS_FILE)
    assert not [k for k in stored if k.endswith(".basis")]
    trained = sum(t.numel() for k, t in stored.items() if not k.endswith(".scale"))  # scales: a float a branch
    assert trained == lp.count_parameters(model)["trainable"]
    loaded = lp.load(tmp_path / "a", BACKBONES["vit"](0)).eval()
    x = images(4)
    for task in ("fashion", "digits"):
        torch.testing.assert_close(loaded(x, task=task), model(x, task=task), atol=1e-6, rtol=1e-6)


def test_a_version_1_adapter_file_still_loads(tmp_path):
    """Files written before heads were keyed by position (and bases left out) load unchanged."""
    from .tiny import BACKBONES, TASKS, build, images

    model = build("shared_specific", rank=2, constraint="subspace", target_modules=["qkv"])
    model.save(tmp_path / "v1")
    tensors = load_file(tmp_path / "v1" / TENSORS_FILE)
    old = {(f"heads.{TASKS[int(k.split('.')[1])]}." + k.split(".", 2)[2]) if k.startswith("heads.") else k: v
           for k, v in tensors.items()}  # fmt: skip
    old |= {k: v.detach().clone() for k, v in lp.core.state.rebuilt_bases(model).items()}
    save_file(old, tmp_path / "v1" / TENSORS_FILE, metadata={"format": "loraplex"})
    config = json.loads((tmp_path / "v1" / "loraplex_config.json").read_text())
    config["version"] = 1
    del config["rebuilt"]
    (tmp_path / "v1" / "loraplex_config.json").write_text(json.dumps(config))
    loaded = lp.load(tmp_path / "v1", BACKBONES["vit"](0)).eval()
    x = images(4)
    torch.testing.assert_close(loaded(x, task="mnist"), model(x, task="mnist"), atol=1e-6, rtol=1e-6)


def test_task_names_are_never_module_keys(tmp_path):
    """Regression: a domain name holding a dot (``folder:./data``) crashed: heads were keyed by name."""
    from .tiny import BACKBONES, images

    names = ["folder:./data", "folder:/home/j.doe/set.v2"]
    model = lp.wrap(BACKBONES["vit"](0), lp.make_config("lora", tasks=names, rank=2), heads=dict.fromkeys(names, 3))
    model.save(tmp_path / "dots")
    loaded = lp.load(tmp_path / "dots", BACKBONES["vit"](0))
    out = loaded(images(4), task=torch.tensor([0, 1, 1, 0]))
    assert set(out.logits) == set(names) and os.path.exists(tmp_path / "dots" / TENSORS_FILE)


# ---- a user's own image folder, end to end -------------------------------------------------------
def _own_folder(root: Path, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 10) -> Path:
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (12 + 3 * i, 10 + 2 * c)  # every image its own size
            pixels = (torch.rand(size[1], size[0], 3, generator=rng) * 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root


def _folder_config(tmp_path: Path, folder: str) -> Path:
    data = {"domains": [folder, "digits"], "train_per_domain": 12, "val_per_domain": 4, "test_per_domain": 4}
    return tiny_config(tmp_path, data=data, train={**SHORT, "steps": 4})


def test_an_own_folder_with_a_dotted_relative_path_and_mixed_sizes_trains(tmp_path, monkeypatch, capsys):
    """Regression: any path holding a '.' crashed (a module name was built from it); mixed sizes were refused."""
    _own_folder(tmp_path / "j.doe" / "set.v2")
    monkeypatch.chdir(tmp_path)
    config = _folder_config(tmp_path, "folder:./j.doe/set.v2")
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"acc/folder:./j.doe/set.v2", "acc/digits", "acc/mean"}
    assert lp.load_run(tmp_path / "run").tasks == ["folder:./j.doe/set.v2", "digits"]


def test_own_folder_mistakes_are_one_line(tmp_path, capsys):
    one = _own_folder(tmp_path / "one", classes=("only",))
    fails(capsys, ["train", str(_folder_config(tmp_path / "a", f"folder:{one}")), "--no-progress"], "only")
    two = _own_folder(tmp_path / "two")
    (two / "dogs" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    config = _folder_config(tmp_path / "b", f"folder:{two}")
    fails(capsys, ["train", str(config), "--no-progress"], str(two / "dogs" / "3.png"))
    skipping = ["--set", "data.skip_unreadable=true", "--set", "data.train_per_domain=10"]  # 19 images left
    assert cli.main(["train", str(config), "--no-progress", *skipping]) == 0


def test_an_error_raised_in_a_data_worker_is_printed_as_its_own_line():
    from loraplex.cli import _one_line

    raised = RuntimeError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nloraplex.data.sources.DataError: cannot decode image /d/cats/3.png: truncated'
    )
    assert _one_line(raised) == "cannot decode image /d/cats/3.png: truncated"
