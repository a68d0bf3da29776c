"""On-disk feature store, sharded featurisation (one or many processes) and top-k retrieval."""

from looptrace.store.fill import featurize_to_store
from looptrace.store.retrieval import TopK, score_to_disk, topk
from looptrace.store.store import FeatureStore

__all__ = ["FeatureStore", "TopK", "featurize_to_store", "score_to_disk", "topk"]
