"""Workers beyond one machine: the fork contract on Ray actors (`RayExecutor`), a throwaway local cluster
(`LocalCluster`), and the actors' model replicas. Ray is imported only when a cluster is used
(`pip install 'parsyn[dist]'`)."""

from .cluster import LocalCluster
from .executor import LocalExecutor, RayExecutor, RayOptions, Shipment

__all__ = ["LocalCluster", "LocalExecutor", "RayExecutor", "RayOptions", "Shipment"]
