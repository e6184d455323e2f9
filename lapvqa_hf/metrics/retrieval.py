"""Retrieval metrics of the two-tower models: Recall@K between paired images and reports, in both directions."""

import torch

RECALL_KS = (1, 5, 10)
DIRECTIONS = {"i2r": "image to report", "r2i": "report to image"}
# What `score_retrieval` reports: Recall@K per direction, and their mean.
RETRIEVAL_METRICS = tuple(f"{d}_recall{k}" for d in DIRECTIONS for k in RECALL_KS) + ("mean_recall",)


def match_ranks(similarity: torch.Tensor) -> torch.Tensor:
    """The rank (0 = first) of each query's match in a square `[queries, items]` similarity matrix whose matches lie
    on the diagonal. Ties are broken against the match: an item scoring the same as the match counts as ranked
    above it, so a constant model retrieves nothing."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"Recall@K needs a square [queries, items] similarity matrix, got {list(similarity.shape)}.")
    matches = similarity.diagonal().unsqueeze(1)
    not_the_match = ~torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    return ((similarity >= matches) & not_the_match).sum(dim=1)


def recall_at_k(similarity: torch.Tensor, k: int) -> float:
    """The fraction of queries whose match is among their `k` best-scored items (see `match_ranks`)."""
    return (match_ranks(similarity) < k).double().mean().item()


def score_retrieval(image_embeddings: torch.Tensor, report_embeddings: torch.Tensor) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 from each image to the reports and from each report to the images, image i paired with
    report i (`{"overall": {...}}`, as the other tasks' scores)."""
    similarity = image_embeddings.double() @ report_embeddings.double().T
    scores = {}
    for direction, matrix in (("i2r", similarity), ("r2i", similarity.T)):
        for k in RECALL_KS:
            scores[f"{direction}_recall{k}"] = recall_at_k(matrix, k)
    scores["mean_recall"] = sum(scores.values()) / len(scores)
    return {"overall": {"count": len(similarity), **scores}}


__all__ = ["RECALL_KS", "RETRIEVAL_METRICS", "match_ranks", "recall_at_k", "score_retrieval"]
