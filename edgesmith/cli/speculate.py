"""``edgesmith speculate TARGET --draft DRAFT | --prompt-lookup N``: measure speculative decoding
of a decoder against its plain greedy decoding on the same runtime, write the report, and refuse
(exit 3) when it does not pay."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgesmith.cli.common import JSON_OUT, console, print_json
from edgesmith.cli.root import app


@app.command("speculate")
def speculate_command(
    target: str = typer.Argument(..., help="The target decoder: an edgesmith ONNX decoder folder, 'smollm2' or a "
                                 "Hugging Face folder (runs in PyTorch)."),
    draft: str | None = typer.Option(None, "--draft", help="A draft decoder with the target's tokenizer (a pruned "
                                     "or distilled copy)."),
    prompt_lookup: int | None = typer.Option(None, "--prompt-lookup", help="Draft by n-gram prompt lookup with "
                                             "n-grams of up to N tokens (no draft model)."),
    num_tokens: int = typer.Option(4, "--num-tokens", "-k", help="Tokens drafted per target call."),
    min_speedup: float = typer.Option(1.0, "--min-speedup", help="Refuse (exit 3) below this net decode speedup, "
                                      "or when the interval does not exclude a slowdown."),
    task: str = typer.Option("summarise", "--task", help="Input-grounded prompts from the shipped corpus: "
                             "summarise, repeat or continue."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Your own prompt(s) instead (repeatable)."),
    prompts: int = typer.Option(4, "--prompts", help="How many corpus prompts."),
    sentences: int = typer.Option(8, "--sentences", help="Corpus sentences per prompt's passage."),
    new_tokens: int = typer.Option(64, "--new-tokens", "-n", help="Most tokens generated per prompt."),
    rounds: int = typer.Option(3, "--rounds", help="Timed rounds (each prompt plain and speculative per round)."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate exactly --new-tokens tokens."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the report (JSON) here."),
    as_json: bool = JSON_OUT,
) -> None:
    """Measure speculative decoding (net decode speedup, acceptance, identical output) and gate it."""
    from edgesmith.profiling.speculative import check_speedup, profile_speculative
    from edgesmith.storage import write_json_atomic

    report = profile_speculative(target, draft=draft, prompt_lookup=prompt_lookup, num_tokens=num_tokens,
                                 task=task, prompts=list(prompt) or None, count=prompts, sentences=sentences,
                                 new_tokens=new_tokens, rounds=rounds, threads=threads, ignore_eos=ignore_eos,
                                 min_speedup=min_speedup)
    data = report.model_dump()
    if out is not None:
        write_json_atomic(out, data)
    if as_json:
        print_json(data)
    else:
        point, low, high = report.speedup
        accept = "-" if report.acceptance_rate is None else f"{100 * report.acceptance_rate:.0f}%"
        console.print(escape(
            f"{report.target} with {report.draft} (k={report.num_tokens}, {report.runtime}): "
            f"plain {report.plain_tokens_per_s:.1f} tokens/s, speculative {report.speculative_tokens_per_s:.1f} "
            f"tokens/s, net speedup {point:.2f}x [{low:.2f}, {high:.2f}], acceptance {accept}, "
            f"{report.tokens_per_call or 0:.2f} tokens per target call, output "
            f"{'identical' if report.identical else 'DIFFERENT'} on {report.prompts} prompt(s)"), highlight=False)
    check_speedup(report, min_speedup)
