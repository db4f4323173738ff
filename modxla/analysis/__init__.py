"""Numbers and figures about runs: FLOPs and parameters, the memory plan, run groups,
the isoFLOP fit and the paper's figures."""
