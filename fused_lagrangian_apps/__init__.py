"""The applications built on the ``fused_lagrangian`` library: the fairness demo (the main job), the position
paper's examples, the bundled data sets and the ``fused-lagrangian`` command.

They use only the library's public API; the library never imports them.  Their extra dependencies
(matplotlib for plots, tqdm for progress) come with ``pip install "fused_lagrangian[apps]"``.
"""
