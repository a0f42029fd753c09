"""int8 kernels: Triton (GPU) and the pure-torch reference each one is tested against. Imported as
``accel.kernels``."""
