"""QKD physics: the decoy-BB84 key-rate model (finite-key), the BB84 Monte-Carlo, circuit-level BB84, and the network of links on a simulated clock."""
