"""Where teacher work runs. Executors only decide placement and retries; `ShardProcessor` does the work.

`LocalExecutor` runs shards in this process (benchmarks, debugging). `RayExecutor` keeps one teacher
actor per GPU (or N CPU actors) and pulls shards to actors with a free slot until none are left.
Both keep `shards_in_flight` shards per teacher at once (threads sharing the one loaded teacher),
so that several Parquet writers compress in parallel. A shard whose
actor died of a system error (actor crash, node loss, OOM kill) is resubmitted to a fresh actor up
to `max_retries` times; an exception raised by the shard's own code is never retried: it surfaces
with its message and the shard's name.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable

from kdcache.storage import ShardInfo
from kdcache.storage.writer import CacheWriteError
from kdcache.pipeline.common.runtime import init_ray

ProgressFn = Callable[[ShardInfo], None]


class ShardFailed(RuntimeError):
    pass


class LocalExecutor:
    def __init__(self, prep, out_url: str, storage_options: dict | None = None):
        from kdcache.pipeline.teacher_pass.shard import ShardProcessor

        self.processor = ShardProcessor(prep, out_url, storage_options)

    def calibrate(self, seqs: list):
        return self.processor.topk_ids(seqs)

    def set_spec(self, spec) -> None:
        self.processor.set_spec(spec)

    def run(self, shards: Iterable[tuple[int, list]], on_done: ProgressFn) -> None:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        slots = self.processor.shards_in_flight
        if slots <= 1:
            for index, seqs in shards:
                on_done(ShardInfo(**self.processor.process(index, seqs)))
            return
        # The shard iterator (corpus reading, tokenising) and `on_done` stay on this thread; a shard
        # is pulled only when a slot is free, so at most `slots` shards' sequences are held at once.
        with ThreadPoolExecutor(slots, thread_name_prefix="shard") as pool:
            running: set = set()

            def finish(done) -> None:
                running.difference_update(done)
                for f in done:
                    on_done(ShardInfo(**f.result()))

            try:
                for index, seqs in shards:
                    if len(running) >= slots:
                        finish(wait(running, return_when=FIRST_COMPLETED)[0])
                    running.add(pool.submit(self.processor.process, index, seqs))
                while running:
                    finish(wait(running, return_when=FIRST_COMPLETED)[0])
            except BaseException:
                # The shards still running finish (and commit) before the error surfaces: a running
                # shard cannot be interrupted, and a committed one is work a rerun keeps.
                wait(running)
                raise

    @property
    def forward_calls(self) -> int:
        return self.processor.forward_calls

    def close(self) -> None:
        self.processor.close()


def _cpu_share(actors: int) -> float:
    """CPUs per CPU actor when not given: the largest whole number with which every actor fits on
    some node (a 2-core machine's one actor gets both, and its forward runs on as many threads), at
    least 1."""
    import ray

    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    return float(cpu_share(node_cpus, actors))


def cpu_share(node_cpus: list[int], actors: int) -> int:
    """Largest s >= 1 with sum(cpus // s) >= actors: `actors` actors of s CPUs each fit on these nodes."""
    for share in range(max(node_cpus, default=1), 1, -1):
        if sum(c // share for c in node_cpus) >= actors:
            return share
    return 1


def _actor_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class TeacherActor:
        """Loads the teacher once; processes whole shards on request, several at once when started
        with `max_concurrency` > 1 (a threaded actor: `ShardProcessor.process` is thread-safe)."""

        def __init__(self, prep, out_url: str, storage_options: dict | None, threads: int):
            import torch

            from kdcache.pipeline.teacher_pass.shard import ShardProcessor

            torch.set_num_threads(max(1, threads))
            # A teacher that cannot load is reported by `stats`, not by the actor dying: the driver then
            # shows the error's own one line and logs the traceback, instead of Ray's wrapped stack.
            self.start_error: tuple[BaseException, str] | None = None
            try:
                self.processor = ShardProcessor(prep, out_url, storage_options)
            except Exception as exc:
                import traceback

                self.start_error = (exc, traceback.format_exc())

        def process(self, index: int, seqs: list) -> dict[str, Any]:
            return self.processor.process(index, seqs)

        def topk_ids(self, seqs: list):
            return self.processor.topk_ids(seqs)

        def set_spec(self, spec) -> None:
            self.processor.set_spec(spec)

        def stats(self) -> dict[str, Any]:
            import ray
            import torch

            from kdcache.pipeline.common import allocator

            if self.start_error is not None:
                return {"start_error": self.start_error}
            return {"pid": os.getpid(), "forward_calls": self.processor.forward_calls,
                    "node": ray.get_runtime_context().get_node_id(), "threads": torch.get_num_threads(),
                    "malloc_tuned": allocator.tuned()}

    return TeacherActor


class RayExecutor:
    """One actor per GPU (`gpus_per_actor`, fractional allowed) or `actors` CPU actors."""

    def __init__(self, prep, out_url: str, storage_options: dict | None = None):
        import ray

        cfg = prep.cfg
        self.started_ray = init_ray(cfg.address)
        self.prep, self.out_url, self.storage_options = prep, out_url, storage_options
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 and cfg.device in ("auto", "cuda")
        n = cfg.actors or (int(gpus // cfg.gpus_per_actor) if use_gpu else 1)
        cpus = ray.cluster_resources().get("CPU", 1)
        per_actor = cfg.cpus_per_actor or (1.0 if use_gpu else _cpu_share(n))
        self.resources = ({"num_gpus": cfg.gpus_per_actor, "num_cpus": min(per_actor, 1.0)} if use_gpu
                          else {"num_cpus": per_actor})
        if not use_gpu and n * per_actor > cpus:
            # Asking for more CPUs than exist would leave actors pending forever: fail now instead.
            raise ValueError(f"{n} CPU actors x {per_actor:g} CPUs exceed the cluster's {cpus:g} CPUs; lower "
                             "--actors or --cpus-per-actor")
        self.threads = max(1, int(per_actor))  # a CPU teacher's forward threads
        from kdcache.pipeline.teacher_pass.shard import auto_shards_in_flight

        # Shards per actor at once; beside a GPU, sized by the CPUs there are per GPU.
        self.slots = auto_shards_in_flight(prep, use_gpu, cpus / gpus * cfg.gpus_per_actor if use_gpu else None)
        self.actor_cls = _actor_class()
        self.actors = [self._new_actor() for _ in range(n)]
        self.forward_calls = 0
        self.placement: list[dict[str, Any]] = []
        # Wait until every teacher is loaded: a broken teacher folder fails here, once, with its message.
        try:
            started = ray.get([a.stats.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            self._stop_actors()
            logging.getLogger("kdcache_details").info(str(exc))
            raise ShardFailed(f"the teacher actors could not start: {(str(exc).splitlines() or [''])[0]} (details in "
                              "the run's log file)") from None
        failed = [s["start_error"] for s in started if "start_error" in s]
        if failed:
            self._stop_actors()
            error, trace = failed[0]
            logging.getLogger("kdcache_details").info(trace)  # the run's log file (pipeline/common/console.py)
            if isinstance(error, (ValueError, FileNotFoundError, PermissionError)):
                raise error  # kdcache's own refusals and bad input: their message is the one line to show
            first = (str(error).strip().splitlines() or [""])[0]
            raise ShardFailed(f"the teacher could not start: {type(error).__name__}: {first} (traceback in the run's "
                              "log file)") from None

    def _stop_actors(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.started_ray:
            ray.shutdown()

    def calibrate(self, seqs: list):
        import ray

        return ray.get(self.actors[0].topk_ids.remote(seqs))

    def set_spec(self, spec) -> None:
        import ray

        self.prep = dataclasses.replace(self.prep, spec=spec)  # actors started later get it too
        ray.get([a.set_spec.remote(spec) for a in self.actors])

    def _new_actor(self):
        # Fault-injection switches (pipeline/common/faults.py) follow the driver into the actors.
        env = {k: v for k, v in os.environ.items() if k.startswith("KDCACHE_FAULTS")}
        if "num_gpus" not in self.resources:  # a CPU teacher: its forwards reuse freed memory (common/allocator.py)
            from kdcache.pipeline.common.allocator import worker_env

            env.update(worker_env())
        options = dict(self.resources, max_concurrency=self.slots)
        if env:
            options["runtime_env"] = {"env_vars": env}
        return self.actor_cls.options(**options).remote(self.prep, self.out_url, self.storage_options, self.threads)

    def run(self, shards: Iterable[tuple[int, list]], on_done: ProgressFn) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        system_errors = (RayActorError,) + tuple(
            getattr(ray.exceptions, n) for n in ("WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                                                 "OutOfMemoryError", "ActorUnavailableError")
            if hasattr(ray.exceptions, n))
        load = {actor: 0 for actor in self.actors}  # shards running on each live actor
        running: dict[Any, tuple[Any, int, Any, int]] = {}  # ref -> (actor, index, seqs ref, attempt)
        source = iter(shards)
        exhausted = False
        while True:
            while not exhausted:
                free = [a for a in self.actors if load[a] < self.slots]
                if not free:
                    break
                try:
                    index, seqs = next(source)
                except StopIteration:
                    exhausted = True
                    break
                actor = min(free, key=load.__getitem__)  # the least busy: shards spread over all actors
                seqs_ref = ray.put(seqs)
                running[actor.process.remote(index, seqs_ref)] = (actor, index, seqs_ref, 0)
                load[actor] += 1
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            actor, index, seqs_ref, attempt = running.pop(ref)
            try:
                info = ray.get(ref)
            except RayTaskError as exc:
                if isinstance(exc, system_errors) or isinstance(getattr(exc, "cause", None), system_errors):
                    self._replace(actor, load, running, index, seqs_ref, attempt, exc)
                    continue
                self._abort(running)
                cause = getattr(exc, "cause", None) or exc
                why = ("the storage refused the write: free space or fix permissions, then rerun to resume"
                       if isinstance(cause, CacheWriteError)
                       else "the error comes from the shard's own code or data")
                raise ShardFailed(f"shard {index} failed: {type(cause).__name__}: {cause} (not retried: {why})"
                                  f"\n--- actor traceback ---\n{exc}") from None
            except system_errors as exc:
                self._replace(actor, load, running, index, seqs_ref, attempt, exc)
                continue
            load[actor] -= 1
            on_done(ShardInfo(**info))

    def _replace(self, dead, load, running, index, seqs_ref, attempt, exc) -> None:
        import ray

        if attempt + 1 > self.prep.cfg.max_retries:
            self._abort(running)
            raise ShardFailed(f"shard {index}: its teacher actor died {attempt + 1} times ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); giving up after --max-retries "
                              f"{self.prep.cfg.max_retries}. Shards already committed are kept: re-run the same "
                              "command to retry the rest") from None
        if dead in load:  # the first of the dead actor's shards to report: replace the actor, once
            del load[dead]
            self.actors.remove(dead)
            ray.kill(dead, no_restart=True)
            fresh = self._new_actor()
            self.actors.append(fresh)
            load[fresh] = 0
        target = min(self.actors, key=load.__getitem__)
        running[target.process.remote(index, seqs_ref)] = (target, index, seqs_ref, attempt + 1)
        load[target] += 1

    def _abort(self, running) -> None:
        import ray

        # Stop the other shards' work; their actors are killed in close(), so a failed cancel is harmless.
        for ref in running:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        import ray

        try:
            stats = ray.get([a.stats.remote() for a in self.actors], timeout=30)
            self.forward_calls = sum(s["forward_calls"] for s in stats)
            # Where and how the teachers ran: one line a user (or a test) can read to see the spread over
            # nodes, the forward threads and whether the allocator was tuned.
            self.placement = [{"node": s["node"], "pid": s["pid"], "forward_calls": s["forward_calls"],
                               "threads": s["threads"], "malloc_tuned": s["malloc_tuned"], **self.resources}
                              for s in stats]
            logging.getLogger("kdcache.executor").info(
                "teacher actors: %d on %d node(s): %s", len(stats), len({s["node"] for s in stats}),
                json.dumps(self.placement))
        except Exception:  # noqa: BLE001 - stats are informational
            pass
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.started_ray:
            ray.shutdown()
