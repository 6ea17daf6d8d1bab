"""Key stores, the ETSI GS QKD 014 KMS, one-time-pad masking and MACs (security=none for now)."""
