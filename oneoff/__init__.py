"""OneOff: a self-hosted, declarative scheduler for one-time jobs."""
