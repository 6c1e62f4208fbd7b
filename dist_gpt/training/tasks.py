"""Multiple-choice accuracy during training (HellaSwag's layout), split across ranks.

    torchrun --standalone --nproc_per_node=2 -m dist_gpt.train --eval.tasks=data/hellaswag_val.jsonl

A task is a .jsonl file, one example per line:

    {"context": "A man is sitting on a roof. he", "endings": ["is using wrap ...", "..."], "label": 3}

(`ctx` is accepted for `context`, as in HellaSwag's own files, and the label may be a string.)
Each ending is scored as lm-evaluation-harness scores a `multiple_choice` task, so the numbers
are comparable with `lm_eval` on the same file (tests/test_hf.py checks that they are equal):
- the continuation is " " + ending after the context (trailing spaces of the context move into
  it); its tokens are those of encode(context + continuation) after the first len(encode(context));
- its log-likelihood is the sum of its tokens' log-probabilities given all tokens before them,
  the sequence left-truncated to block_size + 1 tokens (an empty context is the end-of-text token);
- acc: the ending with the highest log-likelihood is the label;
- acc_norm: the ending with the highest log-likelihood / len(ending) in characters is the label.
Ties go to the first ending, as numpy's argmax. Rank r scores examples r, r + W, ...; one
all-reduce sums the counts. Logged as `val/<file stem>/acc` and `val/<file stem>/acc_norm`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_gpt.parallel import dist
from dist_gpt.errors import DataError


@dataclass
class Example:
    tokens: list[list[int]]  # per ending: context + continuation ids, left-truncated to block_size + 1
    scored: list[int]        # per ending: how many trailing ids are the continuation
    chars: list[int]         # per ending: its length in characters (acc_norm's divisor)
    label: int


class ChoiceTask:
    """One multiple-choice file, tokenized once when built."""

    def __init__(self, path: str | Path, tokenizer, block_size: int, eot_id: int | None, batch_size: int = 16):
        self.path, self.name = Path(path), Path(path).stem
        self.block_size, self.batch_size = block_size, max(1, batch_size)
        self.examples = [self._example(doc, i + 1, tokenizer, eot_id) for i, doc in enumerate(self._read())]
        if not self.examples:
            raise DataError(f"eval.tasks: {self.path} holds no examples")

    def _read(self) -> list[dict]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"eval.tasks: {self.path} does not exist: give multiple-choice .jsonl files") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"eval.tasks: cannot read {self.path} ({e})") from None
        docs = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"eval.tasks: {self.path} line {n} is not JSON ({e})") from None
        return docs

    def _example(self, doc, n: int, tokenizer, eot_id: int | None) -> Example:
        where = f"eval.tasks: {self.path} line {n}"
        context = doc.get("context", doc.get("ctx")) if isinstance(doc, dict) else None
        endings, label = (doc.get("endings"), doc.get("label")) if isinstance(doc, dict) else (None, None)
        if not isinstance(context, str) or not isinstance(endings, list) or len(endings) < 2 \
                or not all(isinstance(e, str) and e for e in endings):
            raise DataError(f"{where}: needs \"context\" (text), \"endings\" (two or more non-empty texts) and "
                            "\"label\" (the index of the right ending)")
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < len(endings):
            raise DataError(f"{where}: label {doc.get('label')!r} is not an index of its {len(endings)} endings")
        stripped = context.rstrip()
        tokens, scored = [], []
        for ending in endings:
            continuation = context[len(stripped):] + " " + ending
            if stripped:
                before = tokenizer.encode(stripped)
                ids = tokenizer.encode(stripped + continuation)
                cont = ids[len(before):]
                ids = before + cont
            elif eot_id is not None:
                cont = tokenizer.encode(continuation)
                ids = [eot_id] + cont
            else:
                raise DataError(f"{where}: the context is empty and the tokenizer has no end-of-text token "
                                "to condition on; give every example a context")
            if not 0 < len(cont) <= self.block_size:
                raise DataError(f"{where}: an ending is {len(cont)} tokens, outside 1..block_size={self.block_size}")
            tokens.append(ids[-(self.block_size + 1):])
            scored.append(len(cont))
        return Example(tokens, scored, [len(e) for e in endings], label)

    def forwards(self, examples: list[Example]) -> int:
        """Forward passes `loglikelihoods` makes for `examples`."""
        return -(-sum(len(e.tokens) for e in examples) // self.batch_size)

    @torch.no_grad()
    def loglikelihoods(self, model, autocast, examples: list[Example], forwards: int = 0) -> list[torch.Tensor]:
        """Per example: the (n_endings,) float64 log-likelihoods of its endings under `model`, run
        under `autocast` (the run's Precision.autocast() context). With `forwards`, uncounted forward
        passes pad this rank's up to that many (a sharded model's passes are collective)."""
        device = next(model.parameters()).device
        rows = [(e, j) for e in examples for j in range(len(e.tokens))]
        sums: dict[tuple[int, int], torch.Tensor] = {}
        was_training = model.training
        model.eval()
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = max(len(e.tokens[j]) for e, j in batch) - 1
            x = torch.zeros(len(batch), width, dtype=torch.long)  # right-padded: padding never feeds back
            for r, (e, j) in enumerate(batch):
                x[r, :len(e.tokens[j]) - 1] = torch.tensor(e.tokens[j][:-1])
            with autocast:
                logits = model(x.to(device))  # (b, width, V) fp32
            logprobs = logits.float().log_softmax(dim=-1)
            for r, (e, j) in enumerate(batch):
                n, k = len(e.tokens[j]) - 1, e.scored[j]
                targets = torch.tensor(e.tokens[j][-k:], device=device)
                sums[id(e), j] = logprobs[r, n - k:n].gather(-1, targets[:, None]).double().sum()
        for _ in range(forwards - self.forwards(examples)):
            with autocast:
                model(torch.zeros(1, 1, dtype=torch.long, device=device))  # keeps this rank in step
        model.train(was_training)
        return [torch.stack([sums[id(e), j] for j in range(len(e.tokens))]) for e in examples]

    def score(self, model, autocast) -> dict[str, float]:
        """acc and acc_norm over the whole file: every rank scores its share, one all-reduce sums them.
        A sharded model (fsdp/hsdp) gathers parameters in every forward pass, so then every rank runs
        as many as the busiest one (each rank knows every share: all examples are tokenized here)."""
        rank, world = dist.rank_and_world()
        mine = self.examples[rank::world]
        forwards = max(self.forwards(self.examples[r::world]) for r in range(world)) if dist.is_sharded(model) else 0
        device = next(model.parameters()).device
        counts = torch.zeros(3, dtype=torch.float64, device=device)  # (acc hits, acc_norm hits, examples)
        for e, ll in zip(mine, self.loglikelihoods(model, autocast, mine, forwards)):
            counts[0] += float(int(ll.argmax()) == e.label)
            counts[1] += float(int((ll / torch.tensor(e.chars, dtype=torch.float64, device=device)).argmax()) == e.label)
            counts[2] += 1
        acc, acc_norm, n = dist.all_reduce_sum(counts).tolist()
        return {"acc": acc / n, "acc_norm": acc_norm / n, "examples": int(n)}

    def report(self, step: int, result: dict, log) -> None:
        log.scalars(step, {f"val/{self.name}/acc": result["acc"], f"val/{self.name}/acc_norm": result["acc_norm"]})
        log.print(f"eval step {step} | {self.name}: acc_norm {result['acc_norm']:.4f} | acc {result['acc']:.4f} "
                  f"| {result['examples']} examples")


def load_tasks(spec: str | None, tokenizer, block_size: int, eot_id: int | None, batch_size: int) -> list[ChoiceTask]:
    """The tasks of eval.tasks (comma-separated .jsonl paths), each read and tokenized once."""
    paths = [p.strip() for p in (spec or "").split(",") if p.strip()]
    names = [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        raise DataError(f"eval.tasks: two files share a name ({', '.join(names)}); each is logged under its "
                        "file name, so rename one")
    return [ChoiceTask(p, tokenizer, block_size, eot_id, batch_size) for p in paths]
