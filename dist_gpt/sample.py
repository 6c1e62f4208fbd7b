"""Stream text from a trained model.

    python -m dist_gpt.sample --run runs/cpu --prompt "def " --max-new-tokens 300
    python -m dist_gpt.sample --checkpoint runs/cpu/checkpoints/step_0001000 --num-samples 3 --top-p 0.9
    python -m dist_gpt.sample --model model.safetensors --temperature 0 --prompt "import "
    python -m dist_gpt.sample --model models/gpt2 --prompt "Hello, I'm a language model,"

Reads a run directory (its latest checkpoint), a checkpoint directory, an exported
.safetensors file or a Hugging Face model directory (GPT-2, Llama, Qwen2, Qwen3; see
docs/INTEROP.md). Tokens are printed as they are generated.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dist_gpt.parallel import dist
from .errors import DataError
from .progress import progress_bar
from dist_gpt.convert.weights import add_source_arguments, load_model


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dist_gpt.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p, "samples from")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (default off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default off)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (default 1337)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


class StreamDecoder:
    """Turns a growing list of ids into text increments; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # the rest of a multi-byte character is still to come
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, loaded = load_model(args, device)
    model.eval()
    tok = loaded.tokenizer
    try:
        prompt_ids = tok.encode(args.prompt) or [loaded.eot_id or 0]
    except DataError as e:  # a character a char vocabulary lacks
        raise DataError(f"--prompt {args.prompt!r}: {e}") from None
    idx = torch.tensor([prompt_ids[-loaded.config.block_size:]], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    # The streamed text is the progress on a terminal; written to a file, a bar on stderr counts the tokens.
    with progress_bar(args.num_samples * args.max_new_tokens, "sample", unit="tok",
                      quiet=args.quiet or sys.stdout.isatty()) as bar:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            sys.stdout.write(args.prompt)
            decoder = StreamDecoder(tok)
            for nxt in model.stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, eot_id=loaded.eot_id, generator=gen):
                token = int(nxt[0, 0])
                bar.update(1)
                if token == loaded.eot_id:
                    break
                sys.stdout.write(decoder.push(token))
                sys.stdout.flush()
            sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> None:
    dist.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
