"""The trainer's Evaluator: validation loss in nats and bits per byte, split across ranks and
reduced; multiple-choice accuracy (tasks.py); text samples from rank 0. The command line around the
same code is `python -m dist_gpt.evaluate` (dist_gpt/evaluate.py); the trainer never imports it.

During training the Evaluator evaluates the fixed `eval.max_blocks` subset every `eval.interval`
steps; the command evaluates the dataset's whole validation split (every block once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from dist_gpt.parallel import dist
from dist_gpt.checkpoint.state import unwrap_model
from .tasks import load_tasks


@torch.no_grad()
def validation_loss(model, val, autocast) -> tuple[float, int]:
    """Mean loss over this rank's share of `val`, reduced over ranks -> (nats per token, blocks).
    `autocast` is the run's precision context (Precision.autocast()).

    The ranks' shares differ by at most one block. When a forward pass is collective (fsdp/hsdp
    gather each block's parameters), every rank must run as many as the busiest one: a rank with
    fewer batches repeats its last one without counting it.
    """
    was_training = model.training
    model.eval()
    # (sum of per-token losses, tokens, blocks) on this rank, summed over ranks below.
    acc = torch.zeros(3, dtype=torch.float64, device=val.device)
    batches = 0
    x = y = None
    doc = []
    for x, y, *doc in val:  # x, y (and doc, under model.doc_mask): (b, T)
        with autocast:
            loss = model(x, y, *doc)
        acc[0] += loss.double() * y.numel()  # stays on the device: no sync per batch
        acc[1] += y.numel()
        acc[2] += y.size(0)
        batches += 1
    if dist.is_sharded(model):
        if x is None:  # no block at all on this rank: any input of the right width keeps it in step
            x = y = torch.zeros(1, val.block_size, dtype=torch.long, device=val.device)
        for _ in range(val.max_batches - batches):
            with autocast:
                model(x, y, *doc)  # uncounted: keeps this rank in step with the others' gathers
    model.train(was_training)
    total, tokens, blocks = dist.all_reduce_sum(acc).tolist()
    return total / max(tokens, 1), int(blocks)


def mixture_loss(model, sources: dict, autocast) -> dict[str, dict]:
    """Each source's validation loss (nats/token), bits per byte and blocks, in data.mix's order."""
    out = {}
    for name, val in sources.items():  # collective: every rank takes part in every source, in order
        loss, blocks = validation_loss(model, val, autocast)
        out[name] = {"loss": loss, "bpb": bits_per_byte(loss, val.ds.bytes_per_token("val")), "blocks": blocks}
    return out


def weighted_total(per_source: dict[str, dict], weights: list[float]) -> tuple[float, float, int]:
    """(loss, bpb, blocks): the sources' losses and bits per byte weighted by the fixed evaluation
    weights (comparable across the run whatever the training phase), and all their blocks."""
    loss = sum(w * r["loss"] for w, r in zip(weights, per_source.values()) if w)
    bpb = sum(w * r["bpb"] for w, r in zip(weights, per_source.values()) if w)
    return loss, bpb, sum(r["blocks"] for r in per_source.values())


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / math.log(2) / bytes_per_token


@dataclass
class SourceBlocks:
    """A data.mix run's validation: each source's blocks, and the weights of their total (val/loss)."""

    blocks: dict            # {name: ValBlocks}
    eval_weights: list[float]


class Evaluator:
    """Decides when validation is due, runs it on every rank, reports it from rank 0 with a text
    sample, and keeps the run's best validation loss in the run state (so it survives a resume).

    `model` is the forward model (compiled or not; never the DDP wrapper, whose forward would sync);
    samples come from the plain module under it. `autocast` is the run's precision context.
    """

    def __init__(self, model, val, autocast, cfg, log, state) -> None:
        """`val`: the validation ValBlocks, or a data.mix run's SourceBlocks (its first source then
        stands for the run's tokenizer and bytes per token)."""
        self.model, self.raw_model = model, unwrap_model(model)
        # data.mix: {name: ValBlocks} per source; val/loss is their eval_weights-weighted total
        mixture = val if isinstance(val, SourceBlocks) else None
        self.sources = mixture.blocks if mixture else None
        self.eval_weights = mixture.eval_weights if mixture else None
        val = next(iter(mixture.blocks.values())) if mixture else val
        self.last_sources: dict[str, dict] = {}
        self.val, self.autocast, self.cfg, self.log, self.state = val, autocast, cfg, log, state
        self.bytes_per_token = val.ds.bytes_per_token("val")
        # A sharded model's forward passes are collective: then every rank samples, in step.
        self.lockstep = dist.is_sharded(model)
        self.last_step: int | None = None
        self.last_loss = float("nan")
        self.last_bpb = float("nan")
        # eval.tasks: multiple-choice files, read and tokenized once (dist_gpt.training.tasks)
        self.tasks = load_tasks(cfg.tasks, val.ds.tokenizer, self.raw_model.cfg.block_size, val.ds.eot_id,
                                val.batch_size)

    def maybe_run(self, step: int, final: bool = False) -> None:
        """Evaluate at `step` when eval.interval (or eval.at_start, or the end of the run) asks for it.
        Not at the step the run resumed at: it was evaluated just before that checkpoint was saved."""
        if final:
            due = self.last_step != step
        elif step == self.state.resumed_step:
            due = False
        elif step == 0:
            due = self.cfg.at_start
        else:
            due = self.cfg.interval > 0 and step % self.cfg.interval == 0
        if due:
            self.run(step)

    def loss_at(self, step: int) -> float | None:
        return self.last_loss if self.last_step == step else None

    @record_function("evaluate")  # the label of a train.profile trace
    def run(self, step: int) -> float:
        if self.sources:
            self.last_sources = mixture_loss(self.model, self.sources, self.autocast)
            loss, self.last_bpb, blocks = weighted_total(self.last_sources, self.eval_weights)
        else:
            loss, blocks = validation_loss(self.model, self.val, self.autocast)
            self.last_bpb = bits_per_byte(loss, self.bytes_per_token)
        self.last_step, self.last_loss = step, loss
        self.state.best_val = min(self.state.best_val, loss)
        self.log.eval(step, loss=loss, bpb=self.last_bpb, blocks=blocks, best=self.state.best_val,
                      sources=self.last_sources or None)
        for task in self.tasks:  # collective: every rank scores its share (the plain module: no recompiles)
            task.report(step, task.score(self.raw_model, self.autocast), self.log)
        if self.cfg.sample_tokens and (self.log.is_main or self.lockstep):
            self.log.text(step, "sample", self.sample())
        return loss

    def sample(self) -> str:
        """Rank 0 only and without collectives, unless the model is sharded: then on every rank in
        step, each drawing the same tokens, and always the full eval.sample_tokens (an end-of-text
        token ends the text afterwards), so no rank stops gathering parameters before the others.
        A generator of its own: sampling never moves training's random stream."""
        tokenizer, eot_id, device = self.val.ds.tokenizer, self.val.ds.eot_id, self.val.device
        ids = tokenizer.encode(self.cfg.prompt) or [eot_id or 0]
        idx = torch.tensor([ids[-self.raw_model.cfg.block_size:]], dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(1234)
        with self.autocast:
            out = self.raw_model.generate(idx, self.cfg.sample_tokens, temperature=self.cfg.temperature,
                                          top_k=self.cfg.top_k, eot_id=None if self.lockstep else eot_id,
                                          generator=gen)
        new = out[0, idx.size(1):].tolist()
        if eot_id in new:
            new = new[:new.index(eot_id) + 1]
        return self.cfg.prompt + tokenizer.decode(new)
