"""A timm Swin as a dense backbone (MTLoRA, spec ``specs/mtlora.md``): a feature pyramid, and every task's
pyramid at once through the stream-aware last block of each stage.

**Pyramid.** Stage ``i``'s feature is its output *after* patch merging (the original Swin code merges
at the end of a stage; timm merges at the start of the next, so stage ``i + 1``'s ``downsample`` is
applied to stage ``i``'s output — computed once and reused as the next stage's input); the last stage
has no merging.  For Swin-T that gives ``[192, 384, 768, 768]`` channels at strides ``[8, 16, 32, 32]``.
No final norm, no classifier.

**Streams** (:meth:`SwinPyramid.forward_tasks`).  In a block whose ``attn.proj``, ``mlp.fc1`` and
``mlp.fc2`` carry a task-routed group, attention (``qkv``, shared) runs once; from ``proj`` on there is
one stream per task, each layer computing ``W x_shared + b`` once and adding each task's own delta on
the task's input (:meth:`~loraplex.core.layer.AdaptedLinear.forward_streams`).  Each task's attention
output is added to the *shared* block input, ``norm2`` is applied to every stream, and each task's
block output goes through the stage's patch merging to become that task's feature; only the shared
stream continues to the next stage.

Any other timm model with ``forward_intermediates`` (a CNN: the small-CNN floor of the dense benchmark)
becomes a dense backbone through :class:`TimmPyramid` — shared pyramid only, no task streams.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import nn

from ..core.layer import AdaptedLinear


class SwinPyramid(nn.Module):
    """``forward(x)`` → the shared pyramid ``[B, C_i, H_i, W_i]``; ``forward_tasks(x, n)`` → one per task."""

    def __init__(self, swin: nn.Module) -> None:
        super().__init__()
        if not isinstance(swin, SwinTransformer):
            raise ValueError(f"a dense backbone is built from a timm SwinTransformer, got {type(swin).__name__}")
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.pretrained_cfg = getattr(swin, "pretrained_cfg", None) or {}
        self.feature_channels = [
            int(self.layers[i + 1].downsample.reduction.out_features)
            if i + 1 < len(self.layers)
            else int(stage.blocks[-1].norm1.normalized_shape[0])
            for i, stage in enumerate(self.layers)
        ]
        self.num_features = self.feature_channels  # what the dense heads are built from
        held = {name for name, _ in self.named_parameters()}
        self._no_weight_decay = {name for name in swin.no_weight_decay() if name in held}

    def no_weight_decay(self) -> set[str]:
        """timm's exemptions (relative-position tables) among the parameters this pyramid keeps, same names."""
        return set(self._no_weight_decay)

    def _merge(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[stage + 1].downsample(x) if stage + 1 < len(self.layers) else x

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0].downsample(self.patch_embed(x))  # NHWC; stage 0's downsample is an identity

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self._stem(x)
        features = []
        for i, stage in enumerate(self.layers):
            x = self._merge(i, stage.blocks(x))
            features.append(x.permute(0, 3, 1, 2))
        return features

    def forward_tasks(self, x: torch.Tensor, num_tasks: int) -> list[list[torch.Tensor]]:
        """Every task's pyramid (``result[t][i]``); stages without task-specific layers share theirs."""
        x = self._stem(x)
        per_task: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]
        for i, stage in enumerate(self.layers):
            *body, last = stage.blocks
            for block in body:
                x = block(x)
            shared, tasks = block_streams(last, x)
            x = self._merge(i, shared)
            if tasks is None:
                merged = [x] * num_tasks
            else:
                if tasks.shape[0] != num_tasks:
                    raise ValueError(f"stage {i} has {tasks.shape[0]} task streams, the model {num_tasks} tasks")
                merged = list(self._merge(i, tasks.flatten(0, 1)).unflatten(0, tasks.shape[:2]))
            for t in range(num_tasks):
                per_task[t].append(merged[t].permute(0, 3, 1, 2))
        return per_task


