"""The pipeline core: bookkeeping on an injected clock (core, clock) and the threads
around it (runner): frames in, exactly one verdict out per frame, in per-camera order."""
