"""The continual regime: task sequences, the accuracy matrix and its metrics, resume after a kill mid-sequence,
InfLoRA's memory invariant and parameter accounting, and the bad inputs a sequence can have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraplex as lp
from loraplex.config import ConfigError, load_config
from loraplex.data.sequence import TaskView, build_sequence
from loraplex.data.stream import DomainData
from loraplex.eval.continual import summarise
from loraplex.methods.duallora import DualLoRAContinual
from loraplex.methods.inflora import InfLoRAContinual
from loraplex.train.runner import evaluate_run, train

from .test_train import kill_after_checkpoint
from .tiny import images, tiny_config, tiny_vit

CONTINUAL = {"regime": "continual", "steps": 6, "warmup_steps": 1, "eval_every": 3, "checkpoint_every": 3}
SPLIT = {"domains": ["digits"], "sequence": [[0, 1], [2, 3], [4, 5]], "train_per_domain": 300, "val_per_domain": 30,
         "test_per_domain": 120}  # fmt: skip
INFLORA = {"name": "inflora", "rank": 2, "target_modules": ["attn.qkv.k", "attn.qkv.v"]}


# ---- metrics --------------------------------------------------------------------------------------------------
def test_metrics_follow_their_definitions():
    matrix = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.75, 0.5]]
    sizes = [100, 100, 200]
    m = summarise(matrix, sizes)
    assert m["A_t"] == pytest.approx([0.9, 0.75, (60 + 75 + 100) / 400])
    assert m["A_T"] == m["A_t"][-1]
    assert m["avg_incremental"] == pytest.approx(sum(m["A_t"]) / 3)
    # max-based: task 0's best before the end is 0.9 (→ 0.3), task 1's 0.8 (→ 0.05); first-based the same here
    assert m["forgetting_max"] == pytest.approx((0.3 + 0.05) / 2)
    assert m["forgetting_first"] == pytest.approx((0.3 + 0.05) / 2)
    later_best = [[0.5, None], [0.9, 0.6]]  # task 0 improved after task 1: the two conventions differ
    assert summarise(later_best, [1, 1])["forgetting_max"] == pytest.approx(0.5 - 0.9)
    assert summarise(later_best, [1, 1])["forgetting_first"] == pytest.approx(0.5 - 0.9)
    three = [[0.5, None, None], [0.9, 0.6, None], [0.7, 0.6, 0.4]]
    assert summarise(three, [1, 1, 1])["forgetting_max"] == pytest.approx(((0.9 - 0.7) + 0.0) / 2)
    assert summarise(three, [1, 1, 1])["forgetting_first"] == pytest.approx(((0.5 - 0.7) + 0.0) / 2)
    assert summarise(three, [1, 1, 1])["backward_transfer"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="row 1 of the accuracy matrix must score tasks 0…1"):
        summarise([[0.5, None], [None, 0.5]], [1, 1])


# ---- sequences ------------------------------------------------------------------------------------------------
def test_class_orders_come_from_the_seed_and_tasks_are_disjoint():
    a, b, c = (build_sequence(["fashion"], 5, seed, [10]) for seed in (0, 0, 1))
    assert a == b and a != c
    classes = [cls for task in a for cls in task.classes]
    assert sorted(classes) == list(range(10)) and all(len(t.classes) == 2 for t in a)
    assert [t.name for t in a] == [f"fashion#{i}" for i in range(5)]
    domains = build_sequence(["mnist", "digits"], None, 0, [10, 10])
    assert [(t.name, t.classes, t.classes_count) for t in domains] == [("mnist", None, 10), ("digits", None, 10)]


@pytest.mark.parametrize(
    ("domains", "sequence", "message"),
    [
        (["fashion"], [[0, 1], [1, 2]], r"class 1 in tasks 0 and 1: tasks must hold disjoint classes"),
        (["fashion"], [[0, 0], [1]], r"class 0 twice"),
        (["fashion"], [[0, 1], []], r"task 1 holds no class"),
        (["fashion"], [[0, 1], [12]], r"names classes \[12\], but fashion has classes 0…9"),
        (["fashion"], 3, r"fashion has 10 classes: they do not split into 3 equal tasks"),
        (["fashion"], 1, r"≥ 2 tasks"),
        (["fashion", "mnist"], 2, r"splits one source's classes"),
        (["fashion"], None, r"needs ≥ 2 tasks"),
    ],
)
def test_bad_sequences_are_refused(domains, sequence, message):
    with pytest.raises(ValueError, match=message):
        build_sequence(domains, sequence, 0, [10] * len(domains))


def test_a_task_view_relabels_its_classes_in_order():
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    base = DomainData("d", torch.arange(8, dtype=torch.uint8).view(8, 1, 1).expand(8, 2, 2).contiguous(), labels, 10)
    view = TaskView("d#1", base, (9, 1))
    assert view.labels.tolist() == [1, 1, 0] and view.num_classes == 2  # rows 1, 3 and 5 of the source
    assert view.take(torch.tensor([0, 2]))[:, 0, 0].tolist() == [1, 5]


@pytest.mark.parametrize(
    ("data", "train", "message"),
    [
        ({"sequence": [[0, 1], [0, 2]], "domains": ["digits"]}, {"regime": "continual"}, "disjoint"),
        ({"sequence": 2, "domains": ["digits"]}, {"regime": "continual", "incremental": "domain"}, "one label space"),
        ({"sequence": 2, "domains": ["digits"]}, {}, r"data.sequence is for train.regime continual"),
        ({}, {"joint": True}, r"train.joint is for train.regime continual"),
        ({}, {"incremental": "class"}, r"train.incremental is for train.regime continual"),
    ],
)
def test_continual_config_errors(tmp_path, data, train, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config(tmp_path, data=data, train=train))


def test_inflora_thresholds_are_checked():
    for bad, message in (({"threshold_start": 0.0}, r"must lie in \(0, 1\]"), ({"threshold_end": 1.5}, r"\(0, 1\]"),
                         ({"threshold_start": 0.99, "threshold_end": 0.9}, "below threshold_start")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            lp.make_config("inflora", tasks=["a", "b"], **bad)


# ---- InfLoRA's memory -----------------------------------------------------------------------------------------
def _inflora_model(threshold: float = 1.0, rank: int = 2) -> tuple[lp.AdaptedModel, InfLoRAContinual]:
    cfg = lp.make_config("inflora", tasks=["a", "b"], rank=rank, target_modules=["attn.qkv.k", "attn.qkv.v"],
                         threshold_start=threshold, threshold_end=threshold)  # fmt: skip
    model = lp.wrap(tiny_vit(), cfg, heads={"a": 3, "b": 3}).eval()
    return model, InfLoRAContinual(cfg)


def test_inflora_later_branches_leave_old_tasks_inputs_unchanged():
    """With the whole energy kept (threshold 1), task 1's branch reads only directions outside what task 0's inputs
    span, in every adapted layer: the network's outputs on task 0's images do not move, however large B_1 is."""
    model, hooks = _inflora_model()
    old, new = images(batch=2, seed=1), images(batch=4, seed=2)  # 2·17 tokens: far fewer than the 48 input dims
    hooks.before_task(model, 0, lambda: iter([old]))
    group = model.adapted_layers()["blocks.0.attn.qkv"].groups["tasks"]
    assert group.trained_branch == 0
    for layer in model.adapted_layers().values():
        layer.groups["tasks"].B.data[0].normal_(std=0.5)  # a learned task 0
    hooks.after_task(model, 0, lambda: iter([old]))
    with torch.no_grad():
        before, before_new = model.forward_features(old), model.forward_features(new)
    hooks.before_task(model, 1, lambda: iter([new]))
    for name, layer in model.adapted_layers().items():
        g = layer.groups["tasks"]
        memory = hooks.memories[name].memory
        assert 0 < memory.shape[1] < 48
        assert (g.A[1] @ memory).abs().max() < 1e-5  # A_1 ⟂ the memory
        assert torch.allclose(g.A[1].norm(dim=1), torch.full((4,), 3**-0.5))  # k and v copies, scaled by 1/√3
        g.B.data[1].normal_(std=10.0)
    with torch.no_grad():
        after, after_new = model.forward_features(old), model.forward_features(new)
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()
    assert (after_new - before_new).abs().max() > 1e-2  # the new task's inputs do see its branch


def test_inflora_refuses_a_rank_the_memory_leaves_no_room_for():
    model, hooks = _inflora_model(rank=3)
    many = images(batch=16, seed=4)  # 16·17 tokens span all 48 input dims: threshold 1 keeps them all
    hooks.before_task(model, 0, lambda: iter([many]))
    hooks.after_task(model, 0, lambda: iter([many]))
    with pytest.raises(
        ValueError,
        match=r"blocks.0.attn.qkv, task 1: rank 3 does not fit: the memory holds 4[6-8] of 48 input directions",
    ):
        hooks.before_task(model, 1, lambda: iter([many]))


def test_inflora_memory_round_trips_through_its_state():
    model, hooks = _inflora_model(threshold=0.9)
    x = images(batch=3, seed=5)
    hooks.before_task(model, 0, lambda: iter([x]))
    hooks.after_task(model, 0, lambda: iter([x]))
    state = hooks.state_dict()
    again = InfLoRAContinual(hooks.config)
    again.load_state_dict(state)
    for name, memory in hooks.memories.items():
        assert torch.equal(again.memories[name].basis, memory.basis)
        assert len(again.memories[name].task_bases) == 1


def test_parameters_per_task_follow_the_formula(tmp_path, capsys):
    """InfLoRA trains B_t on k and v of every block (A is fixed) plus its task's head: 2 blocks × 2 × 48 × r."""
    from loraplex import cli

    path = tiny_config(tmp_path, method=INFLORA, data=SPLIT, train=CONTINUAL)
    assert cli.main(["params", str(path), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    per_task_b = 2 * 2 * 48 * 2
    assert counts["adapter"] == 3 * per_task_b
    assert counts["per_task"] == per_task_b + (48 * 2 + 2)
    assert counts["head"] == 3 * (48 * 2 + 2)


# ---- the regime -----------------------------------------------------------------------------------------------
def test_a_class_incremental_run_scores_every_seen_task(tmp_path):
    config = load_config(tiny_config(tmp_path, method=INFLORA, data=SPLIT, train=CONTINUAL))
    results = train(config, progress=False)
    run = Path(config.output.dir)
    matrix = results["matrix"]
    assert [sum(v is not None for v in row) for row in matrix] == [1, 2, 3]
    assert results["setting"] == "class" and results["tasks"] == ["digits#0", "digits#1", "digits#2"]
    assert results["A_T"] == pytest.approx(summarise(matrix, results["test_sizes"])["A_T"])
    assert results["test_sizes"] == [24, 24, 24]  # 120 test images, 12 per class, 2 classes a task
    assert json.loads((run / "continual.json").read_text())["done"] == 3
    assert (run / "accuracy_matrix.png").stat().st_size > 1000
    after = [load_file(run / f"task{t}" / "after" / "adapters.safetensors") for t in range(3)]
    key = next(k for k in after[0] if k.endswith("groups.tasks.B"))
    assert torch.equal(after[2][key][0], after[0][key][0])  # task 0's branch untouched by later tasks
    assert not torch.equal(after[2][key][2], torch.zeros_like(after[2][key][2]))
    again = train(config, progress=False)  # a finished sequence is read back, not trained again
    assert again["matrix"] == matrix
    scored = evaluate_run(run, split_name="test", device="cpu")  # `loraplex eval`: the model after the last task
    assert [scored[f"acc/{t}"] for t in results["tasks"]] == pytest.approx(matrix[-1])
    assert scored["acc/mean"] == pytest.approx(results["A_T"])


def test_a_sequence_killed_inside_a_task_resumes_to_the_same_matrix(tmp_path):
    train_cfg = {**CONTINUAL, "threads": 1}
    straight = load_config(tiny_config(tmp_path / "a", method=INFLORA, data=SPLIT, train=train_cfg))
    expected = train(straight, progress=False)
    path = tiny_config(tmp_path / "b", method=INFLORA, data=SPLIT, train=train_cfg)
    run = tmp_path / "b" / "run"
    cmd = [sys.executable, "-m", "loraplex", "train", str(path), "--no-progress"]
    kill_after_checkpoint(cmd, run, step=3, checkpoint="task1/checkpoint.pt")
    assert json.loads((run / "continual.json").read_text())["done"] == 1
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming the sequence after task 1 of 3" in done.stdout
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["matrix"] == expected["matrix"]
    a = load_file(Path(straight.output.dir) / "task2" / "after" / "adapters.safetensors")
    b = load_file(run / "task2" / "after" / "adapters.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = subprocess.run([*cmd, "--set", "data.sequence=[[2,3],[0,1],[4,5]]"], capture_output=True, text=True)
    assert other.returncode != 0 and "another recipe (data.sequence" in other.stderr


def test_baselines_run_in_their_settings(tmp_path):
    lora = {"name": "lora", "rank": 2, "target_modules": ["attn.qkv"]}
    per_task = {"name": "lora_per_task", "rank": 2, "target_modules": ["attn.qkv"]}
    short = {**CONTINUAL, "steps": 3, "eval_every": 3}
    two = {**SPLIT, "sequence": [[0, 1], [2, 3]]}
    seq = train(load_config(tiny_config(tmp_path / "seq", method=lora, data=two, train=short)), progress=False)
    assert len(seq["matrix"]) == 2 and seq["params"]["per_task"] == seq["params"]["trainable"] - (48 * 2 + 2)
    oracle_cfg = {**short, "incremental": "task"}
    oracle = train(load_config(tiny_config(tmp_path / "oracle", method=per_task, data=two, train=oracle_cfg)),
                   progress=False)  # fmt: skip
    assert oracle["setting"] == "task" and oracle["matrix"][1][0] is not None
    with pytest.raises(ValueError, match=r"scored with the task id given \(train.incremental: task\)"):
        train(load_config(tiny_config(tmp_path / "bad", method=per_task, data=two, train=short)), progress=False)
    joint = train(load_config(tiny_config(tmp_path / "joint", method=lora, data=two, train={**short, "joint": True})),
                  progress=False)  # fmt: skip
    assert joint["joint"] and len(joint["matrix"]) == 1 and len(joint["matrix"][0]) == 2
    domains = {"domains": ["digits", "mnist"], "train_per_domain": 120, "val_per_domain": 30, "test_per_domain": 60}
    probe = {"name": "linear_probe"}
    dil = train(load_config(tiny_config(tmp_path / "dil", method=probe, data=domains, train=short)), progress=False)
    assert dil["setting"] == "domain" and dil["tasks"] == ["digits", "mnist"]


# ---- DualLoRA -------------------------------------------------------------------------------------------------
DUALLORA = {"name": "duallora", "rank": 2, "residual_rank": 2, "target_modules": ["attn.qkv.k", "attn.qkv.v"]}


def _duallora_model(**kw) -> tuple[lp.AdaptedModel, DualLoRAContinual]:
    cfg = lp.make_config("duallora", tasks=["a", "b"], **{**{k: v for k, v in DUALLORA.items() if k != "name"}, **kw})
    return lp.wrap(tiny_vit(), cfg, heads={"a": 3, "b": 3}).eval(), DualLoRAContinual(cfg)


def _learn(model: lp.AdaptedModel, task: int, seed: int, std: float = 0.5) -> None:
    """Stand-in for training task ``task``: random factors on its branches of both LoRAs."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.adapted_layers().values():
        for group in layer.groups.values():
            for factor in (group.A, group.B):
                factor.data[task] = torch.randn(factor[task].shape, generator=g) * std


def test_duallora_orthogonal_branches_leave_old_inputs_unchanged_and_residuals_stay_in_their_bases():
    model, hooks = _duallora_model(threshold_start=1.0, threshold_end=1.0, tokens="all")
    old, new = images(batch=1, seed=1), images(batch=4, seed=2)  # task 0 before and after training: ≤ 34 of 48 dims
    hooks.before_task(model, 0, lambda: iter([old]))
    _learn(model, 0, seed=1)
    hooks.after_task(model, 0, lambda: iter([old]))
    with torch.no_grad():
        before = model.forward_features(old, task=0)
    hooks.before_task(model, 1, lambda: iter([new]))
    _learn(model, 1, seed=2, std=1.0)
    with torch.no_grad():
        after = model.forward_features(old, task=0)
        moved = (model.forward_features(new, task=1) - model.forward_features(new, task=0)).abs().max()
    # float precision: the projection's fp32 rounding, amplified by ‖B_1‖‖A_1‖ (~70 here), is all old inputs see
    assert (after - before).abs().max() < 1e-4 and moved > 0.1
    for name, layer in model.adapted_layers().items():
        bases = hooks.memories[name].task_bases  # task 0 before and after it trained, then task 1's own U_1
        a, _ = layer.groups["residual"].factors()
        u = bases[2]
        assert u.shape[1] > 0 and (a[1] - a[1] @ u @ u.T).abs().max() < 1e-5  # A_1 rows inside span(U_1)
        a_o, _ = layer.groups["orthogonal"].factors()
        assert (a_o[1] @ torch.cat(bases[:2], 1)).abs().max() < 1e-4  # orthogonal branch 1 outside M_0


def test_relevance_gates_pick_the_task_whose_bases_hold_the_input():
    from loraplex.core.subspace import Relevance

    eye = torch.eye(6)
    basis = torch.stack([eye[:, :2], eye[:, 2:4], eye[:, :0].new_zeros(6, 2)])  # task 2: not learned
    relevance = Relevance(3, cls_only=False, temperature=0.1)
    relevance.norm.copy_(torch.tensor([0.5, 0.5, 0.0]))
    x = torch.zeros(2, 6)
    x[0, 0], x[1, 3] = 1.0, 1.0
    gates = relevance.gates(x, basis)
    assert gates.argmax(1).tolist() == [0, 1] and torch.all(gates[:, 2] == 0)
    assert torch.allclose(gates.sum(1), torch.ones(2))
    relevance.temperature = float("inf")  # dynamic memory off: every learned task alike
    assert torch.allclose(relevance.gates(x, basis), torch.tensor([[0.5, 0.5, 0.0]] * 2))


def test_duallora_saves_and_loads_with_its_grown_bases(tmp_path):
    model, hooks = _duallora_model()
    for task, seed in ((0, 1), (1, 2)):
        inputs = lambda s=seed: iter([images(batch=3, seed=s)])  # noqa: E731
        hooks.before_task(model, task, inputs)
        _learn(model, task, seed)
        hooks.after_task(model, task, inputs)
    x = images(batch=5, seed=9)
    with torch.no_grad():
        expected = hooks.class_logits(model, x, 1)
    model.save(tmp_path / "m")
    loaded = lp.load(tmp_path / "m", tiny_vit()).eval()
    with torch.no_grad():
        assert torch.allclose(hooks.class_logits(loaded, x, 1), expected, atol=1e-5)
    assert not loaded.mergeable  # relevance-gated residuals have no fixed ΔW without a task
    with pytest.raises(ValueError, match="input-dependent gates without a task"), loaded.merged():
        pass


def test_duallora_runs_and_resumes_between_tasks(tmp_path):
    two = {**SPLIT, "sequence": [[0, 1], [2, 3]]}
    short = {**CONTINUAL, "steps": 3, "eval_every": 3}
    config = load_config(tiny_config(tmp_path / "a", method=DUALLORA, data=two, train=short))
    expected = train(config, progress=False)
    assert expected["params"]["per_task"] == 2 * 2 * (2 * 2 * 48 + 2 * 48 * 2) + (48 * 2 + 2)
    # a run stopped right after task 0 was written: its sequence state says so, task 1 never started
    config_b = load_config(tiny_config(tmp_path / "b", method=DUALLORA, data=two, train=short))
    run = Path(config_b.output.dir)
    train(config_b, progress=False)
    state = json.loads((run / "continual.json").read_text())
    (run / "continual.json").write_text(json.dumps({**state, "done": 1, "matrix": state["matrix"][:1],
                                                    "task_seconds": state["task_seconds"][:1]}))  # fmt: skip
    (run / "results.json").unlink()
    for path in sorted((run / "task1").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    resumed = train(config_b, progress=False)
    assert resumed["matrix"] == expected["matrix"]


def test_duallora_refuses_an_orthogonal_rank_the_memory_leaves_no_room_for():
    model, hooks = _duallora_model(threshold_start=1.0, threshold_end=1.0, tokens="all", rank=3)
    many = images(batch=16, seed=4)
    hooks.before_task(model, 0, lambda: iter([many]))
    hooks.after_task(model, 0, lambda: iter([many]))
    with pytest.raises(ValueError, match=r"task 1: the orthogonal LoRA's rank 3 does not fit: the memory holds"):
        hooks.before_task(model, 1, lambda: iter([many]))


def test_duallora_options_are_checked():
    for bad, message in (({"temperature": 0}, "'temperature' must be > 0"), ({"calibration": -1}, "'calibration'"),
                         ({"tokens": "mean"}, "'tokens' must be 'cls' or 'all'")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            lp.make_config("duallora", tasks=["a", "b"], **bad)


@pytest.mark.parametrize("method", ["inflora", "duallora"])
def test_paper_configurations_count_by_the_formula(method, capsys):
    """ViT-B/16 on ImageNet-R in 10 tasks of 20 classes, rank 10 on the k and v rows of all 12 blocks."""
    from loraplex import cli

    paper = Path(__file__).resolve().parents[1] / "configs" / "paper" / f"{method}_vitb_imagenetr10.yaml"
    assert cli.main(["params", str(paper), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    blocks, d, r, tasks, head = 12, 768, 10, 10, 20 * 768 + 20
    b_only = blocks * 2 * d * r  # InfLoRA trains B of k and v; A is fixed from the data
    both = blocks * 2 * (2 * r * d + 2 * d * r)  # DualLoRA: A [2r, d] and B [2, d, r] in each of its two LoRAs
    per_task = b_only if method == "inflora" else both
    assert counts["adapter"] == tasks * per_task
    assert counts["per_task"] == per_task + head
    assert counts["head"] == tasks * head


# ---- DDP ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["inflora", "duallora"])
def test_two_processes_learn_the_sequence_one_process_learns(tmp_path, method):
    """Under torchrun the memory hooks run on every rank from the same inputs, so the ranks' bases agree and the
    sequence (new branches between tasks, only B trained) matches one process with the same global batch."""
    two = {**SPLIT, "sequence": [[0, 1], [2, 3]]}
    settings = {**CONTINUAL, "threads": 1}
    spec = {"inflora": INFLORA, "duallora": DUALLORA}[method]
    one = load_config(tiny_config(tmp_path / "one", method=spec, data=two, train=settings))
    expected = train(one, progress=False)
    path = tiny_config(tmp_path / "two", method=spec, data=two, train=settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           "-m", "loraplex", "train", str(path), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "two" / "run"
    results = json.loads((run / "results.json").read_text())
    for row, expected_row in zip(results["matrix"], expected["matrix"], strict=True):
        assert row == pytest.approx(expected_row, abs=1 / 24)  # one test image of 24 at most
    a = load_file(Path(one.output.dir) / "task1" / "after" / "adapters.safetensors")
    b = load_file(run / "task1" / "after" / "adapters.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
