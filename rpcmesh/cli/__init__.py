"""The `rpcmesh` command line: run the control plane and talk to it.

Each command group lives in its own module and adds its subcommands to the
parser; :mod:`rpcmesh.cli.main` holds the entry point and the one error
boundary that turns failures into a one-line message and a non-zero exit.
"""

from rpcmesh.cli.main import main

__all__ = ["main"]
