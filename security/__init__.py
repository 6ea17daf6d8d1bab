"""Key sources (in-process pools, the ETSI GS QKD 014 KMS), certificates; secure-aggregation modes come next."""
