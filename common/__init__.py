"""What every layer of dfq may use: errors with exit codes, file writing, progress, processes.

This package imports nothing else of dfq (the layers run common <- kernels <- pipeline <- export
<- the command-line/job layer in ``dfq/``).
"""
