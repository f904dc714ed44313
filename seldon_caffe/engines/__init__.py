"""What serving (runtimes/) and converting (convert/) share about an engine or a model file.

Both packages import from here and never from each other: runtimes -> engines <- convert.
Each module imports its engine only when a function is called, so importing one costs nothing.
"""
