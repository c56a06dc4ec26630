"""The torchrun entry point (``python -m edgesmith.training PASS MODEL ...``), one pass in every process.

``python -m edgesmith.training PASS MODEL --options JSON --output FOLDER`` runs one pass under the
process group torchrun sets up, e.g. ``torchrun --nproc_per_node 2 -m edgesmith.training distill ...``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edgesmith.training.checkpoints import save_weights
from edgesmith.training.ddp import init_distributed, world


def main(argv: list[str] | None = None) -> int:
    """``python -m edgesmith.training PASS MODEL --options JSON --output FOLDER [--rank-weights DIR]``.

    Under ``torchrun --nproc_per_node N`` every process runs the pass (DDP inside the loop); rank 0
    saves the result to ``--output``. ``--rank-weights`` makes every rank write its final weights
    to ``DIR/rank<r>.safetensors`` (to check that all ranks agree).
    """
    parser = argparse.ArgumentParser(prog="python -m edgesmith.training", description=main.__doc__)
    parser.add_argument("pass_name")
    parser.add_argument("model")
    parser.add_argument("--options", default="{}", help="the pass's options as JSON")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rank-weights", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("EDGESMITH_VERBOSE") else logging.WARNING)

    from edgesmith.artifacts import load
    from edgesmith.errors import EdgesmithError
    from edgesmith.passes import Context, get_pass

    created = init_distributed()
    try:
        model = load(args.model)
        out = get_pass(args.pass_name)(**json.loads(args.options))(model, Context(source=model, progress=False))
        rank, _ = world()
        if args.rank_weights is not None:
            args.rank_weights.mkdir(parents=True, exist_ok=True)
            save_weights(out.module, args.rank_weights / f"rank{rank}.safetensors")
        if rank == 0:
            out.save(args.output)
            print(json.dumps({"output": str(args.output), "report": out.lineage[-1]["report"]}, default=str))
    except EdgesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
