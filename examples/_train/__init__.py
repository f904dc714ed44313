"""Training helpers shared by the examples (not part of the seldon_caffe package).

`caffe_solver.train` runs a real Caffe solver in the reference root (`make caffe-env`);
`load_hooks` imports an example's hooks.py so that training builds its features with the
very functions the service runs, which is what keeps training and serving from drifting.
"""

from .caffe_solver import Sparse, load_hooks, load_script, train, training_net

__all__ = ["Sparse", "load_hooks", "load_script", "train", "training_net"]
