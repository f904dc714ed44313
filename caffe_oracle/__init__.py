"""Real BVLC Caffe as the oracle: test and benchmark machinery, not part of the installed package.

`caffe_oracle.reference` runs jobs (weights, forward, shapes, timing) in the real-Caffe root
that `make caffe-env` builds; `caffe_oracle.reference_root` is its half that runs inside that
root. Tests import it from the clone's root (`pythonpath = .` in setup.cfg's [tool:pytest]);
benchmarks put the clone's root on `sys.path`.
"""
