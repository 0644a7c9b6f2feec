"""thaw_ray: fork rounds over Ray actors, each holding one warm engine.

    import ray
    from thaw_ray import RayForkPool
    ray.init()                                            # your cluster: the pool neither starts nor stops it
    with RayForkPool(parent.launch_spec(), workers=4) as pool:
        round = pool.fork(parent, 4, context=trunk, suffixes=[s0, s1, s2, s3], params=greedy(32))

The same round as thaw_format.sdk.ForkPool (same arguments, same ForkRound, PoolWorkerDied), its workers Ray
actors on any node of the cluster instead of processes beside the parent. It shares ForkPool's own round code
(thaw_format.sdk's round_pool, fork_round and pool_slots), not only the adapter contract; it asks nothing of an
engine beyond the contract: any contract engine with a launch spec works.
"""

from thaw_format.extras import require

require("ray", "ray", "thaw_ray")  # before the modules that import it: name the extra

from .pool import RayForkPool

__all__ = ["RayForkPool"]
