"""Security by layer: primitives (:mod:`.primitives`), key infrastructure (:mod:`.keys`), and the secure-aggregation protocol built on both (:mod:`.secagg`)."""
