"""Synthesize: chat training data from a teacher model (`slm synth`), in the manner of Orca 2 and self-instruct.

    prompts.py     seed prompts from text / JSONL / CSV files; self-instruct expansion (ask, parse)
    strategies.py  the named system prompts a teacher answers under, and the generic one rows are saved with
    teachers.py    the teacher: a model folder (our batching engine), a GGUF file (llama.cpp) or an OpenAI URL
    filters.py     why an answer or a new instruction is dropped; exact and near-duplicate detection
    run.py         the verb: pool -> jobs -> answers -> filters -> append-only JSONL, resumable, with a report
"""
