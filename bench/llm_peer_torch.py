"""PyTorch FP32 eager, the baseline decoder contender (edgesmith's ``.venv``; imports no edgesmith).

Two modes on one loaded model (one worker, so they share its peak RSS):

- ``loop`` (default): a manual greedy loop over the KV cache — prefill with ``logits_to_keep=1``
  (the LM head on the last position only), then one token per forward, ``argmax`` each step.
  The leanest thing PyTorch eager can do; its tokens are the FP32 source's greedy output that
  every other contender's agreement is measured against.
- ``generate``: Hugging Face ``generate`` (greedy, ``eos_token_id=None`` so the length is forced
  and EOS is not forbidden, just not a stop), timed with a streamer that stamps every token: what a
  user who does not write their own loop gets (its per-step logits processing costs a little).

    .venv/bin/python bench/llm_peer_torch.py measure PROMPTS --model FOLDER --threads 2 --mode loop
"""

from __future__ import annotations

import inspect
import sys
import time

_t0 = time.perf_counter()
import llm_worker
import torch
from transformers import AutoModelForCausalLM

IMPORT_S = time.perf_counter() - _t0


class _Stamps:
    """A generate() streamer that records when each new token id is known."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self.stamps.append(now)

    def end(self) -> None:
        pass


class TorchBackend:
    def __init__(self, folder: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.folder, self.threads = folder, threads
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        # transformers 5.2x renamed past_key_values → cache (the old name warns, and goes in 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def info(self) -> dict:
        import transformers

        return {"runtime": "pytorch", "provider": "cpu (eager)", "torch": torch.__version__,
                "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                "model": self.folder, "dtype": "float32"}

    @torch.inference_mode()
    def generate(self, ids: list[int], new_tokens: int, mode: str | None):
        prompt = torch.tensor([ids], dtype=torch.long)
        if (mode or "loop") == "generate":
            return self._hf_generate(prompt, new_tokens)
        stamps = [time.perf_counter()]
        out = self.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        tokens = [int(tok)]
        stamps.append(time.perf_counter())
        past = self._cache(out)
        for _ in range(new_tokens - 1):
            out = self.model(input_ids=tok.view(1, 1), use_cache=True, **{self.cache_kw: past})
            past = self._cache(out)
            tok = out.logits[0, -1].argmax()
            tokens.append(int(tok))
            stamps.append(time.perf_counter())
        return tokens, stamps

    @staticmethod
    def _cache(out):
        return out.cache if "cache" in out else out.past_key_values

    def _hf_generate(self, prompt: torch.Tensor, new_tokens: int):
        streamer = _Stamps()
        start = time.perf_counter()
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None,
                                  pad_token_id=self.model.config.pad_token_id, streamer=streamer)
        if out.shape[1] - prompt.shape[1] != new_tokens:
            raise RuntimeError(f"generate stopped after {out.shape[1] - prompt.shape[1]} of {new_tokens} tokens")
        return streamer.tokens, [start] + streamer.stamps

    @torch.inference_mode()
    def logits(self, ids: list[int]):
        return self.model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


def _args(p) -> None:
    p.add_argument("--model", required=True, help="FP32 Hugging Face folder")


if __name__ == "__main__":
    sys.exit(llm_worker.main(lambda a: TorchBackend(a.model, a.threads), sys.argv[1:], IMPORT_S, _args))
