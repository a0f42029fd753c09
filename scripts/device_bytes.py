"""The UNet's bytes on the device under W8A8 against fp16, on the real SD 1.5 and SDXL UNet architectures (random
weights, built on CPU; the bytes do not depend on the values): `accel.transforms.quantize.device_bytes`, i.e. every
parameter and buffer a quantized call reads (int8 weights, per-channel scales and zero points, weight sums, the
shift's border-tap sums, per-call tables, the float layers left unquantized), with the float layers kept for
`remove()` in host memory. The `w8a8` recipe's quantizer (conv_in / conv_out stay float); dynamic mode (a static
one adds its per-call tables: 8 bytes per layer and call, ~0.1 MiB at 50 calls).

    OMP_NUM_THREADS=1 python scripts/device_bytes.py [sd15] [sdxl] [miniature]   # a few minutes, ~12 GiB for SDXL
"""
import sys

import torch

import accel
from accel.bench.models import SD15_UNET, SDXL_UNET
from accel.transforms.quantize import device_bytes

torch.set_num_threads(1)
models = sys.argv[1:] or ["sd15", "sdxl"]
cfgs = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
for name in models:
    import diffusers

    if name == "miniature":  # the shipped weights (narrow layers: per-channel constants weigh more)
        unet = accel.miniature.load_pipeline().unet.to(torch.float16)
    else:
        unet = diffusers.UNet2DConditionModel(**cfgs[name]).eval().to(torch.float16)
    fp16 = device_bytes(unet)
    quant = accel.recipe.load("w8a8").transforms[0]
    quant = type(quant)(**{**quant.to_dict_fields(), "mode": "dynamic", "clip_search": False})
    h = accel.apply(unet, quant)
    q = device_bytes(unet)
    h.remove()
    print(f"| {name} | {fp16 / 2**20:.1f} | {q / 2**20:.1f} | {q / fp16:.3f}x |", flush=True)
    del unet, h
