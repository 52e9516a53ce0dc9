"""Text generation from the final CVFP model or a baseline: `cvfp generate` / `python -m cvfp.generate`.

A prompt is encoded as a new document's user turn, the way the cache lays out documents
(`cvfp.data.tokenizer.encode_prompt`): `<|endoftext|> <|user|> text <|assistant|>` (the boundary
token precedes every document of the stream but the first), so the model continues as the
assistant, in the format it trained on; `reply` is prompt text in, continuation text out.
Byte-level BPE encodes any text, characters the training data never held included.

CVFP reads the prompt with one exact sequential scan (`cvfp.scan.exact_scan`) and then
samples step by step with `model.step`, its context the only memory. The GRU carries its
hidden state; the Transformer re-reads its last `seq_len` tokens at every step (no cache:
the models are small). Sampling: temperature (0 = greedy), top-k (0 = off), a seeded
torch.Generator; generation stops after `max_new_tokens`, or earlier at a stop token
(`<|endoftext|>`, a document's end, unless told otherwise), which is kept in the output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer

from cvfp.baselines import load_baseline
from cvfp.data.corpus import BOUNDARY_TOKEN
from cvfp.data.tokenizer import decode, encode_prompt, load_tokenizer, special_token_ids
from cvfp.errors import ArtifactError, ParamsError
from cvfp.io import require_fresh, sha256_file
from cvfp.model import load_model
from cvfp.runtime import resolve_device
from cvfp.scan import exact_scan

MODELS = ("cvfp", "gru", "transformer")
CHECKPOINTS = {"cvfp": "models/phase2.pt", "gru": "models/gru.pt", "transformer": "models/transformer.pt"}
TOKENIZER = "data/tokenizer/tokenizer.json"


class CVFPGenerator:
    """The CVFP model as a generator: the context vector is its whole state."""

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.context: torch.Tensor | None = None

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Scan the prompt from c = 0; logits (V,) for the token after it."""
        embeddings = self.model.embed(torch.tensor(ids, device=self.device))
        contexts, token_outs = exact_scan(self.model, embeddings, with_token_out=True)
        self.context = contexts[-1:]
        return self.model.logits(contexts[-1], token_outs[-1])

    def advance(self, token_id: int) -> torch.Tensor:
        """One model step on the sampled token; logits (V,) for the next."""
        embedding = self.model.embed(torch.tensor([token_id], device=self.device))
        self.context, token_out = self.model.step(self.context, embedding)
        return self.model.logits(self.context, token_out)[0]


class BaselineGenerator:
    """A GRU (hidden state carried) or Transformer (last seq_len tokens re-read) as a generator."""

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.state = None
        self.history: list[int] = []

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.history, self.state = list(ids), None
        return self._read(ids)

    def advance(self, token_id: int) -> torch.Tensor:
        self.history.append(token_id)
        return self._read([token_id])

    def _read(self, new_ids: list[int]) -> torch.Tensor:
        """Logits (V,) after the history: the GRU reads the new ids on from its state, the Transformer
        re-reads its last seq_len tokens."""
        if self.model.carries_state:
            logits, self.state = self.model(torch.tensor([new_ids], device=self.device), self.state)
        else:
            logits, _ = self.model(torch.tensor([self.history[-self.model.args.seq_len:]], device=self.device))
        return logits[0, -1]


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """One token id from logits (V,): greedy at temperature 0, else softmax(logits / T) over the top k."""
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(generator, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, stop_ids: Iterable[int] = ()) -> list[int]:
    """Sample up to `max_new_tokens` ids after the prompt; stops early after a stop id (kept in the output)."""
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rng = torch.Generator().manual_seed(seed)
    stop_ids = set(stop_ids)
    new: list[int] = []
    logits = generator.prefill(list(prompt_ids))
    while len(new) < max_new_tokens:
        new.append(sample(logits, temperature, top_k, rng))
        if new[-1] in stop_ids or len(new) == max_new_tokens:
            break
        logits = generator.advance(new[-1])
    return new


def reply(generator, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
          stop_at_boundary: bool = True) -> str:
    """The continuation of `prompt`, encoded as a user turn (`encode_prompt`), decoded as text (`decode`);
    it stops after the next <|endoftext|> unless `stop_at_boundary` is False."""
    stop = (special_token_ids(tokenizer)[BOUNDARY_TOKEN],) if stop_at_boundary else ()
    ids = generate(generator, encode_prompt(tokenizer, prompt), max_new_tokens, temperature, top_k, seed, stop)
    return decode(tokenizer, ids)


def load_generator(kind: str, checkpoint: str | Path | None = None, device: torch.device | str = "cpu",
                   tokenizer_path: str | Path | None = None):
    """The generator of a trained model: `cvfp` (final Phase-2 model), `gru` or `transformer`.

    With `tokenizer_path`, a checkpoint built with another tokenizer is refused (stale).
    """
    if kind not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    path = checkpoint or CHECKPOINTS[kind]
    stage = "phase2" if kind == "cvfp" else "baselines"
    model, payload = load_model(path, stage, device) if kind == "cvfp" else load_baseline(path, device)
    if tokenizer_path is not None:
        require_fresh(path, stage, {f"tokenizer {tokenizer_path}": (payload.get("tokenizer_sha256"),
                                                                    sha256_file(tokenizer_path))}, unrecorded_ok=True)
    return CVFPGenerator(model) if kind == "cvfp" else BaselineGenerator(model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the user's message; the model answers as the assistant")
    parser.add_argument("--model", choices=MODELS, default="cvfp", help="which trained model (default: cvfp)")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="0 = the whole vocabulary (default: 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stop", action="store_true", help=f"do not stop at {BOUNDARY_TOKEN}")
    parser.add_argument("--checkpoint", type=Path,
                        help="default: models/phase2.pt, models/gru.pt or models/transformer.pt")
    parser.add_argument("--tokenizer", type=Path, default=Path(TOKENIZER))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """Print the continuation of --prompt; a missing or stale artifact is a one-line error (exit 2)."""
    if args.max_new_tokens < 1 or args.top_k < 0 or args.temperature < 0:
        print("error: --max-new-tokens must be >= 1, --top-k >= 0 and --temperature >= 0", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        model = load_generator(args.model, args.checkpoint, resolve_device(args.device), args.tokenizer)
    except (ArtifactError, ParamsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(reply(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                stop_at_boundary=not args.no_stop))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvfp.generate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
