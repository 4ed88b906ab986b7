"""Client helpers for the rpcmesh Bus."""
