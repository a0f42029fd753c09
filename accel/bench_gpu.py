"""The GPU benchmark's old module name, kept while callers move to :mod:`accel.bench.gpu` (``accel bench --gpu`` in
:mod:`accel.cli` imports it by this name). It is not a copy: importing it binds the name to the package's module
itself, so a name read, set or monkeypatched through either is the same. It imports from the package only; nothing
in the package imports it. Once no caller uses this name, delete the file."""
import sys

from accel.bench import gpu

sys.modules[__name__] = gpu
