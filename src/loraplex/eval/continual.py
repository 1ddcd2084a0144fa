"""Continual-learning metrics from the accuracy matrix, in one place.

``R[i][j]`` is the accuracy on task ``j``'s test set after training task ``i`` (``j ≤ i``; later tasks are not
scored, ``None``), ``sizes[j]`` that test set's size.  With ``T`` tasks:

* ``A_t`` — accuracy after task ``t`` over every test sample of the tasks seen so far (sample-weighted, as PILOT
  and InfLoRA report it); ``A_T`` the last, ``Ā`` (``avg_incremental``) the mean of ``A_1 … A_T``;
* **forgetting, max-based** (Chaudhry et al. 2018, PILOT): ``1/(T−1) Σ_{j<T} max_{l∈[j, T−1)} R[l][j] − R[T][j]``;
* **forgetting, first-based** (Avalanche's ``StreamForgetting``): ``1/(T−1) Σ_{j<T} R[j][j] − R[T][j]``;
* **backward transfer** (Lopez-Paz & Ranzato 2017): ``1/(T−1) Σ_{j<T} R[T][j] − R[j][j]`` (minus the first-based
  forgetting; positive when later tasks helped earlier ones).

Accuracies are fractions in [0, 1]; a one-task run has no forgetting (0).
"""

from __future__ import annotations

Matrix = list[list[float | None]]


def accuracies_after(matrix: Matrix, sizes: list[int]) -> list[float]:
    """``A_t`` for every row: the seen tasks' accuracies weighted by their test sizes."""
    out = []
    for t, row in enumerate(matrix):
        seen = range(t + 1)
        out.append(sum(row[j] * sizes[j] for j in seen) / sum(sizes[j] for j in seen))
    return out


def forgetting_max(matrix: Matrix) -> float:
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    return sum(drops) / last


def forgetting_first(matrix: Matrix) -> float:
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return sum(matrix[j][j] - matrix[last][j] for j in range(last)) / last


def backward_transfer(matrix: Matrix) -> float:
    return -forgetting_first(matrix)


def summarise(matrix: Matrix, sizes: list[int]) -> dict[str, float | list[float]]:
    """Every metric above from one matrix (a complete lower triangle)."""
    for i, row in enumerate(matrix):
        if len(row) != len(sizes) or any(row[j] is None for j in range(i + 1)):
            raise ValueError(f"row {i} of the accuracy matrix must score tasks 0…{i} of {len(sizes)}")
    after = accuracies_after(matrix, sizes)
    return {
        "A_T": after[-1],
        "avg_incremental": sum(after) / len(after),
        "A_t": after,
        "forgetting_max": forgetting_max(matrix),
        "forgetting_first": forgetting_first(matrix),
        "backward_transfer": backward_transfer(matrix),
    }


def results_table(results: dict) -> str:
    """A continual run's accuracy matrix (rows: after each task) and its metrics, as plain text."""
    tasks = results["tasks"]
    width = max(9, *(len(t) for t in tasks))
    lines = [f"{'after':{width}s} " + " ".join(f"{t:>{width}s}" for t in tasks)]
    rows = tasks if not results.get("joint") else ["joint"]
    for name, row in zip(rows, results["matrix"], strict=False):
        cells = ["" if v is None else f"{100 * v:.1f}" for v in row]
        lines.append(f"{name:{width}s} " + " ".join(f"{c:>{width}s}" for c in cells))
    lines.append(f"A_T {100 * results['A_T']:.1f}")
    if not results.get("joint"):
        lines.append(
            f"Ā {100 * results['avg_incremental']:.1f} · forgetting (max-based) {100 * results['forgetting_max']:.1f}"
            f" · forgetting (first-based) {100 * results['forgetting_first']:.1f}"
            f" · backward transfer {100 * results['backward_transfer']:.1f}"
        )
    p = results["params"]
    lines.append(f"trainable parameters: {p['trainable']:,} in all, {p['per_task']:,} per task")
    lines.append(f"train time: {results['train_seconds']:.1f} s ({results['setting']}-incremental)")
    return "\n".join(lines)
