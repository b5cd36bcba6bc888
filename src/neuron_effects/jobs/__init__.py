"""The workflow's jobs: one module per rule family, each function reads files, calls the math
and writes files atomically; :mod:`.setup` holds what every job shares.

The Snakemake scripts in ``workflow/scripts/`` are thin wrappers around these (the job's set-up
and one call), and the functions work without Snakemake too (tests call them directly).
"""
