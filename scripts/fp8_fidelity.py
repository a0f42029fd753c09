"""fp8 (e4m3) against int8 W8A8 fidelity on the miniature, measured as docs/BENCHMARKS.md's W8A8 rows are
(`accel.bench.common.quality_rows`: PSNR / SSIM / CLIP / latent MSE against the float pipeline on held-out prompts, 50
steps, guidance `miniature.GUIDANCE`, one `w8a8` calibration for every static row). fp8 runs as its exact CPU
emulation here (the same numbers `torch._scaled_mm` computes on a GPU, up to float accumulation order).

    OMP_NUM_THREADS=1 python scripts/fp8_fidelity.py [N_PROMPTS]      # default 32: about 10-15 minutes
"""
import sys

import torch

import accel
from accel import miniature
from accel.bench.common import baseline, quality_rows, with_calibration
from accel.calibrate import calibrate

torch.set_num_threads(1)
n_prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 32
pipe = miniature.load_pipeline()
cal = calibrate(pipe, "w8a8", steps=50, guidance=miniature.GUIDANCE, progress=False)
ends = ["conv_in", "conv_out"]  # as the w8a8 recipe
methods = [baseline(),
           with_calibration("w8a8 (int8 static)", "w8a8", cal),
           with_calibration("fp8 static", accel.Quantize(dtype="fp8", mode="static", exclude=ends), cal),
           with_calibration("fp8 static, symmetric activations",
                            accel.Quantize(dtype="fp8", mode="static", act_scheme="symmetric", exclude=ends), cal),
           with_calibration("int8 dynamic", accel.Quantize(mode="dynamic", exclude=ends), cal),
           with_calibration("fp8 dynamic", accel.Quantize(dtype="fp8", mode="dynamic", exclude=ends), cal)]
table, _ = quality_rows(pipe, methods, miniature.prompts(n_prompts, seed=0), 50, seed=0, progress=False)
print(table)
