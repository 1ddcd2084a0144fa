"""Cheap comparison of pre-trained backbones (docs/pretraining.md): logistic regression on frozen features.

For each downstream set (seeded split, the acceptance benchmark's sizes): the backbone's pooled features
(timm ``forward_head(pre_logits=True)``) of the train / val / test images, standardised, then an L2 logistic
regression with ``C`` chosen on validation; beside it, the same on raw pixels. No fine-tuning: minutes for a
whole table, so recipes can be compared before one is trained in full and accepted (backbone_acceptance.py).

    python benchmarks/pretraining_probe.py vit_clipart_tiny vit_debian_tiny --random
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import DOWNSTREAM, machine

from loraplex.config import BackboneSection
from loraplex.data.domains import domain_parts
from loraplex.data.stream import DomainData, eval_batches, to_tensor_batch
from loraplex.eval.floors import C_GRID
from loraplex.models import create_backbone, zoo_entries


@torch.no_grad()
def features(model: torch.nn.Module | None, domain: DomainData, size: int) -> np.ndarray:
    """Pooled backbone features (raw pixels when ``model`` is None) of every image, in order."""
    out = []
    for images, _ in eval_batches(domain, 256):
        x = to_tensor_batch(images, size, 3)
        out.append(x.flatten(1) if model is None else model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out).numpy()


def probe(model: torch.nn.Module | None, parts: dict[str, DomainData], size: int) -> float:
    """Test accuracy (%) of the logistic regression whose ``C`` scores best on validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = {part: features(model, domain, size) for part, domain in parts.items()}
    y = {part: domain.labels.numpy() for part, domain in parts.items()}
    scale = StandardScaler().fit(x["train"])
    x = {part: scale.transform(v) for part, v in x.items()}
    fits = [LogisticRegression(C=c, max_iter=3000).fit(x["train"], y["train"]) for c in C_GRID]
    best = max(fits, key=lambda m: m.score(x["val"], y["val"]))
    return 100 * best.score(x["test"], y["test"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbones", nargs="+", help="zoo entries")
    parser.add_argument("--random", action="store_true", help="add the first backbone's architecture at random init")
    parser.add_argument("--sets", nargs="+", default=list(DOWNSTREAM), choices=list(DOWNSTREAM))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module | None] = {"logistic regression on raw pixels": None}
    models |= {name: create_backbone(BackboneSection(name=name, img_size=args.size)) for name in args.backbones}
    if args.random:
        entry = zoo_entries()[args.backbones[0]]
        section = BackboneSection(name=entry["architecture"], img_size=args.size, kwargs=entry["kwargs"])
        models["random init"] = create_backbone(section)
    scores = {name: {s: [] for s in args.sets} for name in models}
    for seed in args.seeds:
        for dataset in args.sets:
            train, val, test = DOWNSTREAM[dataset]
            parts = domain_parts(dataset, root=None, seed=seed, train=train, val=val, test=test, size=args.size)
            for name, model in models.items():
                scores[name][dataset].append(probe(model, parts, args.size))
    print(f"Machine: {machine()}. Seeds {args.seeds}. Linear probe on frozen features, test accuracy (%).\n")
    print("| features | " + " | ".join(args.sets) + " | mean |")
    print("|---|" + "---:|" * (len(args.sets) + 1))
    for name, per_set in scores.items():
        means = [float(np.mean(v)) for v in per_set.values()]
        cells = [
            f"{m:.1f}" + (f" ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else "")
            for m, v in zip(means, per_set.values(), strict=True)
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {np.mean(means):.1f} |")


if __name__ == "__main__":
    main()
