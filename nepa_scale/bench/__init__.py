"""``nepa-scale bench``: the real training step, timed, against this device's measured matmul peak.

Each case (model x attention backend x ZeRO stage x compile scope x engine x data decoder) runs in its own process
(an out-of-memory case does not end the benchmark, and every case starts with fresh peak-memory
counters and compile caches). A case builds the run exactly as ``nepa-scale train`` does
(``Trainer.build_engine``: model, compile, DeepSpeed engine; ``Trainer.batches``: the data) and
calls the loop's own ``Trainer.train_step``; ``engine: plain`` swaps DeepSpeed for a plain PyTorch step on the same
model (fp32 weights, bf16 autocast, fused AdamW) to measure what the engine costs.

Reported per case: img/s (median of the repeats, and their spread), achieved TFLOP/s under the
run's FLOP convention, MFU against the matmul peak measured here, peak memory, the step's
breakdown on the device timeline (data wait, forward, backward, optimizer), the loader's own rate
with the case's workers, and how many graphs torch.compile produced.

bench/options.py: the command's options; bench/case.py: one case and its run config;
bench/child.py: a case run and timed (in its own process); bench/device.py: the device's measured
peak, its facts and profiles; bench/runner.py: the cases one by one, the table and the JSON.
"""
