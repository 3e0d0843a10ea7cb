"""The `deepspeed` backend (ZeRO-0/1/2/3 with a client optimizer), one job per module:
``config`` (the DeepSpeed JSON checked against our config and completed from it), ``units``
(ZeRO-3 fetch units: the leaf guard and persistent modules), ``ema`` (where the EMA's tensors
come from under ZeRO, and its files), ``backend``
(:class:`~framer_dist.parallel.deepspeed.backend.DeepSpeedBackend`) and ``instrument`` (a fetch
counter for benchmarks and tests; the runtime never imports it).

Inside this package ``import deepspeed`` is the DeepSpeed library (absolute imports): the folder
is only ever imported as ``framer_dist.parallel.deepspeed``.
"""
