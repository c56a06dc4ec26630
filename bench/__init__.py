"""edgesmith's benchmarks (BENCHMARKS.md), a package beside the library, not part of it.

- ``bench.core``: what every benchmark measures and writes the same way — rotating rounds
  (``core.rounds``), the machine record (``core.machine``), the results writer (``core.results``)
  and the shared command-line arguments (``core.cli``).
- The encoder comparison (``harness.py``, ``contenders.py``, ``benchmarks_md.py``) and the decoder
  peers (``llm_peers.py``: one worker process per contender, ``llm_worker.py``'s protocol; the
  contenders' table is ``llm_contenders.py``), plus the one-off studies (``*_minilm.py``, ``llm_*.py``).

Every script runs as ``.venv/bin/python bench/NAME.py`` (its first lines put the repository root on
``sys.path``, after the venv and ``PYTHONPATH``) or as ``.venv/bin/python -m bench.NAME``. This file
imports nothing: the decoder workers load it inside foreign venvs (llama.cpp's, Optimum's).
"""
