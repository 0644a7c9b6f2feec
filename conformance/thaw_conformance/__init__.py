"""thaw conformance suite: shared test models (``zoo``) and cross-engine checks."""
