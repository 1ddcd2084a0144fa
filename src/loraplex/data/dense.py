"""Dense multi-task vocabulary: the tasks a multi-task run can predict on every image, and their output
channels (PASCAL-Context's four as MTLoRA uses them; depth for the offline dense-scenes benchmark)."""

from __future__ import annotations

TASK_OUTPUTS: dict[str, int] = {
    "semseg": 21,  # background + 20 classes (PASCAL-Context's 21; the scenes benchmark's 20 item classes)
    "parts": 7,  # human parts, background included
    "saliency": 1,  # foreground logit
    "normals": 3,  # surface normal, L2-normalised at the loss
    "depth": 1,
}
