"""Key infrastructure: the ETSI GS QKD 014 key-source interface, the durable key store, the KMS and its client, certificates."""
