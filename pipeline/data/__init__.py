"""Data: the recipe's data section, problems, row files, traces, benchmarks, the testbed task, tokenizer, grading."""
