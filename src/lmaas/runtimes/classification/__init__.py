"""Sequence-classification runners: text classifiers (and the model core rerankers share)."""
