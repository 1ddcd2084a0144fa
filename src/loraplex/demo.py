"""End-to-end tour of the engine on real data (scikit-learn's 8×8 digits split into three tasks).

Wraps a small timm ViT (random init: the offline pre-trained zoo arrives with the run layer),
trains a shared LoRA plus one LoRA per task — the two confined to separate subspaces of each W —
on mixed batches, then merges, saves, reloads and exports to PEFT, checking each step.
Run: ``make demo`` (or ``python -m loraplex.demo``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F
from tqdm import tqdm

import loraplex as lp

TASK_CLASSES = {"digits_0to3": (0, 1, 2, 3), "digits_4to6": (4, 5, 6), "digits_7to9": (7, 8, 9)}


def digit_tasks(seed: int) -> tuple[torch.Tensor, ...]:
    """Images ``[n, 3, 16, 16]``, task ids, labels within each task — train and test, stratified."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    classes = torch.tensor(digits.target)
    task = torch.zeros_like(classes)
    label = torch.zeros_like(classes)
    for t, members in enumerate(TASK_CLASSES.values()):
        for i, c in enumerate(members):
            task[classes == c], label[classes == c] = t, i
    tr, te = train_test_split(torch.arange(len(x)), test_size=0.3, random_state=seed, stratify=classes)
    return x[tr], task[tr], label[tr], x[te], task[te], label[te]


def backbone(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
        embed_dim=96, depth=4, num_heads=3,
    ).eval()


def accuracy(model: lp.AdaptedModel, x: torch.Tensor, task: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        out = model(x, task=task)
    return {t: (out.logits[t].argmax(1) == label[out.index[t]]).float().mean().item() for t in out.logits}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (mixed batches of 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="where to write adapters (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="loraplex-demo-"))
    xtr, ttr, ytr, xte, tte, yte = digit_tasks(args.seed)
    tasks = list(TASK_CLASSES)
    print(f"data: sklearn digits, {len(xtr)} train / {len(xte)} test images in 3 tasks {tasks}")

    cfg = lp.make_config(
        "shared_specific", tasks=tasks, rank=8, domain_rank=4, constraint="subspace",
        target_modules=["attn.qkv", "mlp.fc1"],
    )
    model = lp.wrap(backbone(args.seed), cfg, heads={t: len(c) for t, c in TASK_CLASSES.items()})
    print(f"method: shared_specific (subspace constraint) on {len(model.adapted_layers())} layers; "
          f"parameters: {lp.count_parameters(model)}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.perf_counter()
    for _ in (bar := tqdm(range(args.steps), desc="train (mixed batches)", unit="step")):
        idx = torch.randint(len(xtr), (64,), generator=generator)
        loss = model(xtr[idx], task=ttr[idx]).loss(ytr[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    acc = accuracy(model, xte, tte, yte)
    print("test accuracy per task: " + ", ".join(f"{t} {a:.1%}" for t, a in acc.items()))

    worst = 0.0
    for t in tasks:
        sel = tte == tasks.index(t)
        with torch.inference_mode():
            unmerged = model(xte[sel], task=t)
            with model.merged(task=t):
                merged = model(xte[sel], task=t)
        worst = max(worst, (merged - unmerged).abs().max().item())
    print(f"merged vs unmerged logits, max |diff| over tasks: {worst:.2e}")

    model.save(out_dir / "adapter")
    reloaded = lp.load(out_dir / "adapter", backbone(args.seed)).eval()
    with torch.inference_mode():
        same = torch.equal(reloaded(xte, task=tasks[0]), model(xte, task=tasks[0]))
    print(f"saved to {out_dir / 'adapter'}; reloaded model gives identical logits: {same}")
    try:
        lp.load(out_dir / "adapter", backbone(args.seed + 1))
    except lp.AdapterFileError as err:
        print(f"wrong backbone refused: {str(err)[:110]}…")

    task = tasks[1]
    lp.export_peft(model, out_dir / "peft", task=task)
    try:
        import peft
    except ImportError:
        print(f"PEFT LoRA for {task} written to {out_dir / 'peft'} (install peft to check it)")
        return
    peft_model = peft.PeftModel.from_pretrained(backbone(args.seed), out_dir / "peft").eval()
    with torch.inference_mode():
        diff = (peft_model(xte[:64]) - model.forward_features(xte[:64], task=task)).abs().max().item()
    print(f"PEFT export for {task} written to {out_dir / 'peft'}; PEFT features vs loraplex, max |diff|: {diff:.2e}")


if __name__ == "__main__":
    main()
