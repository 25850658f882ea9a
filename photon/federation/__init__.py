"""The algorithm: messages and their checks, codecs and compression, the round (aggregator, async rounds, fold,
clipping, outer), server and client state, a client's task (worker, faults), the run loop. No Flower, no benchmarks."""
