"""Training students from a cache: the teacher is never loaded, only its cached outputs are read.

One module per job, in the order a run meets them (a recipe is just a YAML file in
`pipeline/student/recipes/`; every option is a field of `kdcache.pipeline.student.config.TrainConfig`):

* `adapter`: `StudentOutputs`, `HFStudent`, `build_student`: the loop needs nothing from a student
  but `forward(input_ids, attention_mask) -> StudentOutputs`.
* `plan`: `plan_run`, every compatibility check between the config, the cache and the student, before
  step 1 (also what `kdcache train --validate` runs); each loss term's needs come from
  `kdcache.pipeline.student.terms`.
* `data`: `RankStream`, the batches of one rank, deterministic and addressed by (epoch, rows consumed).
* `step`: `DistillLoss`, optimiser, schedule, `train_step`, the gradient all-reduce.
* `checkpoint`: where checkpoints go, the one writer and the one reader (the resume contract).
* `metrics`: the one sink for metrics.jsonl, TensorBoard and the progress bar.
* `loop`: `train_loop(config: dict)`, the per-worker function (Ray Train or in-process).
* `driver`: `train(cfg)`, the checks, then `TorchTrainer.fit()` (or the in-process loop).

The public entry points are re-exported here.
"""
from kdcache.pipeline.student.trainer.adapter import HFStudent
from kdcache.pipeline.student.trainer.data import RankStream, prefetched, to_device
from kdcache.pipeline.student.trainer.driver import train, validate
from kdcache.pipeline.student.trainer.loop import train_loop
from kdcache.pipeline.student.trainer.plan import plan_run
from kdcache.pipeline.student.trainer.step import build_components, step_seed

__all__ = ["train", "train_loop", "validate", "plan_run", "RankStream", "HFStudent", "build_components", "step_seed",
           "to_device", "prefetched"]
