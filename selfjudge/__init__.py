"""selfjudge: self-supervised judge verification for speculative decoding.

The library (this package, minus the stage sub-packages ``data_gen``, ``train``, ``eval`` and
``pipeline``) imports no hydra, wandb or argparse: stages turn their config into plain Python values
and call into it.
"""

__version__ = "0.1.0"
