"""The numbers `workbench eval` reports, and the files and table that show them.

Top-1 and top-5 are also given the Inception evaluation script's names, `precision@1` and `recall@5`.
Per-class precision, recall, F1 and support and the confusion matrix are scikit-learn's own. Top-5 with
five classes or fewer is trivially 1.0 and is reported all the same (`k` says how many classes it took).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TOP_K = 5
TABLE_ROWS = 30  # more classes than this: the table shows the lowest-F1 ones, per_class.csv has them all


@dataclass(frozen=True)
class Report:
    dataset: str  # the name in metric keys and the artifact folder: eval_<dataset>_top1, eval/<dataset>/
    class_names: list[str]
    examples: int
    top1: float
    top5: float
    k: int  # the k of top5: 5, or the number of classes when fewer
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray  # rows: true class, columns: predicted class


def compute(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], dataset: str) -> Report:
    """The report of integer `labels` against class `probabilities` (one row per example)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(class_names)))
    predicted = probabilities.argmax(axis=1)
    k = min(TOP_K, len(class_names))
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # ties: the lower class index first, as argmax
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    return Report(
        dataset=dataset,
        class_names=list(class_names),
        examples=len(labels),
        top1=float(np.mean(predicted == labels)),
        top5=float(np.mean((top == labels[:, None]).any(axis=1))),
        k=k,
        precision=np.asarray(precision, dtype=float),
        recall=np.asarray(recall, dtype=float),
        f1=np.asarray(f1, dtype=float),
        support=np.asarray(support, dtype=int),
        confusion=confusion_matrix(labels, predicted, labels=classes),
    )


def metrics(report: Report) -> dict[str, float]:
    """The MLflow metrics: eval_<dataset>_top1, _top5 and _examples."""
    prefix = f"eval_{report.dataset}"
    return {f"{prefix}_top1": report.top1, f"{prefix}_top5": report.top5, f"{prefix}_examples": report.examples}


def summary(report: Report, details: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: what was evaluated and every overall number, under both sets of names."""
    return {
        **details,
        "dataset": report.dataset,
        "examples": report.examples,
        "top1": report.top1,
        "top5": report.top5,
        "precision@1": report.top1,
        "recall@5": report.top5,
        "top5_k": report.k,
        "macro_precision": float(report.precision.mean()),
        "macro_recall": float(report.recall.mean()),
        "macro_f1": float(report.f1.mean()),
        "class_names": report.class_names,
    }


def write(report: Report, folder: Path, details: dict[str, Any]) -> list[Path]:
    """metrics.json, per_class.csv, confusion_matrix.csv and confusion_matrix.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(summary(report, details), indent=2) + "\n")
    with (folder / "per_class.csv").open("w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["class", "precision", "recall", "f1", "support"])
        for row in _rows(report, range(len(report.class_names))):
            out.writerow(row)
    with (folder / "confusion_matrix.csv").open("w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["true \\ predicted", *report.class_names])
        for name, counts in zip(report.class_names, report.confusion, strict=True):
            out.writerow([name, *(int(c) for c in counts)])
    _plot_confusion(report, folder / "confusion_matrix.png")
    return [folder / name for name in ("metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png")]


def _rows(report: Report, indices: Any) -> list[list[Any]]:
    return [
        [
            report.class_names[i],
            f"{report.precision[i]:.4f}",
            f"{report.recall[i]:.4f}",
            f"{report.f1[i]:.4f}",
            int(report.support[i]),
        ]
        for i in indices
    ]


def _plot_confusion(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed, none touched
    import matplotlib.pyplot as plt

    n = len(report.class_names)
    side = min(max(4.0, 0.45 * n + 2.0), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(report.confusion, cmap="Blues")
    if n <= 100:  # beyond, the names would overlap into a grey band
        ax.set_xticks(range(n), report.class_names, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center")
        ax.set_yticks(range(n), report.class_names)
    if n <= 30:
        high = report.confusion.max() / 2
        for (true, predicted), count in np.ndenumerate(report.confusion):
            colour = "white" if count > high else "black"
            ax.text(predicted, true, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{report.dataset}: top-1 {report.top1:.4f}, {report.examples} examples")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(report: Report) -> list[str]:
    """A short table: top-1, top-5 and the example count, then one row per class (the lowest F1 first
    when there are many)."""
    trivial = f"  (k={report.k}: only {report.k} classes)" if report.k < TOP_K else ""
    lines = [
        f"  top1 (precision@1)  {report.top1:.4f}",
        f"  top5 (recall@5)     {report.top5:.4f}{trivial}",
        f"  examples            {report.examples}",
    ]
    indices: Any = range(len(report.class_names))
    if len(report.class_names) > TABLE_ROWS:
        indices = np.argsort(report.f1, kind="stable")[:TABLE_ROWS]
        lines.append(f"  the {TABLE_ROWS} classes of lowest F1 (all {len(report.class_names)} in per_class.csv):")
    rows = _rows(report, indices)
    width = max(len("class"), *(len(str(r[0])) for r in rows))
    lines.append(f"  {'class':<{width}}  precision  recall  f1      support")
    lines += [f"  {r[0]:<{width}}  {r[1]:<9}  {r[2]:<6}  {r[3]:<6}  {r[4]}" for r in rows]
    return lines
