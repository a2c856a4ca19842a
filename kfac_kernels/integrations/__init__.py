"""Drop-in adapters that run other attribution libraries' heavy stages on kfac_kernels ops.

* ``kfac_kernels.integrations.kronfluence.use_kfac_kernels()``: a context manager under which kronfluence 1.0.x
  computes its activation covariances, EK-FAC eigenvalue corrections (lambda) and pairwise scores with
  ``conv_covariance`` / ``linear_covariance``, ``eigenvalue_correction`` and ``pairwise_scores``.
* ``kfac_kernels.integrations.dattri.EKFACAttributor``: dattri's ``IFAttributorEKFAC`` with the inverse-FIM
  product of the test representations on ``kfac_kernels.precondition``.

Each submodule imports its library on import; this package imports neither.
"""
