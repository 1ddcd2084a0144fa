"""``make demo``: shared + per-domain LoRA on three real domains from the offline pre-trained ViT.

Trains (or, if ``runs/demo`` already holds the finished run, re-reads) ``configs/demo.yaml``:
Fashion-MNIST, MNIST-5k and scikit-learn's 8×8 digits, each with its own head, on mixed batches with
per-sample domain ids, starting from the committed zoo backbone ``vit_debian3_tiny``.  Then it prints
the per-domain table beside logistic regression on raw pixels, checks the engine on the trained model
(merged = unmerged, reload identical, PEFT export identical) and writes the HTML report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import loraplex as lp
from loraplex.config import load_config
from loraplex.eval.floors import pixel_logistic_regression
from loraplex.eval.report import write_report
from loraplex.train.runner import domain_splits, load_run, train

CONFIG = lp.configs_dir() / "demo.yaml"


def engine_checks(run_dir: Path, splits: dict, img_size: int) -> list[str]:
    """Fold, reload and export the trained adapters; each must reproduce the model's outputs."""
    from loraplex.data import to_tensor_batch

    config, model = load_run(run_dir, "best")
    domain = splits["test"][1]
    x = to_tensor_batch(domain.take(torch.arange(min(64, len(domain)))), img_size).to(model.device)
    lines = []
    with torch.inference_mode():
        logits = model(x, task=domain.name)
        with model.merged(task=domain.name):
            merged = model(x, task=domain.name)
        lines.append(f"merged vs unmerged logits ({domain.name}): max |diff| {(merged - logits).abs().max():.1e}")
        _, again = load_run(run_dir, "best")
        lines.append(f"reloaded adapters give identical logits: {torch.equal(again(x, task=domain.name), logits)}")
        out = run_dir / f"peft-{domain.name}"  # where `loraplex export` puts it too
        lp.export_peft(model, out, task=domain.name)
        try:
            import peft
        except ImportError:
            lines.append(f"PEFT LoRA for {domain.name} written to {out} (install peft to check it)")
            return lines
        from loraplex.models import create_backbone

        torch.manual_seed(config.train.seed)
        peft_model = peft.PeftModel.from_pretrained(create_backbone(config.backbone), out).eval().to(model.device)
        diff = (peft_model(x) - model.forward_features(x, task=domain.name)).abs().max()
        lines.append(f"PEFT export of {domain.name} loaded by peft.PeftModel: features max |diff| {diff:.1e}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    run_dir = Path(config.output.dir)
    print(f"loraplex demo: {config.method_name} on {config.data.domains} from backbone {config.backbone.name}")
    results = train(config)
    splits = domain_splits(config)
    pixels = pixel_logistic_regression(splits["train"], splits["val"], splits["test"])

    best, last = results["best"]["test"], results["last"]["test"]
    print(f"\n{'test accuracy':16s} {'best-val':>9s} {'last':>9s} {'pixels+LR':>10s}")
    for key in best:
        name = key.removeprefix("acc/")
        print(f"{name:16s} {100 * best[key]:8.1f}% {100 * last[key]:8.1f}% {100 * pixels[key]:9.1f}%")
    p = results["params"]
    print(f"trainable parameters {p['trainable']:,} of {p['total']:,} (adapters {p['adapter']:,}, heads {p['head']:,})")
    seconds, steps = results["train_seconds"], results["steps"]
    print(f"training: {steps} steps in {seconds:.0f} s (best validation at step {results['best_step']})\n")
    for line in engine_checks(run_dir, splits, config.backbone.img_size):
        print(line)
    html, _ = write_report([run_dir], run_dir / "report")
    print(f"\nHTML report: {html.resolve()}")


if __name__ == "__main__":
    main()
