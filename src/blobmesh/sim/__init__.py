"""A deterministic discrete-event simulator of a blobmesh fleet (see ``docs/sim.md``).

It drives the real sans-I/O swarm schedulers (:mod:`blobmesh.distribution.scheduler`) of N
simulated nodes over a flow-level network model and compares the result with the Kumar–Ross
lower bound.  Importing it is light: plots load matplotlib only when drawn.
"""

from blobmesh.sim.bounds import kumar_ross
from blobmesh.sim.engine import Simulator
from blobmesh.sim.network import FlowNetwork
from blobmesh.sim.scenario import Result, Scenario, run

__all__ = ["FlowNetwork", "Result", "Scenario", "Simulator", "kumar_ross", "run"]
