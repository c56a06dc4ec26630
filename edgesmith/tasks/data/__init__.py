"""edgesmith's offline task set: lm-eval task YAMLs, their data (JSONL) and licences; ``loader``
builds each task's documents in memory (lm-eval's ``custom_dataset``)."""
