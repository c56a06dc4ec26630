"""``edgesmith generate MODEL --prompt "..."``: try a decoder (or its compressed artifact) before shipping
it: streamed text, the chat template for instruct models, greedy or sampled, stop tokens and strings."""

from __future__ import annotations

import sys

import typer

from edgesmith.cli.common import JSON_OUT, err_console, print_json
from edgesmith.cli.root import app


@app.command("generate")
def generate_command(
    model: str = typer.Argument("smollm2", help="A causal LM: 'smollm2', a .gguf file, a Hugging Face folder, "
                                "or an edgesmith decoder artifact (ONNX with a KV cache)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt; '-' reads it from standard input."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy; above 0 samples."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest set with this probability (1: off)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling (reproducible output)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this text (repeatable); EOS tokens always stop."),
    chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Apply the tokenizer's chat template "
                                     "(default: when the tokenizer has one)."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    runtime: str | None = typer.Option(None, "--runtime", help="llamacpp runs a .gguf as it is in llama.cpp "
                                       "(edgesmith[llamacpp]); ortgenai an ORT GenAI folder (export --to genai) in "
                                       "ONNX Runtime GenAI; default: onnxruntime for ONNX, torch otherwise."),
    draft: str | None = typer.Option(None, "--draft", help="Speculative decoding (greedy) with this draft decoder "
                                     "(the target's tokenizer; see edgesmith speculate)."),
    prompt_lookup: int | None = typer.Option(None, "--prompt-lookup", help="Speculative decoding (greedy) by n-gram "
                                             "prompt lookup with n-grams of up to N tokens."),
    num_tokens: int = typer.Option(4, "--num-tokens", help="Tokens drafted per target call (with --draft or "
                                   "--prompt-lookup)."),
    as_json: bool = JSON_OUT,
) -> None:
    """Generate text from a causal LM or its ONNX export, streamed as it is decoded."""
    from edgesmith.runtimes.generation import GenerationConfig, generate, open_decoder

    text = sys.stdin.read() if prompt == "-" else prompt
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop_strings=list(stop), chat=chat)
    artifact, session = open_decoder(model, runtime=runtime, threads=threads)
    drafter, spec = None, None
    try:
        def stream(piece: str) -> None:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()

        if draft is not None or prompt_lookup is not None:
            from edgesmith.runtimes.speculative import make_drafter, speculative_generate

            drafter = make_drafter(session, draft=draft, prompt_lookup=prompt_lookup,
                                   target_tokenizer=artifact.tokenizer, threads=threads)
            result, spec = speculative_generate(session, artifact.tokenizer, text, drafter, cfg,
                                                num_tokens=num_tokens, on_token=stream)
        else:
            result = generate(session, artifact.tokenizer, text, cfg, on_token=stream)
    finally:
        if drafter is not None:
            drafter.close()
        session.close()
    speculation = None if spec is None else {
        "draft": drafter.name, "num_tokens": num_tokens, "target_calls": spec.target_calls,
        "acceptance_rate": spec.acceptance_rate, "tokens_per_call": spec.tokens_per_call}
    if as_json:
        print_json({"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                    "ttft_ms": result.ttft_ms, "decode_tokens_per_s": result.decode_tokens_per_s,
                    "finish_reason": result.finish_reason, "providers": result.providers,
                    **({"speculative": speculation} if speculation else {})})
        return
    sys.stdout.write("\n")
    speed = result.decode_tokens_per_s
    err_console.print(f"[dim]{len(result.token_ids)} tokens ({result.finish_reason}), prompt {result.prompt_tokens} "
                      f"tokens, TTFT {result.ttft_ms:.0f} ms"
                      + (f", decode {speed:.1f} tokens/s" if speed else "")
                      + f", {', '.join(result.providers)}"
                      + (f", {speculation['draft']}: {speculation['tokens_per_call']:.2f} tokens per target call"
                         if speculation and speculation["tokens_per_call"] else "")
                      + "[/]", highlight=False)
