"""Measuring a build: accuracy against the alternatives (`mass-export eval`) and cost against a plain encoder
pass (`mass-export bench`)."""

# The commands' defaults, shared with evaluate() and run_bench(). They live here, not in the torch-side modules, so
# the CLI reads them without importing torch.
EVAL_TA_LAMBDA = 0.3  # task arithmetic's scaling
EVAL_BATCH_SIZE = 256
BENCH_BATCH_SIZES = (1, 16)
BENCH_WARMUP = 2  # untimed rounds per batch size
BENCH_ITERATIONS = 10  # timed rounds per batch size
BENCH_STREAMS = ("homogeneous", "mixed")
BENCH_SEED = 0  # of the mixed stream's draws
