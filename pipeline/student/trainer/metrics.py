"""The one metrics sink of a training worker: every step's numbers go to metrics.jsonl and
TensorBoard (rank 0, every `log_every` steps), the progress bar (rank 0) and, with `log_samples`,
the rank's sample log; the sink also keeps the step timings for the run summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kdcache.pipeline.common.console import progress_bar
from kdcache.pipeline.student.config import TrainConfig


def reduce_losses(total: torch.Tensor, parts: dict[str, torch.Tensor], tokens: float, world: int) -> torch.Tensor:
    """[loss, *parts, tokens] on the CPU: every rank's losses averaged, the tokens summed, so the logged
    loss is the global batch's."""
    vals = torch.stack([total.float(), *[v.float() for v in parts.values()],
                        torch.tensor(tokens, device=total.device)])
    if world > 1:  # on the device: NCCL reduces only CUDA tensors
        import torch.distributed as dist

        dist.all_reduce(vals)
        vals[:-1] /= world
    return vals.cpu()


def step_metrics(step: int, epoch: int, parts: dict[str, Any], vals: torch.Tensor, lr: float, step_s: float,
                 data_s: float) -> dict[str, Any]:
    """One metrics.jsonl row (`vals` from `reduce_losses`)."""
    wall = step_s + data_s
    return {"step": step, "epoch": epoch, "loss": float(vals[0]),
            **{f"loss_{k}": float(v) for k, v in zip(parts, vals[1:-1])},
            "lr": lr, "tokens": int(vals[-1]),
            "tokens_per_s": float(vals[-1]) / max(wall, 1e-9), "step_s": step_s, "data_s": data_s}


class MetricsSink:
    """Opened after the restore: logs written past the checkpoint being resumed are cut back to it."""

    def __init__(self, cfg: TrainConfig, rank: int, step: int, total_steps: int):
        out = Path(cfg.out)
        self.cfg, self.rank, self.total_steps = cfg, rank, total_steps
        self.metrics_path, self.samples_path = out / "metrics.jsonl", out / "samples" / f"rank-{rank:05d}.jsonl"
        self.last: dict[str, Any] = {}
        self.timings: dict[str, list] = {"step_s": [], "data_s": []}
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _keep_until(self.metrics_path, step)  # the log reads as one run, however many attempts it took
        if cfg.log_samples:
            self.samples_path.parent.mkdir(parents=True, exist_ok=True)
            _keep_until(self.samples_path, step)
        self.tb = None
        if rank == 0 and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=step + 1)
        self.bar = None
        if rank == 0 and cfg.progress:
            # In a Ray Train worker the bar is drawn by the driver (common.console), not by Ray's log relay.
            self.bar = progress_bar(total=total_steps, initial=step, desc="train", unit="step", mininterval=1.0)

    def log(self, metrics: dict[str, Any], sample_ids: list[int]) -> None:
        step, cfg = metrics["step"], self.cfg
        self.timings["step_s"].append(metrics["step_s"])
        self.timings["data_s"].append(metrics["data_s"])
        self.last = metrics
        if cfg.log_samples:
            with self.samples_path.open("a") as f:
                f.write(json.dumps({"step": step, "epoch": metrics["epoch"], "sample_ids": sample_ids}) + "\n")
        if self.rank == 0 and (step % cfg.log_every == 0 or step == self.total_steps):
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.tb is not None:
                for k, v in metrics.items():
                    if k.startswith("loss") or k in ("lr", "tokens_per_s"):
                        self.tb.add_scalar(k.replace("loss_", "loss/"), v, step)
        if self.bar is not None:
            extra = {"phase": metrics["phase"]} if "phase" in metrics else {}
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}", **extra,
                                 refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _keep_until(path: Path, step: int) -> None:
    """Drop JSONL lines of steps after `step` (written by an attempt that did not reach a checkpoint)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
