"""scikit-learn interface: ``BatchNormScaler``, a transformer for pipelines (needs scikit-learn).

``import cynorm`` does not import this module; ``import cynorm.sklearn`` needs scikit-learn
(``pip install cynorm[sklearn]``).
"""
from numbers import Real

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import FLOAT_DTYPES, check_is_fitted, validate_data

from ._moments import moments
from .functional import batch_norm

__all__ = ["BatchNormScaler"]


class BatchNormScaler(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Standardize features as BatchNorm does: ``(x - mean) / sqrt(var + eps)`` per column.

    The statistics are exact over everything fitted (``partial_fit`` merges batches by Chan's
    formula, in float64, for any float dtype of X) and the transform runs in cynorm's kernels,
    keeping float32 as float32.  With ``eps=1e-5`` it is BatchNorm in eval mode with fitted
    statistics; with ``eps=0`` it is StandardScaler (a constant column is centered, not scaled).

    Parameters
    ----------
    eps : float >= 0, default 1e-5
        Added to the variance, as in torch.nn.BatchNorm1d.
    copy : bool, default True
        False lets transform and inverse_transform write into X when it is a float ndarray.

    Attributes
    ----------
    mean_, var_ : ndarray (n_features,)
        Mean and biased variance of the fitted data (float64).
    scale_ : ndarray (n_features,)
        ``sqrt(var_ + eps)``, or 1 where that is 0.
    moments_ : cynorm.Moments
        The mergeable statistics behind them.
    n_samples_seen_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of str, when X had column names
    """

    _parameter_constraints = {
        "eps": [Interval(Real, 0, None, closed="left")],
        "copy": ["boolean"],
    }

    def __init__(self, *, eps=1e-5, copy=True):
        self.eps = eps
        self.copy = copy

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        return tags

    def _reset(self):
        for name in ("moments_", "mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_",
                     "feature_names_in_"):
            if hasattr(self, name):
                delattr(self, name)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Statistics of X alone (y is ignored)."""
        self._reset()
        return self._accumulate(X)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add the rows of X to the statistics fitted so far (y is ignored)."""
        return self._accumulate(X)

    def _accumulate(self, X):
        first = not hasattr(self, "moments_")
        X = validate_data(self, X, reset=first, dtype=FLOAT_DTYPES)
        batch = moments(X, axis=0)
        self.moments_ = batch if first else self.moments_.merge(batch)
        self.n_samples_seen_ = int(self.moments_.count[0])
        self.mean_ = self.moments_.mean
        self.var_ = self.moments_.var(0)
        self.scale_ = np.sqrt(self._denominator())
        return self

    def _denominator(self):
        v = self.var_ + self.eps
        return np.where(v > 0, v, 1.0)

    def _input(self, X, copy):
        check_is_fitted(self)
        copy = self.copy if copy is None else copy
        X = validate_data(self, X, reset=False, dtype=FLOAT_DTYPES, copy=False)
        in_place = not copy and X.flags.writeable
        return X, in_place

    def transform(self, X, copy=None):
        """``(X - mean_) / scale_`` in X's float dtype (float64 for integer X)."""
        X, in_place = self._input(X, copy)
        return batch_norm(X, self.mean_, self._denominator(), training=False, eps=0.0,
                          out=X if in_place else None)

    def inverse_transform(self, X, copy=None):
        """``X * scale_ + mean_``, computed in float64, returned in X's float dtype."""
        X, in_place = self._input(X, copy)
        y = np.asarray(X, dtype=np.float64) * self.scale_ + self.mean_
        if in_place:
            X[...] = y
            return X
        return y.astype(X.dtype, copy=False)
