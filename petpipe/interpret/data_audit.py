"""The data audit: likely label errors and near-duplicates of every indexed image, from the body's features.

Pure core on arrays. Label issues: k-fold linear (logistic-regression) heads on the features give every image
out-of-sample probabilities (no head ever saw the image it scores, so a memorised wrong label cannot hide),
which cleanlab ranks (confident learning, Northcutt et al. 2021, https://arxiv.org/abs/1911.00068).
Near-duplicates: cosine similarity of centred, L2-normalised features, computed in row chunks so a large set
never builds its N x N matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

# Rows of the similarity matrix computed at once: CHUNK x N floats (64 MB at N = 16,000).
CHUNK = 1024
# Inverse regularisation of the fold heads on unit-norm features (scikit-learn's C): 10 gave 0.88 out-of-sample
# accuracy on the sample at 224 px, 1.0 gave 0.86.
HEAD_C = 10.0
LABEL_ISSUE_COLUMNS = ["path", "split", "label", "suggested", "quality", "issue"]
DUPLICATE_COLUMNS = ["path_a", "path_b", "split_a", "split_b", "similarity"]


@dataclass(frozen=True)
class LabelAudit:
    """Per image (index order): out-of-sample probabilities (N, C), label quality in [0, 1] (lower = more
    likely mislabelled, cleanlab's self-confidence), and cleanlab's find_label_issues verdict."""

    probabilities: np.ndarray  # (N, C)
    quality: np.ndarray  # (N,)
    issue: np.ndarray  # (N,) bool

    @property
    def suggested(self) -> np.ndarray:
        """The most likely class of each image (N,)."""
        return self.probabilities.argmax(axis=1)


def normalized(features: np.ndarray) -> np.ndarray:
    """Rows centred on the set's mean and scaled to unit length (N, D): cosine similarity is then a dot product,
    and the component every photo shares (the body's pooled features are all positive) no longer dominates it."""
    centred = features - features.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.maximum(norms, 1e-12)


def out_of_sample_probabilities(
    features: np.ndarray, labels: np.ndarray, *, num_classes: int, folds: int, seed: int
) -> np.ndarray:
    """Probabilities (N, C) of every image from a linear head trained on the other folds.

    Stratified folds, at most as many as the largest class has images; a class missing from a fold's training
    images gets probability 0 there.
    """
    from sklearn.model_selection import StratifiedKFold

    inputs = torch.from_numpy(_in_their_span(normalized(np.asarray(features, dtype=np.float64))))
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    folds = min(folds, int(np.bincount(labels).max()))
    if folds < 2:
        raise ValueError("the audit needs a class with at least 2 images")
    probabilities = torch.zeros((len(labels), num_classes), dtype=torch.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer images than folds: scikit-learn warns, we accept it
        warnings.simplefilter("ignore", UserWarning)
        splits = list(splitter.split(inputs.numpy(), labels))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: a second thread only waits (measured 6 s against 44 s on 2 cores)
    try:
        for train_rows, held_out in splits:
            train_rows, held_out = torch.from_numpy(train_rows), torch.from_numpy(held_out)
            seen = torch.unique(targets[train_rows])
            weight, bias = fit_linear_head(inputs[train_rows], targets[train_rows], num_classes=num_classes)
            logits = inputs[held_out] @ weight + bias  # (n, C)
            logits[:, ~torch.isin(torch.arange(num_classes), seen)] = -torch.inf  # a class this head never saw
            probabilities[held_out] = torch.softmax(logits, dim=1)
    finally:
        torch.set_num_threads(threads)
    return probabilities.numpy()


def _in_their_span(vectors: np.ndarray) -> np.ndarray:
    """The same vectors (N, D) in coordinates of the subspace they span, (N, min(N, D)): an L2-regularised
    linear head is the same function of them (its weights lie in that span, the penalty is rotation-invariant)
    and fits D / N times faster when there are fewer images than feature dimensions."""
    if len(vectors) >= vectors.shape[1]:
        return vectors
    left, singular, _ = np.linalg.svd(vectors, full_matrices=False)
    return left * singular


@torch.enable_grad()
def fit_linear_head(
    inputs: torch.Tensor, targets: torch.Tensor, *, num_classes: int, c: float = HEAD_C
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (scikit-learn's objective: summed cross-entropy + |W|^2 / 2C) fitted by
    full-batch L-BFGS from zeros, so the same inputs give the same head: (N, D), (N,) -> W (D, C), b (C,)."""
    weight = torch.zeros(inputs.shape[1], num_classes, dtype=inputs.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=inputs.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight + bias, targets, reduction="sum") + (weight * weight).sum() / (2 * c)
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def label_audit(probabilities: np.ndarray, labels: np.ndarray) -> LabelAudit:
    """cleanlab's label-quality scores and label issues of out-of-sample probabilities (N, C)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # cleanlab wants every class of the probabilities to have an image: score among the labelled classes only.
    present = np.unique(labels)
    position = np.full(probabilities.shape[1], -1)
    position[present] = np.arange(len(present))
    scored = probabilities[:, present]
    scored = scored / np.maximum(scored.sum(axis=1, keepdims=True), 1e-12)
    scored = np.where(scored.sum(axis=1, keepdims=True) > 0, scored, 1.0 / len(present))
    compact = position[labels]
    quality = get_label_quality_scores(compact, scored, method="self_confidence")
    if len(present) > 1:
        issue = find_label_issues(compact, scored, n_jobs=1)
    else:
        issue = np.zeros(len(labels), dtype=bool)
    full = np.zeros_like(probabilities)
    full[:, present] = scored
    return LabelAudit(probabilities=full, quality=np.clip(quality, 0.0, 1.0), issue=np.asarray(issue, dtype=bool))


def near_duplicates(features: np.ndarray, *, threshold: float, chunk: int = CHUNK) -> pd.DataFrame:
    """Pairs (a < b) of images whose cosine similarity is at least `threshold`, most similar first:
    columns a, b (positions) and similarity."""
    vectors = normalized(np.asarray(features, dtype=np.float64))
    firsts, seconds, similarities = [], [], []
    for start in range(0, len(vectors), chunk):
        block = vectors[start : start + chunk] @ vectors.T  # (chunk, N)
        rows, columns = np.nonzero(block >= threshold)
        keep = columns > rows + start  # each pair once, never an image with itself
        firsts.append(rows[keep] + start)
        seconds.append(columns[keep])
        similarities.append(block[rows[keep], columns[keep]])
    pairs = pd.DataFrame(
        {
            "a": np.concatenate(firsts) if firsts else np.empty(0, dtype=np.int64),
            "b": np.concatenate(seconds) if seconds else np.empty(0, dtype=np.int64),
            "similarity": np.concatenate(similarities) if similarities else np.empty(0),
        }
    )
    return pairs.sort_values(["similarity", "a", "b"], ascending=[False, True, True], kind="stable").reset_index(
        drop=True
    )


def label_issues_table(rows: pd.DataFrame, found: LabelAudit, classes: list[str]) -> pd.DataFrame:
    """label_issues.csv: every image (path, split, label), its suggested class and quality, most suspect
    first (lowest quality; ties by path)."""
    table = pd.DataFrame(
        {
            "path": rows["path"].to_numpy(),
            "split": rows["split"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "suggested": [classes[position] for position in found.suggested],
            "quality": found.quality,
            "issue": found.issue,
        }
    )
    return table.sort_values(["quality", "path"], kind="stable").reset_index(drop=True)


def duplicates_table(rows: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """duplicates.csv: the pairs by path and split, most similar first."""
    paths, splits = rows["path"].to_numpy(), rows["split"].to_numpy()
    return pd.DataFrame(
        {
            "path_a": paths[pairs["a"]],
            "path_b": paths[pairs["b"]],
            "split_a": splits[pairs["a"]],
            "split_b": splits[pairs["b"]],
            "similarity": pairs["similarity"].to_numpy(),
        },
        columns=DUPLICATE_COLUMNS,
    )


def summary(issues: pd.DataFrame, duplicates: pd.DataFrame) -> dict[str, int]:
    """The audit stage's metrics: label issues (cleanlab's default threshold), duplicate pairs, leaks (pairs
    across splits), and test leaks: pairs with one photo in test, whose test numbers then score what trained."""
    across = duplicates["split_a"] != duplicates["split_b"] if len(duplicates) else pd.Series(dtype=bool)
    test = (duplicates["split_a"] == "test") | (duplicates["split_b"] == "test") if len(duplicates) else across
    return {
        "audit_images": len(issues),
        "audit_label_issues": int(issues["issue"].sum()),
        "audit_duplicate_pairs": len(duplicates),
        "audit_leaks": int(across.sum()),
        "audit_test_leaks": int((across & test).sum()),
    }
