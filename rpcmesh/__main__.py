"""Run the rpcmesh CLI as ``python -m rpcmesh``."""

from rpcmesh.cli import main

if __name__ == "__main__":
    main()
