"""Experiments and quality measurements that are commands (``python -m accel.experiments.NAME``): they train,
generate and evaluate, so they sit above ``accel.eval`` and the miniature world they measure.

- :mod:`.miniature_quality`: the miniature's quality figures (the pixel checker of :mod:`accel.miniature.check` on
  dataset images, VAE round trips and generations; its CLIP zero-shot; its generations judged).
- :mod:`.scalelong`: the ScaleLong training experiment (``make scalelong``).
"""
