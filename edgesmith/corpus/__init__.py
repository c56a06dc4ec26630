"""The shipped corpus: WordNet 3.0 example sentences with their lexicographer categories (scripts/build_corpus.py rebuilds it; the licence is kept beside it)."""