class TimmPyramid(nn.Module):
    """A timm model's stage outputs after its stem (``feature_info[1:]``: ResNet's ``layer1`` … ``layer4``, at
    strides 4 to 32) as a pyramid ``[B, C_i, H_i, W_i]``; the stem's stride-2 map would only add cost."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not hasattr(model, "forward_intermediates") or not info or len(info) < 2:
            raise ValueError(f"{type(model).__name__} gives no stage features (timm forward_intermediates)")
        self.model = model
        self.indices = list(range(1, len(info)))
        self.feature_channels = [int(info[i]["num_chs"]) for i in self.indices]
        self.num_features = self.feature_channels
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True))

    def forward_tasks(self, x: torch.Tensor, num_tasks: int) -> list[list[torch.Tensor]]:
        """Every task reads the one shared pyramid (a CNN has no task-specific layers), computed once."""
        return [self.forward(x)] * num_tasks


def _streaming(block: SwinTransformerBlock) -> bool:
    layers = (block.attn.proj, block.mlp.fc1, block.mlp.fc2)
    flags = [isinstance(m, AdaptedLinear) and any(g.routing == "task" for g in m.groups.values()) for m in layers]
    if any(flags) and not all(flags):
        raise ValueError("task-specific streams need task-routed branches on attn.proj, mlp.fc1 and mlp.fc2 together")
    return all(flags)


def block_streams(block: SwinTransformerBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(shared [B, H, W, C], tasks [T, B, H, W, C] or None)`` of one Swin block on NHWC ``x``."""
    if not _streaming(block):
        return block(x), None
    batch, height, width, _ = x.shape
    windows, padded = _attention_before_proj(block, block.norm1(x))
    attn_shared, attn_tasks = block.attn.proj.forward_streams(windows)
    tasks = attn_tasks.shape[0]

    def back(y: torch.Tensor) -> torch.Tensor:  # windows → NHWC, shift undone
        return _unwindow(block, block.attn.proj_drop(y), padded, height, width)

    h_shared = x + block.drop_path1(back(attn_shared))
    h_tasks = x.unsqueeze(0) + block.drop_path1(back(attn_tasks.flatten(0, 1))).unflatten(0, (tasks, batch))
    mlp = block.mlp
    f_shared, f_tasks = mlp.fc1.forward_streams(block.norm2(h_shared), block.norm2(h_tasks))
    g_shared, g_tasks = (mlp.norm(mlp.drop1(mlp.act(f))) for f in (f_shared, f_tasks))
    o_shared, o_tasks = mlp.fc2.forward_streams(g_shared, g_tasks)
    return h_shared + block.drop_path2(mlp.drop2(o_shared)), h_tasks + block.drop_path2(mlp.drop2(o_tasks))


def _attention_before_proj(block: SwinTransformerBlock, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """timm's shifted-window attention up to (not including) ``proj``: windows ``[nW·B, N, C]``."""
    _, height, width, channels = x.shape
    shift = any(block.shift_size)
    if shift:
        x = torch.roll(x, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    pad_h = (block.window_size[0] - height % block.window_size[0]) % block.window_size[0]
    pad_w = (block.window_size[1] - width % block.window_size[1]) % block.window_size[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded = (x.shape[1], x.shape[2])
    windows = window_partition(x, block.window_size).view(-1, block.window_area, channels)
    mask = block.get_attn_mask(x) if getattr(block, "dynamic_mask", False) else block.attn_mask
    attn = block.attn
    count, tokens, _ = windows.shape
    q, k, v = attn.qkv(windows).reshape(count, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attn._get_rel_pos_bias()
    if mask is not None:
        num_windows = mask.shape[0]
        expanded = mask.view(1, num_windows, 1, tokens, tokens).expand(count // num_windows, -1, attn.num_heads, -1, -1)
        bias = bias + expanded.reshape(-1, attn.num_heads, tokens, tokens)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return out.transpose(1, 2).reshape(count, tokens, -1), padded


def _unwindow(
    block: SwinTransformerBlock, windows: torch.Tensor, padded: tuple[int, int], h: int, w: int
) -> torch.Tensor:
    x = window_reverse(windows.view(-1, *block.window_size, windows.shape[-1]), block.window_size, *padded)
    x = x[:, :h, :w, :].contiguous()
    return torch.roll(x, shifts=block.shift_size, dims=(1, 2)) if any(block.shift_size) else x
