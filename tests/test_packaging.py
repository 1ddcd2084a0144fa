"""Packaging and the documented entry points: the README's Python snippet runs as written, the zoo and the
presets ship inside the wheel (and are found from an installed copy), and ``lp.load_run`` rebuilds a CLI run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch

import loraplex as lp
from loraplex.config import load_config
from loraplex.models import zoo_dir
from loraplex.train.runner import train

from .tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def readme_python_block() -> str:
    """The README's first ```python block (the "Use" section)."""
    match = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes run/adapter and peft_dir where it runs
    namespace: dict = {"__name__": "readme"}
    with torch.random.fork_rng(devices=[]):
        exec(compile(readme_python_block(), str(ROOT / "README.md"), "exec"), namespace)
    model, x = namespace["model"], namespace["x"]
    assert isinstance(model, lp.AdaptedModel)  # the reloaded one
    with torch.no_grad():
        torch.testing.assert_close(model(x, task="mnist"), namespace["logits"])  # what was saved came back
    assert (tmp_path / "run" / "adapter" / "adapters.safetensors").is_file()
    assert (tmp_path / "peft_dir" / "adapter_config.json").is_file()


def test_source_checkout_finds_zoo_and_configs_at_the_repository_root(monkeypatch):
    from loraplex.demo import CONFIG

    monkeypatch.delenv("LORAPLEX_ZOO", raising=False)
    assert zoo_dir() == ROOT / "zoo"
    assert lp.configs_dir() == ROOT / "configs"
    assert CONFIG == ROOT / "configs" / "demo.yaml"
    monkeypatch.setenv("LORAPLEX_ZOO", "/elsewhere/zoo")
    assert zoo_dir() == Path("/elsewhere/zoo")


def _pip(*args: str | Path) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_installed_wheel_ships_and_finds_the_zoo_and_the_presets(tmp_path):
    # Built from a copy: an in-tree build leaves build/ (stale files included in later wheels) in the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("src", "zoo", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "wheels", source)
    (wheel,) = (tmp_path / "wheels").glob("loraplex-*.whl")

    # every module (a subpackage missing from pyproject's explicit list would be dropped) and every data file
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"loraplex/{p.relative_to(ROOT / 'src' / 'loraplex')}" for p in (ROOT / "src" / "loraplex").rglob("*.py")
    }
    for name in ("zoo", "configs"):
        expected |= {f"loraplex/{p.relative_to(ROOT)}" for p in (ROOT / name).rglob("*") if p.is_file()}
    assert expected - shipped == set()

    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", site, wheel)
    installed_config = site / "loraplex" / "configs" / "demo.yaml"
    script = f"""
import json, sys
import loraplex
assert "loraplex.train" not in sys.modules, "import loraplex pulls in the run layer"
from loraplex.cli import main
from loraplex.config import BackboneSection
from loraplex.models import create_backbone, zoo_dir, zoo_entries
create_backbone(BackboneSection(name="vit_clipart_tiny", img_size=32))  # reads the weights, checks their sha256
print(json.dumps({{"package": loraplex.__file__, "zoo": str(zoo_dir()), "configs": str(loraplex.configs_dir()),
                  "entries": sorted(zoo_entries())}}))
sys.exit(main(["params", {str(installed_config)!r}, "--json"]))
"""
    elsewhere = tmp_path / "elsewhere"  # outside the repository: nothing resolves relative to the checkout
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LORAPLEX_ZOO"}
    env |= {"PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    where, counts = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert Path(where["package"]) == site / "loraplex" / "__init__.py"
    assert Path(where["zoo"]) == site / "loraplex" / "zoo"
    assert Path(where["configs"]) == site / "loraplex" / "configs"
    assert "vit_clipart_tiny" in where["entries"]
    assert set(counts) == {"adapter", "router", "head", "trainable", "frozen", "total"}
    assert counts["trainable"] > 0 and counts["total"] == counts["trainable"] + counts["frozen"]


def test_load_run_rebuilds_the_model_a_cli_run_saved(tmp_path):
    config = load_config(tiny_config(tmp_path))
    train(config, progress=False)
    run_dir = Path(config.output.dir)

    rng = torch.get_rng_state()
    model = lp.load_run(run_dir, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding the seeded backbone leaves the caller's RNG alone
    assert isinstance(model, lp.AdaptedModel) and not model.training and model.device == torch.device("cpu")

    # the saved best/ adapters on the backbone the run started from, rebuilt by hand from its recipe
    torch.manual_seed(config.train.seed)
    section = config.backbone
    backbone = timm.create_model(
        section.name, pretrained=False, num_classes=0, img_size=section.img_size, **section.kwargs
    )
    saved = lp.load(run_dir / "best", backbone).eval()
    x = torch.randn(6, 3, section.img_size, section.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for task in config.data.domains:
            assert torch.equal(model(x, task=task), saved(x, task=task))
        mixed = torch.tensor([0, 1, 1, 0, 1, 0])
        assert torch.equal(model(x, task=mixed).predictions(), saved(x, task=mixed).predictions())
    with pytest.raises(ValueError, match="best' or 'final'"):
        lp.load_run(run_dir, "last")
