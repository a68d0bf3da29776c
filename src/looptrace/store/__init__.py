"""On-disk feature store, sharded featurisation (one or many processes) and top-k retrieval."""

from looptrace.store.fill import featurize_to_store
from looptrace.store.retrieval import TopK, position_matrix, position_scores, score_to_disk, topk
from looptrace.store.store import FeatureStore

__all__ = ["FeatureStore", "TopK", "featurize_to_store", "position_matrix", "position_scores", "score_to_disk", "topk"]
