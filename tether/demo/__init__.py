"""The embedded default task of ``tether demo``: SmolLM2-135M, movie-review prompts, a sentiment reward."""
